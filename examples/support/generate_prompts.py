"""Build the RL prompt files of the Nimbrel Sync support set (``data.format: prompt``).

Each row is a prompt (chat messages ending with the customer's question) and the key phrases
of its intent, which the ``key_facts`` reward checks an answer for
(``configs/quickstart-grpo.yaml``):

- ``prompts.jsonl``: the 400 training question wordings (the same split as ``train.jsonl``),
  some after one of the support team's system prompts, as in the SFT data;
- ``prompts_eval.jsonl``: the 80 held-out wordings (``questions.json`` ``held_out``), each after
  the report's system prompt, so the held-out count of answers stating every key fact is the
  one the quickstart report gives.

Output is deterministic (seeded ``random.Random``, standard library only)::

    python examples/support/generate_prompts.py
"""

import json
import random
from pathlib import Path

from generate import SEED, SYSTEM_PROMPT_RATE, load_spec, split_questions

HERE = Path(__file__).resolve().parent


def build(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """Return (train, eval) prompt rows; deterministic for a given seed."""
    voice, intents = load_spec()
    train_q, _ = split_questions(intents, random.Random(seed))
    rng = random.Random(seed + 2)
    train = []
    for intent in intents:
        for question in train_q[intent.name]:
            prompt = []
            if rng.random() < SYSTEM_PROMPT_RATE:
                prompt.append({"role": "system", "content": rng.choice(voice["system_prompts"])})
            prompt.append({"role": "user", "content": question})
            train.append({"prompt": prompt, "key_facts": list(intent.keys),
                          "intent": intent.name})
    rng.shuffle(train)
    spec = json.loads((HERE / "questions.json").read_text(encoding="utf-8"))
    system = [{"role": "system", "content": spec["system_prompt"]}]
    evals = [{"prompt": system + [{"role": "user", "content": q["question"]}],
              "key_facts": q["key_terms"], "intent": q["intent"]} for q in spec["held_out"]]
    return train, evals


def main() -> None:
    train, evals = build()
    for name, rows in (("prompts.jsonl", train), ("prompts_eval.jsonl", evals)):
        with open(HERE / name, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=True) + "\n")
        print(f"{name}: {len(rows)} prompts")


if __name__ == "__main__":
    main()
