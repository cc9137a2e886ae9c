"""Held-out answers with every key fact, per checkpoint of a support run: the answer curve.

    python scripts/support_accuracy.py runs/quickstart-20261207-120000            # latest step
    python scripts/support_accuracy.py runs/quickstart-... --steps 20 40 60       # a curve
    python scripts/support_accuracy.py runs/quickstart-... --steps 0              # the base model

For each checkpoint (step 0 is the base model the run started from) it asks all 80 held-out
questions of ``examples/support/questions.json`` with jaxtune's greedy generation and prints
one line: answers with every key fact of their intent, and answers giving another intent's
solution (``scripts/support_intents.py``), the counts the quickstart report gives. ``--json``
writes the counts and the answers, so they can be checked again; ``--plot`` draws the curve.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
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
from scripts.support_intents import (  # noqa: E402
    fact_count,
    no_intent_count,
    other_intent_count,
)


def score(texts: list[str], held_out: list[dict]) -> dict:
    """The counts of one checkpoint's answers."""
    complete, facts, total = fact_count(texts, held_out)
    return {"complete": complete, "n": len(held_out), "facts": facts, "facts_total": total,
            "other_intent": other_intent_count(texts, held_out),
            "no_intent": no_intent_count(texts, held_out)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--steps", type=int, nargs="*", default=None,
                   help="checkpoint steps to score (0: the base model; default: the latest)")
    p.add_argument("--questions", type=Path, default=ROOT / "examples/support/questions.json")
    p.add_argument("--max-new-tokens", type=int, default=ANSWER_TOKENS, help=ANSWER_TOKENS_HELP)
    p.add_argument("--json", type=Path, default=None, help="write counts and answers here")
    p.add_argument("--plot", type=Path, default=None,
                   help="draw the counts against the steps into this PNG (two steps or more)")
    args = p.parse_args()
    if args.plot and len(args.steps or []) < 2:  # before any model is loaded
        p.error("--plot draws a curve: give --steps two steps or more")

    from jaxtune.generation.source import load_model_folder, load_run

    spec = json.loads(args.questions.read_text())
    held_out = spec["held_out"]
    chats = [chat(spec, q["question"]) for q in held_out]
    results = {}
    for step in args.steps or [None]:
        if step == 0:
            cfg = yaml.safe_load((args.run_dir / "config.yaml").read_text())
            loaded = load_model_folder(os.path.expanduser(cfg["model"]["path"]))
        else:
            loaded = load_run(str(args.run_dir), step)
        texts = jaxtune_answers(loaded, chats, args.max_new_tokens).texts
        counts = score(texts, held_out)
        label = "latest" if step is None else str(step)
        results[label] = {**counts, "answers": texts}
        print(f"step {label}: every key fact {counts['complete']}/{counts['n']}, "
              f"another intent's solution {counts['other_intent']}/{counts['n']}, "
              f"no intent's {counts['no_intent']}/{counts['n']}, key facts "
              f"{counts['facts']}/{counts['facts_total']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    if args.plot:
        plot_curve({int(k): v for k, v in results.items()}, args.plot, args.run_dir.name)
    return 0


def plot_curve(results: dict[int, dict], out: Path, title: str) -> None:
    """Answers with every key fact and answers giving another intent's solution, per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted(results)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for key, label in (("complete", "every key fact of its intent"),
                       ("other_intent", "another intent's solution")):
        values = [results[s][key] for s in steps]
        ax.plot(steps, values, marker="o", label=label)
        for s, v in zip(steps, values, strict=True):
            ax.annotate(str(v), (s, v), textcoords="offset points", xytext=(0, 6),
                        ha="center", fontsize=8)
    n = results[steps[0]]["n"]
    ax.set_ylim(0, n)
    ax.set_xlabel("step (0: the base model)")
    ax.set_ylabel(f"held-out answers (of {n})")
    ax.set_title(f"greedy answers to the held-out questions: {title}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
