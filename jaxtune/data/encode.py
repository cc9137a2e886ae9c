"""Rows to token ids plus a per-token "trained" flag, batch by batch.

Rendered text is tokenized with ``add_special_tokens=False``: a chat template that writes BOS
(Llama 3, Gemma) gets exactly one, and plain formats get the tokenizer's BOS prepended only
when the tokenizer adds one by default. Plain examples end with a trained EOS; chats end each
assistant turn with the template's own end-of-turn token, which is trained.

A token is trained when its characters overlap a trained span (see :mod:`jaxtune.data.chat`).
``trained[t] = 1`` means token ``t`` is a target: the loss at position ``t - 1`` counts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from jaxtune.data.chat import ChatRenderer, Rendered
from jaxtune.data.errors import DataError, RowProblem
from jaxtune.data.formats import ChatExample, FormatSpec, PlainExample, parse_row
from jaxtune.data.tokenizer import TokenizerInfo


class Encoder:
    """Encodes rows of one format with one tokenizer."""

    def __init__(self, tokenizer, spec: FormatSpec, info: TokenizerInfo | None = None):
        self.tokenizer = tokenizer
        self.spec = spec
        self.info = info or TokenizerInfo.of(tokenizer)
        self.chat = ChatRenderer(tokenizer, self.info.special_tokens, spec.messages_field)
        self.turns_without_end = 0  # running count over everything encoded
        needs_template = spec.format == "chat" or (
            spec.format == "alpaca" and spec.alpaca_prompt == "chat")
        if needs_template and not self.info.has_chat_template:
            raise DataError(
                f"data.format {spec.format} renders chats, but the tokenizer has no chat "
                "template. Set data.chat_template to a built-in name (chatml, llama3, gemma, "
                "gemma4), a Jinja file or a Jinja string" + (
                    ", or data.alpaca_prompt: classic." if spec.format == "alpaca" else ".")
            )
        if spec.format != "chat" and self.info.eos_id is None:
            raise DataError(
                "The tokenizer has no eos_token, so examples could not learn to stop; use a "
                "tokenizer with one (its tokenizer_config.json sets eos_token)."
            )

    def render(self, row: dict[str, Any]) -> Rendered:
        """One row as text with trained character spans (raises RowProblem if malformed)."""
        return self.render_example(parse_row(row, self.spec, self.info.has_chat_template))

    def render_example(self, example) -> Rendered:
        """A parsed :class:`ChatExample` or :class:`PlainExample` as text with trained spans."""
        if isinstance(example, ChatExample):
            return self.chat.render(example.messages, self.spec.train_on_inputs,
                                    example.fields)
        assert isinstance(example, PlainExample)
        text, spans, pos = "", [], 0
        for piece, trained in example.pieces:
            if trained and piece:
                spans.append((pos, pos + len(piece)))
            text += piece
            pos += len(piece)
        return Rendered(text, spans, add_bos=self.info.bos_id is not None, add_eos=True)

    def encode_batch(
        self, rows: list[dict[str, Any]], on_problem: Callable[[int, RowProblem], None]
    ) -> list[tuple[np.ndarray, np.ndarray] | None]:
        """Token ids (int32) and trained flags (uint8) per row; None for a skipped bad row.

        ``on_problem(i, problem)`` is called for each malformed row ``i``; it raises (policy
        ``error``) or returns (policy ``skip``).
        """
        rendered: list[Rendered | None] = []
        for i, row in enumerate(rows):
            try:
                r = self.render(row)
                self.turns_without_end += r.turns_without_end
                rendered.append(r)
            except RowProblem as p:
                on_problem(i, p)
                rendered.append(None)
        return self.tokenize_rendered(rendered)

    def tokenize_rendered(
        self, rendered: list[Rendered | None]
    ) -> list[tuple[np.ndarray, np.ndarray] | None]:
        """Token ids and trained flags for rendered texts, in one tokenizer call (None stays)."""
        texts = [r.text for r in rendered if r is not None]
        enc = self.tokenizer(
            texts, add_special_tokens=False, return_offsets_mapping=True,
            return_attention_mask=False,
        ) if texts else {"input_ids": [], "offset_mapping": []}
        out: list[tuple[np.ndarray, np.ndarray] | None] = []
        k = 0
        for r in rendered:
            if r is None:
                out.append(None)
                continue
            out.append(self._tokens(r, enc["input_ids"][k], enc["offset_mapping"][k]))
            k += 1
        return out

    def _tokens(self, r: Rendered, ids: list[int], offsets: list) -> tuple[np.ndarray, np.ndarray]:
        tokens = np.asarray(ids, dtype=np.int32)
        trained = np.zeros(len(tokens), dtype=np.uint8)
        if len(tokens):
            off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
            for s, e in r.spans:
                trained |= ((off[:, 0] < e) & (off[:, 1] > s)).astype(np.uint8)
        bos = self.tokenizer.bos_token_id
        if bos is not None and len(tokens) > 1 and tokens[0] == bos and tokens[1] == bos:
            tokens, trained = tokens[1:], trained[1:]  # a template wrote BOS twice
        if r.add_bos and not (len(tokens) and tokens[0] == self.info.bos_id):
            tokens = np.concatenate([np.asarray([self.info.bos_id], np.int32), tokens])
            trained = np.concatenate([np.zeros(1, np.uint8), trained])
        if r.add_eos:
            tokens = np.concatenate([tokens, np.asarray([self.info.eos_id], np.int32)])
            trained = np.concatenate([trained, np.ones(1, np.uint8)])
        if len(trained):
            trained[0] = 0  # the first token is never a target
        return tokens, trained
