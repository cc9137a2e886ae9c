"""Evaluation speed on SmolLM2-135M-Instruct: ``jaxtune eval``'s backend vs lm_eval's ``hf``.

    python scripts/bench_eval.py                     # as in docs/benchmarks.md
    python scripts/bench_eval.py --mc 16 --qa 8 --rounds 1   # a quick look

The same offline tasks, the same requests, each backend in its own worker process (started
one after the other, so they never share the CPU; ``--rounds`` alternates them, the order
flipping every round, so a machine shared with other jobs loads both alike):
``nimbrel_support_mc`` (multiple choice, 4 log-likelihood requests per question) and
``nimbrel_support_qa`` (greedy generation up to 128 tokens until EOS), rendered with the chat
template and a system prompt, float32, batch size 8 in both (jaxtune: 8 packed rows or 8
shared contexts per forward pass, 8 prompts per generation batch; hf: 8 requests per forward
pass / ``generate`` call, PyTorch on ``--torch-threads`` threads, all cores by default). Each
task is timed as lm_eval's ``simple_evaluate`` call, from the requests to the scores;
jaxtune's compilation is inside that time (it is part of every ``jaxtune eval``). Prints each
round's seconds per task and backend, whether both gave the same answers and scores, and
``ratio eval:``: the median over rounds of (hf seconds / jaxtune seconds over both tasks,
compiles counted).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SYSTEM = "You are the support assistant for Nimbrel Sync."


def model_dir() -> Path:
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_smollm2.py")],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip().splitlines()[-1])


def worker(backend: str, path: str, limits: dict[str, int], batch: int, threads: int) -> dict:
    """Time each task through lm_eval with one backend (run in its own process)."""
    import lm_eval

    import jaxtune.evaluation  # noqa: F401 -- registers "jaxtune"
    from jaxtune.evaluation.tasks import task_manager

    if backend == "hf":
        import torch
        from lm_eval.models.huggingface import HFLM

        torch.set_num_threads(threads)

        lm = HFLM(pretrained=path, device="cpu", dtype="float32", batch_size=batch)
    else:
        from jaxtune.evaluation.lm import JaxtuneLM

        lm = JaxtuneLM(pretrained=path, batch_size=batch)
    out = {}
    for task, limit in limits.items():
        start = time.perf_counter()
        res = lm_eval.simple_evaluate(
            model=lm, tasks=[task], task_manager=task_manager([task]), limit=limit,
            apply_chat_template=True, system_instruction=SYSTEM, bootstrap_iters=0,
            log_samples=True, torch_random_seed=None)
        seconds = time.perf_counter() - start
        answers = [s["resps"] for s in sorted(res["samples"][task], key=lambda s: s["doc_id"])]
        metrics = {k: v for k, v in res["results"][task].items()
                   if isinstance(v, float) and "stderr" not in k}
        out[task] = {"seconds": seconds, "metrics": metrics, "answers": answers,
                     "requests": sum(len(a) for a in answers)}
    return out


def run_worker(backend: str, path: Path, limits: dict[str, int], batch: int,
               threads: int) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, __file__, "--worker", backend, "--model", str(path),
           "--limits", json.dumps(limits), "--batch", str(batch), "--torch-threads",
           str(threads)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{backend} worker failed:\n{proc.stderr[-4000:]}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("BENCH ")][-1]
    return json.loads(line[len("BENCH "):])


def rounded(metrics: dict[str, float]) -> dict[str, float]:
    """Scores rounded to 6 places (float32 sums may differ in their last bits)."""
    return {k: round(v, 6) for k, v in metrics.items()}


def same_answers(a: list, b: list) -> bool:
    """Equal generations; log-likelihoods to float32 rounding, greedy flags equal."""
    for x, y in zip(a, b, strict=True):
        for u, v in zip(x, y, strict=True):
            u, v = u[0], v[0]
            if isinstance(v, str):
                if u != v:
                    return False
            elif abs(u[0] - v[0]) > 1e-4 + 1e-5 * abs(v[0]) or bool(u[1]) != bool(v[1]):
                return False
    return True


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mc", type=int, default=40, help="multiple-choice questions (x4 requests)")
    p.add_argument("--qa", type=int, default=24, help="questions answered by generation")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1,
                   help="PyTorch threads of the hf worker (default: all cores)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--limits", default=None, help=argparse.SUPPRESS)
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds per backend")
    args = p.parse_args()
    if args.worker:
        result = worker(args.worker, args.model, json.loads(args.limits), args.batch,
                        args.torch_threads)
        print("BENCH " + json.dumps(result), flush=True)
        return 0
    path = model_dir()
    limits = {"nimbrel_support_mc": args.mc, "nimbrel_support_qa": args.qa}
    print(f"SmolLM2-135M-Instruct, float32, batch {args.batch}, {os.cpu_count()} CPUs "
          f"(PyTorch threads {args.torch_threads}); {args.mc} multiple-choice questions, "
          f"{args.qa} generated answers", flush=True)
    ratios = []
    for round_ in range(args.rounds):
        order = ("jaxtune", "hf") if round_ % 2 == 0 else ("hf", "jaxtune")
        out = {b: run_worker(b, path, limits, args.batch, args.torch_threads) for b in order}
        ours, ref = out["jaxtune"], out["hf"]
        for task in limits:
            same = same_answers(ours[task]["answers"], ref[task]["answers"]) and \
                rounded(ours[task]["metrics"]) == rounded(ref[task]["metrics"])
            scores = ", ".join(f"{k.split(',')[0]} {v:.4f}"
                               for k, v in ours[task]["metrics"].items())
            a, b = ours[task]["seconds"], ref[task]["seconds"]
            print(f"round {round_ + 1} {task}: {ours[task]['requests']} requests; jaxtune "
                  f"{a:.1f} s, hf {b:.1f} s, ratio {b / a:.2f}; same answers and scores: "
                  f"{'yes' if same else 'NO'} ({scores})", flush=True)
        total_ours = sum(ours[t]["seconds"] for t in limits)
        total_ref = sum(ref[t]["seconds"] for t in limits)
        ratios.append(total_ref / total_ours)
        print(f"round {round_ + 1}: hf {total_ref:.1f} s / jaxtune {total_ours:.1f} s = "
              f"{ratios[-1]:.2f}", flush=True)
    print(f"ratio eval: {statistics.median(ratios):.2f} (median of {len(ratios)} rounds: "
          f"{', '.join(f'{r:.2f}' for r in ratios)}; compiles counted)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
