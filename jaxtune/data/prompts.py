"""``data.format: prompt``: prompts for RL, each with the columns its reward functions read.

A row holds a prompt in ``data.prompt_field``, either text or a chat (a list of
``{role, content}`` messages: system and earlier turns included), plus any other columns
(``answer``, ``key_facts``...), which reward functions receive by name, as in TRL. A chat is
rendered with the chat template and the assistant turn opened (``data.system_prompt`` first
when it has no system message), special tokens from the template only; a text prompt is
tokenized as it is, with the tokenizer's special tokens (TRL does both the same way), or with
``data.prompt_as_chat`` becomes the user turn of a chat (a GSM8K ``question`` for an instruct
model). A
prompt longer than its budget (``data.seq_len - rl.max_completion_length``) stops the run
naming its file and row, or with ``data.on_bad_row: skip`` is dropped and counted.

Every process reads all prompts: generation runs over the whole global batch on the mesh
(SPMD), so every process must hold the same prompts in the same order.
:class:`PromptIterator` hands out the next prompts of a seeded, shuffled stream of epochs;
its state is ``(epoch, position)``, so a resumed run takes exactly the prompts an
uninterrupted one would.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from jaxtune.data.errors import BadRowError, DataError, RowProblem
from jaxtune.data.formats import FormatSpec, parse_messages
from jaxtune.data.prepare import cache_root
from jaxtune.data.sources import is_sliced, resolve_source, slice_ranges

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prompt:
    """One prompt: as given (a chat after role mapping and the default system prompt), its
    token ids, the row's other columns, and where it came from (for messages)."""

    prompt: str | list[dict[str, Any]]
    ids: tuple[int, ...]
    columns: dict[str, Any]
    where: str  # "<file>, row <n>"


def _parse(row: dict[str, Any], fmt: FormatSpec,
           as_chat: bool = False) -> str | list[dict[str, Any]]:
    name = fmt.prompt_field
    if name not in row or row[name] is None:
        have = ", ".join(sorted(k for k, v in row.items() if v is not None)) or "no fields"
        raise RowProblem(name, f"is missing (the row has {have})",
                         "Point data.prompt_field at the prompt.")
    value = row[name]
    if isinstance(value, str):
        if not value.strip():
            raise RowProblem(name, "is an empty prompt")
        if not as_chat:
            return value
        value = [{"role": "user", "content": value}]
    if isinstance(value, list):
        spec = FormatSpec(**{**fmt.__dict__, "messages_field": name, "train_on_inputs": True})
        messages = parse_messages({**row, name: value}, spec)
        if messages[-1]["role"] == "assistant":
            raise RowProblem(f"{name}[{len(value) - 1}]", "is an assistant message, but a prompt "
                             "ends with the turn the model answers (a user message)")
        return messages
    raise RowProblem(name, f"must be text or a list of chat messages, got "
                     f"{type(value).__name__}")


def _encode(tokenizer, prompt: str | list[dict[str, Any]], name: str) -> list[int]:
    from jaxtune.generation.api import encode_prompt
    from jaxtune.generation.errors import GenerateError

    try:
        return encode_prompt(tokenizer, prompt, raw=isinstance(prompt, str))
    except GenerateError:
        raise RowProblem(name, "is a chat, but the tokenizer has no chat template",
                         "Set data.chat_template (chatml, llama3, gemma, a file or Jinja), or "
                         "give prompts as text.") from None


def load_prompts(cfg, tokenizer, split: str = "train") -> list[Prompt]:
    """The prompts of the train or eval sources of ``cfg``, tokenized, in file order."""
    sources = cfg.data.sources if split == "train" else cfg.data.eval_sources
    key = "data.sources" if split == "train" else "data.eval_sources"
    if split == "train" and not sources:
        raise DataError("No training prompts: add at least one entry to data.sources.")
    fmt = FormatSpec.from_config(cfg.data)
    budget = cfg.data.seq_len - cfg.rl.max_completion_length
    hf_cache = f"{cache_root(cfg.data)}/hf"
    out: list[Prompt] = []
    skipped = 0
    for i, src in enumerate(sources):
        shards = resolve_source(i, src, key)
        rows: list[tuple[Any, int, dict[str, Any]]] = []
        for shard in shards:
            for n, row in enumerate(shard.load(hf_cache)):
                rows.append((shard, n, row))
        if shards and shards[0].is_file and is_sliced(src.split):
            ranges = slice_ranges(src, len(rows))
            rows = [r for k, r in enumerate(rows)
                    if any(x.from_ <= k < x.to for x in ranges)]
        for shard, n, row in rows:
            where = f"{shard.name}, row {n}"
            try:
                prompt = _parse(row, fmt, getattr(cfg.data, "prompt_as_chat", False))
                ids = _encode(tokenizer, prompt, fmt.prompt_field)
                if len(ids) > budget:
                    raise RowProblem(
                        fmt.prompt_field, f"has {len(ids)} tokens, more than the prompt budget "
                        f"data.seq_len - rl.max_completion_length = {cfg.data.seq_len} - "
                        f"{cfg.rl.max_completion_length} = {budget}",
                        "Raise data.seq_len, lower rl.max_completion_length, or shorten it.")
            except RowProblem as p:
                if cfg.data.on_bad_row == "error":
                    raise BadRowError(where, p.field, p.problem, p.fix) from None
                skipped += 1
                continue
            columns = {k: v for k, v in row.items() if k != fmt.prompt_field}
            out.append(Prompt(prompt, tuple(int(t) for t in ids), columns, where))
    if skipped:
        log.warning("skipped %d bad prompt rows of the %s split (data.on_bad_row: skip)",
                    skipped, split)
    if split == "train" and not out:
        raise DataError("The training data has no usable prompts (all were skipped); check "
                        "data.prompt_field and data.seq_len.")
    return out


class PromptIterator:
    """The next prompts of a stream of epochs, each a seeded permutation of all prompts (the
    file order when not shuffled). The same on every process; resumable by its state."""

    def __init__(self, prompts: list[Prompt], *, seed: int = 0, shuffle: bool = True):
        if not prompts:
            raise DataError("There are no prompts to train on.")
        self.prompts, self.seed, self.shuffle = prompts, seed, shuffle
        self.epoch, self.position = 0, 0
        self._order: tuple[int, np.ndarray] | None = None

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            n = len(self.prompts)
            order = (np.random.default_rng([self.seed, epoch, 7]).permutation(n)
                     if self.shuffle else np.arange(n))
            self._order = (epoch, order)
        return self._order[1]

    def take(self, n: int) -> list[Prompt]:
        """The next ``n`` prompts (crossing into the next epoch when this one runs out)."""
        out: list[Prompt] = []
        while len(out) < n:
            order = self._epoch_order(self.epoch)
            picked = order[self.position:self.position + n - len(out)]
            out += [self.prompts[int(i)] for i in picked]
            self.position += len(picked)
            if self.position >= len(order):
                self.epoch, self.position = self.epoch + 1, 0
        return out

    def get_state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "prompts": len(self.prompts)}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("prompts", len(self.prompts)) != len(self.prompts):
            log.warning("the prompt data changed since this checkpoint (%s prompts then, %d "
                        "now): the prompts will not match the interrupted run's",
                        state.get("prompts"), len(self.prompts))
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
