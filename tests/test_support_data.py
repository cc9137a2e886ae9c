"""The quickstart's support-ticket dataset (examples/support): the committed files are exactly
what the generator writes, every conversation is well-formed chat data, the held-out split
shares no question wording with training but only asks about taught intents, and every answer
states its intent's facts in the team's voice."""

import importlib.util
import json
from pathlib import Path

import pytest

SUPPORT = Path(__file__).resolve().parents[1] / "examples" / "support"
FILES = ("train.jsonl", "eval.jsonl", "questions.json")


@pytest.fixture(scope="module")
def gen():
    """examples/support/generate.py as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location("support_generate", SUPPORT / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def built(gen):
    """(train, eval) Conversation lists, with the intent of each user turn."""
    return gen.build()


def _read_jsonl(name: str) -> list[list[dict]]:
    rows = []
    for n, line in enumerate((SUPPORT / name).read_text(encoding="utf-8").splitlines(), 1):
        row = json.loads(line)
        assert list(row) == ["messages"], f"{name}:{n} has keys {list(row)}"
        rows.append(row["messages"])
    return rows


def _users(conversations: list[list[dict]]) -> list[str]:
    return [m["content"] for c in conversations for m in c if m["role"] == "user"]


def test_committed_files_equal_generator_output(gen, tmp_path):
    gen.write(tmp_path)
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (SUPPORT / name).read_bytes(), (
            f"examples/support/{name} is stale: run python examples/support/generate.py"
        )


@pytest.mark.parametrize("name", ["train.jsonl", "eval.jsonl"])
def test_conversations_are_well_formed(name):
    for n, messages in enumerate(_read_jsonl(name), 1):
        roles = [m["role"] for m in messages]
        turns = roles[1:] if roles[0] == "system" else roles
        assert turns and len(turns) % 2 == 0, f"{name}:{n} roles {roles}"
        assert turns == ["user", "assistant"] * (len(turns) // 2), f"{name}:{n} roles {roles}"
        for m in messages:
            assert set(m) == {"role", "content"}, f"{name}:{n} message keys {set(m)}"
            assert isinstance(m["content"], str) and m["content"].strip(), f"{name}:{n} empty"
            assert m["content"].isascii(), f"{name}:{n} non-ASCII content"


def test_sizes_and_mix():
    train, evals = _read_jsonl("train.jsonl"), _read_jsonl("eval.jsonl")
    assert 400 <= len(train) <= 500 and 60 <= len(evals) <= 80
    for rows in (train, evals):
        two_turn = sum(len(_users([c])) == 2 for c in rows) / len(rows)
        assert 0.08 <= two_turn <= 0.2, two_turn
        with_system = sum(c[0]["role"] == "system" for c in rows) / len(rows)
        assert 0.2 <= with_system <= 0.6, with_system
        chars = sorted(sum(len(m["content"]) for m in c) for c in rows)
        # Short enough for a few-minute CPU LoRA run: most under ~700 characters.
        assert sum(chars) / len(chars) < 500 and chars[int(0.9 * len(chars))] < 700


def test_eval_wording_never_seen_in_training():
    train_users = set(_users(_read_jsonl("train.jsonl")))
    leaked = [u for u in _users(_read_jsonl("eval.jsonl")) if u in train_users]
    assert not leaked


def test_every_eval_intent_is_taught_and_stated(gen, built):
    train, evals = built
    assert {i for c in evals for i in c.intents} <= {i for c in train for i in c.intents}
    voice, intents = gen.load_spec()
    keys = {i.name: i.keys for i in intents}
    for conv in train + evals:
        answers = [m["content"] for m in conv.messages if m["role"] == "assistant"]
        for turn, (intent, answer) in enumerate(zip(conv.intents, answers, strict=True)):
            missing = [k for k in keys[intent] if k.lower() not in answer.lower()]
            assert not missing, f"{intent} answer lacks {missing}"
            opener = voice["greeting"] if turn == 0 else voice["followup_greeting"]
            assert answer.startswith(opener) and answer.endswith(voice["sign_off"])


def test_showcase_questions_are_held_out(gen, built):
    shown = json.loads((SUPPORT / "questions.json").read_text(encoding="utf-8"))
    train, evals = built
    single_eval = {c.messages[-2]["content"]: c.intents[0] for c in evals if len(c.intents) == 1}
    train_users = set(gen.user_messages(train))
    answers = {i.name: i.answers for i in gen.load_spec()[1]}
    assert len(shown["questions"]) == 6
    for q in shown["questions"]:
        assert single_eval.get(q["question"]) == q["intent"] and q["question"] not in train_users
        for term in q["key_terms"]:
            assert all(term.lower() in a.lower() for a in answers[q["intent"]]), term


def test_readme_facts_table_is_current(gen):
    readme = (SUPPORT / "README.md").read_text(encoding="utf-8")
    assert gen.facts_table() in readme, (
        "refresh with: python examples/support/generate.py --facts-table"
    )


def test_every_held_out_question_is_listed_with_its_keys(gen, built):
    held = json.loads((SUPPORT / "questions.json").read_text(encoding="utf-8"))["held_out"]
    train, _ = built
    train_users = set(gen.user_messages(train))
    intents = {i.name: i for i in gen.load_spec()[1]}
    assert len(held) == gen.HELD_OUT_PER_INTENT * len(intents)
    for q in held:
        assert q["question"] in intents[q["intent"]].questions
        assert q["question"] not in train_users
        assert q["key_terms"] == list(intents[q["intent"]].keys)
