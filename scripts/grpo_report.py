"""The GRPO quickstart's report: the reward curve, and the held-out answers before and after.

    python scripts/grpo_report.py runs/quickstart-grpo

Reads the run directory (config.yaml, metrics.jsonl, its last checkpoint), draws
``reward_curve.png`` there (each step's mean reward of its sampled completions, and the
held-out evaluations: the share of greedy answers to the 80 held-out questions that state every
key fact), then asks the starting model (the SFT quickstart's export, ``model.path``) and the
GRPO run (its LoRA adapters applied, unmerged) every held-out question with jaxtune's greedy
generation and counts the answers stating every key fact of their intent, as the SFT
quickstart's report does. Writes ``report.md`` next to the metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.quickstart_report import (  # noqa: E402
    ANSWER_TOKENS,
    ANSWER_TOKENS_HELP,
    chat,
    jaxtune_answers,
)
from scripts.support_intents import fact_count  # noqa: E402


def full_key(evals: dict[int, dict]) -> str | None:
    """The held-out metric of answers with every key fact: the all-or-nothing key-facts
    reward's share of full marks (``eval_rewards/<its name>/full``)."""
    keys = {k for e in evals.values() for k in e if k.endswith("/full")}
    for k in sorted(keys):
        if "all_or_nothing" in k:
            return k
    return next(iter(sorted(k for k in keys if "key_facts" in k)), None)


def read_metrics(run_dir: Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """({step: train metrics}, {step: eval metrics}); a resumed run's repeats replaced."""
    train, evals = {}, {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "reward" in row:
            train[row["step"]] = row
        if "eval_reward" in row:
            evals[row["step"]] = row
    return train, evals


def reward_figure(train: dict[int, dict], evals: dict[int, dict]):
    """Each step's mean reward per function (lines), and the held-out share of answers with
    every key fact where it was measured (points with their values, not joined)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    steps = sorted(train)
    means = sorted({k for t in train.values() for k in t
                    if k.startswith("rewards/") and k.endswith("/mean")})
    for i, key in enumerate(means):
        ax.plot(steps, [train[s].get(key) for s in steps], lw=1.2, color=f"C{i}",
                label=f"sampled completions: {key[len('rewards/'):-len('/mean')]}")
    totals = [train[s]["reward"] for s in steps]
    window = 5  # a step's few prompts make its mean noisy: the trend is the running mean
    if len(totals) >= window:
        running = [sum(totals[i - window + 1:i + 1]) / window for i in range(window - 1,
                                                                             len(totals))]
        ax.plot(steps[window - 1:], running, lw=2.2, color="black",
                label=f"sampled completions: total reward, mean of {window} steps")
    full_name = full_key(evals)
    full = [(s, e[full_name]) for s, e in sorted(evals.items()) if full_name in e]
    if full:
        xs, ys = zip(*full, strict=True)
        ax.plot(xs, ys, linestyle="none", marker="o", markersize=7, color="C3",
                label="held-out greedy answers with every key fact")
        for x, y in full:
            ax.annotate(f"{y:.2f}", (x, y), textcoords="offset points", xytext=(0, 8),
                        ha="center", fontsize=8, color="C3")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.set_title("jaxtune GRPO quickstart: key-fact rewards on Nimbrel Sync support", fontsize=10)
    ax.margins(x=0.04, y=0.12)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--questions", type=Path, default=ROOT / "examples/support/questions.json")
    p.add_argument("--max-new-tokens", type=int, default=ANSWER_TOKENS,
                   help=ANSWER_TOKENS_HELP)
    args = p.parse_args()
    run_dir = args.run_dir
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    start_dir = Path(os.path.expanduser(cfg["model"]["path"]))
    train, evals = read_metrics(run_dir)
    fig = reward_figure(train, evals)
    full_name = full_key(evals)
    fig.savefig(run_dir / "reward_curve.png")

    from jaxtune.generation.source import load_model_folder, load_run

    spec = json.loads(args.questions.read_text())
    held_out = spec["held_out"]
    held_chats = [chat(spec, q["question"]) for q in held_out]
    print(f"answering the {len(held_chats)} held-out questions with the starting model and the "
          "GRPO run", flush=True)
    before = fact_count(jaxtune_answers(load_model_folder(str(start_dir)), held_chats,
                                        args.max_new_tokens).texts, held_out)
    after = fact_count(jaxtune_answers(load_run(str(run_dir)), held_chats,
                                       args.max_new_tokens).texts, held_out)
    n = len(held_chats)
    steps = sorted(train)
    first, last = train[steps[0]], train[steps[-1]]
    seconds = sum(t.get("step_time_s", 0.0) for t in train.values())
    lines = [
        f"# GRPO quickstart report ({run_dir})",
        "",
        f"Starting model: {start_dir} (the SFT quickstart's export). {len(steps)} GRPO steps "
        f"of {cfg['trainer']['global_batch_size']} completions ({cfg['rl']['num_generations']} "
        f"per prompt), LoRA rank {cfg['lora']['rank']}, {seconds / 60:.1f} min of steps "
        f"(generation {sum(t.get('time/generate_s', 0.0) for t in train.values()) / 60:.1f} min).",
        "",
        f"Mean reward of the sampled completions: {first['reward']:.3f} at step {steps[0]}, "
        f"{last['reward']:.3f} at step {steps[-1]} (mean of the first and last 5 steps: "
        f"{_mean(train, steps[:5]):.3f} -> {_mean(train, steps[-5:]):.3f}).",
        "",
        "Held-out evaluations (greedy answers to the 80 held-out questions): "
        + ", ".join(f"step {s}: {e[full_name] * n:.0f}/{n} with every key fact" for s, e in
                    sorted(evals.items()) if full_name in e) + ".",
        "",
        "![reward curve](reward_curve.png)",
        "",
        f"All {n} held-out questions: answers with every key fact of their intent: "
        f"SFT model {before[0]}/{n}, after GRPO {after[0]}/{n} (key facts: SFT {before[1]}/"
        f"{before[2]}, after GRPO {after[1]}/{after[2]}).",
    ]
    report = "\n".join(lines) + "\n"
    (run_dir / "report.md").write_text(report)
    print("\n" + "=" * 100)
    for line in lines:
        if line.startswith("!["):
            print(f"Reward curve: {run_dir / 'reward_curve.png'}")
        else:
            print(textwrap.fill(line, 100) if line else "")
    print("=" * 100)
    print(f"Report: {run_dir / 'report.md'}")
    return 0


def _mean(train: dict[int, dict], steps: list[int]) -> float:
    return sum(train[s]["reward"] for s in steps) / max(len(steps), 1)


if __name__ == "__main__":
    sys.exit(main())
