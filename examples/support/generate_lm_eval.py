"""Build the offline lm-evaluation-harness tasks over the Nimbrel Sync support set.

jaxtune ships three `lm_eval` tasks (tag ``nimbrel_support``) whose data are local jsonl
files, so evaluating the quickstart's model needs no network. This script writes those files
from ``intents.json``, ``questions.json`` and ``eval.jsonl`` (held-out data only):

- ``qa.jsonl`` (task ``nimbrel_support_qa``, generation): every held-out question wording
  with its intent's key phrases; an answer scores when it states them (``utils.py``).
- ``mc.jsonl`` (task ``nimbrel_support_mc``, multiple choice by log-likelihood): every
  held-out question with four answers in the support team's voice. The right one is its
  intent's first answer; where that answer holds numbers, the three wrong ones are the same
  answer with every number changed (a model must know the fact, not only the topic),
  otherwise they are three other intents' answers.
- ``ppl.jsonl`` (task ``nimbrel_support_ppl``, rolling log-likelihood / perplexity): every
  held-out conversation as plain text.

Output is deterministic (seeded ``random.Random``, standard library only);
``tests/test_eval_tasks.py`` rebuilds the files and compares them byte for byte::

    python examples/support/generate_lm_eval.py
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE.parents[1] / "jaxtune" / "evaluation" / "offline_tasks" / "nimbrel_support"
SEED = 33
CHOICES = 4
NUMBER = re.compile(r"\d+")


def _wrong_numbers(n: int) -> list[int]:
    """Three distinct values other than ``n`` to put in its place (deterministic)."""
    out: list[int] = []
    for v in (2 * n, 3 * n, n // 2, n + 1, n + 2, 4 * n, n + 5):
        if v != n and v >= 0 and v not in out:
            out.append(v)
    return out[:CHOICES - 1]


def _with_numbers_changed(text: str, k: int) -> str:
    """``text`` with every number replaced by its ``k``-th wrong value (keeping zero padding)."""
    def swap(m: re.Match) -> str:
        digits = m.group(0)
        return str(_wrong_numbers(int(digits))[k]).zfill(len(digits) if digits[0] == "0" else 0)

    return NUMBER.sub(swap, text)


def multiple_choice(intents: dict[str, dict], held_out: list[dict], rng: random.Random
                    ) -> list[dict]:
    rows = []
    names = sorted(intents)
    for q in held_out:
        right = intents[q["intent"]]["answers"][0]
        if NUMBER.search(right):
            wrong = [_with_numbers_changed(right, k) for k in range(CHOICES - 1)]
        else:
            others = rng.sample([n for n in names if n != q["intent"]], CHOICES - 1)
            wrong = [intents[n]["answers"][0] for n in others]
        choices = [right, *wrong]
        assert len(set(choices)) == CHOICES, (q["intent"], choices)
        rng.shuffle(choices)
        rows.append({"intent": q["intent"], "question": q["question"], "choices": choices,
                     "label": choices.index(right)})
    return rows


def conversations(eval_path: Path) -> list[dict]:
    """Held-out conversations as plain text, one document each."""
    names = {"system": "System", "user": "Customer", "assistant": "Support"}
    rows = []
    for line in eval_path.read_text(encoding="utf-8").splitlines():
        messages = json.loads(line)["messages"]
        rows.append({"text": "\n\n".join(f"{names[m['role']]}: {m['content']}"
                                         for m in messages)})
    return rows


def build(seed: int = SEED) -> dict[str, list[dict]]:
    """The three files' rows, by file name."""
    spec = json.loads((HERE / "intents.json").read_text(encoding="utf-8"))
    intents = {i["name"]: i for i in spec["intents"]}
    held_out = json.loads((HERE / "questions.json").read_text(encoding="utf-8"))["held_out"]
    rng = random.Random(seed)
    return {
        "qa.jsonl": [{"intent": q["intent"], "question": q["question"],
                      "key_terms": q["key_terms"]} for q in held_out],
        "mc.jsonl": multiple_choice(intents, held_out, rng),
        "ppl.jsonl": conversations(HERE / "eval.jsonl"),
    }


def write(out_dir: Path = OUT, seed: int = SEED) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rows in build(seed).items():
        path = out_dir / name
        path.write_text("".join(json.dumps(r, ensure_ascii=True) + "\n" for r in rows),
                        encoding="utf-8")
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=OUT)
    args = parser.parse_args(argv)
    for path in write(args.out_dir):
        print(path)


if __name__ == "__main__":
    main()
