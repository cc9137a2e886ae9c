"""jaxtune's offline lm_eval tasks (jaxtune/evaluation/offline_tasks/nimbrel_support): the
committed data files are what examples/support/generate_lm_eval.py writes, they hold only
held-out data, each multiple-choice question has exactly one right answer, the key-fact metric
counts what it says, and the tasks load with the hub unreachable."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUPPORT = ROOT / "examples" / "support"
TASKS = ROOT / "jaxtune" / "evaluation" / "offline_tasks" / "nimbrel_support"


def _module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gen():
    return _module(SUPPORT / "generate_lm_eval.py", "support_generate_lm_eval")


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (TASKS / name).read_text().splitlines()]


def test_committed_files_are_what_the_generator_writes(gen, tmp_path):
    paths = gen.write(tmp_path)
    assert sorted(p.name for p in paths) == ["mc.jsonl", "ppl.jsonl", "qa.jsonl"]
    for path in paths:
        assert path.read_bytes() == (TASKS / path.name).read_bytes(), (
            f"{path.name} is stale: run python examples/support/generate_lm_eval.py")


def test_the_tasks_ask_only_held_out_questions():
    train_users = {m["content"] for line in (SUPPORT / "train.jsonl").read_text().splitlines()
                   for m in json.loads(line)["messages"] if m["role"] == "user"}
    held = json.loads((SUPPORT / "questions.json").read_text())["held_out"]
    for name in ("qa.jsonl", "mc.jsonl"):
        rows = _rows(name)
        assert [r["question"] for r in rows] == [q["question"] for q in held]
        assert not any(r["question"] in u for r in rows for u in train_users)
    assert len(_rows("ppl.jsonl")) == len((SUPPORT / "eval.jsonl").read_text().splitlines())


def test_each_question_has_one_right_answer():
    intents = {i["name"]: i for i in json.loads((SUPPORT / "intents.json").read_text())["intents"]}
    others = {i["answers"][0]: name for name, i in intents.items()}
    changed = 0
    for row in _rows("mc.jsonl"):
        choices, right = row["choices"], row["choices"][row["label"]]
        assert len(choices) == len(set(choices)) == 4
        assert right == intents[row["intent"]]["answers"][0]
        for wrong in (c for c in choices if c != right):
            if wrong in others:  # another intent's answer
                assert others[wrong] != row["intent"]
                continue
            # The right answer with every number changed: the same words, other facts.
            assert re.sub(r"\d+", "#", wrong) == re.sub(r"\d+", "#", right)
            assert all(a != b for a, b in zip(re.findall(r"\d+", wrong),
                                              re.findall(r"\d+", right), strict=True))
            changed += 1
    assert changed > 120  # most wrong answers are the right one with other numbers


def test_key_facts_metric():
    utils = _module(TASKS / "utils.py", "nimbrel_task_utils")
    doc = {"key_terms": ["45 days", "Trash"]}
    assert utils.key_facts(doc, ["Files stay in the TRASH for 45 days."]) == \
        {"all_facts": 1.0, "fact_recall": 1.0}
    assert utils.key_facts(doc, ["In the trash."]) == {"all_facts": 0.0, "fact_recall": 0.5}


def test_offline_tasks_load_without_the_hub(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    from jaxtune.evaluation.tasks import load_tasks, offline_task_names, task_manager

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    assert offline_task_names() == ["nimbrel_support_mc", "nimbrel_support_ppl",
                                    "nimbrel_support_qa"]
    tasks = load_tasks(task_manager(["nimbrel_support"]), ["nimbrel_support"])
    sizes = {t.task_name: len(t.test_docs()) for t in tasks}
    assert sizes == {"nimbrel_support_mc": 80, "nimbrel_support_ppl": 72,
                     "nimbrel_support_qa": 80}
