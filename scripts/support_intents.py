"""Key facts and intents of answers to the support data's questions (examples/support).

Each of the support data's intents (``examples/support/intents.json``) lists the key phrases
every answer to it must state. Two checks read an answer with them:

- **Key facts** (:func:`fact_count`): does the answer state every key phrase of its question's
  intent? A phrase is stated when it occurs in the answer, case-insensitive, as the quickstart
  reports have always counted it (``jaxtune/rl/rewards.py``'s ``key_facts`` reward and the
  offline lm_eval task count alike), so runs compare across versions.
- **Intent** (:func:`answered_intent`): which intent's solution does the answer give? An answer
  can state none of its own intent's phrases and all of another's: the question was taken for
  another one. Here a phrase must stand as words of its own (``$6`` is not in ``$60``, ``2``
  not in ``E-2207``), and a phrase is *distinctive* of its intent when no other intent's key
  phrases or reference answers contain it (``E-4012`` is, ``Business`` is not). The answer gives
  the solution of the intent whose key phrases it states most of, among the intents it states
  a distinctive phrase of (ties: the most distinctive phrases, then the question's own intent,
  then intents.json's order); with no distinctive phrase of any intent it gives none (a
  generic answer). The check is deterministic and reads only the answer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

INTENTS_JSON = Path(__file__).resolve().parents[1] / "examples" / "support" / "intents.json"


# ------------------------------------------------------------------------- key facts

def stated(text: str, terms: Sequence[str]) -> int:
    """How many of ``terms`` the text states (case-insensitive substrings)."""
    return sum(t.lower() in text.lower() for t in terms)


def fact_count(texts: list[str], held_out: list[dict]) -> tuple[int, int, int]:
    """(answers stating every key phrase of their intent, key phrases stated, key phrases):
    greedy answers to every held-out question, so the count rests on 80 wordings, not 6."""
    counts = [stated(text, q["key_terms"]) for text, q in zip(texts, held_out, strict=True)]
    complete = sum(n == len(q["key_terms"]) for n, q in zip(counts, held_out, strict=True))
    return complete, sum(counts), sum(len(q["key_terms"]) for q in held_out)


# ------------------------------------------------------------------------- intents

@dataclass(frozen=True)
class Intent:
    """One intent: its name, key phrases, and those of them no other intent states."""

    name: str
    keys: tuple[str, ...]
    distinctive: tuple[str, ...]


def _pattern(phrase: str) -> re.Pattern:
    # A phrase that starts (ends) with a letter or digit must not continue a word or number
    # there: "$6" is not in "$60", "2" is not in "E-2207", "old" is not in "folder".
    head = r"(?<![a-z0-9])" if phrase[:1].isalnum() else ""
    tail = r"(?![a-z0-9])" if phrase[-1:].isalnum() else ""
    return re.compile(head + re.escape(phrase.lower()) + tail)


def mentions(text: str, phrase: str) -> bool:
    """Whether ``text`` states ``phrase`` as words of its own (case-insensitive)."""
    return _pattern(phrase).search(text.lower()) is not None


@cache
def load_intents(path: Path = INTENTS_JSON) -> tuple[Intent, ...]:
    """The intents of ``intents.json``, each with its distinctive key phrases."""
    raw = json.loads(Path(path).read_text())["intents"]
    intents = []
    for d in raw:
        others = [text for o in raw if o["name"] != d["name"] for text in o["keys"] + o["answers"]]
        distinctive = tuple(k for k in d["keys"] if not any(mentions(t, k) for t in others))
        if not distinctive:
            raise ValueError(f"{path}: intent {d['name']!r} has no key phrase that no other "
                             "intent states, so no answer can be told to be its; give it one.")
        intents.append(Intent(d["name"], tuple(d["keys"]), distinctive))
    return tuple(intents)


def answered_intent(text: str, own: str | None = None,
                    intents: Sequence[Intent] | None = None) -> str | None:
    """The name of the intent whose solution ``text`` gives (None: no intent's solution).

    ``own`` (the question's intent) wins a tie, so a mixed answer is not counted against it.
    """
    intents = load_intents() if intents is None else intents
    best, best_score = None, (0, 0, False)
    for intent in intents:
        distinctive = sum(mentions(text, k) for k in intent.distinctive)
        if not distinctive:
            continue
        score = (sum(mentions(text, k) for k in intent.keys), distinctive, intent.name == own)
        if score > best_score:
            best, best_score = intent.name, score
    return best


def gives_other_intent(text: str, own: str, intents: Sequence[Intent] | None = None) -> bool:
    """Whether ``text`` gives another intent's solution than ``own``'s."""
    found = answered_intent(text, own, intents)
    return found is not None and found != own


def other_intent_count(texts: list[str], questions: list[dict]) -> int:
    """How many answers give another intent's solution than their question's (``intent``)."""
    return sum(gives_other_intent(text, q["intent"])
               for text, q in zip(texts, questions, strict=True))


def no_intent_count(texts: list[str], questions: list[dict]) -> int:
    """How many answers give no intent's solution at all (a generic answer)."""
    return sum(answered_intent(text, q["intent"]) is None
               for text, q in zip(texts, questions, strict=True))
