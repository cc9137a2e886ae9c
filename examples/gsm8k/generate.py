"""Write a small GSM8K-shaped dataset of arithmetic word problems, made here (no download).

The rows have GSM8K's columns and answer format: ``question``, and ``answer`` with the worked
steps (``<<48/2=24>>`` calculator annotations) and a final ``#### <number>`` line, so a recipe
written for ``openai/gsm8k`` runs on these files unchanged, offline (``data.prompt_field:
question``, the ``exact_answer`` reward reading ``answer``). The problems are two- and
three-step sums, differences, products and shares of small numbers, from a seeded
``random.Random``; the output is deterministic::

    python examples/gsm8k/generate.py          # train.jsonl (512 rows), test.jsonl (128)
"""

import argparse
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 8
NAMES = ["Natalia", "Weng", "Betty", "Julie", "James", "Albert", "Ken", "Alexis", "Tina",
         "Mark", "Randy", "Joy", "Carla", "Ivan", "Mei", "Omar"]
THINGS = ["clips", "apples", "books", "stamps", "marbles", "cookies", "pencils", "shells"]


def _buy_and_give(rng):
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(5, 60), rng.randint(2, 40)
    c = rng.randint(1, a + b - 1)
    q = (f"{name} has {a} {thing}. {name} gets {b} more and then gives {c} away. "
         f"How many {thing} does {name} have now?")
    steps = [f"After getting more, {name} has {a}+{b}=<<{a}+{b}={a + b}>>{a + b} {thing}.",
             f"After giving some away, {name} has {a + b}-{c}=<<{a + b}-{c}={a + b - c}>>"
             f"{a + b - c} {thing}."]
    return q, steps, a + b - c


def _per_day(rng):
    name = rng.choice(NAMES)
    rate, days, spent = rng.randint(3, 25), rng.randint(2, 9), rng.randint(1, 30)
    q = (f"{name} earns ${rate} a day for {days} days and spends ${spent} on lunch. "
         f"How many dollars does {name} have left?")
    total = rate * days
    steps = [f"{name} earns {rate}*{days}=<<{rate}*{days}={total}>>{total} dollars.",
             f"{name} has {total}-{spent}=<<{total}-{spent}={total - spent}>>{total - spent} "
             "dollars left."]
    return q, steps, total - spent


def _half_then_more(rng):
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    first = 2 * rng.randint(4, 40)
    half = first // 2
    q = (f"{name} sold {first} {thing} in April, and then half as many in May. How many "
         f"{thing} did {name} sell altogether in April and May?")
    steps = [f"{name} sold {first}/2=<<{first}/2={half}>>{half} {thing} in May.",
             f"{name} sold {first}+{half}=<<{first}+{half}={first + half}>>{first + half} "
             f"{thing} altogether in April and May."]
    return q, steps, first + half


def _groups(rng):
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    boxes, per, extra = rng.randint(2, 12), rng.randint(3, 15), rng.randint(0, 9)
    q = (f"{name} packs {boxes} boxes with {per} {thing} each and has {extra} {thing} left "
         f"over. How many {thing} did {name} start with?")
    packed = boxes * per
    steps = [f"The boxes hold {boxes}*{per}=<<{boxes}*{per}={packed}>>{packed} {thing}.",
             f"{name} started with {packed}+{extra}=<<{packed}+{extra}={packed + extra}>>"
             f"{packed + extra} {thing}."]
    return q, steps, packed + extra


KINDS = (_buy_and_give, _per_day, _half_then_more, _groups)


def build(n: int, rng: random.Random) -> list[dict]:
    rows, seen = [], set()
    while len(rows) < n:
        question, steps, answer = rng.choice(KINDS)(rng)
        if question in seen:
            continue
        seen.add(question)
        rows.append({"question": question, "answer": "\n".join(steps) + f"\n#### {answer}"})
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=HERE)
    args = p.parse_args(argv)
    rng = random.Random(SEED)
    rows = build(512 + 128, rng)  # one pool: no question in both splits
    for name, part in (("train.jsonl", rows[:512]), ("test.jsonl", rows[512:])):
        with open(args.out / name, "w", encoding="utf-8") as f:
            for row in part:
                f.write(json.dumps(row, ensure_ascii=True) + "\n")
        print(f"{args.out / name}: {len(part)} problems")


if __name__ == "__main__":
    main()
