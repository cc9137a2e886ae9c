"""Training metrics: where they go (stdout, metrics.jsonl, TensorBoard, W&B) and the throughput
figures (tokens/s, MFU) and memory readings that go with them.

Only one process writes (process 0 by default); the others construct a writer that does
nothing, so the training loop needs no ``if`` around logging.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import resource
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp

from jaxtune.errors import JaxtuneError

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- FLOPs


@dataclasses.dataclass(frozen=True)
class LoraMatmuls:
    """What a LoRA run trains, in matmul parameters one token meets (see :func:`flops_per_token`;
    ``jaxtune.lora.lora_matmuls`` counts them from the trainable state).

    ``adapters``: the adapters' A and B (every layer; for adapted experts, the top-k share);
    ``saved``: base matmul weights trained fully (``modules_to_save``: a Linear kernel, or the
    embedding when it is also the tied LM head).
    """

    adapters: float
    saved: float = 0.0


def flops_per_token(model_config: Any, seq_len: int, lora: LoraMatmuls | None = None) -> float:
    """Training FLOPs per token (forward + backward): what the step does.

    Full fine-tuning: the PaLM paper's appendix B formula, ``6 * N + 12 * L * H * Q * T``, where
    ``N`` counts the parameters that take part in matmuls: per layer the q/k/v/o projections
    ``D * Q * (2H + 2K)`` and the gated MLP ``3 * D * F``, plus the LM head ``D * V`` (counted
    when tied too: the projection happens either way); the input embedding is a lookup, not a
    matmul, and norms/biases are negligible, so neither counts. ``6N``: 2 FLOPs per parameter
    forward, 2 for the input gradient and 2 for the weight gradient. ``12 * L * H * Q * T`` is
    the attention score and value matmuls (``2 * 2 * H * Q * T`` forward per layer, x3 for
    forward + backward), over the full sequence as PaLM counts it (causal masking is not
    subtracted). L layers, D hidden, H query heads, K kv heads, Q head dim, F MLP width,
    V vocab, T sequence length.

    LoRA (``lora`` given): frozen matrices get no weight gradient, so the base counts ``4 * N``
    (forward and the input gradient the adapters below need), the fully trained
    ``modules_to_save`` matmuls ``2 * lora.saved`` more, and the adapters, trained,
    ``6 * lora.adapters``. (The input gradient of the first layer's projections, which nothing
    needs, is still counted: under 1 / L of the attention.)

    For a mixture of experts ``N`` counts active parameters per token: the config's
    ``active_mlp_params()`` (top-k experts, shared expert, router) replaces ``3 * L * D * F``.
    """
    c = model_config
    layers, d = c.num_hidden_layers, c.hidden_size
    heads, kv_heads = c.num_attention_heads, c.num_key_value_heads
    head_dim = getattr(c, "head_dim", None) or d // heads
    attention = d * head_dim * (2 * heads + 2 * kv_heads)
    # A mixture of experts says what one token meets (its top-k experts, shared expert and
    # router, dense layers) through ``active_mlp_params()``: the total would overstate MFU.
    active = getattr(c, "active_mlp_params", None)
    mlp_total = active() if callable(active) else layers * 3 * d * c.intermediate_size
    n = layers * attention + mlp_total + d * c.vocab_size
    scores = 12 * layers * heads * head_dim * seq_len
    if lora is None:
        return float(6 * n + scores)
    return float(4 * n + 2 * lora.saved + 6 * lora.adapters + scores)


# --------------------------------------------------------------------------- peak FLOP/s

#: Dense (no sparsity) bf16/fp16 peak FLOP/s of one JAX device, by a lower-case substring of
#: ``device.device_kind``; the first match wins, so longer names come first. TPU v2/v3 devices
#: are single cores (half a chip); v4 and later are whole chips.
_PEAK_BF16: tuple[tuple[str, float], ...] = (
    ("gb200", 2500e12),
    ("b200", 2250e12),
    ("gh200", 989e12),
    ("h100 pcie", 756e12),
    ("h100", 989e12),
    ("h200", 989e12),
    ("h800", 989e12),
    ("h20", 148e12),
    ("a100", 312e12),
    ("a800", 312e12),
    ("l40s", 362e12),
    ("l40", 181e12),
    ("l4", 121e12),
    ("v100", 125e12),
    ("tpu7", 2307e12),
    ("v6 lite", 918e12),
    ("v6e", 918e12),
    ("v5 lite", 197e12),
    ("v5e", 197e12),
    ("v5p", 459e12),
    ("tpu v5", 459e12),
    ("tpu v4", 275e12),
    ("tpu v3", 61.5e12),
    ("tpu v2", 22.5e12),
)


def device_peak_flops(
    device: Any = None, dtype: Any = "bfloat16", *, peak_tflops: float = 0.0
) -> float | None:
    """Peak matmul FLOP/s of one device for ``dtype``, or None when unknown.

    ``peak_tflops`` > 0 (``logging.peak_tflops``) overrides everything. On CPU the peak is a
    jitted matmul's measured rate (:func:`measure_matmul_peak`, cached per process). On NVIDIA
    GPUs float32 matmuls run as TF32 (JAX's default precision), half the bf16 rate; TPUs run
    float32 matmuls at default precision in bf16 passes, so the bf16 rate applies.
    """
    if peak_tflops and peak_tflops > 0:
        return float(peak_tflops) * 1e12
    device = device if device is not None else jax.devices()[0]
    dtype = jnp.dtype(dtype)
    if device.platform == "cpu":
        return measure_matmul_peak(dtype=dtype.name)
    kind = device.device_kind.lower()
    for name, peak in _PEAK_BF16:
        if name in kind:
            if dtype == jnp.float32 and device.platform == "gpu":
                return peak / 2
            return peak
    log.warning("No peak FLOP/s known for device '%s'; MFU is not reported. Set "
                "logging.peak_tflops to the per-device peak to get it.", device.device_kind)
    return None


def measure_matmul_peak(dtype: Any = "float32", size: int = 2048, seconds: float = 0.5, *,
                        again: bool = False) -> float:
    """FLOP/s of a jitted ``size x size`` matmul on the default device: the fastest of many
    single matmuls over about ``seconds`` (at least 3), so one quiet moment on a busy machine
    is enough. Cached per process (a run measures once); ``again`` measures anew, and the
    cache keeps the highest rate seen."""
    key = (jnp.dtype(dtype).name, int(size))
    if again or key not in _MEASURED_PEAK:
        rate = _measure_matmul_peak(*key, float(seconds))
        _MEASURED_PEAK[key] = max(rate, _MEASURED_PEAK.get(key, 0.0))
    return _MEASURED_PEAK[key]


_MEASURED_PEAK: dict[tuple[str, int], float] = {}


def _measure_matmul_peak(dtype: str, size: int, seconds: float) -> float:
    a = jnp.full((size, size), 0.5, dtype=dtype)
    b = jnp.full((size, size), 0.25, dtype=dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready(matmul(a, b))  # compile
    fastest, trials = math.inf, 0
    start = time.perf_counter()
    while trials < 3 or time.perf_counter() - start < seconds:
        tick = time.perf_counter()
        jax.block_until_ready(matmul(a, b))
        fastest = min(fastest, time.perf_counter() - tick)
        trials += 1
    return 2.0 * size**3 / max(fastest, 1e-9)


# --------------------------------------------------------------------------- throughput


@dataclasses.dataclass
class Throughput:
    """Step time -> tokens/s, tokens/s per device and MFU.

    ``tokens_per_step`` counts the tokens the model processed in a step (all devices);
    ``peak_flops_per_device`` None leaves MFU out. MFU is never above 1: a step that does
    more FLOP/s than the peak shows the peak was measured low (on a CPU busy with other work
    when it was timed), so ``remeasure`` (the CPU's :func:`measure_matmul_peak` again, at most
    ``max_remeasures`` times) raises it; if the step still outruns it (its matmuls run faster
    than the timed one), MFU is reported as 1, with one warning that says so.
    """

    tokens_per_step: float
    flops_per_token: float
    num_devices: int
    peak_flops_per_device: float | None
    remeasure: Any = None  # () -> a fresh peak FLOP/s, or None (a known or given peak)
    max_remeasures: int = 3  # each takes about half a second: a run does it a few times only
    _warned: bool = False

    def __call__(self, step_time_s: float, tokens: float | None = None) -> dict[str, float]:
        tokens = self.tokens_per_step if tokens is None else tokens
        tps = tokens / max(step_time_s, 1e-12)
        out = {
            "step_time_s": step_time_s,
            "tokens_per_s": tps,
            "tokens_per_s_per_device": tps / self.num_devices,
        }
        if self.peak_flops_per_device:
            achieved = tps * self.flops_per_token / self.num_devices
            if (achieved > self.peak_flops_per_device and self.remeasure is not None
                    and self.max_remeasures > 0):
                self.max_remeasures -= 1
                self.peak_flops_per_device = max(self.peak_flops_per_device, self.remeasure())
            if achieved > self.peak_flops_per_device and not self._warned:
                self._warned = True
                log.warning("a step did %.3g FLOP/s per device, above the peak of %.3g this "
                            "run measured or was given, so MFU is shown as 100%%; set "
                            "logging.peak_tflops to the device's real peak.", achieved,
                            self.peak_flops_per_device)
            out["mfu"] = min(1.0, achieved / self.peak_flops_per_device)
        return out


def peak_remeasure(device: Any, dtype: Any, *, peak_tflops: float = 0.0):
    """For :class:`Throughput`: a function that measures ``device``'s peak again, where the
    peak is measured (a CPU without ``logging.peak_tflops``); None where it is known."""
    if (peak_tflops and peak_tflops > 0) or getattr(device, "platform", None) != "cpu":
        return None
    name = jnp.dtype(dtype).name
    return lambda: measure_matmul_peak(dtype=name, again=True)


# --------------------------------------------------------------------------- memory


def memory_stats(device: Any = None) -> dict[str, float]:
    """Memory in GiB: device 0's in-use and peak bytes where the backend reports them (GPU,
    TPU; not CPU), and this process's peak resident set size on the host."""
    gib = float(1 << 30)
    out: dict[str, float] = {}
    device = device if device is not None else jax.local_devices()[0]
    try:
        stats = device.memory_stats() or {}
    except Exception:  # some backends raise instead of returning None
        stats = {}
    for key, name in (("bytes_in_use", "device_memory_gib"),
                      ("peak_bytes_in_use", "device_peak_memory_gib"),
                      ("bytes_limit", "device_memory_limit_gib")):
        if key in stats:
            out[name] = stats[key] / gib
    # ru_maxrss is in KiB on Linux, bytes on macOS
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out["host_peak_rss_gib"] = rss * (1 if sys.platform == "darwin" else 1024) / gib
    return out


def compiled_memory(compiled: Any) -> str:
    """XLA's accounting of a compiled step per device, in words ("" where the backend keeps
    none): its temporaries are the activations the backward pass keeps, the part that
    ``model.remat``, ``model.scan_layers`` and ``trainer.grad_accum_steps`` change."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return ""
    if m is None:
        return ""
    gib = float(1 << 30)
    held = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
    return (f"{m.temp_size_in_bytes / gib:.2f} GiB of temporaries and {held / gib:.2f} GiB "
            "of state, batch and outputs per device")


# --------------------------------------------------------------------------- writers

#: Short names and formats for the stdout line; other metrics print under their own name.
_STDOUT = {
    "loss": ("loss", "{:.4f}"),
    "learning_rate": ("lr", "{:.2e}"),
    "grad_norm": ("gnorm", "{:.3f}"),
    "param_norm": ("pnorm", "{:.1f}"),
    "tokens_per_s": ("tok/s", "{:.0f}"),
    "tokens_per_s_per_device": ("tok/s/dev", "{:.0f}"),
    "mfu": ("mfu", "{:.1%}"),
    "step_time_s": ("step_s", "{:.3f}"),
}


def _scalar(value: Any) -> float | int | str | None:
    """A plain Python number (or string) from a metric value: jax/numpy scalars included."""
    if isinstance(value, bool | int | str):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def format_line(step: int, metrics: dict[str, Any]) -> str:
    """``step 12 | loss 2.3456 | lr 1.00e-04 | ...``: known metrics first, in a fixed order."""
    parts = [f"step {step}"]
    # Grouped per-item metrics ("expert_fraction/07": one per MoE expert) go to the files and
    # TensorBoard / W&B only; a stdout line stays readable.
    metrics = {k: v for k, v in metrics.items() if "/" not in k}
    keys = [k for k in _STDOUT if k in metrics] + sorted(k for k in metrics if k not in _STDOUT)
    for key in keys:
        value = metrics[key]
        if key in _STDOUT and isinstance(value, float) and math.isfinite(value):
            name, fmt = _STDOUT[key]
            parts.append(f"{name} {fmt.format(value)}")
        elif isinstance(value, float):
            parts.append(f"{key} {value:.4g}")
        else:
            parts.append(f"{key} {value}")
    return " | ".join(parts)


class MetricsWriter:
    """Writes each logged step to stdout, ``<run_dir>/metrics.jsonl``, TensorBoard events in
    ``<run_dir>/tensorboard`` and W&B, as ``cfg.logging`` enables them.

    ``enabled`` defaults to ``jax.process_index() == 0``. With ``start_step`` (the step a run
    starts or resumes from), lines and TensorBoard events after that step, left by an
    interrupted run, are dropped, so the re-run steps are not logged twice; ``start_step=0``
    (no checkpoint was left) drops everything. ``relog_evals`` also drops the evaluation lines
    at ``start_step``, for a run that evaluates there again. Every write is flushed: a crash
    loses at most the current line.
    """

    def __init__(self, cfg: Any, run_dir: str, *, enabled: bool | None = None,
                 start_step: int | None = None, relog_evals: bool = False):
        self.cfg = cfg
        self.logging = cfg.logging
        self.run_dir = run_dir
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._jsonl = self._tb = self._wandb = None
        if not self.enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._open_files(start_step, relog_evals)
        if self.logging.wandb_project:
            self._wandb = _start_wandb(cfg, run_dir)

    def _open_files(self, start_step: int | None, relog_evals: bool = False) -> None:
        if self.logging.jsonl:
            path = os.path.join(self.run_dir, "metrics.jsonl")
            if start_step is not None:
                _drop_lines_after(path, start_step, drop_evals_at_step=relog_evals)
            self._jsonl = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close)
        if self.logging.tensorboard:
            from tensorboardX import SummaryWriter

            # Readers discard the events at or after the purge step written before it. At a
            # step > 0 that step's training scalars stay (its eval point may then show twice).
            purge = None if start_step is None else (0 if start_step == 0 else start_step + 1)
            self._tb = SummaryWriter(logdir=os.path.join(self.run_dir, "tensorboard"),
                                     purge_step=purge, flush_secs=30)

    def resumed_at(self, step: int, relog_evals: bool = False) -> None:
        """The run continues from checkpoint ``step``: forget what was logged after it (the
        same as passing ``start_step`` to the constructor, for a writer made before restore)."""
        if not self.enabled:
            return
        for sink in (self._jsonl, self._tb):
            if sink is not None:
                sink.close()
        self._jsonl = self._tb = None
        self._open_files(step, relog_evals)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        """Log one step's metrics (floats, or jax/numpy scalars); a 'step' key is ignored."""
        if not self.enabled:
            return
        values = {k: _scalar(v) for k, v in metrics.items() if k != "step"}
        values = {k: v for k, v in values.items() if v is not None}
        if self.logging.stdout:
            _print(format_line(step, values))
        if self._jsonl is not None:
            record = {"step": int(step), "time": round(time.time(), 3), **values}
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        numeric = {k: v for k, v in values.items() if not isinstance(v, str)}
        if self._tb is not None:
            for key, value in numeric.items():
                self._tb.add_scalar(key, value, global_step=int(step))
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(numeric, step=int(step))

    def text(self, step: int, tag: str, text: str) -> None:
        """A text entry (e.g. sampled answers) in TensorBoard; other sinks keep numbers only."""
        if self.enabled and self._tb is not None:
            self._tb.add_text(tag, text, global_step=int(step))
            self._tb.flush()

    def close(self) -> None:
        """Flush and close every sink; safe to call twice."""
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _print(line: str) -> None:
    # tqdm.write keeps a progress bar intact below the line (and is a plain print otherwise).
    try:
        from tqdm import tqdm

        tqdm.write(line, file=sys.stdout)
    except ImportError:
        print(line, flush=True)
    sys.stdout.flush()


def _drop_lines_after(path: str, step: int, drop_evals_at_step: bool = False) -> None:
    """Keep only the lines of an existing metrics.jsonl whose step is <= ``step`` (none for
    step 0), less the evaluation-only lines at ``step`` with ``drop_evals_at_step``."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
            at = int(record["step"])
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a crash
        is_eval = all(k in ("step", "time") or k.startswith("eval_") for k in record)
        if at < step or (at == step and step > 0 and not (drop_evals_at_step and is_eval)):
            kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, path)


def _start_wandb(cfg: Any, run_dir: str):
    try:
        import wandb
    except ImportError:
        raise JaxtuneError(
            f"logging.wandb_project is '{cfg.logging.wandb_project}' but wandb is not installed: "
            "pip install 'jaxtune[wandb]' (or wandb), or set logging.wandb_project: ''."
        ) from None
    from jaxtune.config import config_to_dict

    # The same run directory resumes the same W&B run.
    run_id = hashlib.sha1(os.path.abspath(run_dir).encode()).hexdigest()[:16]
    return wandb.init(
        project=cfg.logging.wandb_project,
        entity=getattr(cfg.logging, "wandb_entity", "") or None,
        name=cfg.run.name,
        dir=run_dir,
        config=config_to_dict(cfg),
        id=run_id,
        resume="allow",
    )
