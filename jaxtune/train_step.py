"""The pure train and eval steps, and the one place they are jitted with shardings.

``train_step(state, batch, *, loss_fn, optimizer, grad_accum_steps, schedule)`` returns
``(new_state, metrics)``. Gradients are accumulated with ``lax.scan`` over micro-batches. The
step sets ``batch["loss_denominator"]`` to the objective's normaliser over the whole global
batch (trained tokens for SFT, sequences for a per-sequence objective) and a loss function
divides its sums by it, so summing the micro-batches' contributions gives exactly the
full-batch value (no per-micro-batch averaging bias). Each micro-batch a loss sees also holds
``step`` (steps taken before this one) and ``rng`` (a fresh key per micro-batch, e.g. for
dropout).

``loss_fn`` is an :class:`~jaxtune.objectives.Objective` (or a plain function, which gets
SFT's batch keys and normaliser): its ``batch_axes`` say which keys are per-row and how they
are sharded, so micro-batches split every per-row key, whatever the objective adds (chosen /
rejected ids, per-sequence rewards). When the train state keeps a frozen reference model, the
loss finds it through :func:`jaxtune.objectives.reference_model`.

A frozen model outside the train state (distillation's teacher, a
:class:`~jaxtune.train_state.FrozenModel`) is given to :func:`jit_train_step` as ``teacher``:
the jitted step then takes its arrays as a third argument, ``step(state, batch, teacher)``,
sharded by the same rules and never donated, and the loss reads the model through
:func:`jaxtune.objectives.teacher_model`. The step functions themselves do not change.

A replacement step (``trainer.train_step: pkg.mod:fn``) takes the same arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxtune.errors import JaxtuneError
from jaxtune.objectives import (
    batch_axes_of,
    denominator_of,
    reference_available,
    teacher_available,
)
from jaxtune.sharding import Rules, activation_rules, constrain
from jaxtune.train_state import FrozenModel, TrainState, train_state_shardings

Batch = dict[str, jax.Array]
LossFn = Callable[[nnx.Module, Batch], tuple[jax.Array, dict[str, jax.Array]]]


def per_row_keys(batch: Batch, batch_axes, splitting: bool = True) -> list[str]:
    """The keys of ``batch`` split by rows (declared with a leading ``batch`` axis). When the
    batch is split into micro-batches, every other array must be a scalar shared by all rows:
    an undeclared array would be handed whole to every micro-batch, so it is refused."""
    rows = [k for k, axes in batch_axes.items() if axes and axes[0] == "batch" and k in batch]
    undeclared = [k for k, v in batch.items()
                  if k not in batch_axes and getattr(v, "ndim", 0) > 0]
    if undeclared and splitting:
        raise JaxtuneError(
            f"The batch has keys {undeclared} that the objective does not declare; add them to "
            "its batch_axes with their logical axes (e.g. ('batch',) for a per-row value), so "
            "they are split under gradient accumulation and sharded by rows.")
    return rows


def split_micro_batches(batch: Batch, num_micro: int, batch_axes=None) -> Batch:
    """``[B, ...] -> [A, B/A, ...]`` taking every A-th row, so each device keeps its own rows.

    Row ``r`` goes to micro-batch ``r % A``. With the batch dim sharded in contiguous blocks,
    the reshape to ``[B/A, A]`` keeps the sharding on the first dim and the swap is local.
    Per-row keys are those ``batch_axes`` declares (default: the token batch's).
    """
    rows = set(per_row_keys(batch, batch_axes_of(None) if batch_axes is None else batch_axes))

    def split(x: jax.Array) -> jax.Array:
        b = x.shape[0] // num_micro
        return jnp.swapaxes(x.reshape(b, num_micro, *x.shape[1:]), 0, 1)

    return {k: split(v) if k in rows else v for k, v in batch.items()}


def combine_aux(total: dict[str, jax.Array], micro: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Add one micro-batch's aux to the running total: sums add (every objective's metrics are
    contributions to global means), keys ending in ``_max`` keep the largest value (maxima of
    non-negative quantities, e.g. the largest sampler-vs-trainer log-prob difference)."""
    return {k: jnp.maximum(total[k], v) if k.endswith("_max") else total[k] + v
            for k, v in micro.items()}


def _grads(state: TrainState, params: nnx.State, micro: Batch, loss_fn: LossFn):
    def objective(p: nnx.State):
        return loss_fn(nnx.merge(state.graphdef, p, state.frozen), micro)

    with reference_available(state.reference_model()):
        (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(params)
    return loss, aux, grads


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    grad_accum_steps: int = 1,
    schedule: optax.Schedule | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step over the global batch; pure, so it can be jitted and swapped."""
    params = state.params
    axes = batch_axes_of(loss_fn)
    batch = {k: constrain(v, axes[k]) if k in axes else v for k, v in batch.items()}
    rows = per_row_keys(batch, axes, splitting=grad_accum_steps > 1)
    batch["loss_denominator"] = jnp.asarray(denominator_of(loss_fn)(batch), jnp.float32)
    batch["step"] = state.step  # steps already taken, for losses that change over training
    # A model's own auxiliary loss is a per-micro-batch mean (jaxtune.loss.add_model_aux).
    batch["micro_batches"] = jnp.asarray(grad_accum_steps, jnp.int32)
    rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))

    if grad_accum_steps == 1:
        loss, aux, grads = _grads(state, params, {**batch, "rng": step_rng}, loss_fn)
    else:
        micro = split_micro_batches(batch, grad_accum_steps, axes)
        token_arrays = {k: v for k, v in micro.items() if k in rows}
        shared = {k: v for k, v in micro.items() if k not in rows}

        def body(carry, xs):
            index, mb = xs
            mb = {k: constrain(v, axes[k]) for k, v in mb.items()}
            mb = {**mb, **shared, "rng": jax.random.fold_in(step_rng, index)}
            loss, aux, grads = _grads(state, params, mb, loss_fn)
            acc_loss, acc_aux, acc_grads = carry
            return (acc_loss + loss, combine_aux(acc_aux, aux),
                    jax.tree.map(jnp.add, acc_grads, grads)), None

        zero_grads = jax.tree.map(jnp.zeros_like, params)
        first = jax.eval_shape(lambda: _grads(state, params, {**jax.tree.map(
            lambda v: v[0], token_arrays), **shared, "rng": step_rng}, loss_fn))
        zero_aux = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), first[1])
        init = (jnp.zeros((), jnp.float32), zero_aux, zero_grads)
        indices = jnp.arange(grad_accum_steps)
        (loss, aux, grads), _ = jax.lax.scan(body, init, (indices, token_arrays))

    updates, opt_state = optimizer.update(grads, state.opt_state, params)
    new_params = optax.apply_updates(params, updates)
    metrics = {
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(new_params),
        # Every loss mask the batch has (preference pairs: chosen_ and rejected_loss_mask).
        "trained_tokens": (sum(v.astype(jnp.float32).sum() for k, v in batch.items()
                               if k.endswith("loss_mask"))
                           if any(k.endswith("loss_mask") for k in batch)
                           else batch["loss_denominator"]),
        **{k: v for k, v in aux.items() if k != "num_tokens"},
    }
    if schedule is not None:
        metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
    new_state = state.replace(step=state.step + 1, params=new_params, opt_state=opt_state,
                              rng=jax.random.key_data(rng))
    return new_state, metrics


def eval_step(state: TrainState, batch: Batch, *, loss_fn: LossFn) -> dict[str, jax.Array]:
    """Sums over one batch: the loss with denominator 1 (``loss_sum``), the objective's
    normaliser (``count``) and the loss's aux sums; the objective's ``eval_metrics`` turns the
    totals over the eval split into metrics."""
    count = jnp.asarray(denominator_of(loss_fn)(batch), jnp.float32)
    batch = {**batch, "loss_denominator": jnp.ones((), jnp.float32), "step": state.step,
             "rng": jax.random.wrap_key_data(state.rng)}
    with reference_available(state.reference_model()):
        loss, aux = loss_fn(state.model(), batch)
    return {**aux, "loss_sum": loss, "count": count}


def jit_train_step(
    step_fn: Callable[..., tuple[TrainState, dict[str, jax.Array]]],
    state: TrainState,
    mesh: Mesh,
    rules: Rules | None = None,
    *,
    teacher: FrozenModel | None = None,
    **step_kwargs: Any,
):
    """The single jit of the train step: state and batch shardings in and out, state donated.

    With ``teacher`` the jitted step is ``step(state, batch, teacher_state)``: the teacher's
    arrays are an argument (sharded by ``rules``, not donated), read by the loss through
    :func:`jaxtune.objectives.teacher_model`."""
    state_sh = train_state_shardings(state, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())

    def step(state: TrainState, batch: Batch, *teacher_state: Any):
        with activation_rules(mesh, rules), _teacher_in(teacher, teacher_state):
            return step_fn(state, batch, **step_kwargs)

    # The batch keeps the shardings it was placed with (by its keys' logical axes, see
    # jaxtune.data.to_global_batch), which the step pins again by the objective's batch_axes.
    return jax.jit(step, in_shardings=(state_sh, None, *_teacher_shardings(teacher, mesh,
                                                                            rules)),
                   out_shardings=(state_sh, replicated), donate_argnums=(0,))


def _teacher_in(teacher: FrozenModel | None, teacher_state: tuple):
    """The context that makes the step's teacher argument the loss's teacher model."""
    import contextlib

    if teacher is None:
        if teacher_state:
            raise JaxtuneError("the step was given a teacher argument but built without one")
        return contextlib.nullcontext()
    return teacher_available(teacher.model(teacher_state[0]))


def _teacher_shardings(teacher: FrozenModel | None, mesh: Mesh, rules: Rules | None) -> tuple:
    return () if teacher is None else (teacher.shardings(mesh, rules),)


def jit_eval_step(state: TrainState, mesh: Mesh, rules: Rules | None = None, *,
                  loss_fn: LossFn, teacher: FrozenModel | None = None):
    """The jitted eval step, ``step(state, batch)``, or ``step(state, batch, teacher_state)``
    with a teacher (see :func:`jit_train_step`)."""
    state_sh = train_state_shardings(state, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())

    def step(state: TrainState, batch: Batch, *teacher_state: Any):
        with activation_rules(mesh, rules), _teacher_in(teacher, teacher_state):
            return eval_step(state, batch, loss_fn=loss_fn)

    return jax.jit(step, in_shardings=(state_sh, None, *_teacher_shardings(teacher, mesh,
                                                                            rules)),
                   out_shardings=replicated)
