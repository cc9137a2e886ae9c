"""Build the Nimbrel Sync preference pairs (for DPO / ORPO / SimPO) from intents.json.

Each pair is a support question with the on-brand, correct answer (``chosen``: the support
team's voice and the intent's facts) and a plausible but worse one (``rejected``): either a
generic answer that could come from any company ("please check our documentation or contact
support") or an on-brand answer to a different intent (wrong intent, facts that do not answer
the question). The question split is the SFT set's (``generate.py``: the same seeded held-out
paraphrases), so ``preferences_eval.jsonl`` asks only held-out wordings.

Rows are TRL's conversational preference format: ``prompt`` (messages, sometimes with a system
prompt) and ``chosen`` / ``rejected`` (one assistant message each). Deterministic:
``python examples/support/generate_preferences.py``.
"""

import json
import random
from pathlib import Path

from generate import SEED, SYSTEM_PROMPT_RATE, load_spec, split_questions

HERE = Path(__file__).resolve().parent

GENERIC = [
    "Thanks for your message. For questions like this, please check the help section of our "
    "website or contact your account administrator. We appreciate your patience.",
    "I'm sorry you're having trouble. Please try restarting the app and checking your internet "
    "connection. If the problem continues, reach out to our support team.",
    "Great question! The details can vary depending on your setup, so I'd recommend reviewing "
    "the documentation for your plan. Let me know if there's anything else I can help with.",
    "Unfortunately I don't have that information right now. Please visit our website for the "
    "latest details.",
]


def _answer(intent, voice, rng) -> str:
    return f"{voice['greeting']} {rng.choice(intent.answers)}\n\n{voice['sign_off']}"


def build(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """Return (train, eval) preference rows; deterministic for a given seed."""
    voice, intents = load_spec()
    train_q, held_q = split_questions(intents, random.Random(seed))
    rng = random.Random(seed + 1)

    def rows(questions: dict) -> list[dict]:
        out = []
        for intent in intents:
            for q in questions[intent.name]:
                prompt = []
                if rng.random() < SYSTEM_PROMPT_RATE:
                    system = rng.choice(voice["system_prompts"])
                    prompt.append({"role": "system", "content": system})
                prompt.append({"role": "user", "content": q})
                if rng.random() < 0.5:
                    rejected = rng.choice(GENERIC)
                else:
                    other = rng.choice([i for i in intents if i.name != intent.name])
                    rejected = _answer(other, voice, rng)
                out.append({"prompt": prompt,
                            "chosen": [{"role": "assistant",
                                        "content": _answer(intent, voice, rng)}],
                            "rejected": [{"role": "assistant", "content": rejected}]})
        rng.shuffle(out)
        return out

    return rows(train_q), rows(held_q)


def main() -> None:
    train, evals = build()
    for name, rows in (("preferences.jsonl", train), ("preferences_eval.jsonl", evals)):
        with open(HERE / name, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=True) + "\n")
        print(f"{name}: {len(rows)} pairs")


if __name__ == "__main__":
    main()
