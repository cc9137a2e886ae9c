"""``jaxtune.generate(model, tokenizer, prompts, ...)``: answers from any family's model.

A prompt is a string (a user message, put through the tokenizer's chat template unless
``raw``), a chat (a list of ``{"role", "content"}`` messages), or token ids (a list of ints,
or a 1-D integer array), generated from as they are, as transformers' ``generate(input_ids)``
does: no tokenizer is needed, and the answers come back as token ids. Generation stops at any
stop id: ``generation_config``'s ``eos_token_id`` (one id or a list), the tokenizer's EOS and
its chat template's end-of-turn token, or at ``max_new_tokens``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from jaxtune.generation.errors import GenerateError
from jaxtune.generation.loop import Generated, Generator
from jaxtune.generation.sampling import Sampling

Prompt = str | Sequence[dict[str, str]] | Sequence[int]


@dataclass
class Answers:
    """The answers' text and token ids (stop id included when one was emitted), and timings."""

    texts: list[str] | None  # None when no tokenizer was given (token-id prompts)
    tokens: list[list[int]]
    prompt_ids: list[list[int]]
    stats: Generated


def as_chat(prompt: Prompt, system: str | None) -> list[dict[str, str]]:
    chat = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system and not any(m.get("role") == "system" for m in chat):
        chat = [{"role": "system", "content": system}, *chat]
    return chat


def _is_token_id(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def is_token_ids(prompt: Any) -> bool:
    """Whether ``prompt`` is one prompt given as token ids: a non-empty list of ints (or a
    1-D integer array)."""
    if hasattr(prompt, "ndim") and hasattr(prompt, "dtype"):
        return prompt.ndim == 1 and np.issubdtype(np.asarray(prompt).dtype, np.integer)
    return (isinstance(prompt, Sequence) and not isinstance(prompt, str) and len(prompt) > 0
            and _is_token_id(prompt[0]))


def split_prompts(prompts: Any) -> list[Any]:
    """The prompts as a list, from one string, one chat, one list of token ids (or a 1-D
    array), or a list of them (or a 2-D integer array, one prompt per row)."""
    if hasattr(prompts, "ndim") and hasattr(prompts, "dtype"):
        rows = np.asarray(prompts)
        if not np.issubdtype(rows.dtype, np.integer) or rows.ndim not in (1, 2):
            raise GenerateError(f"an array of prompts must hold token ids, 1-D (one prompt) or "
                                f"2-D (one per row); this one is {rows.ndim}-D {rows.dtype}.")
        return [rows.tolist()] if rows.ndim == 1 else rows.tolist()
    if isinstance(prompts, str) or is_token_ids(prompts) or (
            isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], dict)):
        return [prompts]
    return list(prompts)


def encode_prompt(tokenizer: Any, prompt: Prompt, *, system: str | None = None,
                  raw: bool = False) -> list[int]:
    """Token ids of one prompt: token ids as they are; otherwise the chat template's rendering
    with the assistant turn opened (special tokens come from the template only), or with
    ``raw`` (or a tokenizer without a chat template) the text as it is."""
    if is_token_ids(prompt):
        ids = np.asarray(prompt).tolist() if hasattr(prompt, "ndim") else list(prompt)
        bad = [t for t in ids if not _is_token_id(t)]
        if bad:
            raise GenerateError(f"a prompt of token ids holds {bad[0]!r} "
                                f"({type(bad[0]).__name__}); every item must be an int.")
        return [int(t) for t in ids]
    if not isinstance(prompt, str) and len(prompt) == 0:
        return []  # no tokens and no messages alike: the caller names the empty prompt
    if tokenizer is None:
        kind = "text" if isinstance(prompt, str) else "a chat"
        raise GenerateError(f"this prompt is {kind}, which needs a tokenizer to encode "
                            "(tokenizer is None). Pass the model's tokenizer, or give the "
                            "prompt as token ids (a list of ints), which need none.")
    if raw or not getattr(tokenizer, "chat_template", None):
        if not isinstance(prompt, str):
            raise GenerateError("a chat (list of messages) needs a tokenizer with a chat "
                                "template; this one has none. Give the prompt as text, or "
                                "as token ids.")
        return list(tokenizer(prompt)["input_ids"])
    text = tokenizer.apply_chat_template(as_chat(prompt, system), tokenize=False,
                                         add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def default_stop_ids(tokenizer: Any, generation_config: dict[str, Any] | None) -> list[int]:
    """``generation_config``'s EOS ids, then the tokenizer's EOS and end-of-turn ids."""
    from jaxtune.export.hf_folder import stop_token_ids

    ids: list[int] = []
    eos = (generation_config or {}).get("eos_token_id")
    for i in ([eos] if isinstance(eos, int) else list(eos or [])):
        ids.append(int(i))
    if tokenizer is not None:
        ids += [i for i in stop_token_ids(tokenizer) if i not in ids]
    return ids


def decode_answer(tokenizer: Any, tokens: list[int], stop_ids: Sequence[int]) -> str:
    if tokens and tokens[-1] in stop_ids:
        tokens = tokens[:-1]
    return tokenizer.decode(tokens, skip_special_tokens=True)


def generate(model: Any, tokenizer: Any, prompts: Prompt | Sequence[Prompt], *,
             max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, system: str | None = None, raw: bool = False,
             stop_ids: Sequence[int] | None = None,
             generation_config: dict[str, Any] | None = None,
             stream: Callable[[int, list[int]], None] | None = None,
             generator: Generator | None = None, details: bool = False
             ) -> list[str] | list[list[int]] | Answers:
    """Answers to ``prompts`` from ``model``.

    ``prompts`` is one prompt or a list of them. A prompt is text, a chat, or token ids (a
    list of ints; a 2-D integer array is one prompt per row, taken whole: no padding is
    removed). Token ids are generated from as they are, with no chat template, and need no
    ``tokenizer`` (it may be ``None``).

    Greedy by default (``temperature`` 0); ``top_k`` / ``top_p`` filter sampled tokens and
    ``seed`` makes sampling reproducible. ``stop_ids`` default to :func:`default_stop_ids`
    (with no tokenizer: ``generation_config``'s EOS only, and with neither, none: every
    answer is then ``max_new_tokens`` long).

    Returns the answers in the form the prompts came in: texts for text and chat prompts,
    the new token ids (a stop id included when one was emitted) for token-id prompts. With
    ``details``, an :class:`Answers` (texts, token ids, prompt ids, tokens/s) whatever the
    form; its ``texts`` is ``None`` without a tokenizer. ``generator`` reuses a
    :class:`~jaxtune.generation.loop.Generator` across calls.
    """
    batch = split_prompts(prompts)
    if not batch:
        raise GenerateError("no prompts to answer: give at least one.")
    as_ids = [is_token_ids(p) for p in batch]
    if any(as_ids) and not all(as_ids) and not details:
        first = as_ids.index(not as_ids[0])
        raise GenerateError(f"prompt 0 is {'token ids' if as_ids[0] else 'text or a chat'} but "
                            f"prompt {first} is not: give every prompt in one form (the "
                            "answers come back in that form), or pass details=True.")
    ids = [encode_prompt(tokenizer, p, system=system, raw=raw) for p in batch]
    empty = [i for i, p in enumerate(ids) if not p]
    if empty:
        raise GenerateError(f"prompt {empty[0]} encodes to no tokens; give it some text "
                            "(or token ids).")
    stops = list(stop_ids) if stop_ids is not None else default_stop_ids(tokenizer,
                                                                          generation_config)
    gen = generator or Generator(model)
    out = gen.generate(ids, max_new_tokens=max_new_tokens,
                       sampling=Sampling(temperature, top_k, top_p), seed=seed, stop_ids=stops,
                       stream=stream)
    texts = None if tokenizer is None else [decode_answer(tokenizer, t, stops)
                                             for t in out.tokens]
    if details:
        return Answers(texts, out.tokens, ids, out)
    return out.tokens if all(as_ids) else texts
