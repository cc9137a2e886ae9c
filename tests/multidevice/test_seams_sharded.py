"""The seams on a (2,2,2) mesh: experts stacked by the table read shard by shard, and a toy
objective with a per-row key and a per-sequence normaliser accumulates exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import jaxtune
import tests.toy_family  # noqa: F401  (registers the toy_moe family)
from jaxtune.config import MeshConfig
from jaxtune.export.tensors import iter_hf_tensors
from jaxtune.mesh import make_mesh
from jaxtune.objectives import TOKEN_AXES, Objective
from jaxtune.sharding import make_rules
from tests.toy_family.fixture import write_toy_checkpoint
from tests.train_helpers import make_stepper, params_numpy, put, synthetic_batch


@pytest.mark.parametrize("scan", [False, True])
def test_experts_load_shard_by_shard_and_export_bitwise(tmp_path, scan):
    original = write_toy_checkpoint(tmp_path)
    mesh = make_mesh(MeshConfig(2, 2, 2), jax.devices())
    rules = make_rules({"experts": ["fsdp"], "mlp": ["tensor"]})
    model = jaxtune.from_pretrained(tmp_path, mesh=mesh, scan_layers=scan, rules=rules)
    layers = model.model.layers
    gate = layers.mlp.gate_proj[...] if scan else layers[0].mlp.gate_proj[...]
    spec = gate.sharding.spec
    assert "fsdp" in str(spec) and "tensor" in str(spec), spec  # experts and mlp really split
    full = np.stack([np.stack([original[f"model.layers.{i}.mlp.experts.{j}.gate_proj.weight"].T
                               for j in range(4)]) for i in range(3)])
    full = full if scan else full[0]
    for shard in gate.addressable_shards:  # each device read only its own block
        np.testing.assert_array_equal(np.asarray(shard.data), full[shard.index])
    exported = dict(iter_hf_tensors(model))
    assert exported.keys() == load_file(tmp_path / "model.safetensors").keys()
    for key, array in original.items():
        np.testing.assert_array_equal(exported[key], array, err_msg=key)


def _weighted_sequence_loss(model, batch):
    """Mean token NLL of each row, weighted by the per-row ``row_weight`` [B], summed and
    divided by the number of sequences in the whole global batch."""
    logits = model(batch["input_ids"], batch["positions"], batch["segment_ids"])
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    mask = batch["loss_mask"]
    per_row = (nll * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1.0)
    total = (per_row * batch["row_weight"]).sum()
    return total / batch["loss_denominator"], {"sequences": jnp.float32(per_row.shape[0])}


TOY_OBJECTIVE = Objective(
    "weighted_sequences", _weighted_sequence_loss,
    batch_axes={**TOKEN_AXES, "row_weight": ("batch",)},
    denominator=lambda batch: jnp.float32(batch["row_weight"].shape[0]))


def _grads_after_one_step(model_dir, sizes, accum):
    state, fn, mesh = make_stepper(model_dir, sizes, grad_accum_steps=accum, optimizer="sgd",
                                   lr=1.0, loss_fn=TOY_OBJECTIVE)
    before = params_numpy(state)
    batch = synthetic_batch(8, 24, 389)
    batch["row_weight"] = np.linspace(0.5, 2.0, 8).astype(np.float32)
    state, metrics = fn(state, put(batch, mesh))
    after = params_numpy(state)
    # SGD with lr 1 and no decay on these: the update is minus the gradient.
    return float(metrics["loss"]), {k: before[k] - after[k] for k in before}


def test_toy_objective_accumulates_exactly_on_a_mesh(tiny_hf_model):
    path = tiny_hf_model("llama")
    loss1, grads1 = _grads_after_one_step(path, (2, 2, 2), 1)
    loss4, grads4 = _grads_after_one_step(path, (2, 2, 2), 4)
    ref_loss, ref_grads = _grads_after_one_step(path, (1, 1, 1), 1)
    np.testing.assert_allclose(loss4, loss1, rtol=1e-5)
    np.testing.assert_allclose(loss1, ref_loss, rtol=1e-5)
    for k in grads1:
        np.testing.assert_allclose(grads4[k], grads1[k], rtol=1e-4, atol=1e-6, err_msg=k)
        np.testing.assert_allclose(grads1[k], ref_grads[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_an_undeclared_per_row_key_is_refused(tiny_hf_model):
    state, fn, mesh = make_stepper(tiny_hf_model("llama"), (2, 2, 2), grad_accum_steps=2)
    batch = synthetic_batch(8, 24, 389)
    batch["row_weight"] = np.ones(8, np.float32)
    with pytest.raises(Exception, match="row_weight.*batch_axes"):
        fn(state, put(batch, mesh))
