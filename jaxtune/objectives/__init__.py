"""Training objectives: a loss plus what it needs, named in the config (``trainer.objective``).

An :class:`Objective` is what the one train step and the one loop need to know about an
objective, so SFT, DPO, ORPO or SimPO are each "one function" and never a trainer class:

- ``loss(model, batch) -> (loss, aux)``: this micro-batch's contribution (see ``loss.py``);
- ``batch_axes``: the batch's per-row keys and their logical axes. The step splits
  micro-batches along ``batch`` and shards each key by these axes; a key a batch carries that
  is not declared is an error, not silently shared;
- ``denominator(batch)``: the normaliser over the whole global batch (all micro-batches, all
  devices), set as ``batch["loss_denominator"]`` before the loss runs. Token cross-entropy
  counts trained tokens; a per-sequence objective counts sequences;
- ``eval_metrics(sums)``: reported metrics from eval sums (``loss_sum``, ``count``, ``aux``);
- ``data_formats``: the ``data.format`` values it trains on (None: any token format);
- ``needs_reference``: whether the loss calls :func:`reference_model`;
- ``prepare(trainer)``: optional, run once by the trainer before the data is read (e.g. DPO's
  precomputed reference log-probs);
- ``batch_source(trainer)``: optional, the producer of each step's batch (RL's rollouts, see
  :mod:`jaxtune.batches`); without it the objective trains on the data iterator;
- ``evaluate(trainer)``: optional, its own held-out metrics (RL: rewards of answers to held-out
  prompts) instead of its loss over the eval split;
- ``batch_shapes(cfg)``: the global batch's shapes for a config, which ``jaxtune plan``
  compiles the step with (no data is read);
- ``generates(cfg)``: optional, ``(rows, prompt tokens, new tokens)`` its producer generates
  each step, which ``jaxtune plan`` compiles beside the step (both must fit);
- ``teacher(trainer)``: optional, loads the frozen model the loss reads through
  :func:`teacher_model` (distillation's teacher): a :class:`~jaxtune.train_state.FrozenModel`
  laid out on the training mesh, outside the train state (no optimizer state, never in a
  checkpoint), whose arrays enter the jitted step as an argument. None when the objective
  needs none (or, with precomputed teacher log-probs, no longer needs it).

``aux`` values are contributions that add up over micro-batches; a key ending in ``_max`` is a
maximum instead (``jaxtune.train_step.combine_aux``).

An objective is callable as its loss, so it is passed to ``train_step`` as ``loss_fn``; a
plain function there gets SFT's axes and normaliser. Objectives register themselves with
:func:`register_objective`, one file each in this package: ``sft`` (:mod:`.sft`), ``dpo``,
``orpo`` and ``simpo`` (:mod:`.preference`), ``grpo`` (:mod:`.grpo`), ``distill``
(:mod:`.distill`). The registry is the only list.

The reference model (DPO-style objectives) is :func:`reference_model` inside the loss: the
frozen copy in the train state when the run keeps one (full fine-tuning), else the same model
with its LoRA adapters disabled (no second copy of the weights, PEFT's ``disable_adapter``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp

from jaxtune.errors import JaxtuneError
from jaxtune.loss import load_loss_fn

Batch = dict[str, jax.Array]

#: The token batch every text format produces (``jaxtune.data``): ``[B, T]`` arrays.
TOKEN_AXES: Mapping[str, tuple[str, ...]] = {
    "input_ids": ("batch", "seq"),
    "targets": ("batch", "seq"),
    "loss_mask": ("batch", "seq"),
    "segment_ids": ("batch", "seq"),
    "positions": ("batch", "seq"),
}


def token_batch_shapes(cfg: Any) -> dict[str, jax.ShapeDtypeStruct]:
    """The token batch's shapes for a run's config (``jaxtune plan`` compiles with these)."""
    rows, seq = cfg.trainer.global_batch_size, cfg.data.seq_len
    out = {k: jax.ShapeDtypeStruct((rows, seq), jnp.int32) for k in TOKEN_AXES}
    out["loss_mask"] = jax.ShapeDtypeStruct((rows, seq), jnp.float32)
    return out


def trained_tokens(batch: Batch) -> jax.Array:
    """Token cross-entropy's normaliser: trained tokens in the batch (at least 1)."""
    return jnp.maximum(batch["loss_mask"].astype(jnp.float32).sum(), 1.0)


def token_eval_metrics(sums: Mapping[str, float]) -> dict[str, float]:
    """Held-out mean token NLL and perplexity from summed NLL and trained tokens."""
    tokens = float(sums["count"])
    loss = float(sums.get("nll_sum", sums["loss_sum"])) / max(tokens, 1.0)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)),
            "eval_tokens": tokens}


@dataclass(frozen=True)
class Objective:
    """One objective (see the module docstring)."""

    name: str
    loss: Callable[[Any, Batch], tuple[jax.Array, dict[str, jax.Array]]]
    batch_axes: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: dict(TOKEN_AXES))
    denominator: Callable[[Batch], jax.Array] = trained_tokens
    eval_metrics: Callable[[Mapping[str, float]], dict[str, float]] = token_eval_metrics
    data_formats: tuple[str, ...] | None = None
    needs_reference: bool = False
    prepare: Callable[[Any], None] | None = None
    batch_source: Callable[[Any], Any] | None = None
    evaluate: Callable[[Any], dict[str, float]] | None = None
    batch_shapes: Callable[[Any], dict[str, jax.ShapeDtypeStruct]] = token_batch_shapes
    generates: Callable[[Any], tuple[int, int, int]] | None = None
    teacher: Callable[[Any], Any] | None = None

    def __call__(self, model: Any, batch: Batch):
        return self.loss(model, batch)

    def with_loss(self, loss: Callable) -> Objective:
        """The same objective around another loss (e.g. the loss wrapped for LoRA dropout)."""
        return dataclasses.replace(self, loss=loss)


def batch_axes_of(loss_fn: Any) -> Mapping[str, tuple[str, ...]]:
    """The per-row keys of the batch ``loss_fn`` trains on (SFT's for a plain function)."""
    return getattr(loss_fn, "batch_axes", TOKEN_AXES)


def denominator_of(loss_fn: Any) -> Callable[[Batch], jax.Array]:
    return getattr(loss_fn, "denominator", trained_tokens)


def eval_metrics_of(loss_fn: Any) -> Callable[[Mapping[str, float]], dict[str, float]]:
    return getattr(loss_fn, "eval_metrics", token_eval_metrics)


# --------------------------------------------------------------------------- registry

_OBJECTIVES: dict[str, Callable[[Any], Objective]] = {}
#: Modules whose objectives are built in, one file each; imported on first use of the registry
#: (they build on this module, so it cannot import them at its top).
_BUILTIN_MODULES = ("jaxtune.objectives.sft", "jaxtune.objectives.preference",
                    "jaxtune.objectives.grpo", "jaxtune.objectives.distill")


def _load_builtins() -> None:
    import importlib

    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def register_objective(name: str, build: Callable[[Any], Objective]) -> None:
    """Make ``trainer.objective: name`` build its objective with ``build(cfg)``, ``cfg`` the
    run's :class:`~jaxtune.config.TrainConfig` (its ``trainer`` section, and the sections the
    objective reads, e.g. ``rl``)."""
    _OBJECTIVES[name] = build


def objective_names() -> list[str]:
    _load_builtins()
    return sorted(_OBJECTIVES)


def make_objective(cfg: Any) -> Objective:
    """The objective ``trainer.objective`` names, with the config's settings bound in.
    ``cfg`` is the run's TrainConfig (a bare trainer section, a TrainerConfig or any object
    with its fields, is taken as the trainer section of an otherwise default config).
    ``trainer.loss_fn`` (an import path) replaces its loss and keeps the rest."""
    from jaxtune.config import TrainConfig

    if not hasattr(cfg, "trainer"):
        cfg = TrainConfig(trainer=cfg)
    name = cfg.trainer.objective or "sft"
    _load_builtins()
    build = _OBJECTIVES.get(name)
    if build is None:
        raise JaxtuneError(f"trainer.objective '{name}' is not an objective; use one of "
                           f"{', '.join(objective_names())}.")
    objective = build(cfg)
    if cfg.trainer.loss_fn:
        objective = objective.with_loss(load_loss_fn(cfg.trainer.loss_fn))
    return objective


# --------------------------------------------------------------------------- reference

_reference = threading.local()


@contextlib.contextmanager
def reference_available(frozen_reference: Any) -> Iterator[None]:
    """Within this context (the train step, at trace time) the reference model is
    ``frozen_reference`` (an NNX model) or, when None, the trained model with adapters off."""
    prev = getattr(_reference, "value", None)
    _reference.value = frozen_reference
    try:
        yield
    finally:
        _reference.value = prev


@contextlib.contextmanager
def reference_model(model: Any) -> Iterator[Any]:
    """The reference for ``model``: the train state's frozen copy when the run keeps one,
    else ``model`` itself with its LoRA adapters disabled. Gradients never reach it."""
    frozen = getattr(_reference, "value", None)
    if frozen is not None:
        yield frozen
        return
    from jaxtune import lora

    if not lora.has_adapters(model):
        raise JaxtuneError(
            "This objective needs a reference model: train with LoRA (lora.rank > 0; the base "
            "with adapters disabled is the reference), or keep a frozen copy for full "
            "fine-tuning (the trainer does when the objective needs one).")
    with lora.adapters_disabled():
        yield model


# --------------------------------------------------------------------------- teacher

_teacher = threading.local()


@contextlib.contextmanager
def teacher_available(teacher: Any) -> Iterator[None]:
    """Within this context (the jitted step, at trace time) :func:`teacher_model` is
    ``teacher``: an NNX model whose arrays are the step's teacher argument."""
    prev = getattr(_teacher, "value", None)
    _teacher.value = teacher
    try:
        yield
    finally:
        _teacher.value = prev


def teacher_model() -> Any:
    """The frozen teacher of this step (distillation); gradients never reach it."""
    teacher = getattr(_teacher, "value", None)
    if teacher is None:
        raise JaxtuneError(
            "This loss reads a teacher model, but the step was built without one: the "
            "objective's teacher (Objective.teacher) must be loaded and given to "
            "jit_train_step / jit_eval_step as teacher=... (the trainer does this).")
    return teacher


def make_loss_fn(cfg: Any) -> Objective:
    """The run's objective, callable as ``loss_fn(model, batch)`` (see :func:`make_objective`)."""
    return make_objective(cfg)

