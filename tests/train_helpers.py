"""Shared helpers for training tests: a model from the tiny HF fixture and synthetic batches."""

from __future__ import annotations

import numpy as np
import optax
from flax import nnx

from jaxtune.config import MeshConfig, OptimizerConfig, TrainerConfig
from jaxtune.mesh import make_mesh
from jaxtune.objectives import make_loss_fn
from jaxtune.optim import make_optimizer
from jaxtune.sharding import batch_sharding, make_rules
from jaxtune.train_state import create_train_state
from jaxtune.train_step import jit_train_step, train_step
from jaxtune.weights import from_pretrained


def synthetic_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tokens, two packed documents per row, and uneven loss-mask counts per row."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (batch, seq + 1)).astype(np.int32)
    cut = seq // 3
    segment = np.where(np.arange(seq) < cut, 1, 2).astype(np.int32)[None].repeat(batch, 0)
    segment[:, -2:] = 0  # padding at the end of each row
    positions = np.where(segment == 1, np.arange(seq), np.arange(seq) - cut).astype(np.int32)
    keep = np.linspace(0.1, 0.95, batch)[:, None]
    mask = ((rng.random((batch, seq)) < keep) & (segment > 0)).astype(np.float32)
    mask[:, cut - 1] = 0.0  # never train across a document boundary
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": mask,
            "segment_ids": segment, "positions": np.where(segment > 0, positions, 0)}


def make_stepper(model_dir, mesh_sizes=(1, 1, 1), devices=None, *, grad_accum_steps=1,
                 loss_fn=None, lr=1e-2, optimizer="adamw", steps=10, keep_reference=False):
    """(state, jitted step, mesh) for the tiny model on a mesh of the given sizes."""
    import jax

    devices = devices or jax.devices()[: int(np.prod(mesh_sizes))]
    mesh = make_mesh(MeshConfig(*mesh_sizes), devices)
    rules = make_rules()
    model = from_pretrained(model_dir, mesh=mesh, rules=rules)
    opt_cfg = OptimizerConfig(name=optimizer, learning_rate=lr, schedule="constant",
                              weight_decay=0.01)
    opt = make_optimizer(opt_cfg, steps, nnx.state(model, nnx.Param))
    state = create_train_state(model, opt, mesh=mesh, rules=rules, keep_reference=keep_reference)
    fn = jit_train_step(train_step, state, mesh, rules,
                        loss_fn=loss_fn or make_loss_fn(TrainerConfig(loss_chunk_size=64)),
                        optimizer=opt, grad_accum_steps=grad_accum_steps)
    return state, fn, mesh


def put(batch: dict[str, np.ndarray], mesh) -> dict:
    """Rows split over the batch axes; scalars (a batch's global counts) replicated."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    return {k: jax.device_put(v, batch_sharding(mesh, ndim=np.ndim(v)) if np.ndim(v)
                              else NamedSharding(mesh, PartitionSpec()))
            for k, v in batch.items()}


def params_numpy(state) -> dict[str, np.ndarray]:
    import jax

    flat = nnx.to_flat_state(state.params)
    return {".".join(map(str, p)): np.asarray(jax.device_get(v.get_value())) for p, v in flat}


__all__ = ["synthetic_batch", "make_stepper", "put", "params_numpy", "optax"]
