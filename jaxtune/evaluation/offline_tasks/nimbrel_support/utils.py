"""Loaders and the key-fact metric of the offline Nimbrel Sync tasks (lm_eval ``!function``s).

The data files sit next to this file, so the tasks work from any working directory and never
touch the network. They are built from ``examples/support`` by
``examples/support/generate_lm_eval.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (HERE / name).read_text(encoding="utf-8").splitlines()]


def _test_split(name: str):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(_rows(name))})


def load_qa(**_kwargs):
    """The held-out questions with their intents' key phrases (``qa.jsonl``)."""
    return _test_split("qa.jsonl")


def load_mc(**_kwargs):
    """The held-out questions with four answers each (``mc.jsonl``)."""
    return _test_split("mc.jsonl")


def load_ppl(**_kwargs):
    """The held-out conversations as plain text (``ppl.jsonl``)."""
    return _test_split("ppl.jsonl")


def key_facts(doc: dict, results: list[str]) -> dict[str, float]:
    """``all_facts``: 1 when the answer states every key phrase of the question's intent
    (case-insensitive); ``fact_recall``: the share of those phrases it states."""
    answer = results[0].lower()
    stated = sum(term.lower() in answer for term in doc["key_terms"])
    return {"all_facts": float(stated == len(doc["key_terms"])),
            "fact_recall": stated / len(doc["key_terms"])}
