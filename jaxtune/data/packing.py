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


def pack(slots: np.ndarray, seq_len: int, window: int = PACK_WINDOW) -> list[list[int]]:
    """Group document indices into rows whose ``slots`` sum to at most ``seq_len``."""
    closed: list[list[int]] = []
    free: list[int] = []  # free space of the open rows, ascending
    ids: list[int] = []  # open row ids, parallel to ``free``
    contents: list[list[int]] = []
    for doc, need in enumerate(np.asarray(slots).tolist()):
        k = bisect.bisect_left(free, need)
        if k < len(free):
            room, row = free.pop(k), ids.pop(k)
            contents[row].append(doc)
            room -= need
        else:
            if len(free) >= window:  # close the fullest open row to make room
                free.pop(0)
                closed.append(contents[ids.pop(0)])
            row, room = len(contents), seq_len - need
            contents.append([doc])
        if room == 0:
            closed.append(contents[row])
        else:
            k = bisect.bisect_left(free, room)
            free.insert(k, room)
            ids.insert(k, row)
    closed += [contents[r] for r in sorted(ids)]
    return closed


def build_rows(
    rows: list[list[int]], docs, tokenized, seq_len: int, pad_id: int
) -> dict[str, np.ndarray]:
    """Arrays ``[len(rows), seq_len]`` for rows given as lists of document indices.

    An empty row (``[]``) is all padding with a zero loss mask.
    """
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
        for k, d in enumerate(row):
            tok = tokenized[docs.shard[d]]
            s, length = int(docs.start[d]), int(docs.length[d])
            ids = tok.tokens[s:s + length]
            m = length - 1
            out["input_ids"][r, pos:pos + m] = ids[:-1]
            out["targets"][r, pos:pos + m] = ids[1:]
            out["loss_mask"][r, pos:pos + m] = tok.trained[s + 1:s + length]
            out["segment_ids"][r, pos:pos + m] = k + 1
            out["positions"][r, pos:pos + m] = np.arange(m, dtype=np.int32)
            pos += m
    return out
