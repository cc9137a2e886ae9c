"""Streaming sources (``data.streaming: true``): read, tokenize and pack on the fly.

For data too large to tokenize up front. Rows are read lazily with ``datasets`` streaming,
interleaved across sources by weight (each source is drawn with probability proportional to
its weight until it runs out; an epoch ends when all have), shuffled in a seeded buffer of
``data.shuffle_buffer`` examples, encoded in small batches, and packed with the same best-fit
packer as the cached path. Nothing is cached.

Everything is a deterministic function of (seed, epoch), so the state is ``(epoch, rows
consumed in that epoch)`` and restoring it replays the epoch's stream up to that row: exact,
at the cost of re-reading the data before the resume point. Each process reads the whole
stream and keeps its slice of every global batch (simple and exact; the reading is repeated
per process, so prefer the cached path when the data fits on disk).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np

from jaxtune.data.encode import Encoder
from jaxtune.data.errors import BadRowError, DataError, RowProblem
from jaxtune.data.formats import FormatSpec
from jaxtune.data.packing import Packer, rows_to_arrays
from jaxtune.data.prepare import cache_root
from jaxtune.data.sources import is_sliced, resolve_source
from jaxtune.data.tokenizer import TokenizerInfo

log = logging.getLogger(__name__)

_ENCODE_BATCH = 64  # rows encoded per tokenizer call

_COUNTERS = ("examples", "documents", "tokens", "trained_tokens", "truncated", "dropped",
             "skipped_bad_rows", "turns_without_end", "rows_read", "rows", "row_slots_used")


class StreamingBatchIterator:
    """Same interface as :class:`jaxtune.data.loader.BatchIterator`, over streamed sources."""

    def __init__(self, cfg, tokenizer, *, split: str, process_index: int, process_count: int):
        d = cfg.data
        sources = d.sources if split == "train" else d.eval_sources
        if split == "train" and not sources:
            raise DataError("No training data: add at least one entry to data.sources.")
        for i, src in enumerate(sources):
            if is_sliced(src.split):
                raise DataError(
                    f"Data source {i} ('{src.path}'): split slices ('{src.split}') need the "
                    "cached path; set data.streaming: false or use a plain split name."
                )
        if cfg.trainer.global_batch_size % process_count:
            raise DataError(
                f"trainer.global_batch_size ({cfg.trainer.global_batch_size}) must divide "
                f"evenly over {process_count} processes."
            )
        if d.truncation == "split" and d.format != "text":
            raise DataError("data.truncation: split only suits the text format.")
        self.cfg, self.train = cfg, split == "train"
        self.info = TokenizerInfo.of(tokenizer)
        self.encoder = Encoder(tokenizer, FormatSpec.from_config(d), self.info)
        key = "data.sources" if split == "train" else "data.eval_sources"
        self.shards = [resolve_source(i, src, key) for i, src in enumerate(sources)]
        self.weights = [src.weight for src in sources]
        self.hf_cache = f"{cache_root(d)}/hf"
        self.seq_len, self.global_batch_size = d.seq_len, cfg.trainer.global_batch_size
        self.process_index, self.process_count = process_index, process_count
        self.local_batch_size = self.global_batch_size // process_count
        self.seed, self.shuffle = cfg.run.seed, d.shuffle and self.train
        self.epoch, self.row, self.batches = 0, 0, 0
        self.last_examples: list[list[tuple[int, int, int]]] = []
        self._counts = dict.fromkeys(_COUNTERS, 0)
        self._stream: Iterator | None = None
        self._done = False

    # ----------------------------------------------------------------- the stream

    def _source_rows(self, s: int) -> Iterator[tuple[tuple[int, int, int], dict]]:
        for k, shard in enumerate(self.shards[s]):
            for r, row in enumerate(shard.stream(self.hf_cache)):
                yield (s, k, r), row

    def _interleaved(self, epoch: int) -> Iterator[tuple[tuple[int, int, int], dict]]:
        rng = np.random.default_rng([self.seed, epoch, 2])
        streams = {s: self._source_rows(s) for s in range(len(self.shards))}
        while streams:
            live = sorted(streams)
            w = np.asarray([self.weights[s] for s in live], np.float64)
            s = live[rng.choice(len(live), p=w / w.sum())] if self.train else live[0]
            try:
                yield next(streams[s])
            except StopIteration:
                del streams[s]

    def _shuffled(self, epoch: int):
        rows = self._interleaved(epoch)
        if not self.shuffle:
            yield from rows
            return
        rng = np.random.default_rng([self.seed, epoch, 3])
        buf: list = []
        size = max(1, self.cfg.data.shuffle_buffer)
        for item in rows:
            if len(buf) < size:
                buf.append(item)
                continue
            j = int(rng.integers(len(buf)))
            yield buf[j]
            buf[j] = item
        order = rng.permutation(len(buf))
        for j in order:
            yield buf[j]

    def _documents(self, epoch: int):
        """(tokens, trained, (source, shard, row)) per document, truncation applied."""
        batch: list = []
        for item in self._shuffled(epoch):
            batch.append(item)
            if len(batch) == _ENCODE_BATCH:
                yield from self._encode(batch)
                batch = []
        yield from self._encode(batch)

    def _encode(self, batch):
        c = self._counts

        def problem(i: int, p: RowProblem) -> None:
            (s, k, r), _ = batch[i]
            err = BadRowError(f"{self.shards[s][k].name}, row {r}", p.field, p.problem, p.fix)
            if self.cfg.data.on_bad_row == "error":
                raise err
            c["skipped_bad_rows"] += 1

        before = self.encoder.turns_without_end
        encoded = self.encoder.encode_batch([row for _, row in batch], problem)
        c["turns_without_end"] += self.encoder.turns_without_end - before
        c["rows_read"] += len(batch)
        for (where, _), enc in zip(batch, encoded, strict=True):
            if enc is None:
                continue
            docs = self._windows(enc[0], enc[1], where)
            c["examples"] += bool(docs)
            for tokens, trained in docs:
                c["documents"] += 1
                c["tokens"] += len(tokens) - 1
                c["trained_tokens"] += int(trained[1:].sum())
                yield tokens, trained, where

    def _windows(self, tokens, trained, where):
        n, s, policy = len(tokens), self.seq_len, self.cfg.data.truncation
        c = self._counts
        if n > s + 1:
            if policy == "error":
                src, shard, row = where
                raise DataError(
                    f"{self.shards[src][shard].name}, row {row}: the example has {n} tokens, "
                    f"more than data.seq_len + 1 = {s + 1}. Raise data.seq_len or set "
                    "data.truncation to truncate or drop."
                )
            if policy == "drop":
                c["dropped"] += 1
                return []
            if policy == "truncate":
                c["truncated"] += 1
                tokens, trained = tokens[:s + 1], trained[:s + 1]
        out = [(tokens[o:o + s + 1], trained[o:o + s + 1]) for o in range(0, max(n - 1, 0), s)]
        kept = [(t, m) for t, m in out if len(t) > 1 and m[1:].any()]
        c["dropped"] += len(out) - len(kept) if out else 1
        return kept

    def _rows(self, epoch: int):
        packer = Packer(self.seq_len) if self.cfg.data.packing else None
        for doc in self._documents(epoch):
            if packer is None:
                yield [doc]
            else:
                yield from packer.add(doc, len(doc[0]) - 1)
        if packer is not None:
            yield from packer.flush()

    # ----------------------------------------------------------------- iteration

    def __iter__(self):
        return self

    def _next_row(self):
        """The next global row, moving to the next epoch when one ends (None: eval done)."""
        while True:
            if self._stream is None:
                self._stream = self._rows(self.epoch)
            row = next(self._stream, None)
            if row is not None:
                self.row += 1
                return row
            if not self.train:
                return None
            if self.row == 0:
                raise DataError("The streamed training data has no usable examples.")
            self.epoch, self.row, self._stream = self.epoch + 1, 0, None

    def __next__(self) -> dict[str, np.ndarray]:
        if self._done:
            raise StopIteration
        rows = []
        while len(rows) < self.global_batch_size:
            row = self._next_row()
            if row is None:
                self._done = True
                break
            rows.append(row)
        if not rows:
            raise StopIteration
        rows += [[] for _ in range(self.global_batch_size - len(rows))]
        lo = self.process_index * self.local_batch_size
        mine = rows[lo:lo + self.local_batch_size]
        self.batches += 1
        c = self._counts
        for row in rows:
            if row:
                c["rows"] += 1
                c["row_slots_used"] += sum(len(t) - 1 for t, _, _ in row)
        self.last_examples = [[where for _, _, where in row] for row in mine]
        return rows_to_arrays([[(t, m) for t, m, _ in row] for row in mine], self.seq_len,
                              self.info.pad_id)

    # ----------------------------------------------------------------- state and stats

    def get_state(self) -> dict[str, Any]:
        return {"version": 1, "split": "train" if self.train else "eval", "streaming": True,
                "epoch": self.epoch, "row": self.row, "batches": self.batches,
                "seed": self.seed, "seq_len": self.seq_len}

    def set_state(self, state: dict[str, Any]) -> None:
        """Replay the stream of ``state['epoch']`` up to its row (exact, re-reads the data)."""
        if not state.get("streaming"):
            raise DataError("This data state was saved by the cached (non-streaming) pipeline; "
                            "resume with data.streaming: false.")
        self.epoch, self.row, self._stream = int(state["epoch"]), 0, None
        self.batches, self._done = int(state.get("batches", 0)), False
        self._counts = dict.fromkeys(_COUNTERS, 0)
        for _ in range(int(state["row"])):
            if self._next_row() is None:
                self._done = True
                break

    @property
    def stats(self) -> dict[str, Any]:
        """Running totals since this iterator started (or was restored)."""
        c = dict(self._counts)
        slots = c.pop("row_slots_used")
        c["packing_efficiency"] = slots / (c["rows"] * self.seq_len) if c["rows"] else 0.0
        c["epoch"] = self.epoch
        return c
