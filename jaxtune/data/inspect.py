"""``jaxtune inspect-data``: show exactly what the model trains on, before training.

Prints the first examples as text with the trained tokens marked (green in a terminal,
``[[like this]]`` otherwise, or when ``color=False``), then the totals: examples, tokens,
trained tokens, truncated, dropped, skipped bad rows and packing efficiency.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np

from jaxtune.data.loader import BatchIterator
from jaxtune.data.prepare import PreparedData, prepare
from jaxtune.data.tokenizer import check_vocab_fits, load_tokenizer

_GREEN, _DIM, _RESET = "\033[1;32m", "\033[2m", "\033[0m"


def _use_color(color: bool | None) -> bool:
    if color is not None:
        return color
    return sys.stdout.isatty() and "NO_COLOR" not in os.environ


def render_marked(tokenizer, tokens: np.ndarray, trained: np.ndarray, color: bool) -> str:
    """Decode ``tokens``, marking runs of trained tokens."""
    out, start = [], 0
    flags = np.asarray(trained).astype(bool)
    for end in range(1, len(tokens) + 1):
        if end == len(tokens) or flags[end] != flags[start]:
            text = tokenizer.decode(np.asarray(tokens[start:end]).tolist(),
                                    skip_special_tokens=False)
            if flags[start]:
                text = f"{_GREEN}{text}{_RESET}" if color else f"[[{text}]]"
            out.append(text)
            start = end
    return "".join(out)


def inspect_data(cfg, n: int = 3, color: bool | None = None) -> dict[str, Any]:
    """Print the first ``n`` training examples with trained tokens marked, then totals."""
    use_color = _use_color(color)
    tokenizer = load_tokenizer(cfg)
    check_vocab_fits(tokenizer, cfg)
    if cfg.data.format == "preference":
        return inspect_pairs(cfg, tokenizer, n, use_color)
    if cfg.data.format == "prompt":
        return inspect_prompts(cfg, tokenizer, n)
    data = prepare(cfg, tokenizer, "train")
    marker = f"{_GREEN}green{_RESET}" if use_color else "[[in double brackets]]"
    print(f"Trained tokens (loss targets) are shown {marker}.\n")
    for i in range(min(n, len(data.docs))):
        print(_example(data, tokenizer, i, use_color, cfg.data.seq_len))
    stats = _totals(cfg, data)
    print(_report(stats, cfg, data))
    if cfg.data.eval_sources:
        ev = prepare(cfg, tokenizer, "eval").stats
        print(f"eval: {ev['examples']:,} examples, {ev['tokens']:,} tokens, "
              f"{ev['trained_tokens']:,} trained")
    return stats


def _example(data: PreparedData, tokenizer, i: int, color: bool, seq_len: int) -> str:
    docs = data.docs
    shard = data.shards[docs.shard[i]]
    tok = data.tokenized[docs.shard[i]]
    s, length = int(docs.start[i]), int(docs.length[i])
    tokens, trained = tok.tokens[s:s + length], tok.trained[s:s + length]
    example = np.searchsorted(np.asarray(tok.offsets), s, side="right") - 1
    full = int(tok.offsets[example + 1] - tok.offsets[example])
    cut = f", truncated from {full}" if full > length else ""
    head = (f"--- example {i + 1}: {shard.name}, row {int(docs.row[i])} "
            f"({length} tokens{cut}, {int(docs.trained[i])} trained) ---")
    if color:
        head = f"{_DIM}{head}{_RESET}"
    return f"{head}\n{render_marked(tokenizer, tokens, trained, color)}\n"


def _totals(cfg, data: PreparedData) -> dict[str, Any]:
    it = BatchIterator(
        data, seq_len=cfg.data.seq_len, global_batch_size=cfg.trainer.global_batch_size,
        seed=cfg.run.seed, shuffle=cfg.data.shuffle, packing=cfg.data.packing,
    ) if len(data.docs) else None
    stats = dict(it.stats if it else data.stats)
    stats.setdefault("packing_efficiency", 0.0)
    stats.setdefault("rows_per_epoch", 0)
    return stats


def _report(s: dict[str, Any], cfg, data: PreparedData) -> str:
    pct = 100.0 * s["trained_tokens"] / max(s["tokens"], 1)
    steps = s["rows_per_epoch"] / cfg.trainer.global_batch_size
    lines = [
        "totals:",
        f"  examples            {s['examples']:,} (of {s['rows_read']:,} rows read)",
        f"  tokens              {s['tokens']:,}",
        f"  trained tokens      {s['trained_tokens']:,} ({pct:.1f}%)",
        f"  truncated           {s['truncated']:,} (data.truncation: {cfg.data.truncation}, "
        f"seq_len {cfg.data.seq_len})",
        f"  dropped             {s['dropped']:,} ({s['dropped_too_long']:,} too long, "
        f"{s['dropped_untrained']:,} with nothing to train)",
        f"  skipped bad rows    {s['skipped_bad_rows']:,}",
        f"  packing efficiency  {100.0 * s['packing_efficiency']:.1f}% "
        f"({s['rows_per_epoch']:,} rows of {cfg.data.seq_len}, {steps:,.1f} steps per epoch; "
        f"packing {'on' if cfg.data.packing else 'off'})",
    ]
    if s["turns_without_end"]:
        lines.append(
            f"warning: {s['turns_without_end']:,} trained turns have no end-of-turn special "
            "token, so the model may not learn to stop; check data.chat_template."
        )
    for t in data.tokenized:
        for problem in t.meta.get("first_bad_rows", [])[:3]:
            lines.append(f"skipped: {problem}")
    return "\n".join(lines)


def inspect_pairs(cfg, tokenizer, n: int, color: bool) -> dict[str, Any]:
    """``jaxtune inspect-data`` for pairs: both sides of the first ``n`` with the trained
    tokens marked, then the totals."""
    from jaxtune.data.preference import (
        SIDES,
        PreferenceBatchIterator,
        pair_tokens,
        prepare_pairs,
    )

    data = prepare_pairs(cfg, tokenizer, "train")
    marker = f"{_GREEN}green{_RESET}" if color else "[[in double brackets]]"
    print(f"Trained tokens (loss targets) are shown {marker}.\n")
    for d in range(min(n, len(data.docs))):
        shard = data.shards[int(data.docs.shard[d])]
        for side in SIDES:
            tokens, trained = pair_tokens(data, d, side)
            head = (f"--- pair {d + 1} {side}: {shard.name}, row {int(data.docs.row[d])} "
                    f"({len(tokens)} tokens, {int(np.asarray(trained)[1:].sum())} trained) ---")
            print(f"{_DIM}{head}{_RESET}" if color else head)
            print(render_marked(tokenizer, tokens, trained, color) + "\n")
    s, first = dict(data.stats), []
    if len(data.docs):  # rows per epoch and the share of their positions holding tokens
        it = PreferenceBatchIterator(
            data, seq_len=cfg.data.seq_len, global_batch_size=cfg.trainer.global_batch_size,
            seed=cfg.run.seed, shuffle=cfg.data.shuffle, packing=cfg.data.packing,
            pad_id=data.pad_id)
        s.update(it.stats)
        first = it.plan(0)[:1][0]
    rows = s.get("rows_per_epoch", 0)
    seq, batch = cfg.data.seq_len, cfg.trainer.global_batch_size
    layout = (f"on, {s['pairs'] / max(rows, 1):.2f} pairs per row of 2 x {seq} positions"
              if cfg.data.packing else f"off, one pair per row (a chosen and a rejected row of "
              f"{seq})")
    lines = [
        "totals:",
        f"  pairs               {s['pairs']:,} (of {s['rows_read']:,} rows read)",
        f"  tokens              {s['tokens']:,} (both sides)",
        f"  trained tokens      {s['trained_tokens']:,}",
        f"  truncated           {s['truncated']:,} pairs (data.truncation: "
        f"{cfg.data.truncation}, seq_len {cfg.data.seq_len} per side)",
        f"  dropped             {s['dropped']:,} ({s['dropped_too_long']:,} too long, "
        f"{s['dropped_untrained']:,} with a side that has nothing to train)",
        f"  skipped bad rows    {s['skipped_bad_rows']:,}",
        f"  packing             {layout}",
        f"  packing efficiency  {100.0 * s.get('packing_efficiency', 0.0):.1f}% of positions "
        f"hold tokens ({rows:,} rows, {rows / batch:,.1f} steps per epoch)",
    ]
    if cfg.data.packing and first:
        names = [data.shards[int(data.docs.shard[d])].name for d in first]
        where = ", ".join(f"{n}, row {int(data.docs.row[d])}" for n, d in zip(names, first,
                                                                            strict=True))
        if len(set(names)) == 1:
            where = f"{names[0]}, rows {', '.join(str(int(data.docs.row[d])) for d in first)}"
        used = int((data.docs.length[first] - 1).sum())
        lines.append(f"  first row           {len(first)} pairs ({where}) as segments "
                     f"1-{2 * len(first)}, {used} of {2 * seq} positions")
    for t in data.tokenized:
        for problem in t.meta.get("first_bad_rows", [])[:3]:
            lines.append(f"skipped: {problem}")
    print("\n".join(lines))
    if cfg.data.eval_sources:
        ev = prepare_pairs(cfg, tokenizer, "eval").stats
        print(f"eval: {ev['pairs']:,} pairs, {ev['tokens']:,} tokens, "
              f"{ev['trained_tokens']:,} trained")
    return dict(s)


def inspect_prompts(cfg, tokenizer, n: int) -> dict[str, Any]:
    """RL prompts (``data.format: prompt``): nothing in them is trained; the completions are
    generated. Shows the first prompts exactly as the generator receives them (special tokens
    included), the columns the reward functions get, and the prompt lengths against their
    budget (``data.seq_len - rl.max_completion_length``)."""
    from jaxtune.data.prompts import load_prompts

    prompts = load_prompts(cfg, tokenizer, "train")
    print("RL prompts: the model generates the completions; the columns go to the rewards.\n")
    for p in prompts[:n]:
        text = tokenizer.decode(list(p.ids), skip_special_tokens=False)
        print(f"--- {p.where} ({len(p.ids)} tokens)\n{text}")
        for k, v in p.columns.items():
            print(f"    {k}: {v!r}")
        print()
    lengths = np.asarray([len(p.ids) for p in prompts])
    budget = cfg.data.seq_len - cfg.rl.max_completion_length
    stats = {"prompts": len(prompts), "max_prompt_tokens": int(lengths.max()),
             "mean_prompt_tokens": float(lengths.mean()), "prompt_budget": budget}
    print(f"train: {stats['prompts']:,} prompts, {stats['mean_prompt_tokens']:.1f} tokens on "
          f"average, at most {stats['max_prompt_tokens']} (budget data.seq_len - "
          f"rl.max_completion_length = {budget})")
    if cfg.data.eval_sources:
        print(f"eval: {len(load_prompts(cfg, tokenizer, 'eval')):,} prompts")
    return stats
