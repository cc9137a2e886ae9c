"""Metric sinks (jsonl, TensorBoard, stdout), the FLOPs formula, MFU arithmetic, memory."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.config import TrainConfig
from jaxtune.errors import JaxtuneError
from jaxtune.metrics import (
    LoraMatmuls,
    MetricsWriter,
    Throughput,
    device_peak_flops,
    flops_per_token,
    format_line,
    measure_matmul_peak,
    memory_stats,
    peak_remeasure,
)


def make_cfg(**logging) -> TrainConfig:
    cfg = TrainConfig()
    cfg.logging = dataclasses.replace(cfg.logging, **logging)
    return cfg


def test_jsonl_tensorboard_and_stdout(tmp_path, capsys):
    cfg = make_cfg()
    with MetricsWriter(cfg, str(tmp_path), enabled=True) as w:
        w.write(1, {"loss": jnp.float32(2.5), "learning_rate": 1e-4, "step": 1})
        w.write(2, {"loss": np.float64(2.25), "grad_norm": 0.5, "mfu": 0.123})
        # flushed as written: readable before close
        lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == 2
    records = [json.loads(line) for line in lines]
    assert records[0]["step"] == 1 and records[0]["loss"] == 2.5
    assert records[0]["learning_rate"] == 1e-4
    assert records[1] == {**records[1], "step": 2, "loss": 2.25, "grad_norm": 0.5, "mfu": 0.123}
    events = os.listdir(tmp_path / "tensorboard")
    assert any(e.startswith("events.out.tfevents") for e in events)
    assert os.path.getsize(tmp_path / "tensorboard" / events[0]) > 100
    out = capsys.readouterr().out
    assert "step 2 | loss 2.2500 | gnorm 0.500 | mfu 12.3%" in out


def test_tensorboard_holds_the_scalars(tmp_path):
    with MetricsWriter(make_cfg(stdout=False, jsonl=False), str(tmp_path), enabled=True) as w:
        for step in range(1, 4):
            w.write(step, {"loss": 1.0 / step})
    values = [(e.step, v.tag, v.simple_value) for e in read_events(tmp_path / "tensorboard")
              for v in e.summary.value]
    assert values == [(1, "loss", 1.0), (2, "loss", 0.5), (3, "loss", pytest.approx(1 / 3))]


def read_events(folder):
    """Parse TFRecord event files (length, crc, payload, crc) with tensorboardX's protos."""
    from tensorboardX.proto.event_pb2 import Event

    events = []
    for name in sorted(os.listdir(folder)):
        data = (folder / name).read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            events.append(Event.FromString(data[pos + 12:pos + 12 + length]))
            pos += 12 + length + 4
    return [e for e in events if e.HasField("summary")]


def test_resume_drops_lines_after_the_checkpoint(tmp_path):
    cfg = make_cfg(stdout=False, tensorboard=False)
    with MetricsWriter(cfg, str(tmp_path), enabled=True) as w:
        for step in range(1, 6):
            w.write(step, {"loss": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # cut short by a crash
    with MetricsWriter(cfg, str(tmp_path), enabled=True, start_step=3) as w:
        w.write(4, {"loss": 40.0})
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    with MetricsWriter(cfg, str(tmp_path), enabled=True) as w:  # made before the restore
        w.resumed_at(2)
        w.write(3, {"loss": 30.0})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [(json.loads(x)["step"], json.loads(x)["loss"]) for x in lines] == [
        (1, 1.0), (2, 2.0), (3, 30.0)]


def test_a_restart_without_checkpoint_keeps_no_old_lines(tmp_path):
    """A run that left no checkpoint restarts at step 0: none of its lines or events stay."""
    cfg = make_cfg(stdout=False)
    with MetricsWriter(cfg, str(tmp_path), enabled=True, start_step=0, relog_evals=True) as w:
        w.write(0, {"eval_loss": 9.0})
        for step in (1, 2):
            w.write(step, {"loss": float(step)})
    # Event files are named by the second they were opened in: keep the first run's apart.
    (first,) = os.listdir(tmp_path / "tensorboard")
    os.rename(tmp_path / "tensorboard" / first, tmp_path / "tensorboard" / "events.out.tfevents.1")
    with MetricsWriter(cfg, str(tmp_path), enabled=True, start_step=0, relog_evals=True) as w:
        w.write(0, {"eval_loss": 8.0})
        w.write(1, {"loss": 10.0})
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(x["step"], x.get("loss", x.get("eval_loss"))) for x in lines] == [(0, 8.0), (1, 10.0)]
    # TensorBoard, read as TensorBoard does: a session start at step S drops what came before
    # at steps >= S. Only the second run's scalars remain.
    assert purged_scalars(tmp_path / "tensorboard") == [(0, "eval_loss", 8.0), (1, "loss", 10.0)]


def test_rerun_of_a_finished_run_relogs_its_final_evaluation_once(tmp_path):
    cfg = make_cfg(stdout=False, tensorboard=False)
    with MetricsWriter(cfg, str(tmp_path), enabled=True) as w:
        w.write(0, {"eval_loss": 3.0})
        w.write(1, {"loss": 2.0})
        w.write(2, {"loss": 1.0})
        w.write(2, {"eval_loss": 1.5, "eval_perplexity": 4.5})
    with MetricsWriter(cfg, str(tmp_path), enabled=True, start_step=2, relog_evals=True) as w:
        w.write(2, {"eval_loss": 1.5, "eval_perplexity": 4.5})
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(x["step"], "loss" in x) for x in lines] == [(0, False), (1, True), (2, True),
                                                         (2, False)]


def purged_scalars(folder) -> list[tuple[int, str, float]]:
    """Scalars of every event file, oldest first, with TensorBoard's purge on session start."""
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    kept: list[tuple[int, str, float]] = []
    for name in sorted(os.listdir(folder)):
        data, pos = (folder / name).read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            e = Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            if e.HasField("session_log") and e.session_log.status == SessionLog.START:
                kept = [x for x in kept if x[0] < e.step]
            kept += [(e.step, v.tag, v.simple_value) for v in e.summary.value]
    return kept


def test_disabled_writer_writes_nothing(tmp_path):
    w = MetricsWriter(make_cfg(), str(tmp_path / "run"), enabled=False)
    w.write(1, {"loss": 1.0})
    w.close()
    assert not (tmp_path / "run").exists()


def test_wandb_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "wandb", None)  # import fails
    with pytest.raises(JaxtuneError, match="wandb is not installed"):
        MetricsWriter(make_cfg(wandb_project="p"), str(tmp_path), enabled=True)


def test_format_line_handles_odd_values():
    line = format_line(7, {"loss": float("nan"), "zeta": 3, "eval_loss": 1.23456})
    assert line == "step 7 | loss nan | eval_loss 1.235 | zeta 3"


def test_flops_per_token_by_hand():
    # Llama-like: L=2, D=64, H=4, K=2, Q=16, F=96, V=100, T=32
    c = types.SimpleNamespace(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, intermediate_size=96,
                              vocab_size=100, tie_word_embeddings=False)
    q = 64 * 4 * 16
    k = v = 64 * 2 * 16
    o = 4 * 16 * 64
    mlp = 3 * 64 * 96
    n = 2 * (q + k + v + o + mlp) + 64 * 100  # LM head counted, input embedding not
    attention = 12 * 2 * 4 * 16 * 32
    assert flops_per_token(c, 32) == 6 * n + attention
    tied = types.SimpleNamespace(**{**vars(c), "tie_word_embeddings": True})
    assert flops_per_token(tied, 32) == 6 * n + attention  # a tied head is still a matmul
    no_head_dim = types.SimpleNamespace(**{**vars(c), "head_dim": None})
    assert flops_per_token(no_head_dim, 32) == 6 * n + attention  # D / H = 16


def test_lora_flops_count_4n_for_the_frozen_base_and_6x_the_adapters(tiny_hf_model):
    """LoRA: no weight gradient for frozen matrices (4N), the adapters' work (6 per adapter
    parameter), the modules_to_save matmuls fully trained (6), counted from a real model."""
    from flax import nnx

    from jaxtune import from_pretrained
    from jaxtune.config import LoraConfig
    from jaxtune.lora import apply_lora, lora_matmuls

    c = types.SimpleNamespace(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, intermediate_size=96,
                              vocab_size=100, tie_word_embeddings=False)
    n = 2 * (64 * 4 * 16 + 2 * 64 * 2 * 16 + 4 * 16 * 64 + 3 * 64 * 96) + 64 * 100
    attention = 12 * 2 * 4 * 16 * 32
    assert flops_per_token(c, 32, LoraMatmuls(adapters=1000, saved=6400)) == \
        4 * n + 2 * 6400 + 6 * 1000 + attention
    assert flops_per_token(c, 32, LoraMatmuls(adapters=0)) == 4 * n + attention

    for scan in (False, True):
        model = from_pretrained(tiny_hf_model("llama"), scan_layers=scan)
        cfg = model.config
        d, q = cfg.hidden_size, cfg.head_dim
        heads, kv, r = cfg.num_attention_heads, cfg.num_key_value_heads, 4
        lora_cfg = LoraConfig(rank=r, targets=["q_proj", "v_proj"], modules_to_save=["lm_head"])
        model, trainable = apply_lora(model, lora_cfg)
        counted = lora_matmuls(nnx.state(model, trainable), cfg)
        layers = cfg.num_hidden_layers
        assert counted.adapters == layers * r * ((d + heads * q) + (d + kv * q)), scan
        assert counted.saved == d * cfg.vocab_size, scan  # lm_head; no embedding (a lookup)
        full = flops_per_token(cfg, 32)
        lora = flops_per_token(cfg, 32, counted)
        assert lora < full
        assert lora == full - 2 * (full - 12 * layers * heads * q * 32) / 6 \
            + 2 * counted.saved + 6 * counted.adapters


def test_throughput_and_mfu_arithmetic():
    t = Throughput(tokens_per_step=8192, flops_per_token=1e9, num_devices=4,
                   peak_flops_per_device=1e14)
    out = t(0.5)
    assert out["tokens_per_s"] == 16384
    assert out["tokens_per_s_per_device"] == 4096
    assert math.isclose(out["mfu"], 16384 * 1e9 / 4e14)
    assert t(1.0, tokens=100)["tokens_per_s"] == 100
    assert "mfu" not in Throughput(1, 1, 1, None)(1.0)


def test_mfu_is_never_above_one(caplog):
    """A step faster than the peak (measured low on a busy CPU): the peak is measured again
    and raised; if the step still outruns it, MFU shows 1 and one warning says why."""
    peaks = iter([3e14, 2e13, 2e13])
    t = Throughput(8192, 1e9, 4, 1e13, remeasure=lambda: next(peaks))  # 4.1e13 per device
    assert math.isclose(t(0.05)["mfu"], 163840 * 1e9 / 4 / 3e14)  # 4.1 at the first peak
    assert t.peak_flops_per_device == 3e14
    t.peak_flops_per_device = 1e13
    with caplog.at_level("WARNING", logger="jaxtune.metrics"):
        assert t(0.05)["mfu"] == 1.0  # measured again, 2e13: still below the step's 4.1e13
        assert t(0.05)["mfu"] == 1.0
    assert sum("MFU is shown as 100%" in r.message for r in caplog.records) == 1
    assert t.max_remeasures == 0 and t(0.05)["mfu"] == 1.0  # measured 3 times: no more
    fixed = Throughput(8192, 1e9, 4, 1e13)  # a given peak: not re-measured, still capped
    assert fixed(0.01)["mfu"] == 1.0
    cpu = jax.devices("cpu")[0]
    assert peak_remeasure(cpu, "float32", peak_tflops=100) is None
    assert peak_remeasure(types.SimpleNamespace(platform="tpu"), "bfloat16") is None
    assert peak_remeasure(cpu, "float32")() >= measure_matmul_peak("float32")


def test_peak_flops_table_and_override():
    def dev(kind, platform="gpu"):
        return types.SimpleNamespace(device_kind=kind, platform=platform)

    assert device_peak_flops(dev("NVIDIA H100 80GB HBM3"), "bfloat16") == 989e12
    assert device_peak_flops(dev("NVIDIA H100 80GB HBM3"), "float32") == 989e12 / 2
    assert device_peak_flops(dev("NVIDIA H200"), jnp.bfloat16) == 989e12
    assert device_peak_flops(dev("NVIDIA A100-SXM4-80GB")) == 312e12
    assert device_peak_flops(dev("NVIDIA L4")) == 121e12
    assert device_peak_flops(dev("TPU v4", "tpu")) == 275e12
    assert device_peak_flops(dev("TPU v5 lite", "tpu"), "float32") == 197e12
    assert device_peak_flops(dev("TPU v5p", "tpu")) == 459e12
    assert device_peak_flops(dev("TPU v6 lite", "tpu")) == 918e12
    assert device_peak_flops(dev("Some Future Chip")) is None
    assert device_peak_flops(dev("Some Future Chip"), peak_tflops=123.0) == 123e12


def test_cpu_peak_is_measured_and_cached():
    cpu = jax.devices("cpu")[0]
    peak = device_peak_flops(cpu, "float32")
    assert 1e8 < peak < 1e14
    assert measure_matmul_peak("float32") == peak  # cached, not re-measured


def test_memory_stats():
    stats = memory_stats()
    assert stats["host_peak_rss_gib"] > 0.01  # this process has imported JAX
    if jax.devices()[0].platform == "cpu":
        assert "device_memory_gib" not in stats
