"""Where a train step's time goes, op class by op class: jaxtune vs transformers + PyTorch.

Builds the same two models as ``scripts/bench_train.py`` (its S / M sizes, or the quickstart's
LoRA job with ``--lora``), runs a few steps under each framework's profiler, and prints, per op
class, the CPU time per step and its share:

- jaxtune: ``jax.profiler`` traces the compiled step; every executed HLO instruction is
  classed from the Python stack XLA keeps for it (the function that emitted it: attention,
  the loss, a norm, RoPE, an optax update, ...) and from what it is (a matmul, a copy or
  transpose). Only leaf instructions count (a ``while`` is the sum of its body).
- PyTorch: ``torch.profiler`` self CPU time per ``aten::`` op, classed by the op's name.

Times are CPU time summed over threads (two threads busy for 1 ms count 2 ms), so the shares
are comparable between the frameworks; the step's wall time is printed beside them.

    python scripts/profile_step.py --sizes S,M
    python scripts/profile_step.py --sizes M --top 15          # also the 15 costliest HLO ops
    python scripts/profile_step.py --lora --steps 2            # the quickstart's LoRA job
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import tempfile
import time

from jaxtune.loss import LOSS_SCOPE

CLASSES = ("matmul", "attention", "loss (vocabulary)", "norms + RoPE", "activations",
           "optimizer update", "copies + layout", "other")

# Innermost jaxtune / optax function that emitted an HLO instruction -> its class. Checked
# innermost first: a projection inside Attention.__call__ is a matmul, not attention.
_FUNCTION_CLASSES = (
    (re.compile(r"(^|\.)(_masked_attention|_blocked_causal_attention|_grouped_attention|cpu_attention|_attention_fwd|_attention_bwd|_forward|_local"
                r"|dot_product_attention"
                r"|splash_attention)$"), "attention"),
    (re.compile(r"(^|\.)(apply_rope|rope_cos_sin)$|RMSNorm\."), "norms + RoPE"),
    (re.compile(r"chunked|cross_entropy|_ce_|logsumexp|sequence_logps"), "loss (vocabulary)"),
    (re.compile(r"Linear\.__call__|LoraAdapter|\.add$|lora"), "matmul"),
    (re.compile(r"GatedMLP\.__call__|silu|gelu"), "activations"),
)


def _hlo_classes(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> class, for every instruction of the compiled module."""
    files, functions, locations, frames = {}, {}, {}, {}
    section = None
    for line in hlo_text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = line
            continue
        if section and not line.strip():
            section = None
            continue
        if section == "FileNames":
            i, name = line.split(" ", 1)
            files[int(i)] = name.strip('"')
        elif section == "FunctionNames":
            i, name = line.split(" ", 1)
            functions[int(i)] = name.strip('"')
        elif section == "FileLocations":
            i, rest = line.split(" ", 1)
            f = int(re.search(r"file_name_id=(\d+)", rest).group(1))
            fn = int(re.search(r"function_name_id=(\d+)", rest).group(1))
            locations[int(i)] = (f, fn)
        elif section == "StackFrames":
            i, rest = line.split(" ", 1)
            loc = int(re.search(r"file_location_id=(\d+)", rest).group(1))
            parent = int(re.search(r"parent_frame_id=(\d+)", rest).group(1))
            frames[int(i)] = (loc, parent)

    def stack(frame_id: int) -> list[tuple[str, str]]:
        out, seen = [], set()
        while frame_id in frames and frame_id not in seen:
            seen.add(frame_id)
            loc, parent = frames[frame_id]
            f, fn = locations[loc]
            out.append((files[f], functions[fn]))
            frame_id = parent
        return out  # innermost first

    def classify(opcode: str, name: str, op_name: str, frame_id: int | None) -> str:
        if opcode in ("copy", "transpose") or name.startswith(("copy", "transpose")):
            return "copies + layout"
        if LOSS_SCOPE in op_name:  # the chunked loss's scope: its LM head matmuls too
            return "loss (vocabulary)"
        chain = stack(frame_id) if frame_id is not None else []
        # The update and the loss own everything they call (the LM head's matmuls included:
        # the loss computes the logits chunk by chunk); elsewhere the innermost function rules.
        for file, _ in chain:
            if "optax" in file or file.endswith("optim.py"):
                return "optimizer update"
            if file.endswith("jaxtune/loss.py"):
                return "loss (vocabulary)"
        for file, function in chain:
            if "jaxtune" not in file:
                continue
            for pattern, cls in _FUNCTION_CLASSES:
                if pattern.search(function):
                    return cls
        if "dot_general" in op_name or "dot" in opcode:
            return "matmul"
        return "other"

    out = {}
    inst = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = .*? (\w[\w\-]*)\(")
    for line in hlo_text.splitlines():
        m = inst.match(line)
        if not m:
            continue
        name, opcode = m.group(1), m.group(2)
        if opcode in ("while", "call", "conditional", "parameter", "constant", "tuple",
                      "get-tuple-element", "bitcast"):
            continue
        op_name = (re.search(r'op_name="([^"]*)"', line) or [None, ""])[1]
        frame = re.search(r"stack_frame_id=(\d+)", line)
        out[name] = classify(opcode, name, op_name, int(frame.group(1)) if frame else None)
    return out


def profile_jaxtune(runner, steps: int, top: int) -> tuple[dict[str, float], float, list]:
    """Per-class CPU ms per step of ``runner``'s compiled step (see the module docstring)."""
    import jax

    classes = _hlo_classes(runner.step_fn.as_text())
    runner.step()
    with tempfile.TemporaryDirectory() as logdir:
        tick = time.perf_counter()
        jax.profiler.start_trace(logdir)
        for _ in range(steps):
            runner.step()
        jax.profiler.stop_trace()
        wall = (time.perf_counter() - tick) / steps
        path = sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True))[-1]
        data = jax.profiler.ProfileData.from_file(path)
        per_class: dict[str, float] = collections.Counter()
        per_op: dict[str, float] = collections.Counter()
        for plane in data.planes:
            for line in plane.lines:
                for event in line.events:
                    cls = classes.get(event.name)
                    if cls is not None:
                        per_class[cls] += event.duration_ns / 1e6 / steps
                        per_op[event.name] += event.duration_ns / 1e6 / steps
    ops = [(name, ms, classes[name]) for name, ms in per_op.most_common(top)]
    return dict(per_class), wall, ops


def _torch_class(op: str) -> str | None:
    if op in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear",
              "aten::matmul"):
        return "matmul"
    if "attention" in op or "flash" in op or op in ("aten::_softmax",
                                                    "aten::_softmax_backward_data"):
        return "attention"
    if any(s in op for s in ("log_softmax", "nll_loss", "cross_entropy")):
        return "loss (vocabulary)"
    if op.startswith(("aten::_foreach", "aten::_fused_adam")) or "Optimizer" in op:
        return "optimizer update"
    if any(s in op for s in ("copy_", "contiguous", "clone", "cat", "transpose", "permute",
                             "index", "to_copy", "_to_copy", "stack", "expand", "view")):
        return "copies + layout"
    if any(s in op for s in ("silu", "gelu", "sigmoid", "tanh")):
        return "activations"
    if any(s in op for s in ("pow", "rsqrt", "mean", "mul", "add", "neg", "div", "sum",
                             "cos", "sin", "rms_norm", "sub")):
        return "norms + RoPE"  # elementwise: RMSNorm, RoPE, residual adds
    if op.startswith("aten::"):
        return "other"
    return None  # Python-level ranges (module calls, autograd nodes) overlap the aten ops


def profile_torch(runner, steps: int, vocab: int) -> tuple[dict[str, float], float]:
    """Per-class self CPU ms per step of ``runner``'s step under ``torch.profiler``; matmuls
    with a ``vocab``-sized operand (the LM head, forward and backward) count as the loss, as
    jaxtune's chunked loss computes its logits itself."""
    from torch.profiler import ProfilerActivity, profile

    runner.step()
    tick = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            runner.step()
    wall = (time.perf_counter() - tick) / steps
    per_class: dict[str, float] = collections.Counter()
    for event in prof.key_averages(group_by_input_shape=True):
        cls = _torch_class(event.key)
        shapes = [d for shape in (event.input_shapes or []) for d in (shape or [])]
        if cls == "matmul" and vocab in shapes:
            cls = "loss (vocabulary)"
        if cls is not None:
            per_class[cls] += event.self_cpu_time_total / 1e3 / steps
    return dict(per_class), wall


def format_breakdown(name: str, jx: dict, jx_wall: float, th: dict | None,
                     th_wall: float | None) -> str:
    """A markdown table: class, jaxtune ms/step and share, PyTorch ms/step and share."""
    jt = sum(jx.values())
    lines = [f"{name}: step wall time jaxtune {jx_wall * 1e3:,.0f} ms"
             + (f", PyTorch {th_wall * 1e3:,.0f} ms" if th else ""),
             "", "| op class | jaxtune ms/step | share | PyTorch ms/step | share |",
             "|---|---:|---:|---:|---:|"]
    tt = sum(th.values()) if th else 0.0
    for cls in CLASSES:
        j = jx.get(cls, 0.0)
        row = f"| {cls} | {j:,.1f} | {j / jt:.0%} |"
        if th:
            t = th.get(cls, 0.0)
            row += f" {t:,.1f} | {t / tt:.0%} |"
        else:
            row += " - | - |"
        lines.append(row)
    lines.append(f"| total (CPU time, all threads) | {jt:,.1f} | | {tt:,.1f} | |")
    return "\n".join(lines)


def profile_lora_job(args) -> None:
    """The quickstart's LoRA job, as ``scripts/bench_quickstart_lora.py`` builds both sides."""
    from jaxtune.config import load_config
    from scripts.bench_quickstart_lora import JaxtuneJob, TorchPeftJob
    from scripts.make_smollm2 import default_dir

    run_dir = tempfile.mkdtemp(prefix="jaxtune-profile-")
    cfg = load_config("configs/quickstart.yaml", [
        f"--model.path={default_dir()}", f"--run.output_dir={run_dir}",
        "--checkpoint.enabled=false", "--export.enabled=false"])
    jx = JaxtuneJob(cfg, 1)
    jx_classes, jx_wall, ops = profile_jaxtune(jx, args.steps, args.top)
    th_classes = th_wall = None
    if not args.no_torch:
        th = TorchPeftJob(cfg, jx.host_batches, args.threads)
        vocab = jx.trainer.model_config.vocab_size
        th_classes, th_wall = profile_torch(th, args.steps, vocab)
    print(format_breakdown("lora", jx_classes, jx_wall, th_classes, th_wall))
    for op, ms, cls in ops:
        print(f"  {ms:8.1f}  {cls:<18} {op}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default="S,M")
    p.add_argument("--steps", type=int, default=3, help="profiled steps per framework")
    p.add_argument("--threads", type=int, default=2, help="PyTorch intra-op threads")
    p.add_argument("--top", type=int, default=0, help="also list the N costliest HLO ops")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--lora", action="store_true",
                   help="profile the quickstart's LoRA job (scripts/bench_quickstart_lora.py) "
                        "instead of the --sizes models")
    args = p.parse_args()

    from jaxtune.hardware import describe_machine
    from scripts.bench_train import SIZES, JaxRunner, TorchRunner

    print(f"machine {describe_machine()}\n")
    if args.lora:
        profile_lora_job(args)
        return
    for name in args.sizes.split(","):
        jx = JaxRunner(SIZES[name], "float32")
        jx_classes, jx_wall, ops = profile_jaxtune(jx, args.steps, args.top)
        del jx
        th_classes = th_wall = None
        if not args.no_torch:
            th = TorchRunner(SIZES[name], args.threads)
            th_classes, th_wall = profile_torch(th, args.steps, SIZES[name]["vocab_size"])
            del th
        print(format_breakdown(name, jx_classes, jx_wall, th_classes, th_wall))
        if ops:
            print(f"\n{name}: costliest HLO ops (CPU ms per step)")
            for op, ms, cls in ops:
                print(f"  {ms:8.1f}  {cls:<18} {op}")
        print()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
