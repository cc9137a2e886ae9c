"""The real train step of a recipe, built from abstract shapes and compiled for a target.

Nothing here reads a weight or tokenises a row: the model is ``nnx.eval_shape``'d from the
architecture (``config.json`` fields), LoRA and quantisation are applied to that abstract model,
the optimizer state is ``jax.eval_shape(optimizer.init)``, and the batch is
``ShapeDtypeStruct``s. The step is then jitted by the same :func:`jaxtune.train_step.
jit_train_step` the trainer uses, on a mesh of the target's compile-only devices, under
:func:`jaxtune.kernels.compiling_for` so ``attention: auto`` resolves for the target.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jaxtune.config import TrainConfig
from jaxtune.kernels import compiling_for
from jaxtune.train_state import TrainState, count_params


@dataclass
class BuiltStep:
    """A lowered-and-ready train step plus what the report needs to break its memory down."""

    jitted: Any  # the jax.jit of the train step
    state: TrainState  # abstract (ShapeDtypeStruct leaves)
    batch: dict[str, jax.ShapeDtypeStruct]
    mesh: Mesh
    model_config: Any
    attention: str  # the kernel attention resolved to for the target
    num_params: int
    num_trainable: int
    objective: Any = None  # the objective the step trains (its producer may generate, RL)
    teacher: Any = None  # a FrozenModel of shapes given to the step as its third argument


def _dtype(name: str) -> Any:
    return jnp.dtype(name)


def abstract_batch(objective: Any, cfg: TrainConfig, mesh=None,
                   rules=None) -> dict[str, jax.ShapeDtypeStruct]:
    """The objective's global batch (``Objective.batch_shapes``: the packed token batch, pairs,
    rollouts), as shapes placed as its producer places them (rows split by the ``batch`` rule,
    scalars replicated) when a mesh is given: the jitted step keeps the shardings its batch
    comes with."""
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxtune.objectives import batch_axes_of
    from jaxtune.sharding import named_sharding, present_rules

    shapes = objective.batch_shapes(cfg)
    if mesh is None:
        return shapes
    axes, rules = batch_axes_of(objective), present_rules(rules, mesh)
    return {k: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=NamedSharding(mesh, PartitionSpec()) if not x.shape
        else named_sharding(mesh, axes.get(k, ("batch",) + ("seq",) * (len(x.shape) - 1)),
                            rules, x.shape)) for k, x in shapes.items()}


def build_train_step(cfg: TrainConfig, hf_config: dict[str, Any], devices: list,
                     platform: str) -> BuiltStep:
    """The recipe's jitted train step over ``devices``, with abstract state and batch."""
    from jaxtune import loss, optim
    from jaxtune.lora import apply_lora, with_dropout
    from jaxtune.mesh import check_batch, make_mesh
    from jaxtune.models import get_family
    from jaxtune.models.build import single_device_mesh
    from jaxtune.objectives import make_objective
    from jaxtune.sharding import make_rules
    from jaxtune.train_step import jit_train_step, train_step

    mesh = make_mesh(cfg.mesh, devices)
    rules = make_rules(cfg.mesh.rules)
    check_batch(cfg.trainer.global_batch_size, mesh, cfg.trainer.grad_accum_steps)
    family = get_family(hf_config.get("model_type"))
    model_config = family.config_cls.from_hf_config({**hf_config, **cfg.model.overrides})
    m = cfg.model
    options = dict(param_dtype=_dtype(m.dtype), compute_dtype=_dtype(m.compute_dtype),
                   scan_layers=m.scan_layers, remat=m.remat, attention=m.attention)

    def make() -> nnx.Module:
        model = family.model_cls(model_config, rngs=nnx.Rngs(cfg.run.seed), **options)
        if cfg.lora.rank > 0:  # on a one-device mesh: the result is abstract anyway
            model, _ = apply_lora(model, cfg.lora, mesh=single_device_mesh(), rules=rules,
                                  seed=cfg.run.seed)
        return model

    with compiling_for(platform):
        abstract = nnx.eval_shape(make)
    # What the family's model resolved ``attention`` to for the target (a soft-capped Gemma 2
    # takes XLA on GPU), read from its attention layers rather than resolved again here.
    impls = {mod.implementation for _, mod in nnx.iter_graph(abstract)
             if isinstance(mod, nnx.Module) and type(mod).__name__.endswith("Attention")
             and isinstance(getattr(mod, "implementation", None), str)}
    attention = ", ".join(sorted(impls)) or m.attention
    windows = model_config.layer_windows()
    # Scanned layers whose windows follow a repeating pattern (Gemma's) run as blocks with a
    # static window on every layer (jaxtune.models.stack.block_runs); otherwise mixed windows
    # are a per-layer array, which the kernels cannot take (they fall back to XLA).
    from jaxtune.models.stack import block_runs

    mixed = m.scan_layers and len(set(windows)) > 1 and \
        block_runs([{"window": w} for w in windows]) is None
    if attention == "splash" and mixed:
        attention = "xla (splash cannot take the per-layer window array of these scanned layers)"
    windowed = sum(w is not None and w < cfg.data.seq_len for w in windows)
    if attention == "pallas_gpu" and windowed:
        # The Triton kernel has no sliding window: those layers fall back to XLA (with a note),
        # all of them when scanned layers mix windows in no repeating pattern.
        attention = ("xla (the pallas_gpu kernel has no sliding window)"
                     if windowed == len(windows) or mixed
                     else f"pallas_gpu (XLA on the {windowed} sliding-window layers)")
    if cfg.lora.rank > 0:
        from jaxtune.lora import TRAINABLE as trainable
    else:
        trainable = nnx.Param
    graphdef, params, frozen = nnx.split(abstract, trainable, ...)
    optimizer = optim.make_optimizer(cfg.optimizer, cfg.trainer.steps, params)
    state = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32), params=params, frozen=frozen,
        opt_state=jax.eval_shape(optimizer.init, params),
        rng=jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))), graphdef=graphdef)
    loss_fn = make_objective(cfg)
    if cfg.lora.rank > 0 and cfg.lora.dropout > 0:
        loss_fn = with_dropout(loss_fn)
    step_fn = loss.load_callable(cfg.trainer.train_step) if cfg.trainer.train_step \
        else train_step
    teacher = None
    if loss_fn.teacher is not None:  # distillation: the teacher's arrays sit on the same chips
        from jaxtune.distill.teacher import abstract_teacher

        teacher = abstract_teacher(cfg, platform)
    jitted = jit_train_step(step_fn, state, mesh, rules, loss_fn=loss_fn, optimizer=optimizer,
                            grad_accum_steps=cfg.trainer.grad_accum_steps,
                            schedule=optim.make_schedule(cfg.optimizer, cfg.trainer.steps),
                            teacher=teacher)
    return BuiltStep(jitted, state, abstract_batch(loss_fn, cfg, mesh, rules), mesh,
                     model_config,
                     attention, count_params(params) + count_params(frozen),
                     count_params(params), loss_fn, teacher)


def lower(built: BuiltStep, platform: str):
    """Trace and lower the step for the target (kernels are chosen while tracing)."""
    extra = () if built.teacher is None else (built.teacher.state,)
    with compiling_for(platform):
        return built.jitted.lower(built.state, built.batch, *extra)


def probe_config(cfg: TrainConfig, layers: int, *, remat: str | None = None,
                 full_finetune: bool = False) -> tuple[TrainConfig, dict[str, Any]]:
    """A copy of ``cfg`` whose step the compiler's cost analysis counts exactly.

    XLA's cost analysis counts a loop body once, whatever its trip count, and cannot see
    inside a Pallas kernel. So the probe unrolls ``layers`` layers (no scan), takes one
    micro-batch with no accumulation loop, one loss chunk, and XLA attention; the caller
    scales the per-layer difference back up. ``remat`` / ``full_finetune`` change what is
    counted (the MFU formula counts neither recomputation nor LoRA's skipped weight grads).
    """
    t = cfg.trainer
    micro = t.global_batch_size // t.grad_accum_steps
    probe = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, scan_layers=False, attention="xla",
                                  remat=remat if remat is not None else cfg.model.remat,
                                  overrides={**cfg.model.overrides,
                                             "num_hidden_layers": layers}),
        trainer=dataclasses.replace(t, global_batch_size=micro, grad_accum_steps=1,
                                    loss_chunk_size=micro * cfg.data.seq_len),
        lora=dataclasses.replace(cfg.lora, rank=0, quantize_base="none", base_dtype="",
                                 modules_to_save=[]) if full_finetune else cfg.lora,
    )
    return probe, {}


def compiled_flops(compiled) -> float | None:
    """Total FLOPs of a compiled SPMD program per device (None when the backend has none)."""
    try:
        costs = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    if isinstance(costs, (list, tuple)):
        costs = costs[0] if costs else None
    if not costs or "flops" not in costs:
        return None
    return float(costs["flops"])


def count_layers(model_config: Any) -> int:
    return int(model_config.num_hidden_layers)
