"""Log-likelihood requests packed several to a row, and their scores read back out.

A request is ``(context tokens, continuation tokens)``; its score is the summed log-prob of
the continuation given the context and whether every continuation token is the greedy one.
As lm_eval's HF backend does, the model reads ``(context + continuation)[-(L + 1):][:-1]``
(``L`` the model's maximum length, so an over-long context is cut from the left) and the last
``len(continuation)`` positions are scored against the continuation.

Requests are sorted longest first and packed first-fit into ``B`` rows of ``T`` tokens (``T``
the longest request rounded up to a power of two, at least ``min_len``); each request is a
segment of its row (its own segment id, positions from 0), so packed requests never see each
other (``jaxtune.models.layers.AttentionMask``). Only the scored positions reach the
vocabulary: each row lists them in ``index_BC`` (``C`` rounded up to a power of two), with
their targets. Shapes therefore come from a few buckets, and the forward pass compiles a few
times per task, not per batch. Empty rows and slots have segment 0 and are never read back.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from jaxtune.evaluation.errors import EvalError

MIN_ROW = 64  # shortest row bucket (tokens)
MIN_SCORED = 16  # smallest bucket of scored positions per row


def bucket(n: int, minimum: int) -> int:
    """``n`` rounded up to a power of two, at least ``minimum``."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


@dataclass(frozen=True)
class Request:
    """One log-likelihood request as the model reads it."""

    inputs: tuple[int, ...]  # tokens fed to the model
    targets: tuple[int, ...]  # the continuation: targets of the last len(targets) positions

    @classmethod
    def from_tokens(cls, context: Sequence[int], continuation: Sequence[int],
                    max_length: int) -> Request:
        """lm_eval's window over ``context + continuation`` (left-truncated to fit)."""
        if not continuation:
            raise EvalError("a log-likelihood request has an empty continuation (the task's "
                            "answer encodes to no tokens); check its doc_to_choice / "
                            "doc_to_target.")
        if len(continuation) > max_length:
            raise EvalError(f"a continuation of {len(continuation)} tokens is longer than the "
                            f"model's maximum length {max_length}, so it cannot be scored "
                            "(lm_eval's hf backend refuses it too); raise max_length if the "
                            "model takes longer inputs.")
        whole = (list(context) + list(continuation))[-(max_length + 1):]
        return cls(tuple(whole[:-1]), tuple(continuation))


@dataclass
class Placement:
    """Where one request sits in a packed batch."""

    request: int  # index into the caller's request list
    row: int
    scored: int  # first of its columns in index_BC / the forward pass's outputs
    length: int  # number of scored positions (continuation tokens)


@dataclass
class PackedBatch:
    """Model inputs ``[B, T]`` and the scored positions ``[B, C]`` of some requests."""

    ids_BT: np.ndarray
    positions_BT: np.ndarray
    segment_ids_BT: np.ndarray  # 0 = padding
    index_BC: np.ndarray  # position in the row of each scored token (0 where unused)
    targets_BC: np.ndarray  # its target token
    placements: list[Placement]

    def arrays(self) -> dict[str, np.ndarray]:
        return {"ids_BT": self.ids_BT, "positions_BT": self.positions_BT,
                "segment_ids_BT": self.segment_ids_BT, "index_BC": self.index_BC,
                "targets_BC": self.targets_BC}

    def read(self, logp_BC: np.ndarray, greedy_BC: np.ndarray
             ) -> Iterator[tuple[int, float, bool]]:
        """``(request index, summed log-prob, all tokens greedy)`` of each placed request."""
        for p in self.placements:
            cols = slice(p.scored, p.scored + p.length)
            yield (p.request, float(np.sum(logp_BC[p.row, cols], dtype=np.float64)),
                   bool(np.all(greedy_BC[p.row, cols])))


def pack(requests: Sequence[Request], rows: int, *, min_len: int = MIN_ROW,
         row_multiple: int = 1, one_per_row: bool = False) -> list[PackedBatch]:
    """Batches of ``rows`` rows (rounded up to ``row_multiple``) holding every request.

    Longest requests first; each batch's row length is its first (longest) request's length
    bucket. ``one_per_row`` puts a single request in each row (the reference layout the
    packed one must equal).
    """
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i].inputs))
    rows = -(-max(1, rows) // row_multiple) * row_multiple
    batches: list[PackedBatch] = []
    at = 0
    while at < len(order):
        t = bucket(len(requests[order[at]].inputs), min_len)
        free = [t] * rows  # tokens left in each row
        content: list[list[int]] = [[] for _ in range(rows)]
        while at < len(order):
            n = len(requests[order[at]].inputs)
            row = next((r for r in range(rows) if free[r] >= n
                        and not (one_per_row and content[r])), None)
            if row is None:
                break
            content[row].append(order[at])
            free[row] -= n
            at += 1
        batches.append(_lay_out(requests, content, t))
    return batches


def _lay_out(requests: Sequence[Request], content: list[list[int]], t: int) -> PackedBatch:
    b = len(content)
    ids = np.zeros((b, t), np.int32)
    positions = np.zeros((b, t), np.int32)
    segments = np.zeros((b, t), np.int32)
    scored = [sum(len(requests[i].targets) for i in row) for row in content]
    c = bucket(max(scored), MIN_SCORED)
    index = np.zeros((b, c), np.int32)
    targets = np.zeros((b, c), np.int32)
    placements = []
    for r, row in enumerate(content):
        start = col = 0
        for seg, i in enumerate(row, 1):
            req = requests[i]
            n, k = len(req.inputs), len(req.targets)
            ids[r, start:start + n] = req.inputs
            positions[r, start:start + n] = np.arange(n)
            segments[r, start:start + n] = seg
            index[r, col:col + k] = np.arange(start + n - k, start + n)
            targets[r, col:col + k] = req.targets
            placements.append(Placement(i, r, col, k))
            start += n
            col += k
    return PackedBatch(ids, positions, segments, index, targets, placements)
