"""The Optax optimizer of a run, built from :class:`~jaxtune.config.OptimizerConfig`.

``make_optimizer(cfg, total_steps, params)`` returns one ``GradientTransformation``:

    partition(
      trainable: clip_by_global_norm -> {adamw | adafactor | lion | sgd | muon} direction
                 -> add_decayed_weights(weight_decay, mask=not no_decay)
                 -> scale_by_learning_rate(schedule),
      frozen:    set_to_zero,                      # only when optimizer.freeze is set
    )

Parameters are named by their path in the tree, keys joined with '.', e.g.
``model.layers.0.self_attn.q_proj.kernel`` (scanned layers have no layer index). ``no_decay``
and ``freeze`` are regexes searched in that path. Clipping sits inside the trainable branch, so
frozen parameters neither count towards the global norm nor hold optimizer state.

Weight decay is decoupled and multiplied by the scheduled learning rate for every optimizer
(the PyTorch/optax AdamW convention), so it follows warmup and decay.

``state_dtype`` (float32 | bfloat16) is honoured for first moments: AdamW's ``mu``, Lion's
momentum, SGD's momentum trace, Muon's momentum (and its Adam fallback's ``mu``). Second
moments (AdamW ``nu``, Adafactor's factored statistics) stay float32: an EMA with b2=0.999
changes ``nu`` by 0.1% a step, below bfloat16's resolution (0.4%), so a bf16 ``nu`` would stop
updating without stochastic rounding.

``params`` may be an ``nnx.State`` (leaves are ``nnx.Variable``s; their ``logical_axes`` tell
Muon which axes form the matrix) or any pytree of arrays.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from optax import contrib as optax_contrib

from jaxtune.config import ConfigError, OptimizerConfig

# Muon's width scaling (sqrt(max(1, fan_out / fan_in))) is not re-exported by optax.contrib.
_scale_by_shape = getattr(optax_contrib, "scale_by_shape", None) or (
    optax_contrib._muon.scale_by_shape
)

#: Muon orthogonalises hidden matrices only; embeddings and the LM head (anything with a
#: vocabulary axis, or so named) use Adam, as in the Muon reference recipes.
_MUON_SKIP = re.compile(r"embed|lm_head|wte|wpe")


# --------------------------------------------------------------------------- schedules


def make_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Learning rate as a function of the optimizer step count (0-based).

    All schedules warm up linearly from 0 over ``warmup_steps`` (step ``s < warmup`` gets
    ``peak * s / warmup``), then: ``constant`` stays at the peak; ``linear`` and ``cosine`` go
    from the peak at the end of warmup to ``peak * min_lr_ratio`` at ``total_steps``; ``wsd``
    stays at the peak until the last ``decay_fraction`` of all steps and decays linearly to
    ``peak * min_lr_ratio`` at ``total_steps``.
    """
    _check_config(cfg)
    if total_steps <= 0:
        raise ConfigError(f"The schedule needs a positive number of steps, got {total_steps}.")
    peak = float(cfg.learning_rate)
    floor = peak * float(cfg.min_lr_ratio)
    warmup = min(int(cfg.warmup_steps), total_steps)
    if cfg.schedule == "wsd":
        decay_start = max(warmup, total_steps - round(cfg.decay_fraction * total_steps))
    else:
        decay_start = warmup
    span = max(total_steps - decay_start, 1)
    name = cfg.schedule

    def schedule(count: jax.Array) -> jax.Array:
        step = jnp.asarray(count, jnp.float32)
        warm = peak * step / max(warmup, 1)
        frac = jnp.clip((step - decay_start) / span, 0.0, 1.0)
        if name == "constant":
            main = jnp.full_like(step, peak)
        elif name == "cosine":
            main = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(math.pi * frac))
        else:  # linear, wsd
            main = peak + (floor - peak) * frac
        return jnp.where(step < warmup, warm, main)

    return schedule


# --------------------------------------------------------------------------- paths and masks


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def path_str(keypath: Sequence[Any]) -> str:
    """``(DictKey('model'), DictKey('layers'), SequenceKey(0), ...)`` -> ``model.layers.0...``.

    The ``.value`` attribute step that leads into an ``nnx.Variable`` is left out, so a path
    is the same whether the tree holds Variables or bare arrays.
    """
    parts = []
    for k in keypath:
        if isinstance(k, jax.tree_util.GetAttrKey):
            if k.name == "value":
                continue
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            parts.append(str(k.key))
        else:
            parts.append(str(k))
    return ".".join(parts)


def map_params(fn: Callable[[str, Any], Any], params: Any) -> Any:
    """``fn(path, leaf)`` over parameters (a Variable counts as one leaf): a prefix tree of
    ``params`` usable as an Optax mask or label tree."""
    return jax.tree_util.tree_map_with_path(
        lambda kp, leaf: fn(path_str(kp), leaf), params, is_leaf=_is_variable
    )


def param_paths(params: Any) -> list[str]:
    """Every parameter's path, in tree order."""
    leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_variable)[0]
    return [path_str(kp) for kp, _ in leaves]


def _compile(patterns: Sequence[str], key: str) -> list[re.Pattern]:
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except re.error as e:
            raise ConfigError(f"'{key}' holds '{p}', which is not a valid regex: {e}.") from None
    return compiled


def _matches(patterns: Sequence[re.Pattern], path: str) -> bool:
    return any(p.search(path) for p in patterns)


def decay_mask_fn(cfg: OptimizerConfig) -> Callable[[Any], Any]:
    """Params -> mask tree: True where weight decay applies (path matches no ``no_decay``)."""
    patterns = _compile(cfg.no_decay, "optimizer.no_decay")
    return lambda params: map_params(lambda path, _: not _matches(patterns, path), params)


def frozen_labels_fn(cfg: OptimizerConfig) -> Callable[[Any], Any]:
    """Params -> label tree: 'frozen' where the path matches a ``freeze`` regex, else
    'trainable'."""
    patterns = _compile(cfg.freeze, "optimizer.freeze")
    return lambda params: map_params(
        lambda path, _: "frozen" if _matches(patterns, path) else "trainable", params
    )


def _check_freeze(cfg: OptimizerConfig, params: Any) -> None:
    """A freeze regex that matches nothing is a typo; freezing everything leaves nothing to
    train. Both fail here, before any work, naming the pattern and some real paths."""
    paths = param_paths(params)
    patterns = _compile(cfg.freeze, "optimizer.freeze")
    for pattern in patterns:
        if not any(pattern.search(p) for p in paths):
            raise ConfigError(
                f"'optimizer.freeze' pattern '{pattern.pattern}' matches no trainable parameter. "
                f"Parameter paths look like: {', '.join(paths[:6])}."
            )
    if paths and all(_matches(patterns, p) for p in paths):
        raise ConfigError(
            f"'optimizer.freeze' ({cfg.freeze}) freezes every trainable parameter; nothing would "
            "train. Narrow the patterns."
        )


def _check_config(cfg: OptimizerConfig) -> None:
    checks = [
        (cfg.learning_rate >= 0, "optimizer.learning_rate", "must be >= 0"),
        (cfg.warmup_steps >= 0, "optimizer.warmup_steps", "must be >= 0"),
        (0.0 <= cfg.decay_fraction <= 1.0, "optimizer.decay_fraction", "must be in [0, 1]"),
        (0.0 <= cfg.min_lr_ratio <= 1.0, "optimizer.min_lr_ratio", "must be in [0, 1]"),
        (cfg.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0"),
        (cfg.max_grad_norm >= 0, "optimizer.max_grad_norm", "must be >= 0 (0 disables)"),
        (0.0 <= cfg.b1 < 1.0, "optimizer.b1", "must be in [0, 1)"),
        (0.0 <= cfg.b2 < 1.0, "optimizer.b2", "must be in [0, 1)"),
        (0.0 <= cfg.momentum < 1.0, "optimizer.momentum", "must be in [0, 1)"),
    ]
    for ok, key, what in checks:
        if not ok:
            raise ConfigError(f"'{key}' {what}; got {_value(cfg, key)}.")
    choices = {
        "name": ("adamw", "adafactor", "lion", "sgd", "muon"),
        "schedule": ("constant", "linear", "cosine", "wsd"),
        "state_dtype": ("float32", "bfloat16"),
    }
    for field, allowed in choices.items():
        if getattr(cfg, field) not in allowed:
            raise ConfigError(
                f"'optimizer.{field}' is '{getattr(cfg, field)}'; use one of {', '.join(allowed)}."
            )


def _value(cfg: OptimizerConfig, key: str) -> Any:
    return getattr(cfg, key.split(".")[-1])


# --------------------------------------------------------------------------- optimizers


def _muon_dims(path: str, leaf: Any) -> optax_contrib.MuonDimensionNumbers | None:
    """Which axes of a parameter form Muon's matrix (None: not a Muon parameter, use Adam).

    With ``logical_axes`` (an ``nnx.Variable``): 'layers' axes are batch axes; the rest must be
    at least two axes without 'vocab'. A trailing 'embed' is the output (``o_proj``,
    ``down_proj``: reduce over heads x head_dim or mlp); otherwise the first axis is the input
    and the rest the output (``q_proj``: embed -> heads x head_dim). Without metadata, only
    2-D leaves are matrices.
    """
    value = leaf.get_value() if _is_variable(leaf) else leaf
    names = getattr(leaf, "logical_axes", None) if _is_variable(leaf) else None
    if _MUON_SKIP.search(path):
        return None
    if names is None or len(names) != value.ndim:
        return optax_contrib.MuonDimensionNumbers(0, 1) if value.ndim == 2 else None
    if "vocab" in names:
        return None
    axes = [i for i, n in enumerate(names) if n != "layers"]
    if len(axes) < 2:
        return None
    if names[axes[-1]] == "embed":
        return optax_contrib.MuonDimensionNumbers(tuple(axes[:-1]), (axes[-1],))
    return optax_contrib.MuonDimensionNumbers((axes[0],), tuple(axes[1:]))


def _muon(cfg: OptimizerConfig, params: Any, mu_dtype: Any) -> optax.GradientTransformation:
    """Muon on hidden matrices, Adam on the rest; both as directions (no lr, no decay)."""
    dims_by_path = {}
    for kp, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_variable)[0]:
        dims_by_path[path_str(kp)] = _muon_dims(path_str(kp), leaf)

    def labels(tree: Any) -> Any:
        return map_params(lambda path, _: "muon" if dims_by_path.get(path) else "adam", tree)

    def dims(tree: Any) -> Any:
        # Called by optax on the (masked) updates, whose leaves are arrays: map the leaves
        # themselves so the result has exactly the updates' structure.
        return jax.tree_util.tree_map_with_path(lambda kp, _: dims_by_path[path_str(kp)], tree)

    return optax.partition(
        {
            "muon": optax.chain(
                optax_contrib.scale_by_muon(beta=cfg.b1, mu_dtype=mu_dtype,
                                            weight_dimension_numbers=dims),
                _scale_by_shape(weight_dimension_numbers=dims),
            ),
            "adam": optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, mu_dtype=mu_dtype),
        },
        labels,
    )


def _direction(cfg: OptimizerConfig, params: Any) -> optax.GradientTransformation:
    """The optimizer's update direction before weight decay and the learning rate."""
    mu_dtype = jnp.dtype(cfg.state_dtype)
    if cfg.name == "adamw":
        return optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, mu_dtype=mu_dtype)
    if cfg.name == "lion":
        return optax.scale_by_lion(b1=cfg.b1, b2=cfg.b2, mu_dtype=mu_dtype)
    if cfg.name == "sgd":
        if cfg.momentum == 0:
            return optax.identity()
        return optax.trace(decay=cfg.momentum, accumulator_dtype=mu_dtype)
    if cfg.name == "adafactor":
        # optax.adafactor's defaults, minus its parameter-scale step (``relative_step``): the
        # configured learning rate is an absolute step size here, as for the other optimizers
        # (HF's fine-tuning advice: scale_parameter=False, relative_step=False).
        return optax.chain(optax.scale_by_factored_rms(), optax.clip_by_block_rms(1.0))
    if cfg.name == "muon":
        return _muon(cfg, params, mu_dtype)
    raise ConfigError(f"'optimizer.name' is '{cfg.name}'; use adamw, adafactor, lion, sgd, muon.")


def make_optimizer(
    cfg: OptimizerConfig, total_steps: int, params: Any
) -> optax.GradientTransformation:
    """The run's optimizer for the trainable ``params`` (see the module docstring)."""
    _check_config(cfg)
    _check_freeze(cfg, params)
    steps = [optax.clip_by_global_norm(cfg.max_grad_norm)] if cfg.max_grad_norm > 0 else []
    steps.append(_direction(cfg, params))
    if cfg.weight_decay > 0:
        steps.append(optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask_fn(cfg)))
    steps.append(optax.scale_by_learning_rate(make_schedule(cfg, total_steps)))
    trainable = optax.chain(*steps)
    if not cfg.freeze:
        return trainable
    return optax.partition(
        {"trainable": trainable, "frozen": optax.set_to_zero()}, frozen_labels_fn(cfg)
    )
