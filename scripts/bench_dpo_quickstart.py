"""The DPO quickstart before and after a change, run to the end back to back, side by side.

    python scripts/bench_dpo_quickstart.py --before-code DIR [--rounds N] [OVERRIDES ...]

Runs ``jaxtune train configs/quickstart-dpo.yaml`` (the whole job: data, compile, three
evaluations, 30 steps, export) once with the code and recipe in ``--before-code`` (e.g. an
unpacked ``git archive`` of the earlier commit) and once with this checkout's, each in its own
process with its own code on ``PYTHONPATH``, one after the other (the order flips every round,
so a machine that gets busier or quieter over the runs tilts neither side). Both get the same
``OVERRIDES`` (e.g. ``--model.path=runs/quickstart/hf``) and a temporary output directory.

For each run it prints the wall time of the command, the train step's compile time, the median
step time and pairs per second (pairs counted by the objective, so packed and unpacked batches
compare), the peak resident memory of the process (``wait4``'s ``ru_maxrss``) beside the
trainer's own ``host_peak_rss_gib``, and the held-out reward accuracy, margin and loss at each
evaluation (``metrics.jsonl``); then the after/before ratios. The exports stay in the printed
folders for ``scripts/preference_report.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/quickstart-dpo.yaml"


def run_recipe(code: Path, out_dir: Path, overrides: list[str]) -> dict:
    """Run the recipe with ``code``; return its wall time, peak RSS, log and metrics."""
    env = {**os.environ, "PYTHONPATH": str(code), "JAX_PLATFORMS": "cpu",
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "jaxtune.cli", "train", CONFIG, f"--run.output_dir={out_dir}",
           "--trainer.progress=false", *overrides]
    log_path = out_dir.with_suffix(".log")
    tick = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=code, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - tick
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} in {code} failed; see {log_path}")
    text = log_path.read_text()
    compile_s = re.search(r"compiled the train step in ([\d.]+) s", text)
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "step_time_s" in r]
    evals = [r for r in records if "eval_loss" in r]
    return {
        "wall_s": wall, "peak_gib": usage.ru_maxrss / 1024**2,
        "host_peak_rss_gib": max(r["host_peak_rss_gib"] for r in steps),
        "compile_s": float(compile_s.group(1)) if compile_s else float("nan"),
        "step_s": statistics.median(r["step_time_s"] for r in steps),
        "pairs_per_s": statistics.median(r["pairs"] / r["step_time_s"] for r in steps),
        "pairs": sum(r["pairs"] for r in steps), "steps": len(steps), "evals": evals,
        "export": out_dir / "hf", "log": log_path,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--before-code", required=True, type=Path,
                   help="a checkout (or unpacked archive) of the code and recipe before")
    p.add_argument("--rounds", type=int, default=1, help="before/after pairs of runs")
    p.add_argument("--out", type=Path, default=None, help="where the runs go (default: a "
                   "new temporary folder)")
    args, overrides = p.parse_known_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="jaxtune-bench-dpo-"))
    out.mkdir(parents=True, exist_ok=True)

    sys.path.insert(0, str(ROOT))
    from jaxtune.hardware import describe_machine

    print(f"machine {describe_machine()}; load average {os.getloadavg()[0]:.1f}")
    print(f"recipe {CONFIG} {' '.join(overrides)}; runs in {out}", flush=True)
    codes = {"before": args.before_code.resolve(), "after": ROOT}
    results: dict[str, list[dict]] = {"before": [], "after": []}
    for i in range(args.rounds):
        for name in ("before", "after") if i % 2 == 0 else ("after", "before"):
            r = run_recipe(codes[name], out / f"{name}-{i}", overrides)
            results[name].append(r)
            acc = ", ".join(f"step {e['step']}: {e['eval_rewards/accuracy']:.3f}"
                            for e in r["evals"])
            print(f"round {i} {name:<6} wall {r['wall_s'] / 60:5.1f} min, compile "
                  f"{r['compile_s']:.1f} s, step {r['step_s']:.1f} s (median), "
                  f"{r['pairs_per_s']:.3f} pairs/s, {r['pairs']:.0f} pairs in {r['steps']} "
                  f"steps, peak RSS {r['peak_gib']:.2f} GiB (trainer "
                  f"{r['host_peak_rss_gib']:.2f}); held-out reward accuracy {acc}; "
                  f"load average {os.getloadavg()[0]:.1f}", flush=True)

    print(f"\n{'':<28}{'before':>12}{'after':>12}{'after/before':>14}")
    rows = [("wall time (min)", "wall_s", 1 / 60), ("median step (s)", "step_s", 1.0),
            ("pairs per second", "pairs_per_s", 1.0), ("peak RSS (GiB)", "peak_gib", 1.0),
            ("trainer host peak (GiB)", "host_peak_rss_gib", 1.0)]
    for label, key, scale in rows:
        b = statistics.median(r[key] for r in results["before"]) * scale
        a = statistics.median(r[key] for r in results["after"]) * scale
        print(f"{label:<28}{b:>12.2f}{a:>12.2f}{a / b:>14.2f}")
    for name in ("before", "after"):
        last = results[name][-1]["evals"][-1]
        print(f"{name}: held-out (last run, step {last['step']}) reward accuracy "
              f"{last['eval_rewards/accuracy']:.3f}, margin {last['eval_rewards/margin']:.2f}, "
              f"loss {last['eval_loss']:.3f}; export {results[name][-1]['export']}")


if __name__ == "__main__":
    main()
