"""LoRA and QLoRA: low-rank adapters on a model's Linear layers, merge / unmerge, PEFT layout.

:func:`apply_lora` attaches a :class:`LoraAdapter` to every targeted ``Linear`` (its ``lora``
attribute, see ``jaxtune.models.layers``). For a kernel ``[*in, *out]`` the adapter holds

- ``lora_a`` ``[*in, r]``, logical axes ``(*in_axes, "lora_rank")``, drawn like PEFT's
  ``lora_A`` (uniform in ``±1/sqrt(fan_in)``),
- ``lora_b`` ``[r, *out]``, logical axes ``("lora_rank", *out_axes)``, zeros,

(with a leading ``layers`` axis under ``scan_layers``) and adds
``scale * (dropout(x) . A) . B`` to the layer's output, ``scale = alpha / r`` (PEFT's
``lora_alpha / r``) or ``alpha / sqrt(r)`` with ``rslora``. B starts at zero, so a fresh
adapter gives exactly the base model's logits. In PEFT's layout ``lora_A.weight`` is
``A.reshape(in, r).T`` and ``lora_B.weight`` is ``B.reshape(r, out).T`` (see
:func:`iter_lora_weights`).

Trainable are the adapters (:class:`LoraParam`) and the parameters of ``modules_to_save``
(retyped :class:`SavedParam`), so the trainer's filter is ``nnx.Any(LoraParam, SavedParam)``
(:data:`TRAINABLE`) and the optimizer state holds only those. The frozen rest can be cast to
``base_dtype`` (adapters stay float32) or quantised (``quantize_base``: int8 / nf4, see
``jaxtune.quant``; ``lm_head`` stays unquantised, as in QLoRA).

Dropout on the adapter input runs only inside :func:`dropout_rng` (the train loss wrapped by
:func:`with_dropout`); anywhere else, evaluation included, the adapters are deterministic.

``targets`` entries match a Linear's HF-style module path (``model.layers.3.self_attn.q_proj``,
per layer even when layers are stacked): the path itself, its last names (``q_proj``,
``self_attn.q_proj``) or a regex over the whole path; ``all-linear`` is every Linear but
``lm_head``. ``modules_to_save`` entries match any module the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxtune.config import ConfigError, LoraConfig
from jaxtune.models.family import family_table
from jaxtune.models.layers import Linear, project
from jaxtune.models.table import STACK_AXES, ParamTable
from jaxtune.quant import QuantizedKernel, quantize_kernel
from jaxtune.sharding import Rules, host_array, state_shardings

STACKED_LOGICAL_AXES = frozenset(STACK_AXES.values())

ALL_LINEAR = "all-linear"


class LoraParam(nnx.Param):
    """A LoRA adapter matrix (``lora_a`` or ``lora_b``): what a LoRA run trains."""


class SavedParam(nnx.Param):
    """A parameter of a ``modules_to_save`` module: trained fully in a LoRA run."""


class LoraSalt(nnx.Variable):
    """A per-(adapter, layer) integer that makes each adapter's dropout mask its own."""


#: The trainable filter of every LoRA run (adapters plus modules_to_save).
TRAINABLE = nnx.Any(LoraParam, SavedParam)


def lora_scale(alpha: float, rank: int, rslora: bool = False) -> float:
    """PEFT's scaling: ``alpha / rank``, or ``alpha / sqrt(rank)`` with rank-stabilised LoRA."""
    return float(alpha) / (math.sqrt(rank) if rslora else rank)


# --------------------------------------------------------------------------- disabling

_disabled = threading.local()


@contextlib.contextmanager
def adapters_disabled() -> Iterator[None]:
    """Within this context (at trace time) every adapter adds nothing: the model is its base.

    This is the free reference model of preference objectives (PEFT's ``disable_adapter``):
    the same weights, no second copy, and no gradient reaches the adapters through it.
    """
    prev = getattr(_disabled, "value", False)
    _disabled.value = True
    try:
        yield
    finally:
        _disabled.value = prev


def has_adapters(model: nnx.Module) -> bool:
    """Whether any Linear of ``model`` carries a LoRA adapter."""
    return any(lin.lora is not None for _, lin in _linears(model))


# --------------------------------------------------------------------------- dropout

_dropout_context = threading.local()


@contextlib.contextmanager
def dropout_rng(key: jax.Array) -> Iterator[None]:
    """Within this context (at trace time) adapters with dropout > 0 drop inputs using ``key``."""
    prev = getattr(_dropout_context, "key", None)
    _dropout_context.key = key
    try:
        yield
    finally:
        _dropout_context.key = prev


def with_dropout(loss_fn: Callable[[Any, dict], Any]) -> Callable[[Any, dict], Any]:
    """The training loss: ``loss_fn`` run with LoRA dropout keyed by the micro-batch's ``rng``.

    Give it to the train step only; the eval step keeps the plain (deterministic) loss. An
    objective (``jaxtune.objectives.Objective``) stays one, with its axes and normaliser.
    """

    def train_loss(model: Any, batch: dict) -> Any:
        with dropout_rng(jax.random.fold_in(batch["rng"], 0x10A)):
            return loss_fn(model, batch)

    with_loss = getattr(loss_fn, "with_loss", None)
    return with_loss(train_loss) if with_loss is not None else train_loss


# --------------------------------------------------------------------------- the adapter


class LoraAdapter(nnx.Module):
    """``scale * (dropout(x) . A) . B``, added to a Linear's output by :meth:`add`."""

    def __init__(self, a: LoraParam, b: LoraParam, *, scale: float, num_in: int,
                 dropout: float = 0.0, salt: LoraSalt | None = None):
        self.lora_a = a
        self.lora_b = b
        self.scale = float(scale)
        self.num_in = num_in
        self.dropout = float(dropout)
        self.salt = salt
        self.merged = False  # set by merge(keep_adapters=True): the kernel already holds it

    def add(self, y: jax.Array, x: jax.Array) -> jax.Array:
        """``y`` (the base layer's output for input ``x``) plus this adapter's update."""
        if self.merged or getattr(_disabled, "value", False):
            return y
        x = self._drop(x)
        n = self.num_in
        a = self.lora_a[...].astype(x.dtype)
        b = self.lora_b[...].astype(x.dtype)
        h = project(x, a, n)  # batch and length merged: see layers.project
        h = h * jnp.asarray(self.scale, h.dtype)  # scaling the rank-r side is cheapest
        u = project(h, b, 1, y.dtype)
        return y + u.astype(y.dtype)

    def add_grouped(self, y_MO: jax.Array, x_MI: jax.Array,
                    group_sizes_E: jax.Array) -> jax.Array:
        """:meth:`add` for a Linear with a leading ``experts`` axis applied as a grouped matmul
        (rows of ``x`` sorted by expert, ``group_sizes`` rows each; see ``jax.lax.ragged_dot``).
        """
        if self.merged or getattr(_disabled, "value", False):
            return y_MO
        key = getattr(_dropout_context, "key", None)
        if self.dropout > 0.0 and key is not None:  # one mask per row, the layer's salt
            key = jax.random.fold_in(key, jnp.min(self.salt[...]))
            keep = jax.random.bernoulli(key, 1.0 - self.dropout, x_MI.shape)
            x_MI = jnp.where(keep, x_MI / (1.0 - self.dropout), 0).astype(x_MI.dtype)
        u = grouped_lora_update(x_MI, self.lora_a[...], self.lora_b[...], self.scale,
                                group_sizes_E)
        return y_MO + u.astype(y_MO.dtype)

    def grouped_arrays(self) -> tuple[jax.Array, jax.Array, float] | None:
        """``(A [E, I, r], B [E, r, O], scale)`` for a grouped matmul elsewhere (expert
        parallelism inside shard_map), or None when the adapter is merged or disabled."""
        if self.merged or getattr(_disabled, "value", False):
            return None
        if self.dropout > 0.0 and getattr(_dropout_context, "key", None) is not None:
            raise ConfigError("lora.dropout on expert projections is not supported with "
                              "expert parallelism (mesh.expert > 1); set lora.dropout: 0.")
        return self.lora_a[...], self.lora_b[...], self.scale

    def _drop(self, x: jax.Array) -> jax.Array:
        key = getattr(_dropout_context, "key", None)
        if self.dropout == 0.0 or key is None:
            return x
        key = jax.random.fold_in(key, self.salt[...])
        keep = jax.random.bernoulli(key, 1.0 - self.dropout, x.shape)
        return jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)

    def delta(self) -> jax.Array:
        """The float32 kernel update ``scale * A . B``, ``[*lead, *in, *out]``."""
        a = self.lora_a[...].astype(jnp.float32)
        b = self.lora_b[...].astype(jnp.float32)
        return lora_delta(a, b, self.scale, a.ndim - self.num_in - 1,
                          functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST))


def grouped_lora_update(x_MI: jax.Array, a_EIr: jax.Array, b_ErO: jax.Array, scale: float,
                        group_sizes_E: jax.Array) -> jax.Array:
    """``scale * (x . A[e]) . B[e]`` for each row's expert ``e`` by two grouped matmuls."""
    h = jax.lax.ragged_dot(x_MI, a_EIr.astype(x_MI.dtype), group_sizes_E)
    h = h * jnp.asarray(scale, h.dtype)
    return jax.lax.ragged_dot(h, b_ErO.astype(x_MI.dtype), group_sizes_E)


def lora_delta(a: Any, b: Any, scale: float, depth: int, matmul: Callable = np.matmul) -> Any:
    """``scale * A . B`` as a kernel update ``[*lead, *in, *out]`` from ``a`` ``[*lead, *in, r]``
    and ``b`` ``[*lead, r, *out]`` (``depth`` leading stacked axes). The one LoRA merge: the
    in-memory :func:`merge` (jax arrays) and the streamed export (numpy) both call it."""
    lead, r = a.shape[:depth], a.shape[-1]
    d = matmul(a.reshape(*lead, -1, r), b.reshape(*lead, r, -1)) * scale
    return d.reshape(*lead, *a.shape[depth:-1], *b.shape[depth + 1:])


def peft_layout(a: np.ndarray, b: np.ndarray, depth: int, *,
                experts: bool = False) -> Iterator[tuple[tuple[int, ...], np.ndarray, np.ndarray]]:
    """PEFT's ``lora_A.weight`` ``[r, in]`` and ``lora_B.weight`` ``[out, r]`` of every stacked
    slice of one adapter, in index order (the one PEFT layout writer's maths).

    ``experts``: the last stacked axis is the experts axis, kept in the tensors as PEFT's
    ``ParamWrapper`` holds a fused 3-D parameter: ``lora_A.weight`` ``[E*r, in]`` with
    expert-major rows, ``lora_B.weight`` ``[out, r*E]`` with expert-minor columns.
    """
    r = a.shape[-1]
    lead = a.shape[:depth - 1] if experts else a.shape[:depth]
    for index in itertools.product(*(range(n) for n in lead)):
        if not experts:
            yield index, a[index].reshape(-1, r).T.copy(), b[index].reshape(r, -1).T.copy()
            continue
        a_E, b_E = a[index], b[index]
        n = a_E.shape[0]
        pa = a_E.reshape(n, -1, r).transpose(0, 2, 1).reshape(n * r, -1)
        pb = b_E.reshape(n, r, -1).transpose(2, 1, 0).reshape(-1, r * n)
        yield index, pa.copy(), pb.copy()


def fuse_adapters(parts: Sequence[tuple[np.ndarray, np.ndarray] | None],
                  ) -> tuple[np.ndarray, np.ndarray]:
    """One adapter for kernels joined along their (1-D) output axis, as transformers fuses
    gate and up into ``gate_up_proj``, from each part's ``(A [*lead, in, r], B [*lead, r,
    out])`` or None for a part without adapter: the A side by side (their ranks summed), B
    block-diagonal, so ``A . B`` is each part's update in its own columns, zero for a part
    without one. Exact: no sum mixes two parts."""
    present = [p for p in parts if p is not None]
    a0, b0 = present[0]
    out = b0.shape[-1]
    a = np.concatenate([p[0] for p in present], axis=-1)
    b = np.zeros((*b0.shape[:-2], a.shape[-1], out * len(parts)), np.float32)
    row = 0
    for k, p in enumerate(parts):
        if p is not None:
            r = p[1].shape[-2]
            b[..., row:row + r, k * out:(k + 1) * out] = p[1]
            row += r
    return a, b


# --------------------------------------------------------------------------- module paths


def _modules(model: nnx.Module) -> list[tuple[tuple, nnx.Module]]:
    return [(tuple(p), m) for p, m in nnx.iter_graph(model) if isinstance(m, nnx.Module)]


def _linears(model: nnx.Module) -> list[tuple[tuple, Linear]]:
    return [(p, m) for p, m in _modules(model) if isinstance(m, Linear)]


def _table(model: nnx.Module) -> ParamTable:
    return family_table(model.config)


def _hf_names(table: ParamTable, path: tuple, linear: Linear) -> list[str]:
    """HF module names of a Linear (one per stacked slice: layers under scan, experts), from
    the family's table, so LoRA targets are HF names whatever jaxtune calls the module."""
    kernel = linear.kernel
    shape = kernel.get_value().shape if isinstance(kernel, nnx.Variable) else kernel.shape
    names = table.hf_module_names(".".join(map(str, (*path, "kernel"))), shape)
    return names if names is not None else [".".join(map(str, path))]


def _matches(pattern: str, name: str) -> bool:
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error as e:
        raise ConfigError(f"LoRA pattern '{pattern}' is not a module name or a valid regex "
                          f"({e}).") from None


def _select(model: nnx.Module, patterns: Sequence[str], candidates: list[tuple[tuple, Any]],
            key: str) -> list[tuple]:
    """Paths of the candidate modules some pattern selects; every pattern must select one."""
    table = _table(model)
    selected, used = [], set()
    for path, module in candidates:
        names = (_hf_names(table, path, module) if isinstance(module, Linear)
                 else [".".join(map(str, path))])
        hits = [[p for p in patterns if _matches(p, name)] for name in names]
        if all(hits):
            selected.append(path)
        elif any(hits):
            picked = [i for i, h in enumerate(hits) if h]
            raise ConfigError(
                f"'{key}' selects layers {picked} of {len(names)} for {names[0]}, but with "
                "model.scan_layers the layers share one stacked module: select every layer, "
                "or set model.scan_layers: false."
            )
        for h in hits:
            used.update(h)
    unused = [p for p in patterns if p not in used]
    if unused:
        raise ConfigError(_no_match_message(model, unused, key, candidates))
    return selected


def _no_match_message(model: nnx.Module, unused: list[str], key: str,
                      candidates: list[tuple[tuple, Any]]) -> str:
    short = sorted({str(p[-1]) for p, _ in candidates if p})
    skipped = [m for m in getattr(model.config, "skipped_modules", ()) or ()
               if any(m in u for u in unused)]
    if skipped:  # a multimodal checkpoint's tower: not loaded, so nothing can train it
        source = str(model.config.model_type).removesuffix("_text")
        return (f"'{key}' entries {unused} name {', '.join(skipped)}: this model is the "
                f"language model of a {source} checkpoint, and its "
                f"{', '.join(model.config.skipped_modules)} were not loaded (jaxtune trains the "
                "text model). Target the language model's modules (q_proj, o_proj, ...).")
    msg = f"'{key}' entries {unused} match no module of this model."
    if key == "lora.targets":
        others = [str(p[-1]) for p, _ in _modules(model)
                  if p and any(_matches(u, str(p[-1])) for u in unused)]
        if others:
            msg += (f" {sorted(set(others))} are not linear layers; train them fully with "
                    "'lora.modules_to_save' instead.")
    if "lm_head" in unused and getattr(model.config, "tie_word_embeddings", False):
        msg += " This model ties lm_head to embed_tokens: use embed_tokens."
    return msg + f" Names here: {', '.join(short)} (or a regex over paths like " \
        "'model.layers.0.self_attn.q_proj', or all-linear)."


def _bare_parameter(table: ParamTable, path: tuple, linear: Linear) -> str | None:
    """The HF name of a Linear that transformers keeps as a bare parameter, not a Linear
    module (Gemma 4's fused experts, ``experts.gate_up_proj``), else None."""
    kernel = linear.kernel
    shape = kernel.get_value().shape if isinstance(kernel, nnx.Variable) else kernel.shape
    entries = table.entries(".".join(map(str, (*path, "kernel"))), shape)
    if entries and not entries[0].key.endswith(".weight"):
        return entries[0].key
    return None


def resolve_targets(model: nnx.Module, targets: Sequence[str]) -> list[tuple]:
    """Paths of the Linear modules ``targets`` selects (``all-linear``: all but ``lm_head``,
    as PEFT's: only what transformers holds as Linear modules)."""
    table = _table(model)
    linears, bare = [], []
    for path, linear in _linears(model):
        name = _bare_parameter(table, path, linear)
        (bare if name else linears).append((path, linear, name))
    patterns = [t for t in targets if t != ALL_LINEAR]
    names = [n for p, lin, _ in linears for n in _hf_names(table, p, lin)]
    for pattern in patterns:
        hits = [name for _, _, name in bare if _matches(pattern, name)]
        if hits and not any(_matches(pattern, n) for n in names):
            raise ConfigError(
                f"'lora.targets' entry '{pattern}' selects only {hits[0]}, which transformers "
                "keeps as a fused parameter of all experts, not a Linear module, so LoRA (and "
                "a PEFT adapter, whose target_modules are modules) does not apply to it. "
                "Target the attention, the dense MLP and the other Linear modules (q_proj, "
                "gate_proj, ...).")
    linears = [(p, lin) for p, lin, _ in linears]
    chosen = {p for p, _ in linears if p[-1] != "lm_head"} if ALL_LINEAR in targets else set()
    if patterns:
        chosen.update(_select(model, patterns, linears, "lora.targets"))
    if not chosen:
        raise ConfigError("'lora.targets' is empty: name modules (q_proj, v_proj, ...), give a "
                          "regex, or use all-linear.")
    return [p for p, _ in linears if p in chosen]


def resolve_modules_to_save(model: nnx.Module, names: Sequence[str]) -> list[tuple]:
    """Paths of the modules trained fully (``lora.modules_to_save``)."""
    if not names:
        return []
    return _select(model, list(names), _modules(model), "lora.modules_to_save")


# --------------------------------------------------------------------------- apply


def _validate(cfg: LoraConfig) -> None:
    if cfg.rank < 0:
        raise ConfigError(f"'lora.rank' must be >= 0 (0 is full fine-tuning), got {cfg.rank}.")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError(f"'lora.dropout' must be in [0, 1), got {cfg.dropout}.")
    if cfg.quantize_base not in ("none", "int8", "nf4"):
        raise ConfigError(f"'lora.quantize_base' is '{cfg.quantize_base}'; use none, int8 or "
                          "nf4.")
    if cfg.base_dtype and cfg.base_dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"'lora.base_dtype' is '{cfg.base_dtype}'; use float32, bfloat16 or "
                          "float16 (or quantize_base for int8 / nf4).")
    if cfg.rank == 0 and (cfg.quantize_base != "none" or cfg.modules_to_save):
        raise ConfigError("'lora.quantize_base' and 'lora.modules_to_save' need a LoRA run: "
                          "set 'lora.rank' > 0.")


def _mesh_of(model: nnx.Module) -> Mesh:
    for leaf in jax.tree.leaves(nnx.state(model)):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return sharding.mesh
    from jaxtune.models.build import single_device_mesh

    return single_device_mesh()


def _rebuild(model: nnx.Module, edit: Callable[[nnx.Module, Any], None], mesh: Mesh | None,
             rules: Rules | None, extra: Any = None) -> nnx.Module:
    """A new model: ``edit(copy, extra)`` applied to a copy of ``model``.

    Arrays the edit leaves alone (or takes as they are from ``extra``, arrays it reads) are
    reused, not copied, so rebuilding a large model does not hold its base twice. What the
    edit computes comes out of one jit whose outputs are sharded by the new variables' logical
    axes, so nothing is gathered on one device.
    """
    graphdef, state = nnx.split(model)
    inputs = jax.tree.leaves((state, extra))
    sources: list[int | None] = []  # per output leaf: the input leaf it is, or None

    def run(state: nnx.State, extra: Any) -> nnx.State:
        index = {id(x): i for i, x in enumerate(jax.tree.leaves((state, extra)))}
        copy = nnx.merge(graphdef, state)
        edit(copy, extra)
        new_graphdef, new_state = nnx.split(copy)
        if not sources:  # the first (abstract) trace records the structure
            sources.extend(index.get(id(x)) for x in jax.tree.leaves(new_state))
            structure.append(new_graphdef)
        return new_state

    structure: list[nnx.GraphDef] = []
    abstract_state = jax.eval_shape(run, state, extra)
    shardings = jax.tree.leaves(state_shardings(abstract_state, mesh or _mesh_of(model), rules))
    for i, src in enumerate(sources):  # an array placed otherwise than the rules say is moved
        if src is not None and not _placed_as(inputs[src], shardings[i]):
            sources[i] = None
    computed_at = [i for i, src in enumerate(sources) if src is None]

    def computed(state: nnx.State, extra: Any) -> list[jax.Array]:
        leaves = jax.tree.leaves(run(state, extra))
        return [leaves[i] for i in computed_at]

    values = jax.jit(computed, out_shardings=[shardings[i] for i in computed_at])(state, extra)
    it = iter(values)
    leaves = [inputs[src] if src is not None else next(it) for src in sources]
    new_state = jax.tree.unflatten(jax.tree.structure(abstract_state), leaves)
    return nnx.merge(structure[0], new_state)


def _placed_as(x: Any, sharding: NamedSharding) -> bool:
    current = getattr(x, "sharding", None)
    return current is not None and current.is_equivalent_to(sharding, x.ndim)


def _lead(var: nnx.Variable) -> int:
    """How many stacked axes (``layers`` under scan, ``experts``) the variable carries first."""
    axes = tuple(var.get_metadata().get("logical_axes") or ())
    n = 0
    while n < len(axes) and axes[n] in STACKED_LOGICAL_AXES:
        n += 1
    return n


def _axes(var: nnx.Variable) -> tuple:
    axes = var.get_metadata().get("logical_axes")
    return tuple(axes) if axes is not None else (None,) * var.get_value().ndim


def _make_adapter(linear: Linear, rank: int, scale: float, dropout: float, key: jax.Array,
                  salt_base: int) -> LoraAdapter:
    kernel = linear.kernel
    lead, n = _lead(kernel), linear.num_in
    shape, axes = kernel.get_value().shape, _axes(kernel)
    lead_shape, in_shape, out_shape = shape[:lead], shape[lead:lead + n], shape[lead + n:]
    lead_axes, in_axes, out_axes = axes[:lead], axes[lead:lead + n], axes[lead + n:]
    bound = 1.0 / math.sqrt(math.prod(in_shape))  # PEFT: kaiming_uniform(a=sqrt(5)) on lora_A
    a = jax.random.uniform(key, (*lead_shape, *in_shape, rank), jnp.float32, -bound, bound)
    b = jnp.zeros((*lead_shape, rank, *out_shape), jnp.float32)
    salt = None
    if dropout > 0:
        count = math.prod(lead_shape)
        values = jnp.arange(salt_base * count, (salt_base + 1) * count, dtype=jnp.uint32)
        salt = LoraSalt(values.reshape(lead_shape), logical_axes=lead_axes)
    return LoraAdapter(
        LoraParam(a, logical_axes=(*lead_axes, *in_axes, "lora_rank")),
        LoraParam(b, logical_axes=(*lead_axes, "lora_rank", *out_axes)),
        scale=scale, num_in=n, dropout=dropout, salt=salt,
    )


def _retype(module: nnx.Module, old_type: type, new_type: type) -> None:
    """Turn the ``old_type`` variables of ``module`` and its submodules into ``new_type``."""
    for _, node in list(nnx.iter_graph(module)):
        if not isinstance(node, nnx.Module):
            continue
        for name, value in list(vars(node).items()):
            if type(value) is old_type:
                meta = {"logical_axes": value.get_metadata().get("logical_axes")}
                setattr(node, name, new_type(value.get_value(), **meta))


def apply_lora(model: nnx.Module, cfg: LoraConfig, *, mesh: Mesh | None = None,
               rules: Rules | None = None, seed: int = 0) -> tuple[nnx.Module, Any]:
    """Add adapters to ``model`` as ``cfg`` says; returns ``(new_model, trainable_filter)``.

    The input model is left as it was, but shares its unchanged arrays with the new one (so
    donating the new model's state in a train step deletes them). The new model's variables
    are sharded over ``mesh``
    (default: the mesh the model is on) by their logical axes and ``rules``. ``seed`` draws the
    A matrices. ``rank: 0`` returns the model unchanged with the filter ``nnx.Param`` (full
    fine-tuning).
    """
    _validate(cfg)
    if cfg.rank == 0:
        return model, nnx.Param
    if any(lin.lora is not None for _, lin in _linears(model)):
        raise ConfigError("This model already has LoRA adapters; apply_lora once.")
    targets = resolve_targets(model, cfg.targets)
    saved = resolve_modules_to_save(model, cfg.modules_to_save)
    clash = [p for p in targets if any(p[:len(s)] == s for s in saved)]
    if clash:
        raise ConfigError(f"{['.'.join(map(str, p)) for p in clash]} are both LoRA targets and "
                          "modules_to_save; remove them from one of 'lora.targets' and "
                          "'lora.modules_to_save'.")
    scale = lora_scale(cfg.alpha, cfg.rank, cfg.rslora)
    base_dtype = jnp.dtype(cfg.base_dtype) if cfg.base_dtype else None

    def edit(m: nnx.Module, _: Any) -> None:
        key = jax.random.key(seed)
        modules = dict(_modules(m))
        for path in saved:
            _retype(modules[path], nnx.Param, SavedParam)
        for index, path in enumerate(targets):
            linear = modules[path]
            linear.lora = nnx.data(_make_adapter(linear, cfg.rank, scale, cfg.dropout,
                                                 jax.random.fold_in(key, index), index))
        if cfg.quantize_base != "none":  # from the kernels as loaded, before any cast
            for path, linear in _linears(m):
                if path[-1] == "lm_head" or type(linear.kernel) is not nnx.Param:
                    continue
                k = linear.kernel
                linear.kernel = nnx.data(quantize_kernel(
                    k.get_value(), cfg.quantize_base, num_in=linear.num_in, lead=_lead(k),
                    logical_axes=_axes(k)))
        if base_dtype is not None:
            for _, var in nnx.iter_graph(m):
                if type(var) is nnx.Param and jnp.issubdtype(var.get_value().dtype,
                                                             jnp.floating):
                    var.set_value(var.get_value().astype(base_dtype))

    return _rebuild(model, edit, mesh, rules), TRAINABLE


# --------------------------------------------------------------------------- merge


def _float_kernel(linear: Linear) -> tuple[jax.Array, Any, tuple]:
    """(float32 kernel, its dtype before any quantisation, logical axes)."""
    k = linear.kernel
    if isinstance(k, QuantizedKernel):
        return k.dequantize(), k.dtype, k.logical_axes
    return k.get_value().astype(jnp.float32), k.get_value().dtype, _axes(k)


def merge(model: nnx.Module, *, base: nnx.Module | None = None, dtype: Any = None,
          keep_adapters: bool = False, mesh: Mesh | None = None,
          rules: Rules | None = None) -> nnx.Module:
    """A new model with every adapter folded into its kernel: ``W + scale * A . B``.

    The sum is taken in float32 and cast once (to ``dtype``, default the kernel's dtype before
    any quantisation). Quantised kernels are dequantised, so the result is a plain model
    (``modules_to_save`` parameters become plain Params again) that a full export writes.
    ``base``: the unquantised base model (same layout, no adapters), e.g. reloaded with
    ``from_pretrained`` in float32; every frozen parameter is then taken from it, and the
    adapters are added to its kernels (USERS.md: merge from the unquantised base).
    ``keep_adapters``: keep the adapters attached but inactive, so :func:`unmerge` can
    restore the adapter model.
    """
    base_flat = None
    if base is not None:
        base_flat = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(base))}
    out_dtype = jnp.dtype(dtype) if dtype is not None else None

    def edit(m: nnx.Module, base_flat: dict | None) -> None:
        if base_flat is not None:
            _take_frozen_from(m, base_flat)
        for _, linear in _linears(m):
            adapter = linear.lora
            if adapter is None and not isinstance(linear.kernel, QuantizedKernel):
                continue
            kernel, kdtype, axes = _float_kernel(linear)
            if adapter is not None and not adapter.merged:
                kernel = kernel + adapter.delta()
            linear.kernel = nnx.data(nnx.Param(kernel.astype(out_dtype or kdtype),
                                               logical_axes=axes))
            if adapter is not None:
                if keep_adapters:
                    adapter.merged = True
                else:
                    linear.lora = None
        if out_dtype is not None:
            for _, var in nnx.iter_graph(m):
                if type(var) in (nnx.Param, SavedParam):
                    var.set_value(var.get_value().astype(out_dtype))
        if not keep_adapters:
            _retype(m, SavedParam, nnx.Param)

    return _rebuild(model, edit, mesh, rules, base_flat)


def _take_frozen_from(m: nnx.Module, base_flat: dict[tuple, jax.Array]) -> None:
    """Replace the frozen parameters of ``m`` by the base's (dequantising where needed)."""
    for path, linear in _linears(m):
        kernel_path = (*path, "kernel")
        if isinstance(linear.kernel, QuantizedKernel) and kernel_path in base_flat:
            k = linear.kernel
            linear.kernel = nnx.data(nnx.Param(base_flat[kernel_path],
                                               logical_axes=k.logical_axes))
    missing = []
    for path, var in nnx.iter_graph(m):
        if type(var) is nnx.Param:
            if tuple(path) not in base_flat:
                missing.append(".".join(map(str, path)))
                continue
            value = base_flat[tuple(path)]
            if value.shape != var.get_value().shape:
                missing.append(f"{'.'.join(map(str, path))} (shape {value.shape})")
                continue
            var.set_value(value)
    if missing:
        raise ConfigError(f"merge: the base model lacks or reshapes {missing}; give the base "
                          "model the adapters were trained on, in the same layout "
                          "(scan_layers).")


def unmerge(model: nnx.Module, *, mesh: Mesh | None = None,
            rules: Rules | None = None) -> nnx.Module:
    """Undo :func:`merge` with ``keep_adapters=True``: ``W - scale * A . B`` in float32,
    adapters active again. A kernel that was quantised comes back as float (not requantised)."""

    def edit(m: nnx.Module, _: Any) -> None:
        for _, linear in _linears(m):
            adapter = linear.lora
            if adapter is None or not adapter.merged:
                continue
            kernel, kdtype, axes = _float_kernel(linear)
            linear.kernel = nnx.data(nnx.Param((kernel - adapter.delta()).astype(kdtype),
                                               logical_axes=axes))
            adapter.merged = False

    return _rebuild(model, edit, mesh, rules)


# --------------------------------------------------------------------------- FLOPs


def lora_matmuls(trainable: nnx.State, model_config: Any):
    """What a LoRA run trains, in matmul parameters one token meets, for the FLOPs count
    (:class:`jaxtune.metrics.LoraMatmuls`): the adapters (:class:`LoraParam`), and the
    ``modules_to_save`` weights (:class:`SavedParam`) that are matmuls: Linear kernels, and
    the embedding where it is also the tied LM head (a lookup otherwise). Arrays with an
    ``experts`` axis count the share a token meets, ``num_experts_per_tok / num_experts``."""
    from jaxtune.metrics import LoraMatmuls

    experts = getattr(model_config, "num_experts", 0) or 0
    share = model_config.num_experts_per_tok / experts if experts else 1.0
    tied = bool(getattr(model_config, "tie_word_embeddings", False))
    adapters = saved = 0.0
    for path, var in nnx.to_flat_state(trainable):
        n = float(np.prod(var.get_value().shape)) * (share if "experts" in _axes(var) else 1)
        if isinstance(var, LoraParam):
            adapters += n
        elif isinstance(var, SavedParam) and (path[-1] == "kernel" or
                                              (path[-1] == "embedding" and tied)):
            saved += n
    return LoraMatmuls(adapters=adapters, saved=saved)


# --------------------------------------------------------------------------- PEFT layout


@dataclasses.dataclass
class LoraWeights:
    """One adapter in PEFT's layout: ``W_hf += scale * b @ a`` with ``W_hf`` ``[out, in]``."""

    a: np.ndarray  # lora_A.weight [r, in] (input dims flattened in HF order)
    b: np.ndarray  # lora_B.weight [out, r]
    scale: float


def iter_lora_weights(model: nnx.Module) -> Iterator[tuple[str, LoraWeights]]:
    """Yield ``(hf_module_path, LoraWeights)`` per adapter and stacked slice, one at a time.

    ``hf_module_path`` is the HF module the adapter belongs to, e.g.
    ``model.layers.0.self_attn.q_proj`` (PEFT writes ``base_model.model.<it>.lora_A.weight``).
    """
    table = _table(model)
    for path, linear in _linears(model):
        adapter = linear.lora
        if adapter is None:
            continue
        a_all = host_array(adapter.lora_a.get_value()).astype(np.float32)
        b_all = host_array(adapter.lora_b.get_value()).astype(np.float32)
        names = _hf_names(table, path, linear)
        depth = a_all.ndim - adapter.num_in - 1
        for name, (_, a, b) in zip(names, peft_layout(a_all, b_all, depth), strict=True):
            yield name, LoraWeights(a=a, b=b, scale=adapter.scale)


def lora_state(model: nnx.Module) -> dict[str, LoraWeights]:
    """All adapters in PEFT's layout, keyed by HF module path (see :func:`iter_lora_weights`)."""
    return dict(iter_lora_weights(model))
