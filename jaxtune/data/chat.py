"""Render a chat with the tokenizer's template and find, in characters, what is trained.

The masks must not depend on the template having ``{% generation %}`` markers (few do), and
they must never come from searching the text for the reply: a reply such as ``positive`` or
``Yes`` is often also written in the prompt. So every position comes from rendering variants
of the conversation and comparing them. For assistant turn ``i``:

* the reply is located by *probing*: the chat is rendered again with turn ``i``'s content
  replaced by a probe string whose first and last characters occur nowhere in the chat.
  What the two renderings share before and after is template text or other turns; what
  differs is exactly what the template made of the reply. The located text must be the reply
  itself (perhaps trimmed, or with a ``<think>`` block the template drops), or the row is
  refused;
* the turn's end is read from ``through = render(messages[:i + 1])``, in which turn ``i``
  comes last: what the template writes after the reply up to its first special token (the
  end-of-turn token, e.g. ``<|im_end|>``, ``<|eot_id|>``, ``</s>``) is trained, so the end
  token always is and the newline a template writes after it is not. In the full chat the
  turn must close the same way, though its end token may differ (GPT-OSS ends earlier turns
  with ``<|end|>``, the last with ``<|return|>``);
* the turn's start: when ``through`` is a prefix of the full chat (earlier turns render the
  same once later turns follow), everything after ``render(messages[:i],
  add_generation_prompt=True)`` is written by the model and trained (e.g. the empty
  ``<think>`` block Qwen3 puts before its last reply). Otherwise, or when the template ignores
  ``add_generation_prompt``, training starts at the reply: the assistant header is never
  trained, whitespace the template keeps at the start of a reply is.

Some templates render earlier turns differently once later turns follow (Qwen3 drops their
``<think>`` blocks; Mistral v0.3 writes the system prompt into the last user turn). Then the
probes are rendered on the full conversation, so the reply is found in the very text that is
tokenized and trained, and its end must read as in ``through``. Where a reply cannot be
located and verified this way, :class:`RowProblem` names the message and the template;
nothing is trained by guess.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import dataclass
from typing import Any

from jaxtune.data.errors import RowProblem

# The probe reply is framed by private-use characters that do not occur in the chat, so where
# its rendering starts and ends differing from the real one is exactly where the reply does.
_PROBE_EDGES = range(0xE000, 0xF900)


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
        self._generation_prompt: str | None = None  # what add_generation_prompt appends
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

    def render(self, messages: list[dict[str, Any]], train_on_inputs: bool,
               fields: list[str] | None = None) -> Rendered:
        """The full conversation text and its trained character spans. ``fields`` names the
        row field each message came from, for errors (default ``messages[i].content``)."""
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        names = fields or [f"{self.field}[{i}].content" for i in range(len(messages))]
        if train_on_inputs:
            (full,) = self._render([messages], False)
            if isinstance(full, Exception):
                raise self._rejected(full)
            return Rendered(full, [(0, len(full))])
        rendered = self._render([messages] + [messages[: i + 1] for i in turns], False)
        full, throughs = rendered[0], rendered[1:]
        if isinstance(full, Exception):
            raise self._rejected(full)
        for i, through in zip(turns, throughs, strict=True):
            if isinstance(through, Exception):
                raise self._unlocatable(names[i], "cannot be rendered as the last turn "
                                           f"({type(through).__name__}: {through})")
        # Turns that render differently once later turns follow are probed in the full chat.
        unstable = [k for k, through in enumerate(throughs) if not full.startswith(through)]
        probe = _probe([full, *throughs])
        probes = self._render(
            [_with_reply(messages[: i + 1], i, probe) for i in turns]
            + [_with_reply(messages, turns[k], probe) for k in unstable], False)
        full_probes = dict(zip(unstable, probes[len(turns):], strict=True))
        befores = self._render([messages[:i] for i in turns], True)
        generation = self._generation_text(messages, turns, befores)
        spans: list[tuple[int, int]] = []
        missing_end = 0
        for k, i in enumerate(turns):
            start, end, has_end = self._turn(
                messages[i]["content"], names[i], full, throughs[k], probes[k],
                full_probes.get(k), befores[k], generation)
            if spans and start < spans[-1][1]:
                raise self._unlocatable(names[i], "overlaps the turn before it in the rendering")
            spans.append((start, end))
            missing_end += not has_end
        return Rendered(full, spans, turns_without_end=missing_end)

    def _turn(self, content: str, name: str, full: str, through: str, probe, full_probe,
              before, generation: str) -> tuple[int, int, bool]:
        """Trained ``(start, end)`` in ``full`` of the assistant turn whose reply is
        ``content`` (from row field ``name``), and whether it ends with a special token.
        ``full_probe`` is None when ``full`` starts with ``through``."""
        for r in (probe, full_probe):
            if isinstance(r, Exception):
                raise self._unlocatable(name, f"cannot be probed ({type(r).__name__}: {r})")
        reply_start, reply_end = _changed_region(through, probe)
        tail = through[reply_end:]  # how the template closes the turn
        if full_probe is None:  # the full chat renders this turn exactly as ``through`` does
            a, b = reply_start, reply_end
        else:
            a, b = _changed_region(full, full_probe)
        if not _renders_reply(full[a:b], content):
            raise self._unlocatable(
                name, f"is rendered as {_clip(full[a:b])!r}, not as the reply {_clip(content)!r}")
        start = a
        if generation and isinstance(before, str) and before.endswith(generation) \
                and through.startswith(before) and len(before) <= reply_start:
            lead = through[len(before):reply_start]  # written after the generation prompt
            if full_probe is None:
                start = len(before)
            elif lead and a >= len(generation + lead) and full.startswith(
                    generation + lead, a - len(generation + lead)):
                start = a - len(lead)  # anchored on this turn's own assistant header
        m = self._end_re.search(tail) if self._end_re is not None else None
        if m is None:  # no end-of-turn token: train what closes the turn, if it reads the same
            return start, b + (len(tail) if full.startswith(tail, b) else 0), False
        # The turn must close as it does when last, up to its end token; that token may differ
        # (GPT-OSS ends earlier turns with <|end|>, the last one with <|return|>).
        pre = tail[: m.start()]
        end = self._end_re.match(full, b + len(pre)) if full.startswith(pre, b) else None
        if end is None:
            raise self._unlocatable(
                name, f"is not followed by {tail[: m.end()]!r} (or another special token) in the "
                "full conversation, as it is when it is the last turn")
        return start, end.end(), True

    def _generation_text(self, messages, turns: list[int], befores: list) -> str:
        """What ``add_generation_prompt`` appends ("" if the template ignores it); cached."""
        if self._generation_prompt is None:
            for i, before in zip(turns, befores, strict=True):
                if i == 0 or not isinstance(before, str):
                    continue
                (bare,) = self._render([messages[:i]], False)
                if isinstance(bare, str):
                    # A template that rewrites the prefix for it is not trusted to mark the
                    # start of the reply: start at the reply itself.
                    self._generation_prompt = (
                        before[len(bare):] if before.startswith(bare) else "")
                    break
        return self._generation_prompt or ""

    def _template(self) -> str:
        """The chat template, named for error messages."""
        from jaxtune.data.tokenizer import NAMED_TEMPLATES

        template = self.tokenizer.chat_template
        if not isinstance(template, str):
            template = str(template)
        for name, text in NAMED_TEMPLATES.items():
            if text == template:
                return f"the built-in chat template '{name}'"
        digest = hashlib.sha256(template.encode()).hexdigest()[:12]
        source = getattr(self.tokenizer, "name_or_path", "")
        source = f"tokenizer '{source}'" if source else "the tokenizer"
        return f"the chat template of {source} (sha256 {digest})"

    def _unlocatable(self, name: str, problem: str) -> RowProblem:
        return RowProblem(
            name,
            f"(an assistant reply) {problem}: with {self._template()} the tokens to train "
            "cannot be located unambiguously, so the row is refused rather than trained on "
            "the wrong tokens",
            "Set data.chat_template to a template that renders each reply as written, or use "
            "data.train_on_inputs: true.",
        )

    def _rejected(self, e: Exception) -> RowProblem:
        return RowProblem(
            self.field, f"is rejected by the chat template ({type(e).__name__}: {e})",
            "Fix the conversation (e.g. roles must alternate) or set data.chat_template.",
        )


def _with_reply(messages: list[dict[str, Any]], i: int, reply: str) -> list[dict[str, Any]]:
    out = list(messages)
    out[i] = {**messages[i], "content": reply}
    return out


def _common_prefix(x: str, y: str) -> int:
    n, lo, step = min(len(x), len(y)), 0, 256
    while lo + step <= n and x[lo:lo + step] == y[lo:lo + step]:
        lo += step
    while lo < n and x[lo] == y[lo]:
        lo += 1
    return lo


def _probe(texts: list[str]) -> str:
    """A probe reply whose first and last characters occur in none of ``texts``."""
    used = set().union(*texts)
    first, last = itertools.islice((c for c in map(chr, _PROBE_EDGES) if c not in used), 2)
    return f"{first}jaxtune probe reply{last}"


def _changed_region(text: str, variant: str) -> tuple[int, int]:
    """``(a, b)`` such that ``text[:a]`` and ``text[b:]`` are what ``text`` shares with
    ``variant`` at its start and end. When ``variant`` renders a probe reply whose first and
    last characters ``text`` lacks, ``text[a:b]`` is exactly what the template made of the
    real reply: the shared parts cannot run into it."""
    a = _common_prefix(text, variant)
    return a, len(text) - _common_prefix(text[a:][::-1], variant[a:][::-1])


def _renders_reply(rendered: str, reply: str) -> bool:
    """Whether ``rendered`` is the reply as a template writes it: whole, trimmed, or with a
    part dropped (Qwen3 drops the ``<think>`` block of earlier turns)."""
    text = rendered.strip()
    if not reply.strip():
        return not text
    return bool(text) and text in reply


def _clip(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."
