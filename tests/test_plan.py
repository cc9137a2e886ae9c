"""`jaxtune plan` without a compiler: targets, offline config.json lookup, the memory report's
arithmetic and suggestions, and the errors. The compiles themselves are in tests/plan_compile."""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxtune.cli import main
from jaxtune.config import load_config
from jaxtune.errors import JaxtuneError
from jaxtune.plan import devices as plan_devices
from jaxtune.plan.hf import find_hf_config, shipped_models
from jaxtune.plan.report import MemoryPlan, parse_oom, shard_bytes, suggestions
from jaxtune.plan.targets import GIB, TargetError, parse_target


@pytest.mark.parametrize("name, topology, chips, slices, hbm", [
    ("v5e-8", "v5e:2x4", 8, 1, 16), ("v5litepod-16", "v5e:4x4", 16, 1, 16),
    ("v5e-256", "v5e:16x16", 256, 1, 16), ("v6e-8", "v6e:2x4", 8, 1, 32),
    ("v6e-256", "v6e:16x16", 256, 1, 32), ("v4-32", "v4:2x2x4", 16, 1, 32),
    ("v5p-64", "v5:2x4x4", 32, 1, 95), ("v5p-128", "v5:4x4x4", 64, 1, 95),
    ("v5p-1024", "v5:8x8x8", 512, 1, 95), ("2xv5e-256", "v5e:16x16", 256, 2, 16),
    ("8xh100", "1x1x8", 8, 1, 80), ("8xh200", "1x1x8", 8, 1, 141),
    ("8xa100-80gb", "1x1x8", 8, 1, 80),
])
def test_targets(name, topology, chips, slices, hbm):
    t = parse_target(name)
    assert (t.topology, t.chips_per_slice, t.slices) == (topology, chips, slices)
    assert t.hbm_bytes == hbm * GIB
    assert t.num_chips == chips * slices


@pytest.mark.parametrize("bad", ["v5p-48", "v9-8", "h100", "8xh100-8", "v5e", "fast"])
def test_bad_targets_name_the_fix(bad):
    with pytest.raises(TargetError, match="target"):
        parse_target(bad)


def test_shipped_configs_build_their_models():
    """Every shipped config.json builds a family config with the real sizes."""
    from jaxtune.models import get_family

    expected = {"meta-llama/Llama-3.1-8B-Instruct": 8.03e9,
                "meta-llama/Llama-3.1-70B-Instruct": 70.6e9,
                "Qwen/Qwen2.5-7B-Instruct": 7.62e9,
                "Qwen/Qwen2.5-32B-Instruct": 32.76e9}
    assert set(expected) <= set(shipped_models())
    for hub_id, params in expected.items():
        hf, source = find_hf_config(hub_id)
        assert "shipped" in source
        c = get_family(hf["model_type"]).config_cls.from_hf_config(hf)
        d, f, layers, v = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
        attn = d * c.head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
        n = layers * (attn + 3 * d * f) + 2 * d * v
        assert abs(n - params) / params < 0.01, (hub_id, n)


def test_local_folder_and_hf_cache_win_over_shipped(tmp_path, monkeypatch):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "x": 1}))
    assert find_hf_config(str(folder))[0]["x"] == 1
    cache = tmp_path / "hub"
    snap = cache / "models--meta-llama--Llama-3.1-8B-Instruct" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps({"model_type": "llama", "x": 2}))
    refs = cache / "models--meta-llama--Llama-3.1-8B-Instruct" / "refs"
    refs.mkdir()
    (refs / "main").write_text("abc")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    hf, source = find_hf_config("meta-llama/Llama-3.1-8B-Instruct")
    assert hf["x"] == 2 and "cache" in source


def test_unknown_model_says_how_to_get_its_config():
    with pytest.raises(JaxtuneError, match="hf download some-org/some-model config.json"):
        find_hf_config("some-org/some-model")


def test_shard_bytes_counts_one_devices_share():
    mesh = jax.make_mesh((1,), ("fsdp",))
    x = jax.ShapeDtypeStruct((8, 4), jnp.float32)
    assert shard_bytes([x], [NamedSharding(mesh, PartitionSpec("fsdp"))]) == 8 * 4 * 4


def test_parse_oom_messages():
    msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
           "temporaries (24.00G) exceeds available HBM (15.75G).")
    assert parse_oom(msg) == (24 * GIB, int(15.75 * GIB))
    assert parse_oom("Used 20.50G of 15.48G hbm. Exceeded hbm capacity by 5.02G.") == (
        int(20.5 * GIB), int(15.48 * GIB))
    assert parse_oom("something else") is None


def _plan(peak_gib, activations_gib, hbm_gib=16):
    return MemoryPlan(params=int(0.5 * GIB), frozen=2 * GIB, opt_state=GIB, gradients=GIB // 2,
                      activations=int(activations_gib * GIB), batch=0,
                      peak=int(peak_gib * GIB), hbm=hbm_gib * GIB)


def test_near_miss_suggests_remat_fsdp_and_micro_batches():
    cfg = load_config(None, ["--model.path=x", "--model.remat=dots_saveable", "--mesh.data=2",
                             "--mesh.fsdp=4", "--trainer.global_batch_size=64"])
    plan = _plan(17.5, 10)
    assert not plan.fits and plan.headroom < 0
    tips = suggestions(plan, cfg, parse_target("v5e-8"))
    text = "\n".join(tips)
    assert "needs 2.30 GiB less per chip" in tips[0]
    assert "model.remat: minimal" in text
    assert "mesh.fsdp: 8" in text
    assert "trainer.grad_accum_steps: 2" in text  # halving the micro-batch saves 5 GiB >= 2.3
    assert suggestions(_plan(8, 4), cfg, parse_target("v5e-8")) == []


def test_missing_compiler_names_the_extra(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "jax_plugins.xla_cuda12", None)  # import fails
    with pytest.raises(plan_devices.MissingCompilerError, match=r"jaxtune\[plan\]"):
        plan_devices.compile_only_devices(parse_target("8xh100"))
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "libtpu" else real(name, *a))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {path: meta-llama/Llama-3.1-8B-Instruct}\n")
    assert main(["plan", str(recipe), "--target", "v5e-8"]) == 2
    err = capsys.readouterr().err
    assert "TPU compiler (libtpu)" in err and "jaxtune[plan]" in err


def test_slices_must_match_dcn_data(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {path: meta-llama/Llama-3.1-8B-Instruct}\n")
    assert main(["plan", str(recipe), "--target", "2xv5e-256"]) == 2
    assert "--mesh.dcn_data=2" in capsys.readouterr().err


def test_gpu_target_config_is_a_proto_text():
    text = plan_devices.gpu_target_config(plan_devices.GPU_SPECS["h100"])
    assert "major: 9 minor: 0" in text and "core_count: 132" in text
    assert f"device_memory_size: {80 * GIB}" in text


def test_flops_probes_are_counted_on_the_cpu_compiler(monkeypatch):
    # The probes only count FLOPs: they compile for one CPU device whatever the target (the
    # partitioned TPU program under-counts, the GPU path has no cost analysis, and a full
    # fine-tune's probe may not fit a chip), and the per-layer difference is scaled up.
    import types

    import jaxtune.plan as plan
    from jaxtune.plan import build

    built_for = []

    def fake_build(probe, hf, devices, platform):
        built_for.append((platform, len(devices), probe.mesh.fsdp, probe.mesh.tensor))
        layers = probe.model.overrides["num_hidden_layers"]
        return types.SimpleNamespace(layers=layers)

    monkeypatch.setattr(build, "build_train_step", fake_build)
    monkeypatch.setattr(build, "compiled_flops", lambda c: 10.0 + 5.0 * (c.layers - 1))
    monkeypatch.setattr(plan, "_compile", lambda built, platform: built)
    cfg = load_config(None, ["--model.path=x", "--trainer.grad_accum_steps=2",
                             "--mesh.fsdp=8", "--mesh.tensor=2"])
    flops = plan.step_flops(cfg, {"num_hidden_layers": 4}, remat="none", full_finetune=True)
    assert built_for == [("cpu", 1, 1, 1)] * 2
    assert flops == (10.0 + 3 * 5.0) * 2


def test_compiler_flops_agree_with_the_mfu_formula_for_llama_8b():
    # The real probes of Llama 3.1 8B (shipped config.json fields; one sequence of 2048
    # tokens, full fine-tune, no remat): the compiler's count is within 10% of 6N + attention.
    from jaxtune import metrics
    from jaxtune.models import get_family
    from jaxtune.plan import step_flops
    from jaxtune.plan.hf import find_hf_config

    cfg = load_config("configs/llama3.1-8b-full-v5p64.yaml",
                      ["--data.seq_len=2048", "--trainer.global_batch_size=1",
                       "--mesh.fsdp=1"])
    hf, _ = find_hf_config(cfg.model.path)
    model_config = get_family(hf["model_type"]).config_cls.from_hf_config(hf)
    counted = step_flops(cfg, hf, remat="none", full_finetune=True)
    formula = metrics.flops_per_token(model_config, 2048) * 2048
    assert 0.9 < counted / formula < 1.1, counted / formula


def test_plan_names_the_attention_a_soft_capped_model_runs_on_gpu():
    # Gemma 2 soft-caps its attention logits, which neither cuDNN nor the Pallas GPU kernel
    # can: its layers take XLA attention, and the plan must say so rather than cudnn.
    import jax

    from jaxtune.plan.build import build_train_step

    hf = dict(model_type="gemma2", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=2, num_key_value_heads=1, head_dim=32, vocab_size=128,
              query_pre_attn_scalar=32, sliding_window=4096, attn_logit_softcapping=50.0,
              final_logit_softcapping=30.0, max_position_embeddings=256)
    cfg = load_config(None, ["--model.path=x", "--model.compute_dtype=bfloat16",
                             "--data.seq_len=256", "--trainer.global_batch_size=1"])
    built = build_train_step(cfg, hf, jax.devices("cpu")[:1], "gpu")
    assert built.attention == "xla"
