"""Per-chip memory of a compiled train step against the target's HBM, and what to change.

The compiler's memory analysis gives per-device bytes of the program's arguments (train state
and batch), outputs, donated (aliased) buffers and temporaries. The report splits the
arguments into parameters and optimizer state from the state's shardings (each leaf's shard
shape), counts gradients as the trainable parameters' shard (they live among the temporaries)
and calls the rest of the temporaries activations. Peak per chip is
``arguments + outputs - aliased + temporaries + code``, compared with the chip's HBM
explicitly, since only the TPU compiler refuses a program that does not fit.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import jax

from jaxtune.plan.targets import GIB, Target

#: Below this headroom a plan "fits" but is flagged: allocator fragmentation and the runtime's
#: own buffers take a few percent of HBM.
TIGHT_FRACTION = 0.05


def shard_bytes(tree: Any, shardings: Any) -> int:
    """Bytes one device holds of ``tree`` placed by ``shardings`` (its largest shard)."""
    leaves = jax.tree.leaves(tree)
    shs = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    total = 0
    for x, sh in zip(leaves, shs, strict=True):
        shape = sh.shard_shape(x.shape) if x.shape else ()
        total += math.prod(shape) * x.dtype.itemsize
    return total


@dataclass
class MemoryPlan:
    """Per-chip bytes of one compiled step (``compiler_*`` straight from memory_analysis)."""

    params: int
    frozen: int
    opt_state: int
    gradients: int
    activations: int
    batch: int
    peak: int
    hbm: int
    compiler: dict[str, int] = field(default_factory=dict)
    oom_message: str = ""  # the TPU compiler's RESOURCE_EXHAUSTED text, when it refused
    params_total: int = 0  # the trainable parameters' bytes on all chips together
    teacher: int = 0  # a frozen teacher's parameters (distillation), an argument of the step

    @property
    def fits(self) -> bool:
        return not self.oom_message and self.peak <= self.hbm

    @property
    def headroom(self) -> int:
        return self.hbm - self.peak


def memory_plan(state, state_shardings, batch_bytes: int, stats: Any, hbm: int,
                teacher: int = 0) -> MemoryPlan:
    """Break ``compiled.memory_analysis()`` down; ``state_shardings`` as the jit's in_shardings.
    ``teacher``: bytes per chip of a teacher given to the step (already in its arguments)."""
    params = shard_bytes(state.params, state_shardings.params)
    frozen = shard_bytes(state.frozen, state_shardings.frozen)
    opt = shard_bytes(state.opt_state, state_shardings.opt_state)
    compiler = {k: int(getattr(stats, k)) for k in (
        "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
        "temp_size_in_bytes", "generated_code_size_in_bytes")}
    temp = compiler["temp_size_in_bytes"]
    peak = (compiler["argument_size_in_bytes"] + compiler["output_size_in_bytes"]
            - compiler["alias_size_in_bytes"] + temp + compiler["generated_code_size_in_bytes"])
    grads = min(params, temp)
    return MemoryPlan(params, frozen, opt, grads, temp - grads, batch_bytes, peak, hbm, compiler,
                      params_total=_total_bytes(state.params), teacher=teacher)


def _total_bytes(tree: Any) -> int:
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


_OOM_PATTERNS = (
    # "... required for HLO temporaries (24.00G) exceeds available HBM (15.75G)."
    re.compile(r"\(([\d.]+)([KMGT])\)\s*exceeds available HBM\s*\(([\d.]+)([KMGT])\)"),
    # "Used 20.50G of 15.48G hbm. Exceeded hbm capacity by 5.02G."
    re.compile(r"Used ([\d.]+)([KMGT]) of ([\d.]+)([KMGT]) hbm"),
)
_UNIT = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_oom(message: str) -> tuple[int, int] | None:
    """(bytes needed, bytes available) from a TPU RESOURCE_EXHAUSTED message, if stated."""
    for pattern in _OOM_PATTERNS:
        m = pattern.search(message)
        if m:
            used = float(m.group(1)) * _UNIT[m.group(2)]
            avail = float(m.group(3)) * _UNIT[m.group(4)]
            return int(used), int(avail)
    return None


def oom_plan(state, state_shardings, batch_bytes: int, message: str, hbm: int,
             teacher: int = 0) -> MemoryPlan:
    """A plan for a program the TPU compiler refused: state from shardings, peak from its text.

    The message counts one kind of buffer (usually temporaries), so the peak is the state and
    batch plus what it names: a lower bound of what the program needs.
    """
    params = shard_bytes(state.params, state_shardings.params)
    frozen = shard_bytes(state.frozen, state_shardings.frozen)
    opt = shard_bytes(state.opt_state, state_shardings.opt_state)
    parsed = parse_oom(message)
    needed = parsed[0] if parsed else 0
    temps = needed if parsed and "temporaries" in message else max(
        0, needed - params - frozen - opt - batch_bytes - teacher)
    grads = min(params, temps)
    peak = params + frozen + opt + batch_bytes + teacher + temps
    return MemoryPlan(params, frozen, opt, grads, temps - grads, batch_bytes, peak, hbm,
                      oom_message=message.strip().splitlines()[0][:400],
                      params_total=_total_bytes(state.params), teacher=teacher)


# --------------------------------------------------------------------------- suggestions


def suggestions(plan: MemoryPlan, cfg: Any, target: Target) -> list[str]:
    """What to change, with an estimate of how much each saves per chip, for a near miss or
    a tight fit. Estimates scale the broken-down terms; re-run ``jaxtune plan`` to confirm."""
    over = plan.peak - int(plan.hbm * (1 - TIGHT_FRACTION))
    if over <= 0 and plan.fits:
        return []
    out: list[str] = []
    m, mesh, t = cfg.model, cfg.mesh, cfg.trainer
    remat_next = {"none": "dots_saveable", "dots_saveable": "minimal", "minimal": "full"}
    # Saved activations shrink with remat: full keeps only layer inputs (about 1/8 to 1/10).
    keep = {"dots_saveable": 0.6, "minimal": 0.4, "full": 0.12}
    if m.remat in remat_next and plan.activations > 0:
        new = remat_next[m.remat] if m.remat != "none" else "full"
        saves = int(plan.activations * (1 - keep[new] / keep.get(m.remat, 1.0)))
        out.append(f"model.remat: {new} (now {m.remat}): saves about {_gib(saves)} of "
                   f"activations per chip, for ~25% more compute with full")
    chips = target.num_chips // max(1, mesh.dcn_data)
    fsdp_now = mesh.fsdp if mesh.fsdp > 0 else chips // max(1, mesh.tensor * max(mesh.data, 1))
    state = plan.params + plan.frozen + plan.opt_state + plan.gradients
    if fsdp_now < chips // max(1, mesh.tensor):
        new_fsdp = chips // max(1, mesh.tensor)
        saves = int(state * (1 - fsdp_now / new_fsdp))
        out.append(f"mesh.fsdp: {new_fsdp} with mesh.data: 1 (now fsdp {fsdp_now}): shards "
                   f"parameters, gradients and optimizer state {new_fsdp}-way, saving about "
                   f"{_gib(saves)} per chip")
    micro_rows = t.global_batch_size // t.grad_accum_steps
    ways = max(1, micro_rows // max(1, target.num_chips // max(1, mesh.tensor)))
    if ways >= 2 and plan.activations > 0:
        k = 2
        while k < ways and plan.activations * (1 - 1 / k) < over:
            k *= 2
        saves = int(plan.activations * (1 - 1 / k))
        out.append(f"trainer.grad_accum_steps: {t.grad_accum_steps * k} (now "
                   f"{t.grad_accum_steps}): {k}x smaller micro-batches, saving about "
                   f"{_gib(saves)} of activations per chip, same global batch")
    if cfg.lora.rank == 0 and m.dtype == "float32" and m.compute_dtype == "bfloat16":
        out.append(f"optimizer.state_dtype: bfloat16: halves the first moments, about "
                   f"{_gib(plan.opt_state // 4)} per chip")
    if over > 0:
        out.insert(0, f"needs {_gib(over)} less per chip to keep {TIGHT_FRACTION:.0%} headroom")
    return out


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def format_table(plan: MemoryPlan, target: Target) -> str:
    """The per-chip table the CLI prints."""
    rows = [
        ("parameters (trainable)", plan.params),
        ("parameters (frozen)", plan.frozen),
        ("optimizer state", plan.opt_state),
        *([("teacher (frozen, not trained)", plan.teacher)] if plan.teacher else []),
        ("gradients", plan.gradients),
        ("activations + temporaries", plan.activations),
        ("batch", plan.batch),
        ("peak per chip", plan.peak),
        (f"HBM per chip ({target.chip.name})", plan.hbm),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"  {name:<{width}}  {n / GIB:9.2f} GiB" for name, n in rows]
    if plan.params_total:  # how the trained parameters (LoRA: the adapters) are split
        lines[0] += f"  (of {plan.params_total / GIB:.2f} GiB on all chips)"
    pct = 100 * plan.headroom / plan.hbm
    lines.append(f"  {'headroom':<{width}}  {plan.headroom / GIB:9.2f} GiB ({pct:.0f}%)")
    return "\n".join(lines)
