"""Gemma 4 on 8 fake CPU devices: a LoRA train step on a (data=2, fsdp=2, tensor=2) mesh equals
the one-device step (per-layer embeddings and KV sharing, scanned; the MoE block, scanned),
and the MoE model's logits with its experts over an expert axis of 2 equal transformers'."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import jaxtune
from jaxtune.config import LoraConfig, MeshConfig
from jaxtune.mesh import make_mesh
from tests.fixtures_gemma import VOCAB
from tests.fixtures_gemma4 import GEMMA4_VARIANTS, gemma4_logits, make_gemma4_model
from tests.multidevice.test_models_sharded import _sharded_logits
from tests.test_lora import flat_numpy, lora_stepper
from tests.train_helpers import put, synthetic_batch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]


def _steps(model_dir, sizes, scan: bool, targets):
    cfg = LoraConfig(rank=4, alpha=8.0, targets=targets)
    _, state, fn, mesh = lora_stepper(model_dir, cfg, sizes, scan_layers=scan,
                                      optimizer="sgd", lr=0.05)
    losses = []
    for i in range(2):
        state, m = fn(state, put(synthetic_batch(8, 24, VOCAB, seed=i), mesh))
        losses.append(float(m["loss"]))
    return losses, flat_numpy(state.params)


@pytest.mark.parametrize("name", ["shared", "moe"])
def test_lora_step_on_2x2x2_equals_one_device(gemma4_model, name):
    path = gemma4_model(name)
    targets = TARGETS + (["per_layer_input_gate"] if name == "shared" else [])
    ref_losses, ref_params = _steps(path, (1, 1, 1), True, targets)
    losses, params = _steps(path, (2, 2, 2), True, targets)
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    assert params.keys() == ref_params.keys() and params
    for k in ref_params:
        np.testing.assert_allclose(params[k], ref_params[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_moe_logits_with_an_expert_axis_match_transformers(tmp_path):
    # 4 experts (top 2), so the expert axis of 2 divides them.
    path = make_gemma4_model(tmp_path / "moe4", **{**GEMMA4_VARIANTS["moe"], "num_experts": 4})
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=1, expert=2), jax.devices()[:8])
    model = jaxtune.from_pretrained(path, mesh=mesh, scan_layers=True)
    kernel = model.model.layers["sliding"].experts.gate_proj.kernel.get_value()
    assert "expert" in str(kernel.sharding.spec)  # [L, E, D, F]: experts over the expert axis
    ids = np.random.RandomState(2).randint(0, VOCAB, (4, 16))
    np.testing.assert_allclose(_sharded_logits(model, mesh, ids), gemma4_logits(path, ids),
                               atol=1e-4, rtol=0)
