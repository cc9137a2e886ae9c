"""The MoE family (mixtral, qwen2_moe, qwen3_moe) against transformers: logits, router
losses, the loss an objective trains on, export round trips, FLOPs accounting, LoRA.

Every variant of ``tests/fixtures_moe.py`` (5 experts, top-2, odd sizes; with and without a
shared expert, ``norm_topk_prob`` on and off, all-sparse and dense + sparse layers) is loaded
from a checkpoint transformers saved, with and without ``scan_layers``.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtune.export.api import save_pretrained
from jaxtune.loss import cross_entropy_loss
from jaxtune.metrics import flops_per_token
from jaxtune.models.moe.config import MoeConfig
from jaxtune.weights import from_pretrained
from tests.fixtures_moe import MOE_VARIANTS
from tests.test_export import assert_same_tensors

IDS = np.random.default_rng(0).integers(0, 67, (2, 11))
MASK = np.ones((2, 11), np.int64)
MASK[1, 8:] = 0  # the second row ends in padding


def hf_model(model_dir):
    import torch
    import transformers

    # The eager expert loop: transformers' grouped_mm path needs 16-byte aligned strides,
    # which the odd test sizes do not have.
    return transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, experts_implementation="eager").eval()


def hf_outputs(model_dir, **kwargs):
    import torch

    with torch.no_grad():
        return hf_model(model_dir)(torch.as_tensor(IDS), output_router_logits=True, **kwargs)


@pytest.mark.parametrize("variant", list(MOE_VARIANTS))
def test_logits_and_router_loss_match_transformers(variant, moe_hf_model):
    import torch

    model_dir = moe_hf_model(variant)
    plain = hf_outputs(model_dir)
    padded = hf_outputs(model_dir, attention_mask=torch.as_tensor(MASK))
    # A dense + sparse mix keeps its layers as a list under scan_layers: one run covers both.
    for scan in (False,) if "mixed" in variant else (False, True):
        model = from_pretrained(model_dir, scan_layers=scan)
        if "mixed" in variant:
            assert not from_pretrained(model_dir, scan_layers=True).model.scan_layers
        (logits, aux), (_, aux_padded) = forward(model)
        np.testing.assert_allclose(np.asarray(logits), plain.logits.numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(float(aux["metrics"]["router_aux_loss"]),
                                   float(plain.aux_loss), atol=1e-5, rtol=0)
        # Padding (segment 0) is masked out of the router statistics like HF's attention mask.
        np.testing.assert_allclose(float(aux_padded["metrics"]["router_aux_loss"]),
                                   float(padded.aux_loss), atol=1e-5, rtol=0)
        fractions = [float(v) for k, v in aux_padded["metrics"].items()
                     if k.startswith("expert_fraction/")]
        assert len(fractions) == 5 and abs(sum(fractions) - 1.0) < 1e-6
        assert float(aux_padded["metrics"]["expert_load_max"]) == pytest.approx(
            5 * max(fractions))


@nnx.jit
def forward(model):
    """Logits and router output on IDS, without and with the padding mask (one compile)."""
    out = []
    for seg in (None, jnp.asarray(MASK, jnp.int32)):
        hidden, aux = model.hidden_states_and_aux(jnp.asarray(IDS), None, seg)
        out.append((model.unembed(hidden), aux))
    return out


@pytest.mark.parametrize("variant", ["qwen3_moe_mixed"])
def test_training_loss_is_transformers_loss_with_router_loss(variant, moe_hf_model):
    """The objective's loss adds router_aux_loss_coef * aux_loss by default, as transformers'
    loss does when output_router_logits is set (there it is off by default)."""
    import torch

    model_dir = moe_hf_model(variant)
    labels = np.where(MASK == 1, np.roll(IDS, -1, axis=1), -100)
    labels[:, -1] = -100
    out = hf_outputs(model_dir, attention_mask=torch.as_tensor(MASK),
                     labels=torch.as_tensor(np.concatenate(
                         [np.full((2, 1), -100), labels[:, :-1]], axis=1)))
    model = from_pretrained(model_dir)
    batch = {"input_ids": jnp.asarray(IDS), "targets": jnp.asarray(np.maximum(labels, 0)),
             "loss_mask": jnp.asarray(labels >= 0, jnp.float32),
             "segment_ids": jnp.asarray(MASK, jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(11), (2, 11))}
    loss, aux = nnx.jit(cross_entropy_loss)(model, batch)
    np.testing.assert_allclose(float(loss), float(out.loss), atol=1e-5, rtol=0)
    assert float(aux["router_aux_loss"]) == pytest.approx(float(out.aux_loss), abs=1e-5)
    # Turned off by the config's coefficient, the loss is the cross-entropy alone.
    off = from_pretrained(model_dir, router_aux_loss_coef=0.0)
    loss_off, _ = nnx.jit(cross_entropy_loss)(off, batch)
    coef = json.loads((model_dir / "config.json").read_text())["router_aux_loss_coef"]
    np.testing.assert_allclose(float(loss) - float(loss_off), coef * float(out.aux_loss),
                               atol=1e-6)


def test_router_z_loss_is_optional_and_reported(moe_hf_model):
    model_dir = moe_hf_model("qwen2_moe")
    base = from_pretrained(model_dir)
    z = from_pretrained(model_dir, router_z_loss_coef=0.5)
    run = nnx.jit(lambda m: m.hidden_states_and_aux(jnp.asarray(IDS))[1])
    aux0, aux1 = run(base), run(z)
    assert float(aux0["metrics"]["router_z_loss"]) > 0
    np.testing.assert_allclose(float(aux1["loss"] - aux0["loss"]),
                               0.5 * float(aux0["metrics"]["router_z_loss"]), rtol=1e-5)


@pytest.mark.parametrize("variant", list(MOE_VARIANTS))
def test_save_pretrained_round_trip_is_exact(variant, moe_hf_model, tmp_path):
    model_dir = moe_hf_model(variant)
    original = json.loads((model_dir / "config.json").read_text())
    for scan in (False, True):
        model = from_pretrained(model_dir, scan_layers=scan)
        out = save_pretrained(model, tmp_path / f"scan{scan}")
        assert_same_tensors(model_dir, out)
        assert json.loads((out / "config.json").read_text()) == original
        assert MoeConfig.from_hf_config(original).to_hf_config() == original


def test_flops_count_active_experts(moe_hf_model):
    cfg = MoeConfig.from_hf_config(json.loads(
        (moe_hf_model("qwen2_moe") / "config.json").read_text()))
    d, layers = cfg.hidden_size, cfg.num_hidden_layers
    attention = d * cfg.head_dim * (2 * 3 + 2 * 1)
    per_layer_mlp = 2 * 3 * d * 14 + d * 5 + 3 * d * 18 + d  # top-2, router, shared + gate
    n = layers * (attention + per_layer_mlp) + d * cfg.vocab_size
    assert flops_per_token(cfg, 16) == 6 * n + 12 * layers * 3 * cfg.head_dim * 16


def test_grouped_dispatch_equals_per_expert_loop(moe_hf_model):
    """ragged_dot and the CPU row tiles compute what every expert over every token, masked,
    does: values and gradients."""
    model_dir = moe_hf_model("mixtral")
    _, state = nnx.split(from_pretrained(model_dir))

    @nnx.jit
    def value_and_grad(model):
        return nnx.value_and_grad(lambda m: jnp.sum(jnp.sin(m(jnp.asarray(IDS)))))(model)

    results = {name: value_and_grad(nnx.merge(nnx.graphdef(_with_dispatch(
        MoeConfig.from_hf_config(json.loads((model_dir / "config.json").read_text())), name)),
        state)) for name in ("naive", "ragged", "tiled")}
    v0, g0 = results.pop("naive")
    for v, g in results.values():
        np.testing.assert_allclose(float(v), float(v0), rtol=1e-5)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g0), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)


def _with_dispatch(cfg, dispatch):
    from jaxtune.models.moe.model import MoeForCausalLM

    return nnx.eval_shape(lambda: MoeForCausalLM(cfg, dispatch=dispatch, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("variant,targets,scan", [
    ("mixtral", ["w1", "w3", "w2", "q_proj"], True),
    ("qwen2_moe", ["gate_proj", "up_proj", "down_proj", "v_proj"], False),
    ("qwen3_moe", ["gate_proj"], False),  # gate without up, experts only
])
def test_peft_adapter_on_experts_loads_in_peft(variant, targets, scan, moe_hf_model, tmp_path):
    """Expert adapters go to PEFT's target_parameters on transformers' fused experts (gate and
    up as one rank-2r adapter); peft loads the folder and gives jaxtune's logits, and the
    merged export equals the PEFT-applied model."""
    import peft
    import torch

    from jaxtune.config import LoraConfig
    from jaxtune.lora import LoraParam, apply_lora

    model_dir = moe_hf_model(variant)
    model, _ = apply_lora(from_pretrained(model_dir, scan_layers=scan),
                          LoraConfig(rank=3, alpha=6.0, targets=targets))
    state = nnx.state(model, LoraParam)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [
        jax.random.normal(k, v.shape) * 0.3 for k, v in zip(keys, leaves, strict=True)]))
    adapted = np.asarray(nnx.jit(lambda m: m(jnp.asarray(IDS)))(model))
    out = save_pretrained(model, tmp_path / "adapter", lora="adapter")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["target_parameters"]
    with torch.no_grad():
        applied = peft.PeftModel.from_pretrained(hf_model(model_dir), out).eval()
        logits = applied(torch.as_tensor(IDS)).logits.numpy()
        np.testing.assert_allclose(logits, adapted, atol=1e-4, rtol=0)
        merged = hf_model(save_pretrained(model, tmp_path / "merged"))(
            torch.as_tensor(IDS)).logits.numpy()
    np.testing.assert_allclose(merged, logits, atol=1e-4, rtol=0)
    plain = np.asarray(nnx.jit(lambda m: m(jnp.asarray(IDS)))(from_pretrained(model_dir)))
    assert np.abs(adapted - plain).max() > 1e-2  # the expert adapters really act


def test_trained_run_exports_expert_adapters_that_peft_loads(tmp_path, data_tokenizers):
    """The run's own export (from its checkpoint, not a model in memory) writes the expert
    adapters for peft: the PEFT model and the merged export give the trained model's logits."""
    import peft
    import torch

    from jaxtune.config import config_from_dict
    from jaxtune.trainer import train
    from tests.fixtures_data import chat_rows, write_jsonl
    from tests.fixtures_moe import make_moe_hf_model

    model_type, overrides = MOE_VARIANTS["qwen2_moe"]
    base = make_moe_hf_model(model_type, tmp_path / "base", **{**overrides, "vocab_size": 389})
    cfg = config_from_dict({
        "run": {"output_dir": str(tmp_path / "run"), "seed": 3},
        "model": {"path": str(base), "tokenizer": data_tokenizers["chatml"],
                  "scan_layers": True},
        "lora": {"rank": 2, "alpha": 4, "targets": ["gate_proj", "up_proj", "down_proj",
                                                    "q_proj"]},
        "data": {"sources": [{"path": write_jsonl(tmp_path / "c.jsonl", chat_rows(12))}],
                 "format": "chat", "seq_len": 32, "cache_dir": str(tmp_path / "cache")},
        "optimizer": {"learning_rate": 3e-2, "schedule": "constant"},
        "trainer": {"steps": 2, "global_batch_size": 2, "progress": False},
        "logging": {"tensorboard": False, "stdout": False},
        "export": {"enabled": True, "lora": "both", "dtype": "float32"},
    })
    trained = train(cfg).state.model()
    ids = np.random.default_rng(1).integers(0, 389, (2, 11))
    ref = np.asarray(trained(jnp.asarray(ids)))
    adapter = tmp_path / "run" / "hf-adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["target_parameters"]
    with torch.no_grad():
        applied = peft.PeftModel.from_pretrained(hf_model(base), adapter).eval()
        np.testing.assert_allclose(applied(torch.as_tensor(ids)).logits.numpy(), ref,
                                   atol=1e-4, rtol=0)
        merged = hf_model(tmp_path / "run" / "hf")(torch.as_tensor(ids)).logits.numpy()
        plain = hf_model(base)(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(merged, ref, atol=1e-4, rtol=0)
    assert np.abs(ref - plain).max() > 1e-3  # two steps moved the adapters off zero


def test_router_loss_under_accumulation_is_the_micro_batch_mean(moe_hf_model):
    """With 2 micro-batches the step's router loss is the mean of each micro-batch's own."""
    from tests.train_helpers import make_stepper, put, synthetic_batch

    model_dir = moe_hf_model("qwen3_moe_mixed")
    batch = synthetic_batch(4, 9, 67)
    model = from_pretrained(model_dir)
    # Jitted: run eagerly, the grouped dispatch is hundreds of small ops per layer.
    router_loss = nnx.jit(lambda model, *args: model.hidden_states_and_aux(*args)[1][
        "metrics"]["router_aux_loss"])
    expected = np.mean([float(router_loss(
        model, jnp.asarray(batch["input_ids"][m::2]), jnp.asarray(batch["positions"][m::2]),
        jnp.asarray(batch["segment_ids"][m::2]))) for m in range(2)])
    state, fn, mesh = make_stepper(model_dir, grad_accum_steps=2)
    _, metrics = fn(state, put(batch, mesh))
    np.testing.assert_allclose(float(metrics["router_aux_loss"]), expected, rtol=1e-5)
