"""``jaxtune.generate(model, tokenizer, prompts, ...)``: text answers from any family's model.

A prompt is a string (a user message, put through the tokenizer's chat template unless
``raw``) or a chat (a list of ``{"role", "content"}`` messages). Generation stops at any
stop id: ``generation_config``'s ``eos_token_id`` (one id or a list), the tokenizer's EOS and
its chat template's end-of-turn token, or at ``max_new_tokens``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from jaxtune.generation.errors import GenerateError
from jaxtune.generation.loop import Generated, Generator
from jaxtune.generation.sampling import Sampling

Prompt = str | Sequence[dict[str, str]]


@dataclass
class Answers:
    """The answers' text and token ids (stop id included when one was emitted), and timings."""

    texts: list[str]
    tokens: list[list[int]]
    prompt_ids: list[list[int]]
    stats: Generated


def as_chat(prompt: Prompt, system: str | None) -> list[dict[str, str]]:
    chat = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system and not any(m.get("role") == "system" for m in chat):
        chat = [{"role": "system", "content": system}, *chat]
    return chat


def encode_prompt(tokenizer: Any, prompt: Prompt, *, system: str | None = None,
                  raw: bool = False) -> list[int]:
    """Token ids of one prompt: the chat template's rendering with the assistant turn opened
    (special tokens come from the template only), or with ``raw`` the text as it is."""
    if raw or not getattr(tokenizer, "chat_template", None):
        if not isinstance(prompt, str):
            raise GenerateError("a chat (list of messages) needs a tokenizer with a chat "
                                "template; this one has none. Give the prompt as text.")
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
             generator: Generator | None = None, details: bool = False) -> list[str] | Answers:
    """Answers to ``prompts`` (one string, one chat, or a list of them) from ``model``.

    Greedy by default (``temperature`` 0); ``top_k`` / ``top_p`` filter sampled tokens and
    ``seed`` makes sampling reproducible. ``stop_ids`` default to :func:`default_stop_ids`.
    Returns the answer texts, or with ``details`` an :class:`Answers` (token ids, tokens/s).
    ``generator`` reuses a :class:`~jaxtune.generation.loop.Generator` across calls.
    """
    single = isinstance(prompts, str) or (
        bool(prompts) and isinstance(prompts[0], dict))
    batch = [prompts] if single else list(prompts)
    if not batch:
        raise GenerateError("no prompts to answer: give at least one.")
    ids = [encode_prompt(tokenizer, p, system=system, raw=raw) for p in batch]
    empty = [i for i, p in enumerate(ids) if not p]
    if empty:
        raise GenerateError(f"prompt {empty[0]} encodes to no tokens; give it some text.")
    stops = list(stop_ids) if stop_ids is not None else default_stop_ids(tokenizer,
                                                                          generation_config)
    gen = generator or Generator(model)
    out = gen.generate(ids, max_new_tokens=max_new_tokens,
                       sampling=Sampling(temperature, top_k, top_p), seed=seed, stop_ids=stops,
                       stream=stream)
    texts = [decode_answer(tokenizer, t, stops) for t in out.tokens]
    if details:
        return Answers(texts, out.tokens, ids, out)
    return texts
