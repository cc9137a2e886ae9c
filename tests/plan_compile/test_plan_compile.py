"""Compile-only tier: the real train step of a tiny model compiled for TPU and GPU targets with
no accelerator (libtpu and the CUDA plugin from the plan extra). Run by scripts/test.sh in its
own process with JAXTUNE_PLAN_COMPILE=1. Each test is one or two compiles of a 2-layer model."""

from __future__ import annotations

import json

import pytest

from jaxtune.config import load_config
from jaxtune.plan import format_plan, make_plan
from jaxtune.plan.build import build_train_step, lower
from jaxtune.plan.devices import compile_only_devices
from jaxtune.plan.targets import GIB, parse_target

pytestmark = pytest.mark.tpu_compile

TINY = {"model_type": "llama", "vocab_size": 512, "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 128, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 4096, "tie_word_embeddings": False}


def _model_dir(tmp_path_factory, **changes) -> str:
    folder = tmp_path_factory.mktemp("model")
    (folder / "config.json").write_text(json.dumps({**TINY, **changes}))
    return str(folder)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return _model_dir(tmp_path_factory)


def _cfg(path: str, *overrides: str):
    return load_config(None, [f"--model.path={path}", "--model.dtype=float32",
                              "--model.compute_dtype=bfloat16", "--model.scan_layers=true",
                              "--model.remat=full", "--data.seq_len=256",
                              "--trainer.global_batch_size=8", "--mesh.data=1",
                              "--mesh.fsdp=-1", "--mesh.tensor=1", *overrides])


def test_full_step_with_splash_for_v5e_2x4(tiny_dir):
    """LoRA, scan, remat, FSDP over 8 chips, splash inside shard_map; memory analysis present."""
    cfg = _cfg(tiny_dir, "--lora.rank=8", "--mesh.fsdp=4", "--mesh.tensor=2")
    target = parse_target("v5e-8")
    built = build_train_step(cfg, TINY, compile_only_devices(target), "tpu")
    assert built.attention == "splash"
    compiled = lower(built, "tpu").compile()
    # The Mosaic kernel is in the program: compiled, not interpreted.
    assert "tpu_custom_call" in compiled.as_text()
    stats = compiled.memory_analysis()
    assert stats.argument_size_in_bytes > 0 and stats.temp_size_in_bytes > 0


def test_multi_host_v5p_topology_plans_and_fits(tiny_dir):
    """v5p-64 is 32 chips on 8 hosts; the report's numbers come from the compiler."""
    cfg = _cfg(tiny_dir, "--trainer.global_batch_size=32", "--model.attention=xla")
    target = parse_target("v5p-64")
    devices = compile_only_devices(target)
    assert len(devices) == 32 and len({d.process_index for d in devices}) == 8
    result = make_plan(cfg, target)
    m = result.memory
    assert result.fits and m.peak > 0 and m.compiler["argument_size_in_bytes"] > 0
    # float32 params + 2 AdamW moments, FSDP over 32 chips (sizes divide evenly here).
    assert m.opt_state == pytest.approx(2 * m.params, rel=0.01)
    assert result.flops_per_step and result.flops_per_step > 0
    text = format_plan(cfg, result)
    assert "verdict: fits" in text and "v5p" in text


def test_oversized_config_does_not_fit_on_tpu(tmp_path_factory):
    """A 40-layer model of width 4096 in float32 on one v5e host: the compiler refuses it."""
    big = _model_dir(tmp_path_factory, hidden_size=4096, intermediate_size=16384,
                     num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=8,
                     vocab_size=32000)
    cfg = _cfg(big, "--model.attention=xla", "--mesh.fsdp=1", "--mesh.data=-1")
    result = make_plan(cfg, parse_target("v5e-8"), flops=False)
    assert not result.fits
    assert result.memory.peak > 16 * GIB
    text = format_plan(cfg, result)
    assert "DOES NOT FIT" in text and "try: mesh.fsdp: 8" in text


def test_gpu_target_compiles_and_is_compared_with_hbm(tiny_dir, tmp_path_factory):
    """8 x H100: cuDNN flash attention in bf16; the GPU compiler never refuses, so the plan
    compares its memory analysis with the table's 80 GiB itself (both ways)."""
    cfg = _cfg(tiny_dir, "--mesh.fsdp=8")
    target = parse_target("8xh100")
    result = make_plan(cfg, target, flops=False)
    assert result.attention == "cudnn"
    assert result.fits and 0 < result.memory.peak < 80 * GIB
    big = _model_dir(tmp_path_factory, hidden_size=8192, intermediate_size=28672,
                     num_hidden_layers=24, num_attention_heads=64, num_key_value_heads=8)
    cfg = _cfg(big, "--mesh.fsdp=1", "--mesh.data=-1", "--model.attention=xla")
    result = make_plan(cfg, target, flops=False)
    assert not result.fits and not result.memory.oom_message
    assert result.memory.peak > 80 * GIB
    assert "DOES NOT FIT" in format_plan(cfg, result)


def test_pallas_gpu_attention_compiles_for_8xh100(tiny_dir):
    """float32 compute, which cuDNN cannot take: auto picks the Pallas Triton kernel, lowered to
    Triton inside shard_map (GQA heads split over tensor=2) and compiled by XLA's GPU compiler,
    which checks the kernel's shared memory against the H100's."""
    cfg = _cfg(tiny_dir, "--model.compute_dtype=float32", "--mesh.fsdp=4", "--mesh.tensor=2")
    built = build_train_step(cfg, TINY, compile_only_devices(parse_target("8xh100")), "gpu")
    assert built.attention == "pallas_gpu"
    lowered = lower(built, "gpu")
    # Forward, remat's forward again, the backward's preprocessing and the fused backward.
    assert lowered.as_text().count("__gpu$xla.gpu.triton") >= 3
    stats = lowered.compile().memory_analysis()
    assert stats.argument_size_in_bytes > 0 and stats.temp_size_in_bytes > 0


def test_an_rl_recipe_plans_its_rollouts_beside_the_step(tiny_dir):
    """GRPO: the train step over a rollout batch and the generation (prefill + decode loop
    with its KV cache) both compiled for v5e-8; the verdict needs both to fit."""
    cfg = _cfg(tiny_dir, "--lora.rank=8", "--trainer.objective=grpo", "--data.format=prompt",
               "--rl.num_generations=4", "--rl.max_completion_length=64", "--rl.beta=0.04",
               "--rl.rewards=[{function: key_facts}]", "--model.attention=xla")
    result = make_plan(cfg, parse_target("v5e-8"), flops=False)
    g = result.generation
    assert g is not None and result.fits and g.fits
    # 8 rows over 8 chips; slots: the prompt budget 192 -> bucket 256, plus 64 new tokens;
    # bf16 keys and values of 2 layers x 2 kv heads x 128 (one row per chip), int32 slot
    # positions and segments, and the write indices (one per layer, one for the cache).
    assert (g.rows, g.slots) == (8, 320)
    assert g.cache == 2 * 320 * 2 * 128 * 2 * 2 + 2 * 320 * 4 + 2 * 4 + 4
    assert 0 < g.model and g.peak > g.cache + g.model
    text = format_plan(cfg, result)
    assert "rollout generation (8 rows x 320 slots): KV cache" in text
    assert "verdict: fits" in text


def test_sliding_window_rollouts_plan_the_window_only(tmp_path_factory):
    """A Mistral-style model (every layer slides by 64) plans its rollouts' cache as rings of
    the window: keys and values of 64 slots, not 320, plus each ring slot's position and
    segment id."""
    path = _model_dir(tmp_path_factory, model_type="mistral", sliding_window=64)
    cfg = _cfg(path, "--lora.rank=8", "--trainer.objective=grpo", "--data.format=prompt",
               "--rl.num_generations=4", "--rl.max_completion_length=64", "--rl.beta=0.04",
               "--rl.rewards=[{function: key_facts}]", "--model.attention=xla")
    g = make_plan(cfg, parse_target("v5e-8"), flops=False).generation
    assert (g.rows, g.slots) == (8, 320)
    assert g.cache == (2 * 64 * 2 * 128 * 2 * 2 + 2 * (2 * 64 * 4) + 2 * 320 * 4 + 2 * 4
                       + 4)


def test_lora_adapters_are_split_over_a_pure_fsdp_mesh(tiny_dir):
    """LoRA rank 8 on v5p-32 (16 chips, fsdp 16, which does not divide the rank): each
    adapter's non-embed half goes 16 ways on another of its dims (head_dim 128, mlp 512), so
    the trainable parameters per chip, and their AdamW moments, are 1/16 of all of them (they
    were whole on every chip), and the report says so."""
    cfg = _cfg(tiny_dir, "--lora.rank=8", "--model.attention=xla",
               "--trainer.global_batch_size=16")
    result = make_plan(cfg, parse_target("v5p-32"), flops=False)
    m = result.memory
    assert m.params_total == 16 * m.params > 0
    assert m.opt_state == pytest.approx(2 * m.params, abs=64)  # + the step count
    assert f"(of {m.params_total / GIB:.2f} GiB on all chips)" in format_plan(cfg, result)


def test_a_distillation_recipe_plans_its_teacher_and_generation(tiny_dir, tmp_path_factory):
    """GKD: the teacher (twice the student's width) is an argument of the compiled step, on
    the same chips; its bytes are in the table and the peak, and held while generating."""
    teacher = _model_dir(tmp_path_factory, hidden_size=512, intermediate_size=1024,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=64)
    cfg = _cfg(tiny_dir, "--trainer.objective=distill", f"--distill.teacher={teacher}",
               "--distill.dtype=bfloat16", "--distill.lmbda=0.5", "--distill.max_new_tokens=64",
               "--data.packing=false", "--model.attention=xla", "--mesh.fsdp=8")
    result = make_plan(cfg, parse_target("v5e-8"), flops=False)
    m, g = result.memory, result.generation
    # the bf16 teacher's parameters, one chip's share of their FSDP shards
    layer = 2 * 512 * 512 + 2 * 512 * 256 + 3 * 512 * 1024 + 2 * 512
    params = 2 * layer + 2 * 512 * 512 + 512  # untied embeddings and head, final norm
    assert m.teacher == pytest.approx(2 * params / 8, rel=0.05)
    assert m.peak > m.teacher + m.params + m.opt_state
    assert g is not None and g.resident >= m.teacher + m.opt_state
    text = format_plan(cfg, result)
    assert "teacher (frozen, not trained)" in text and "verdict: fits" in text


_S, _F = "sliding_attention", "full_attention"
GEMMA3 = {"model_type": "gemma3_text", "vocab_size": 512, "hidden_size": 256,
          "intermediate_size": 512, "num_hidden_layers": 12, "num_attention_heads": 4,
          "num_key_value_heads": 2, "head_dim": 128, "sliding_window": 128,
          "layer_types": ([_S] * 5 + [_F]) * 2, "max_position_embeddings": 4096}
GEMMA4 = {"model_type": "gemma4_text", "vocab_size": 512, "vocab_size_per_layer_input": 512,
          "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 12,
          "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 128,
          "global_head_dim": 256, "num_global_key_value_heads": 2, "attention_k_eq_v": True,
          "hidden_size_per_layer_input": 64, "num_kv_shared_layers": 6,
          "use_double_wide_mlp": True, "sliding_window": 128,
          "layer_types": ([_S] * 5 + [_F]) * 2, "final_logit_softcapping": 30.0,
          "max_position_embeddings": 4096}


@pytest.mark.parametrize("hf", [GEMMA3, GEMMA4], ids=["gemma3", "gemma4"])
def test_scanned_gemma_runs_splash_on_every_layer_for_v5e(tmp_path_factory, hf, caplog):
    """Scanned over blocks of the layer pattern (5 sliding + 1 full), every layer of the block
    has a static window: splash on all of them, nothing falls back to XLA attention. Gemma 4
    with per-layer embeddings, KV sharing of the last 6 layers, keys as values on 256-wide
    global heads."""
    folder = tmp_path_factory.mktemp("gemma")
    (folder / "config.json").write_text(json.dumps(hf))
    cfg = _cfg(str(folder), "--lora.rank=8", "--mesh.fsdp=4", "--mesh.tensor=2")
    built = build_train_step(cfg, hf, compile_only_devices(parse_target("v5e-8")), "tpu")
    assert built.attention == "splash"
    with caplog.at_level("WARNING"):
        compiled = lower(built, "tpu").compile()
    assert not [r.getMessage() for r in caplog.records if "falls back" in r.getMessage()]
    # Per layer body (a scan's body, or a layer unrolled) the kernel's forward, its forward
    # again (full remat) and its backward (dq, dkv). Inside a block the 5 alike sliding layers
    # are a scan of one layer per step, the full layer is on its own: Gemma 3 (one scan of 2
    # blocks of 6 layers) has 2 layer bodies; Gemma 4 (own-KV layers 0-5 and KV-shared 6-11,
    # one block each) has 4. Every one of them runs the kernel (and nothing fell back above).
    calls = compiled.as_text().count('custom_call_target="tpu_custom_call"')
    assert calls >= 4 * (4 if hf is GEMMA4 else 2), calls
