"""``jaxtune plan``: compile a recipe's real train step for TPU or GPU hardware you don't have.

    jaxtune plan configs/llama3.1-8b-full-v5p64.yaml --target v5p-64 [--compare]

builds the train step from abstract shapes (:mod:`jaxtune.plan.build`), compiles it for the
target's compile-only devices (:mod:`jaxtune.plan.devices`), and prints per-chip memory
against HBM, FLOPs per step and a fits / does-not-fit verdict, with what to change for a near
miss (:mod:`jaxtune.plan.report`). FLOPs are counted by the CPU compiler on the
unpartitioned step (:func:`step_flops`), beside the formula MFU is computed with
(:func:`jaxtune.metrics.flops_per_token`: ``6N + attention``, for LoRA ``4N`` plus the
adapters); ``--compare`` sets the compiler's count of a full fine-tune beside ``6N``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from jaxtune.errors import JaxtuneError
from jaxtune.plan.targets import GIB, Target, parse_target

log = logging.getLogger("jaxtune.plan")


@dataclass
class PlanResult:
    """What one plan found (see :func:`make_plan`)."""

    target: Target
    memory: Any  # report.MemoryPlan
    attention: str
    num_params: int
    num_trainable: int
    flops_per_step: float | None  # the compiler's, whole step, all chips
    formula_flops_per_step: float  # as MFU counts (jaxtune.metrics.flops_per_token)
    compile_seconds: float
    hf_source: str
    suggestions: list[str] = field(default_factory=list)
    compare: dict[str, float] | None = None
    generation: Any = None  # rollouts.GenerationPlan of an objective that generates (RL)

    @property
    def fits(self) -> bool:
        return self.memory.fits and (self.generation is None or self.generation.fits)


def _is_oom(err: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(err) or "Ran out of memory" in str(err)


def _compile(built, platform: str):
    from jaxtune.plan.build import lower

    return lower(built, platform).compile()


def step_flops(cfg, hf_config: dict, *, remat: str | None = None,
               full_finetune: bool = False) -> float:
    """Whole-step FLOPs (all chips) from the compiler's cost analysis of two probes.

    The probes are the step with 1 and 2 unrolled layers on one micro-batch (see
    :func:`jaxtune.plan.build.probe_config`); per-layer cost is their difference, scaled to the
    model's layers and the accumulation steps. They are compiled for this machine's CPU, on one
    device: the same HLO, counted before it is partitioned. The partitioned TPU program is not
    counted: cost analysis counts a loop body once, and its count of the Llama 3.1 8B full
    fine-tune on v5p-64 came out 27% below the unpartitioned one (0.69 vs 0.95 of the formula);
    the GPU compiler's compile-only path has no cost analysis at all; and a probe that does not
    fit a chip's HBM (a full fine-tune's, without remat) still compiles here.
    """
    import jax

    from jaxtune.plan.build import build_train_step, compiled_flops, probe_config

    layers = int(hf_config["num_hidden_layers"])
    hf = {k: v for k, v in hf_config.items() if k != "layer_types"}
    counts = []
    for n in (1, 2):
        probe, _ = probe_config(cfg, n, remat=remat, full_finetune=full_finetune)
        probe = dataclasses.replace(probe, mesh=dataclasses.replace(
            probe.mesh, data=1, fsdp=1, tensor=1, expert=1, dcn_data=1))
        built = build_train_step(probe, hf, jax.devices("cpu")[:1], "cpu")
        flops = compiled_flops(_compile(built, "cpu"))
        if flops is None:
            raise JaxtuneError("the CPU compiler gave no cost analysis for the FLOPs probes")
        counts.append(flops)
    per_layer = counts[1] - counts[0]
    return (counts[0] + (layers - 1) * per_layer) * cfg.trainer.grad_accum_steps


def _model_hf_config(hf_config: dict) -> dict:
    """The config.json of the model jaxtune builds from ``hf_config``, as its family writes it:
    the same dict for most models; a multimodal config's language model (Gemma 3), flat, so
    the probes' ``num_hidden_layers`` reaches it."""
    from jaxtune.models import get_family

    family = get_family(hf_config.get("model_type"))
    return family.config_cls.from_hf_config(hf_config).to_hf_config()


def make_plan(cfg, target: Target, *, compare: bool = False, flops: bool = True) -> PlanResult:
    """Compile ``cfg``'s train step for ``target`` and report memory, FLOPs and the verdict.

    ``flops=False`` skips the two probe compiles that count FLOPs per step."""
    from jaxtune import metrics
    from jaxtune.plan import report
    from jaxtune.plan.build import build_train_step
    from jaxtune.plan.devices import compile_only_devices
    from jaxtune.plan.hf import find_hf_config
    from jaxtune.sharding import make_rules
    from jaxtune.train_state import train_state_shardings, tree_bytes

    hf_config, source = find_hf_config(cfg.model.path)
    hf_config = {**_model_hf_config(hf_config), **cfg.model.overrides}
    devices = compile_only_devices(target)
    built = build_train_step(cfg, hf_config, devices, target.platform)
    shardings = train_state_shardings(built.state, built.mesh, make_rules(cfg.mesh.rules))
    batch_bytes = tree_bytes(built.batch) // max(1, built.mesh.shape["data"]
                                                 * built.mesh.shape["fsdp"])
    teacher = 0 if built.teacher is None else report.shard_bytes(
        built.teacher.state, built.teacher.shardings(built.mesh, make_rules(cfg.mesh.rules)))
    tick = time.perf_counter()
    try:
        compiled = _compile(built, target.platform)
    except Exception as err:  # the TPU compiler refuses a program that does not fit
        if not _is_oom(err):
            raise
        memory = report.oom_plan(built.state, shardings, batch_bytes, str(err), target.hbm_bytes,
                                 teacher)
    else:
        memory = report.memory_plan(built.state, shardings, batch_bytes,
                                    compiled.memory_analysis(), target.hbm_bytes, teacher)
    generates = getattr(built.objective, "generates", None)
    generation = None
    if generates is not None:  # RL, GKD: completions are generated on the same chips each step
        from jaxtune.plan.rollouts import generation_plan

        generation = generation_plan(built, cfg, generates(cfg), target.platform,
                                     target.hbm_bytes)
    seconds = time.perf_counter() - tick
    tokens = cfg.trainer.global_batch_size * cfg.data.seq_len
    lora = None
    if cfg.lora.rank > 0:  # as the trainer counts it: 4N for the frozen base + the adapters
        from jaxtune.lora import lora_matmuls

        lora = lora_matmuls(built.state.params, built.model_config)
    formula = metrics.flops_per_token(built.model_config, cfg.data.seq_len, lora) * tokens
    counted = step_flops(cfg, hf_config) if flops else None
    result = PlanResult(target, memory, built.attention, built.num_params, built.num_trainable,
                        counted, formula, seconds, source)
    result.generation = generation
    result.suggestions = report.suggestions(memory, cfg, target)
    if compare:
        counted = step_flops(cfg, hf_config, remat="none", full_finetune=True)
        full = metrics.flops_per_token(built.model_config, cfg.data.seq_len) * tokens
        result.compare = {"compiler": counted, "formula": full}
    return result


def format_plan(cfg, result: PlanResult) -> str:
    """The report the CLI prints."""
    from jaxtune.plan.report import format_table

    t, m = result.target, result.memory
    lines = [
        f"plan: {cfg.run.name} on {t.describe()}",
        f"  model: {cfg.model.path} ({result.hf_source}), {result.num_params / 1e9:.2f}B params, "
        f"{result.num_trainable / 1e6:.1f}M trainable; attention: {result.attention}",
        f"  mesh: data={cfg.mesh.data} fsdp={cfg.mesh.fsdp} tensor={cfg.mesh.tensor} "
        f"dcn_data={cfg.mesh.dcn_data}; batch {cfg.trainer.global_batch_size} x "
        f"{cfg.data.seq_len} tokens, {cfg.trainer.grad_accum_steps} micro-batch(es); "
        f"remat {cfg.model.remat}",
        f"  compiled for {t.platform.upper()} in {result.compile_seconds:.1f} s",
        "",
        "per chip:",
        format_table(m, t),
        "",
    ]
    if result.flops_per_step:
        peak = t.chip.peak_bf16_flops * t.num_chips
        lines.append(f"FLOPs per step (compiler, unpartitioned): {result.flops_per_step:.3e} "
                     f"({result.flops_per_step / peak:.2f} s at 100% of {t.num_chips} x "
                     f"{t.chip.peak_bf16_flops / 1e12:.0f} TFLOP/s)")
    else:
        lines.append("FLOPs per step (compiler): not counted")
    kind = "4N + adapters" if cfg.lora.rank > 0 else "6N"
    lines.append(f"FLOPs per step ({kind} + attention, as MFU counts): "
                 f"{result.formula_flops_per_step:.3e}")
    if result.compare:
        c, f = result.compare["compiler"], result.compare["formula"]
        lines.append(f"compare (full fine-tune, no remat, XLA attention): compiler {c:.3e} vs "
                     f"formula {f:.3e}: ratio {c / f:.3f}")
    if result.generation is not None:
        lines.append(result.generation.describe())
    lines.append("")
    if result.generation is not None and not result.generation.fits:
        g = result.generation
        lines.append(f"verdict: DOES NOT FIT: generating the rollouts needs {g.peak / GIB:.2f} "
                     f"GiB per chip, {g.hbm / GIB:.0f} GiB available (fewer rows per step, a "
                     "shorter rl.max_completion_length or data.seq_len, or more chips)")
    elif m.oom_message:
        lines.append(f"verdict: DOES NOT FIT: the {t.platform.upper()} compiler ran out of HBM "
                     f"({m.oom_message})")
    elif not m.fits:
        lines.append(f"verdict: DOES NOT FIT: {m.peak / GIB:.2f} GiB per chip needed, "
                     f"{m.hbm / GIB:.0f} GiB available")
    else:
        headroom = m.headroom if result.generation is None else min(
            m.headroom, result.generation.hbm - result.generation.peak)
        lines.append(f"verdict: fits, {headroom / GIB:.2f} GiB "
                     f"({100 * headroom / m.hbm:.0f}%) headroom per chip")
    for s in result.suggestions:
        lines.append(f"  try: {s}")
    return "\n".join(lines)


def _cpu_backend() -> None:
    """Run the plan process on the CPU backend unless ``JAX_PLATFORMS`` says otherwise.

    Planning compiles for compile-only devices and counts FLOPs on the CPU; it never runs on
    an attached accelerator. Without this, jax initialises every installed plugin as a
    backend: on a machine without a GPU the CUDA plugin fails to start (an error printed at
    startup), and its compile-only GPU topology is then unavailable too."""
    import os

    import jax

    if not os.environ.get("JAX_PLATFORMS"):
        jax.config.update("jax_platforms", "cpu")


def plan_main(argv: list[str]) -> int:
    """``jaxtune plan CONFIG --target T [--compare] [--section.key=value ...]``."""
    p = argparse.ArgumentParser(
        prog="jaxtune plan",
        description="Compile the recipe's train step for a TPU/GPU target (no accelerator "
                    "needed) and report per-chip memory, FLOPs per step and whether it fits.",
        epilog="Any --section.key=value after the config overrides that field of the recipe.")
    p.add_argument("config", help="YAML recipe, e.g. configs/llama3.1-8b-full-v5p64.yaml")
    p.add_argument("--target", required=True,
                   help="v5e-8, v6e-256, v4-32, v5p-64, 2xv5e-256, 8xh100, 8xa100-80gb, ...")
    p.add_argument("--compare", action="store_true",
                   help="also compare the compiler's FLOPs with the 6N + attention formula")
    args, overrides = p.parse_known_args(argv)
    _cpu_backend()
    from jaxtune.config import load_config

    cfg = load_config(args.config, overrides)
    target = parse_target(args.target)
    if target.slices != cfg.mesh.dcn_data:
        raise JaxtuneError(
            f"--target {target.name} has {target.slices} slice(s) but mesh.dcn_data is "
            f"{cfg.mesh.dcn_data}; add --mesh.dcn_data={target.slices} (data parallelism "
            "across slices).")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    result = make_plan(cfg, target, compare=args.compare)
    print(format_plan(cfg, result))
    return 0
