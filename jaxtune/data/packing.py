"""Packing documents into fixed-length rows, and writing rows as arrays.

Each row holds whole documents. The shift to next-token targets happens per document, so a
target never crosses from one document into the next; ``segment_ids`` (1, 2, ... per document,
0 for padding) and ``positions`` (restarting at 0) let attention keep documents apart.

The packer is a best fit over a window of open rows: each document goes to the open row with
the least free space that still fits it; when none fits and the window is full, the fullest
row is closed. It only looks at lengths, so a plan is cheap to recompute from the seed, and it
keeps the shuffled order roughly intact (a row's documents come from nearby positions).
"""

from __future__ import annotations

import bisect

import numpy as np

PACK_WINDOW = 64  # open rows the packer chooses among


class Packer:
    """Incremental best-fit packer: feed documents, collect the rows it closes."""

    def __init__(self, seq_len: int, window: int = PACK_WINDOW):
        self.seq_len, self.window = seq_len, window
        self._free: list[int] = []  # free space of the open rows, ascending
        self._ids: list[int] = []  # open row ids, parallel to ``_free``
        self._rows: dict[int, list] = {}
        self._next = 0

    def add(self, item, need: int) -> list[list]:
        """Place ``item`` (taking ``need`` positions); returns the rows this closed."""
        closed = []
        k = bisect.bisect_left(self._free, need)
        if k < len(self._free):
            room, row = self._free.pop(k), self._ids.pop(k)
            self._rows[row].append(item)
            room -= need
        else:
            if len(self._free) >= self.window:  # close the fullest open row to make room
                self._free.pop(0)
                closed.append(self._rows.pop(self._ids.pop(0)))
            row, room = self._next, self.seq_len - need
            self._next += 1
            self._rows[row] = [item]
        if room == 0:
            closed.append(self._rows.pop(row))
        else:
            k = bisect.bisect_left(self._free, room)
            self._free.insert(k, room)
            self._ids.insert(k, row)
        return closed

    def flush(self) -> list[list]:
        """Close every open row, oldest first."""
        rows = [self._rows.pop(r) for r in sorted(self._ids)]
        self._free, self._ids = [], []
        return rows


def pack(slots: np.ndarray, seq_len: int, window: int = PACK_WINDOW) -> list[list[int]]:
    """Group document indices into rows whose ``slots`` sum to at most ``seq_len``."""
    packer = Packer(seq_len, window)
    rows: list[list[int]] = []
    for doc, need in enumerate(np.asarray(slots).tolist()):
        rows += packer.add(doc, need)
    return rows + packer.flush()


def build_rows(
    rows: list[list[int]], docs, tokenized, seq_len: int, pad_id: int
) -> dict[str, np.ndarray]:
    """Arrays ``[len(rows), seq_len]`` for rows given as lists of document indices.

    An empty row (``[]``) is all padding with a zero loss mask.
    """
    spans = []
    for row in rows:
        spans.append([])
        for d in row:
            tok = tokenized[docs.shard[d]]
            s, length = int(docs.start[d]), int(docs.length[d])
            spans[-1].append((tok.tokens[s:s + length], tok.trained[s:s + length]))
    return rows_to_arrays(spans, seq_len, pad_id)


def rows_to_arrays(
    rows: list[list[tuple[np.ndarray, np.ndarray]]], seq_len: int, pad_id: int
) -> dict[str, np.ndarray]:
    """Arrays for rows given as lists of documents ``(tokens, trained)``."""
    n = len(rows)
    out = {
        "input_ids": np.full((n, seq_len), pad_id, np.int32),
        "targets": np.full((n, seq_len), pad_id, np.int32),
        "loss_mask": np.zeros((n, seq_len), np.float32),
        "segment_ids": np.zeros((n, seq_len), np.int32),
        "positions": np.zeros((n, seq_len), np.int32),
    }
    for r, row in enumerate(rows):
        pos = 0
        for k, (ids, trained) in enumerate(row):
            m = len(ids) - 1
            out["input_ids"][r, pos:pos + m] = ids[:-1]
            out["targets"][r, pos:pos + m] = ids[1:]
            out["loss_mask"][r, pos:pos + m] = trained[1:]
            out["segment_ids"][r, pos:pos + m] = k + 1
            out["positions"][r, pos:pos + m] = np.arange(m, dtype=np.int32)
            pos += m
    return out
