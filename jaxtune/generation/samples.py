"""Greedy answers during training, so a user watches the answers change, not just the loss.

``trainer.sample_every: N`` answers the prompts every N steps (and at the end) with the model
being trained; the answers go to ``<run_dir>/samples.jsonl`` (one line per prompt and step)
and to TensorBoard as text. ``trainer.sample_prompts`` is a jsonl file of prompts (the format
of ``jaxtune generate --prompts``), or empty: the first ``trainer.sample_count`` chats of the
held-out data (``data.eval_sources``, chat format), asked up to their last user turn.
"""

from __future__ import annotations

import json
import os
from typing import Any

from jaxtune.generation.errors import GenerateError


def held_out_prompts(cfg: Any, n: int) -> list[list[dict[str, Any]]]:
    """The first ``n`` eval chats, cut before their last assistant turn."""
    from jaxtune.data.formats import FormatSpec, parse_messages
    from jaxtune.data.sources import resolve_source

    if cfg.data.format != "chat" or not cfg.data.eval_sources:
        raise GenerateError("trainer.sample_every needs prompts: set trainer.sample_prompts to "
                            "a jsonl file of prompts, or give chat-format data.eval_sources.")
    spec = FormatSpec.from_config(cfg.data)
    out: list[list[dict[str, Any]]] = []
    for i, src in enumerate(cfg.data.eval_sources):
        for shard in resolve_source(i, src, "data.eval_sources"):
            for row in shard.load():
                messages = parse_messages(row, spec)
                last = max((j for j, m in enumerate(messages) if m["role"] == "assistant"),
                           default=len(messages))
                if last and any(m["role"] == "user" for m in messages[:last]):
                    out.append(messages[:last])
                if len(out) == n:
                    return out
    if not out:
        raise GenerateError("data.eval_sources has no chat with a user turn to sample from.")
    return out


class TrainingSampler:
    """Answers ``trainer.sample_prompts`` greedily with the current model state."""

    def __init__(self, cfg: Any, tokenizer: Any, run_dir: str, *, write: bool = True):
        from jaxtune.generation.command import read_prompts

        t = cfg.trainer
        self.every = t.sample_every
        self.max_new_tokens = t.sample_max_new_tokens
        self.tokenizer = tokenizer
        self.write = write  # process 0 writes; every process generates (SPMD)
        self.prompts = read_prompts(t.sample_prompts) if t.sample_prompts else \
            held_out_prompts(cfg, t.sample_count)
        self.path = os.path.join(run_dir, "samples.jsonl")

    def due(self, step: int, last: int) -> bool:
        return bool(self.every) and (step % self.every == 0 or step == last)

    def __call__(self, step: int, model: Any, writer: Any = None) -> list[str]:
        """Answer every prompt with ``model``; append them to samples.jsonl and TensorBoard."""
        from jaxtune.generation.api import generate
        from jaxtune.generation.loop import Generator

        # Parameters change every step, the graph does not: the compiled programs are reused.
        texts = generate(model, self.tokenizer, self.prompts, max_new_tokens=self.max_new_tokens,
                         generator=Generator(model))
        if not self.write:
            return texts
        with open(self.path, "a", encoding="utf-8") as f:
            for i, (prompt, text) in enumerate(zip(self.prompts, texts, strict=True)):
                f.write(json.dumps({"step": int(step), "prompt_index": i, "prompt": prompt,
                                    "answer": text}) + "\n")
        if writer is not None:
            writer.text(step, "samples", "\n\n".join(
                f"**prompt {i}**: {_last_user(p)}\n\n{t}"
                for i, (p, t) in enumerate(zip(self.prompts, texts, strict=True))))
        return texts


def _last_user(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    return next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")
