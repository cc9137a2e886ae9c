"""Sources -> tokenized shards (cached) -> documents ready to pack, with totals.

A *document* is a window of one example's tokens that fits a row: ``length`` tokens give
``length - 1`` (input, target) positions. Over-long examples follow ``data.truncation``:
``truncate`` keeps the first ``seq_len + 1`` tokens, ``drop`` leaves the example out, ``error``
stops with the file and row, and ``split`` (text format only) cuts it into consecutive windows
that overlap by one token, so every token is still a target exactly once. Documents with no
trained target left (e.g. a response cut off by truncation) are dropped and counted.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from jaxtune.data import cache
from jaxtune.data.encode import Encoder
from jaxtune.data.errors import BadRowError, DataError, RowProblem
from jaxtune.data.formats import FormatSpec
from jaxtune.data.sources import Shard, is_sliced, resolve_source, slice_ranges
from jaxtune.data.tokenizer import TokenizerInfo

log = logging.getLogger(__name__)

_BATCH_ROWS = 256  # rows rendered and tokenized per call (amortises tokenizer overhead)


@dataclass
class Documents:
    """Packable documents, one entry per document (parallel arrays)."""

    shard: np.ndarray  # int32: index into PreparedData.shards
    start: np.ndarray  # int64: first token in that shard's token array
    length: np.ndarray  # int64: tokens in the document (length - 1 row positions)
    source: np.ndarray  # int32: data source index
    row: np.ndarray  # int64: row of the shard the example came from
    trained: np.ndarray  # int64: trained targets in the document

    def __len__(self) -> int:
        return len(self.start)


@dataclass
class PreparedData:
    """Everything the batch iterator needs: tokens per shard, documents and totals."""

    shards: list[Shard]
    tokenized: list[cache.TokenizedShard]
    docs: Documents
    weights: list[float]  # per source
    stats: dict[str, Any] = field(default_factory=dict)
    key: str = ""  # identifies the data (cache keys + seq_len + truncation), for resume checks
    pad_id: int = 0  # token id written into padding (always masked)


def cache_root(data_cfg) -> str:
    """``data.cache_dir`` (relative paths are relative to the working directory)."""
    return os.path.abspath(os.path.expanduser(data_cfg.cache_dir))


def prepare(cfg, tokenizer, split: str = "train") -> PreparedData:
    """Tokenize (or load from cache) the train or eval sources of ``cfg`` into documents."""
    sources = cfg.data.sources if split == "train" else cfg.data.eval_sources
    list_key = "data.sources" if split == "train" else "data.eval_sources"
    if split == "train" and not sources:
        raise DataError("No training data: add at least one entry to data.sources.")
    if cfg.data.truncation == "split" and cfg.data.format != "text":
        raise DataError(
            "data.truncation: split only suits the text format (a piece of a chat would lose "
            "its prompt); use truncate, drop or error."
        )
    info = TokenizerInfo.of(tokenizer)
    spec = FormatSpec.from_config(cfg.data)
    encoder = Encoder(tokenizer, spec, info)
    root = cache_root(cfg.data)
    hf_cache = os.path.join(root, "hf")
    fmt = {"spec": spec.__dict__, "on_bad_row": cfg.data.on_bad_row}
    shards: list[Shard] = []
    tokenized: list[cache.TokenizedShard] = []
    selections: list[np.ndarray] = []
    keys: list[str] = []
    for i, src in enumerate(sources):
        src_shards = resolve_source(i, src, list_key)
        src_tok = []
        for shard in src_shards:
            key = cache.cache_key({
                "shard": shard.identity(hf_cache), "tokenizer": info.fingerprint, "format": fmt,
            })
            tok = cache.load(root, key)
            if tok is None:
                tok = tokenize_shard(shard, encoder, cfg.data.on_bad_row, hf_cache)
                cache.save(root, key, tok)
            src_tok.append(tok)
            keys.append(key)
        selections += _select(src, src_shards, src_tok)
        shards += src_shards
        tokenized += src_tok
    docs, stats = _documents(shards, tokenized, selections, cfg.data.seq_len,
                             cfg.data.truncation)
    key = cache.cache_key({"shards": keys, "seq_len": cfg.data.seq_len,
                           "truncation": cfg.data.truncation, "split": split})
    return PreparedData(shards, tokenized, docs, [s.weight for s in sources], stats, key,
                        info.pad_id)


def tokenize_shard(
    shard: Shard, encoder: Encoder, on_bad_row: str, hf_cache: str | None = None
) -> cache.TokenizedShard:
    """Read every row of ``shard`` and encode it; bad rows raise or are counted."""
    t0 = time.perf_counter()
    ds = shard.load(hf_cache)
    tokens, trained, lengths, rows = [], [], [], []
    bad: list[str] = []
    encoder.turns_without_end = 0
    n = 0

    def on_problem(i: int, p: RowProblem) -> None:
        err = BadRowError(f"{shard.name}, row {base + i}", p.field, p.problem, p.fix)
        if on_bad_row == "error":
            raise err
        bad.append(f"{err.where}: field '{err.field}' {err.problem}")

    for batch in ds.iter(batch_size=_BATCH_ROWS):
        cols = list(batch)
        count = len(batch[cols[0]]) if cols else 0
        batch_rows = [{c: batch[c][j] for c in cols} for j in range(count)]
        base = n
        for j, enc in enumerate(encoder.encode_batch(batch_rows, on_problem)):
            if enc is None:
                continue
            tokens.append(enc[0])
            trained.append(enc[1])
            lengths.append(len(enc[0]))
            rows.append(base + j)
        n += count
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    meta = {
        "name": shard.name, "rows": n, "bad_rows": len(bad), "first_bad_rows": bad[:5],
        "turns_without_end": encoder.turns_without_end,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    log.info("tokenized %s: %d rows, %d tokens in %.1fs", shard.name, n, int(offsets[-1]),
             meta["seconds"])
    return cache.TokenizedShard(
        tokens=np.concatenate(tokens) if tokens else np.zeros(0, np.int32),
        trained=np.concatenate(trained) if trained else np.zeros(0, np.uint8),
        offsets=offsets, rows=np.asarray(rows, np.int64), meta=meta,
    )


def _select(src, shards: list[Shard], tokenized: list[cache.TokenizedShard]) -> list[np.ndarray]:
    """Per shard, the examples a sliced split (``train[:90%]``) keeps (all when not sliced)."""
    if not shards[0].is_file or not is_sliced(src.split):
        return [np.arange(t.num_examples) for t in tokenized]
    ranges = slice_ranges(src, sum(t.meta["rows"] for t in tokenized))
    out, base = [], 0
    for t in tokenized:
        global_rows = base + np.asarray(t.rows)
        keep = np.zeros(len(global_rows), bool)
        for r in ranges:
            keep |= (global_rows >= r.from_) & (global_rows < r.to)
        out.append(np.flatnonzero(keep))
        base += t.meta["rows"]
    return out


def _documents(shards, tokenized, selections, seq_len: int, policy: str):
    parts: list[dict[str, np.ndarray]] = []
    truncated = dropped = too_short = untrained = 0
    for s, (shard, tok, sel) in enumerate(zip(shards, tokenized, selections, strict=True)):
        offsets = np.asarray(tok.offsets)
        starts, lengths = offsets[:-1][sel], np.diff(offsets)[sel]
        rows = np.asarray(tok.rows)[sel]
        short = lengths < 2  # nothing to predict
        too_short += int(short.sum())
        starts, lengths, rows = starts[~short], lengths[~short], rows[~short]
        long = lengths > seq_len + 1
        if long.any():
            if policy == "error":
                j = int(np.flatnonzero(long)[0])
                raise DataError(
                    f"{shard.name}, row {int(rows[j])}: the example has {int(lengths[j])} "
                    f"tokens, more than data.seq_len + 1 = {seq_len + 1}. Raise data.seq_len or "
                    "set data.truncation to truncate or drop."
                )
            if policy == "drop":
                dropped += int(long.sum())
                starts, lengths, rows = starts[~long], lengths[~long], rows[~long]
            elif policy == "truncate":
                truncated += int(long.sum())
                lengths = np.minimum(lengths, seq_len + 1)
            else:  # split into windows of seq_len + 1 tokens overlapping by one
                starts, lengths, rows = _split(starts, lengths, rows, seq_len)
        csum = np.concatenate([[0], np.cumsum(np.asarray(tok.trained, np.int64))])
        trained = csum[starts + lengths] - csum[starts + 1]
        keep = trained > 0
        untrained += int((~keep).sum())
        n = int(keep.sum())
        parts.append({
            "shard": np.full(n, s, np.int32), "start": starts[keep].astype(np.int64),
            "length": lengths[keep].astype(np.int64),
            "source": np.full(n, shard.source_index, np.int32),
            "row": rows[keep].astype(np.int64), "trained": trained[keep].astype(np.int64),
        })
    cat = {k: np.concatenate([p[k] for p in parts]) if parts else np.zeros(0, np.int64)
           for k in ("shard", "start", "length", "source", "row", "trained")}
    docs = Documents(**cat)
    stats = {
        # a split example yields several documents; count the examples themselves
        "examples": len(np.unique((docs.shard.astype(np.int64) << 40) | docs.row)),
        "documents": len(docs),
        "tokens": int((docs.length - 1).sum()),
        "trained_tokens": int(docs.trained.sum()),
        "truncated": truncated,
        "dropped": dropped + too_short + untrained,
        "dropped_too_long": dropped,
        "dropped_untrained": too_short + untrained,
        "skipped_bad_rows": sum(t.meta["bad_rows"] for t in tokenized),
        "turns_without_end": sum(t.meta["turns_without_end"] for t in tokenized),
        "rows_read": sum(t.meta["rows"] for t in tokenized),
    }
    if stats["turns_without_end"]:
        log.warning(
            "%d trained turns have no end-of-turn special token after them, so the model may "
            "not learn to stop; check the chat template (jaxtune inspect-data shows them).",
            stats["turns_without_end"],
        )
    return docs, stats


def _split(starts, lengths, rows, seq_len):
    out_s, out_l, out_r = [], [], []
    for s, n, r in zip(starts.tolist(), lengths.tolist(), rows.tolist(), strict=True):
        for off in range(0, n - 1, seq_len):
            out_s.append(s + off)
            out_l.append(min(seq_len + 1, n - off))
            out_r.append(r)
    return (np.asarray(out_s, np.int64), np.asarray(out_l, np.int64),
            np.asarray(out_r, np.int64))
