"""Build the Nimbrel Sync support-ticket dataset from the hand-written intents.json.

Nimbrel Sync is a fictional team file sync and backup service. intents.json holds its facts:
for each intent (a question type such as "error E-4012" or "refund policy") a one-line fact,
the key phrases every answer must contain, one or two answers in the support team's voice and
twelve paraphrased user questions.

This script turns that into chat data in the `messages` format:

- eval.jsonl: for every intent, HELD_OUT_PER_INTENT question paraphrases (picked with a seeded
  RNG) are held out; those are the only user messages in the eval split, so eval questions are
  worded in ways training never shows, while every eval intent is taught in training.
- train.jsonl: every other paraphrase once as a single-turn conversation, plus some two-turn
  conversations (a follow-up question on another intent).
- questions.json: held-out questions for a base vs fine-tuned side-by-side comparison, and every
  held-out question with its intent's key phrases (the report's fact count over all of them).

Output is deterministic (seeded `random.Random`, standard library only), so the committed
files can be checked against a fresh run: `python examples/support/generate.py`.
"""

import argparse
import json
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 9
HELD_OUT_PER_INTENT = 2
TRAIN_TWO_TURN = 70  # about 15% of the training conversations
EVAL_TWO_TURN = 8
SYSTEM_PROMPT_RATE = 0.4  # share of conversations that start with a system prompt

# Intents shown side by side in the quickstart report, with the phrases a correct answer
# should contain (case-insensitive). Their held-out questions are kept single-turn.
SHOWCASE = {
    "error_e4012": ["sign out", "30 days"],
    "sso": ["Business"],
    "restore_deleted": ["45 days", "Trash"],
    "api_rate_limit": ["120", "429"],
    "refund_policy": ["14 days"],
    "plans_prices": ["$6", "$14"],
}


@dataclass(frozen=True)
class Intent:
    """One question type: the fact, the phrases every answer contains, answers, questions."""

    name: str
    fact: str
    keys: tuple
    answers: tuple
    questions: tuple


@dataclass(frozen=True)
class Conversation:
    """A chat in `messages` format plus the intent of each user turn (not written out)."""

    intents: tuple
    messages: tuple

    def to_json(self) -> str:
        """One JSONL line: only the messages, so any chat loader can read it."""
        return json.dumps({"messages": list(self.messages)}, ensure_ascii=True)


def load_spec(path: Path = HERE / "intents.json") -> tuple[dict, list[Intent]]:
    """Read intents.json and return (voice settings, intents), checking it is well formed."""
    raw = json.loads(path.read_text(encoding="utf-8"))
    intents = [
        Intent(d["name"], d["fact"], tuple(d["keys"]), tuple(d["answers"]), tuple(d["questions"]))
        for d in raw["intents"]
    ]
    seen: dict[str, str] = {}
    for intent in intents:
        for answer in intent.answers:
            missing = [k for k in intent.keys if k.lower() not in answer.lower()]
            assert not missing, f"{intent.name}: answer lacks {missing}: {answer!r}"
        for question in intent.questions:
            # Near-duplicates (same words, other case or punctuation) would leak across splits.
            norm = _normalise(question)
            assert norm not in seen, f"{question!r} ({intent.name}) duplicates {seen[norm]!r}"
            seen[norm] = question
        assert len(intent.questions) > HELD_OUT_PER_INTENT + 4, f"{intent.name}: too few"
    assert sorted(SHOWCASE) == sorted(set(SHOWCASE) & {i.name for i in intents})
    return raw["voice"], intents


def _normalise(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def split_questions(intents: list[Intent], rng: random.Random) -> tuple[dict, dict]:
    """Hold out HELD_OUT_PER_INTENT paraphrases per intent; return (train, held_out) maps."""
    train, held = {}, {}
    for intent in intents:
        held_idx = sorted(rng.sample(range(len(intent.questions)), HELD_OUT_PER_INTENT))
        held[intent.name] = [intent.questions[i] for i in held_idx]
        train[intent.name] = [q for i, q in enumerate(intent.questions) if i not in held_idx]
    return train, held


def _render(turns: list[tuple[Intent, str]], voice: dict, rng: random.Random) -> Conversation:
    """Turn (intent, question) pairs into a conversation in the support team's voice."""
    messages = []
    if rng.random() < SYSTEM_PROMPT_RATE:
        messages.append({"role": "system", "content": rng.choice(voice["system_prompts"])})
    for turn, (intent, question) in enumerate(turns):
        if turn > 0:
            question = rng.choice(voice["followup_prefixes"]) + question
        opener = voice["greeting"] if turn == 0 else voice["followup_greeting"]
        body = rng.choice(intent.answers)
        messages.append({"role": "user", "content": question})
        messages.append({"role": "assistant", "content": f"{opener} {body}\n\n{voice['sign_off']}"})
    return Conversation(tuple(i.name for i, _ in turns), tuple(messages))


def _pairs(items: list, count: int, rng: random.Random) -> list[tuple]:
    """Draw `count` pairs of items on different intents, without reusing an item."""
    pool = list(items)
    rng.shuffle(pool)
    pairs = []
    while len(pairs) < count:
        first = pool.pop()
        j = next(j for j in range(len(pool) - 1, -1, -1) if pool[j][0].name != first[0].name)
        pairs.append((first, pool.pop(j)))
    return pairs


def build(seed: int = SEED) -> tuple[list[Conversation], list[Conversation]]:
    """Return (train, eval) conversations; deterministic for a given seed."""
    voice, intents = load_spec()
    rng = random.Random(seed)
    train_q, held_q = split_questions(intents, rng)

    train_items = [(i, q) for i in intents for q in train_q[i.name]]
    train = [_render([item], voice, rng) for item in train_items]
    for _ in range(TRAIN_TWO_TURN):
        train.append(_render(list(_pairs(train_items, 1, rng)[0]), voice, rng))
    rng.shuffle(train)

    held_items = [(i, q) for i in intents for q in held_q[i.name]]
    pairable = [item for item in held_items if item[0].name not in SHOWCASE]
    pairs = _pairs(pairable, EVAL_TWO_TURN, rng)
    paired = {item[1] for pair in pairs for item in pair}
    evals = [_render(list(pair), voice, rng) for pair in pairs]
    evals += [_render([item], voice, rng) for item in held_items if item[1] not in paired]
    rng.shuffle(evals)

    check_split(train, evals, held_q)
    return train, evals


def user_messages(conversations: list[Conversation]) -> list[str]:
    """Every user turn's text, in order."""
    return [m["content"] for c in conversations for m in c.messages if m["role"] == "user"]


def check_split(train: list[Conversation], evals: list[Conversation], held_q: dict) -> None:
    """Fail if held-out wording reaches training or an eval intent is not taught in training."""
    train_users = user_messages(train)
    train_norm = {_normalise(u) for u in train_users}
    leaked = [u for u in user_messages(evals) if _normalise(u) in train_norm]
    assert not leaked, f"held-out user messages appear in train: {leaked[:3]}"
    # Follow-ups carry a prefix, so also check that no held-out paraphrase is inside one.
    held = [_normalise(q) for qs in held_q.values() for q in qs]
    inside = [h for h in held if any(h in t for t in train_norm)]
    assert not inside, f"held-out paraphrases inside training messages: {inside[:3]}"
    taught = {name for c in train for name in c.intents}
    untaught = {name for c in evals for name in c.intents} - taught
    assert not untaught, f"eval intents never taught in training: {sorted(untaught)}"


def showcase(evals: list[Conversation]) -> dict:
    """Held-out questions for the base vs fine-tuned comparison, one per SHOWCASE intent."""
    voice, intents = load_spec()
    by_name = {i.name: i for i in intents}
    questions = []
    for name, terms in SHOWCASE.items():
        singles = [c for c in evals if c.intents == (name,)]
        # Of the held-out questions, the one listed first in intents.json.
        user = min(user_messages(singles), key=by_name[name].questions.index)
        questions.append(
            {"intent": name, "question": user, "expected": by_name[name].fact, "key_terms": terms}
        )
    return {
        "product": "Nimbrel Sync",
        "system_prompt": voice["system_prompts"][0],
        "questions": questions,
        "held_out": held_out_questions(evals),
    }


def held_out_questions(evals: list[Conversation]) -> list[dict]:
    """Every held-out question (each intent's HELD_OUT_PER_INTENT paraphrases, in intents.json
    order), with its intent's key phrases: the report asks each one on its own, so its fact
    count rests on every held-out wording, not on the six showcased."""
    voice, intents = load_spec()
    asked = set(user_messages(evals))
    prefixes = [""] + voice["followup_prefixes"]
    held = [{"intent": i.name, "question": q, "key_terms": list(i.keys)}
            for i in intents for q in i.questions if any(p + q in asked for p in prefixes)]
    assert len(held) == HELD_OUT_PER_INTENT * len(intents), len(held)
    return held


def facts_table() -> str:
    """The intent -> fact table in Markdown (kept in README.md; a test checks it matches)."""
    _, intents = load_spec()
    rows = ["| Intent | Fact the answers teach |", "|---|---|"]
    rows += [f"| `{i.name}` | {i.fact.replace('|', '/')} |" for i in intents]
    return "\n".join(rows) + "\n"


def stats(name: str, conversations: list[Conversation]) -> str:
    """A one-line summary: counts, two-turn share and characters per conversation."""
    chars = [sum(len(m["content"]) for m in c.messages) for c in conversations]
    two_turn = sum(len(c.intents) > 1 for c in conversations)
    over = sum(n > 700 for n in chars)
    return (
        f"{name}: {len(conversations)} conversations, {two_turn} two-turn, "
        f"{len({i for c in conversations for i in c.intents})} intents, "
        f"chars/conversation mean {sum(chars) / len(chars):.0f} max {max(chars)}, "
        f"{over} over 700"
    )


def write(out_dir: Path, seed: int = SEED) -> list[Path]:
    """Write train.jsonl, eval.jsonl and questions.json into out_dir; return their paths."""
    train, evals = build(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "train.jsonl", out_dir / "eval.jsonl", out_dir / "questions.json"]
    paths[0].write_text("".join(c.to_json() + "\n" for c in train), encoding="utf-8")
    paths[1].write_text("".join(c.to_json() + "\n" for c in evals), encoding="utf-8")
    paths[2].write_text(json.dumps(showcase(evals), indent=2) + "\n", encoding="utf-8")
    print(stats("train", train))
    print(stats("eval", evals))
    return paths


def main(argv: list[str] | None = None) -> None:
    """Command line: write the dataset (default next to this script) or print the facts table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=HERE)
    parser.add_argument("--facts-table", action="store_true", help="print the README table")
    args = parser.parse_args(argv)
    if args.facts_table:
        sys.stdout.write(facts_table())
        return
    for path in write(args.out_dir):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
