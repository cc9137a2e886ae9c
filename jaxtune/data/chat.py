"""Render a chat with the tokenizer's template and find, in characters, what is trained.

The masks must not depend on the template having ``{% generation %}`` markers (few do), so
they come from rendering prefixes and diffing: for assistant turn ``i``

* ``start`` = length of ``render(messages[:i], add_generation_prompt=True)``, the text up to
  where the model starts writing;
* ``stop`` = length of ``render(messages[:i + 1])``, the text through the end of that turn;

and the trained span runs from ``start`` through the first special token after the turn's
content (its end-of-turn token, e.g. ``<|im_end|>`` or ``<|eot_id|>``), so that the newline a
template writes after the end token is not trained but the end token always is.

Some templates render a turn differently once later turns follow (Qwen3 drops an empty
``<think>`` block from earlier turns), so a prefix is not always a prefix of the full text.
For such a turn we fall back to finding the turn's content in the full rendering, searching
forward from the previous turn, and train from there through its end token. Templates that
ignore ``add_generation_prompt`` are handled the same way: the span starts at the content,
so the assistant header is not trained.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from jaxtune.data.errors import RowProblem


@dataclass
class Rendered:
    """Text to tokenize plus the character spans whose tokens are trained."""

    text: str
    spans: list[tuple[int, int]]
    add_bos: bool = False  # prepend the tokenizer's BOS (plain formats)
    add_eos: bool = False  # append a trained EOS (plain formats)
    turns_without_end: int = 0  # trained turns that have no end-of-turn special token


class ChatRenderer:
    """Renders chats with one tokenizer; reused for every row of a source."""

    def __init__(self, tokenizer, special_tokens: tuple[str, ...], field: str = "messages"):
        self.tokenizer = tokenizer
        self.field = field
        self._generation_prompt: bool | None = None  # does the template honour it?
        self._end_re = (
            re.compile("|".join(re.escape(t) for t in special_tokens)) if special_tokens else None
        )

    def _render(self, conversations: list[list[dict[str, Any]]], generation: bool) -> list[str]:
        if not conversations:
            return []
        try:
            return self.tokenizer.apply_chat_template(
                conversations, tokenize=False, add_generation_prompt=generation
            )
        except Exception:  # noqa: BLE001 -- find which conversation the template rejects
            out = []
            for conv in conversations:
                try:
                    out.append(self.tokenizer.apply_chat_template(
                        conv, tokenize=False, add_generation_prompt=generation))
                except Exception as e:  # noqa: BLE001 -- templates raise anything
                    out.append(e)
            return out

    def render(self, messages: list[dict[str, Any]], train_on_inputs: bool) -> Rendered:
        """The full conversation text and its trained character spans."""
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if train_on_inputs:
            (full,) = self._render([messages], False)
            if isinstance(full, Exception):
                raise self._rejected(full)
            return Rendered(full, [(0, len(full))])
        rendered = self._render([messages] + [messages[: i + 1] for i in turns], False)
        full, throughs = rendered[0], rendered[1:]
        if isinstance(full, Exception):
            raise self._rejected(full)
        befores = self._render([messages[:i] for i in turns], True)
        spans: list[tuple[int, int]] = []
        missing_end = 0
        cursor = 0
        for i, before, through in zip(turns, befores, throughs, strict=True):
            content = messages[i]["content"].strip()
            exact = (
                isinstance(before, str) and isinstance(through, str)
                and full.startswith(through) and through.startswith(before)
                and len(before) >= cursor
            )
            if exact:
                start, stop = len(before), len(through)
                found = full.find(content, start, stop) if content else start
                content_end = found + len(content) if found >= 0 else start
                if found > start and not self._has_generation_prompt(messages):
                    start = found  # the template cannot write the assistant header alone
            else:
                start = full.find(content, cursor) if content else -1
                if start < 0:
                    raise RowProblem(
                        f"{self.field}[{i}].content",
                        "could not be located in the chat template's rendering (the template "
                        "renders this turn differently when later turns follow, and changes "
                        "its text)",
                        "Set data.chat_template to a template whose earlier turns render "
                        "unchanged, or use data.train_on_inputs: true.",
                    )
                content_end = start + len(content)
                stop = len(full)
            end = self._end_of_turn(full, content_end, stop)
            if end is None:
                missing_end += 1
                end = stop
            spans.append((start, end))
            cursor = end
        return Rendered(full, spans, turns_without_end=missing_end)

    def _has_generation_prompt(self, messages: list[dict[str, Any]]) -> bool:
        """Whether ``add_generation_prompt`` changes the rendering (checked once)."""
        if self._generation_prompt is None:
            with_prompt, without = (self._render([messages[:1]], g)[0] for g in (True, False))
            self._generation_prompt = with_prompt != without
        return self._generation_prompt

    def _end_of_turn(self, text: str, pos: int, stop: int) -> int | None:
        if self._end_re is None:
            return None
        m = self._end_re.search(text, pos, stop)
        return m.end() if m else None

    def _rejected(self, e: Exception) -> RowProblem:
        return RowProblem(
            self.field, f"is rejected by the chat template ({type(e).__name__}: {e})",
            "Fix the conversation (e.g. roles must alternate) or set data.chat_template.",
        )
