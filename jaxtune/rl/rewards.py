"""Reward functions: loading them from the config, the built-ins, and calling them safely.

A reward function has TRL's signature::

    fn(prompts, completions, completion_ids, **columns) -> list[float | None]

``prompts`` and ``completions`` are text (or, for chat prompts, message lists with the
completion as ``[{"role": "assistant", "content": ...}]``, as TRL passes them),
``completion_ids`` the completion's token ids (up to its EOS), and every other column of the
prompt rows comes by name (``answer``, ``key_facts``...), plus ``trainer_state`` (an object
with ``global_step`` and ``max_steps``). ``None`` means "does not apply to this completion"
and counts as NaN (summed with ``nansum``, as TRL). ``rl.rewards`` names each function (a
built-in, or ``pkg.module:function``) with a weight and ``options`` bound as keyword
arguments.

Built-ins:

- ``exact_answer``: 1 when the completion's final number equals the ``answer`` column's (GSM8K
  style: after ``####`` when present, else the last number; commas, ``$`` and a trailing
  ``.0`` ignored), else 0. Options: ``answer_field``.
- ``format``: 1 when the completion matches ``pattern`` (``re.search``; ``full_match: true``
  for ``re.fullmatch``), else 0. Default pattern: a ``#### <number>`` final answer.
- ``key_facts``: the fraction of the ``key_facts`` column's phrases the completion states
  (case-insensitive), as the support quickstart's report counts them. Options:
  ``facts_field``, ``all_or_nothing``.
- ``overlong``: DAPO's soft overlong punishment, counted in tokens (TRL's
  ``get_soft_overlong_punishment``): 0 up to ``max_length - buffer`` tokens, falling linearly
  to -1 at ``max_length``, -1 beyond. Options: ``max_length`` (default
  ``rl.max_completion_length``), ``buffer`` (default a quarter of ``max_length``).

A function that cannot be imported stops the run before any weights are read; one that raises,
returns the wrong number of rewards, a value that is not a number, or NaN for every completion
stops it with a :class:`RewardError` naming the function and the prompt row.
"""

from __future__ import annotations

import functools
import inspect
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from jaxtune.errors import JaxtuneError


class RewardError(JaxtuneError):
    """A reward function could not be loaded, or failed on a rollout; names it and the row."""


# --------------------------------------------------------------------------- built-ins

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> str | None:
    """The final answer's number in ``text``: after the last ``####`` when there is one, else
    the last number; normalised (no ``$`` or commas, ``12.0`` -> ``12``)."""
    if text is None:
        return None
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    found = _NUMBER.findall(tail)
    if not found:
        return None
    value = (found[0] if "####" in text else found[-1]).replace("$", "").replace(",", "")
    if "." in value:
        value = value.rstrip("0").rstrip(".")
    return value or None


def _column(columns: dict[str, Any], name: str, option: str) -> list[Any]:
    """A column of the prompt rows that a built-in reads, or the error that names it."""
    if columns.get(name) is None:
        raise ValueError(f"the prompt rows have no '{name}' column (set the reward's "
                         f"options.{option})")
    return columns[name]


def _text(completion: Any) -> str:
    """A completion's text: TRL passes chat completions as ``[{"role", "content"}]``."""
    if isinstance(completion, list):
        return "".join(str(m.get("content", "")) for m in completion if isinstance(m, dict))
    return str(completion)


def exact_answer(prompts, completions, completion_ids, *, answer_field: str = "answer",
                 **columns) -> list[float | None]:
    """1.0 when the completion's final number equals the answer's, else 0.0 (None: no answer)."""
    answers = _column(columns, answer_field, "answer_field")
    out: list[float | None] = []
    for completion, answer in zip(completions, answers, strict=True):
        want = final_number(str(answer)) if answer is not None else None
        out.append(None if want is None else float(final_number(_text(completion)) == want))
    return out


FINAL_ANSWER = r"####\s*-?\$?\d[\d,]*(?:\.\d+)?"


def format_match(prompts, completions, completion_ids, *, pattern: str = FINAL_ANSWER,
                 full_match: bool = False, **columns) -> list[float]:
    """1.0 when the completion matches ``pattern``, else 0.0."""
    regex = re.compile(pattern, re.DOTALL)
    match = regex.fullmatch if full_match else regex.search
    return [float(match(_text(c)) is not None) for c in completions]


def key_facts(prompts, completions, completion_ids, *, facts_field: str = "key_facts",
              all_or_nothing: bool = False, **columns) -> list[float | None]:
    """The fraction of the row's key phrases the completion states (case-insensitive)."""
    facts = _column(columns, facts_field, "facts_field")
    out: list[float | None] = []
    for completion, terms in zip(completions, facts, strict=True):
        if not terms:
            out.append(None)
            continue
        text = _text(completion).lower()
        share = sum(str(t).lower() in text for t in terms) / len(terms)
        out.append(float(share == 1.0) if all_or_nothing else share)
    return out


def overlong(prompts, completions, completion_ids, *, max_length: int, buffer: int,
             **columns) -> list[float]:
    """DAPO's soft overlong punishment in tokens (TRL's ``get_soft_overlong_punishment``)."""
    if not 0 < buffer <= max_length:
        raise ValueError(f"buffer ({buffer}) must be in (0, max_length={max_length}]")
    out = []
    for ids in completion_ids:
        n = len(ids)
        if n <= max_length - buffer:
            out.append(0.0)
        elif n <= max_length:
            out.append((max_length - buffer - n) / buffer)
        else:
            out.append(-1.0)
    return out


BUILTINS: dict[str, Callable[..., list]] = {
    "exact_answer": exact_answer,
    "format": format_match,
    "key_facts": key_facts,
    "overlong": overlong,
}


# --------------------------------------------------------------------------- loading


@dataclass
class Reward:
    """One configured reward function."""

    name: str  # in metrics (rewards/<name>/mean): short, TensorBoard's characters
    fn: Callable[..., Sequence[Any]]
    weight: float
    source: str = ""  # as configured (a built-in name or the import path), for messages

    def __post_init__(self):
        self.source = self.source or self.name


def load_rewards(rl_cfg) -> list[Reward]:
    """The configured reward functions, each with its options bound. Import failures and
    options the function does not take are reported here, before anything is loaded."""
    from jaxtune.loss import ImportPathError, load_callable

    out = []
    for i, r in enumerate(rl_cfg.rewards):
        key = f"rl.rewards[{i}].function"
        if r.function in BUILTINS:
            fn = BUILTINS[r.function]
            options = dict(r.options)
            if r.function == "overlong":
                options.setdefault("max_length", rl_cfg.max_completion_length)
                buffer = options.setdefault("buffer", max(1, options["max_length"] // 4))
                if not 0 < buffer <= options["max_length"]:
                    raise RewardError(
                        f"{key} overlong: options.buffer ({buffer}) must be in (0, max_length="
                        f"{options['max_length']}] (max_length defaults to "
                        "rl.max_completion_length).")
        elif ":" in r.function:
            try:
                fn = load_callable(r.function)
            except ImportPathError as e:
                raise RewardError(f"{key} '{r.function}' cannot be loaded: {e}") from None
            options = dict(r.options)
        else:
            raise RewardError(
                f"{key} is '{r.function}', which is neither a built-in reward "
                f"({', '.join(sorted(BUILTINS))}) nor an import path 'pkg.module:function'.")
        if not callable(fn):
            raise RewardError(f"{key} '{r.function}' is a {type(fn).__name__}, not a function.")
        _check_options(fn, options, f"{key} '{r.function}'")
        out.append(Reward(_name(r, [x.name for x in out]),
                          functools.partial(fn, **options) if options else fn, float(r.weight),
                          r.function))
    return out


def _name(r, taken: list[str]) -> str:
    """The reward's name in metrics: the built-in's name or the function's own (as TRL names
    reward functions), then its options, in the characters TensorBoard keeps (``key_facts`` +
    ``{all_or_nothing: true}`` is ``key_facts_all_or_nothing_True``), numbered when twice."""
    name = r.function.rsplit(":", 1)[-1]
    for k, v in sorted(r.options.items()):
        name += f"_{k}_{v}"
    name = re.sub(r"[^A-Za-z0-9_.\-]", "_", name)
    base, n = name, 2
    while name in taken:
        name, n = f"{base}_{n}", n + 1
    return name


def _check_options(fn: Callable, options: dict[str, Any], name: str) -> None:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return
    # Options must name the function's own parameters: reward functions take **kwargs (the
    # rows' columns arrive there), which would swallow a misspelt option without a word.
    named = [p for p, v in params.items() if v.kind not in (v.VAR_KEYWORD, v.VAR_POSITIONAL)]
    unknown = [k for k in options if k not in named]
    if unknown:
        takes = [p for p in named if p not in ("prompts", "completions", "completion_ids")]
        raise RewardError(f"{name} takes no option(s) {unknown}; its options are "
                          f"{takes or 'none'}.")


# --------------------------------------------------------------------------- calling


@dataclass
class TrainerStateView:
    """What TRL's ``trainer_state`` gives reward functions that shape rewards over training."""

    global_step: int
    max_steps: int


def score(rewards: list[Reward], prompts: list[Any], completions: list[Any],
          completion_ids: list[list[int]], columns: dict[str, list[Any]],
          where: list[str], state: TrainerStateView) -> np.ndarray:
    """``[N, F]`` float32 rewards of ``N`` completions by ``F`` functions (NaN: None).

    ``where[i]`` names completion ``i``'s prompt row, for errors."""
    out = np.full((len(completions), len(rewards)), np.nan, np.float32)
    for j, reward in enumerate(rewards):
        values = _call(reward, prompts, completions, completion_ids, columns, where, state)
        out[:, j] = values
        if len(values) and not np.isfinite(values).any():
            raise RewardError(
                f"reward function '{reward.source}' gave no number (NaN or None) for any of the "
                f"{len(values)} completions of this step (first prompt: {where[0]}). Return "
                "None only for the completions it does not apply to; check the columns it "
                f"reads (the rows have: {', '.join(sorted(columns)) or 'no other columns'}).")
    return out


def _call(reward: Reward, prompts, completions, completion_ids, columns, where,
          state) -> np.ndarray:
    n = len(completions)
    try:
        got = reward.fn(prompts=prompts, completions=completions, completion_ids=completion_ids,
                        trainer_state=state, **columns)
    except Exception as e:  # noqa: BLE001 -- a user's function: name it and the row
        raise RewardError(
            f"reward function '{reward.source}' raised {type(e).__name__}: {e} "
            f"({_failing_row(reward, prompts, completions, completion_ids, columns, where, state)}"
            "). Fix the function or the rows it reads.") from None
    try:
        got = list(got)
    except TypeError:
        raise RewardError(f"reward function '{reward.source}' returned a "
                          f"{type(got).__name__}, not a list of {n} rewards.") from None
    if len(got) != n:
        raise RewardError(
            f"reward function '{reward.source}' returned {len(got)} rewards for {n} completions "
            f"(prompts from {where[0]} on); it must return one per completion, None where it "
            "does not apply.")
    values = np.full(n, np.nan, np.float32)
    for i, v in enumerate(got):
        if v is None:
            continue
        try:
            x = float(v)
        except (TypeError, ValueError):
            raise RewardError(
                f"reward function '{reward.source}' returned {v!r} for completion {i} (prompt "
                f"{where[i]}); rewards must be numbers or None.") from None
        if math.isinf(x):
            raise RewardError(f"reward function '{reward.source}' returned {x} for completion {i} "
                              f"(prompt {where[i]}); rewards must be finite.")
        values[i] = x
    return values


def _failing_row(reward, prompts, completions, completion_ids, columns, where, state) -> str:
    """Which prompt row makes the function raise, found by calling it on each row alone."""
    for i in range(len(completions)):
        try:
            reward.fn(prompts=prompts[i:i + 1], completions=completions[i:i + 1],
                      completion_ids=completion_ids[i:i + 1], trainer_state=state,
                      **{k: v[i:i + 1] for k, v in columns.items()})
        except Exception:  # noqa: BLE001
            return f"on the completion of prompt {where[i]}"
    return f"on the batch of prompts from {where[0]} on; no single row fails alone"
