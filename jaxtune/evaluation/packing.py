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


def fine_bucket(n: int, minimum: int) -> int:
    """``n`` rounded up to one of four sizes per power of two (48, 64, 80, 96, 112, 128,
    160, ...), at least ``minimum``: less padding than :func:`bucket`, a few more shapes."""
    step = max(1, bucket(n, 1) // 8)
    return max(minimum, -(-n // step) * step)


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
        return read_scores(self.placements, logp_BC, greedy_BC)


def read_scores(placements: Sequence[Placement], logp_BC: np.ndarray, greedy_BC: np.ndarray
                ) -> Iterator[tuple[int, float, bool]]:
    """``(request index, summed log-prob, all tokens greedy)`` of each placed request."""
    for p in placements:
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


# --------------------------------------------------------------------------- shared contexts


@dataclass
class SharedBatch:
    """Requests that share their context, scored with the context run once per group.

    Multiple-choice tasks ask for several continuations of one context. Here each distinct
    context (its tokens up to the position that predicts the first continuation token) is a
    *prefix*, run once into a KV cache (left-padded ``[G, P]``, as generation prefills); each
    request then runs only its *tail* (the continuation's other tokens, ``[R, T]``, right-
    padded) against a copy of its group's cache. Scored positions index ``[prefix end, tail
    0..T-1]`` (``T + 1`` columns). The context's forward pass is paid once per question, not
    once per choice, as lm_eval's hf backend pays it.
    """

    prefix_ids_GP: np.ndarray
    prefix_positions_GP: np.ndarray
    prefix_segment_ids_GP: np.ndarray  # 0 = left padding (and unused groups)
    group_R: np.ndarray  # each tail row's group
    tail_ids_RT: np.ndarray
    tail_positions_RT: np.ndarray
    tail_segment_ids_RT: np.ndarray  # 0 = right padding (and unused rows)
    index_RC: np.ndarray  # into [prefix end, tail positions]; C = T + 1
    targets_RC: np.ndarray
    placements: list[Placement]

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in (
            "prefix_ids_GP", "prefix_positions_GP", "prefix_segment_ids_GP", "group_R",
            "tail_ids_RT", "tail_positions_RT", "tail_segment_ids_RT", "index_RC",
            "targets_RC")}

    def read(self, logp_BC: np.ndarray, greedy_BC: np.ndarray
             ) -> Iterator[tuple[int, float, bool]]:
        return read_scores(self.placements, logp_BC, greedy_BC)


#: A continuation token run against a cached context costs about twice a packed token on
#: XLA:CPU (SmolLM2, 2 cores: each row carries its copy of the cache through the layers), so
#: a group shares its context only where that saves work: ``(n - 1) * context > tails``.
TAIL_COST = 2


def split_shared(requests: Sequence[Request], min_prefix: int = 8
                 ) -> tuple[dict[tuple[int, ...], list[int]], list[int]]:
    """``({prefix: request indices}, the other request indices)``: requests grouped by their
    shared prefix (of ``min_prefix`` tokens or more) where running it once saves work, i.e.
    ``n * prefix + tails > prefix + TAIL_COST * tails`` (short continuations of a long
    context, as in most multiple-choice tasks; one-token continuations always)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, req in enumerate(requests):
        groups.setdefault(prefix_of(req), []).append(i)
    shared = {}
    for prefix, ids in groups.items():
        tails = sum(len(requests[i].targets) - 1 for i in ids)
        if len(ids) >= 2 and len(prefix) >= min_prefix and \
                (len(ids) - 1) * len(prefix) > (TAIL_COST - 1) * tails:
            shared[prefix] = ids
    rest = sorted(i for p, ids in groups.items() if p not in shared for i in ids)
    return shared, rest


def prefix_of(req: Request) -> tuple[int, ...]:
    """The tokens up to (and with) the one whose output predicts the first target."""
    return req.inputs[:len(req.inputs) - len(req.targets) + 1]


def pack_shared(requests: Sequence[Request], groups: dict[tuple[int, ...], list[int]],
                group_count: int, *, row_multiple: int = 1, rows_per_group: int = 4
                ) -> list[SharedBatch]:
    """Batches of ``group_count`` prefixes (rounded up to ``row_multiple``) and their tails,
    longest prefixes first; tail rows rounded up to a power of two (and ``row_multiple``)."""
    g = -(-max(1, group_count) // row_multiple) * row_multiple
    order = sorted(groups, key=lambda p: -len(p))
    batches = []
    for at in range(0, len(order), g):
        chunk = order[at:at + g]
        batches.append(_lay_out_shared(requests, [(p, groups[p]) for p in chunk], g,
                                       row_multiple, rows_per_group))
    return batches


def _lay_out_shared(requests, chunk, g, row_multiple, rows_per_group) -> SharedBatch:
    p = fine_bucket(max(len(prefix) for prefix, _ in chunk), MIN_SCORED)
    rows = sum(len(ids) for _, ids in chunk)
    r = g * rows_per_group if rows <= g * rows_per_group else bucket(rows, 1)
    r = -(-r // row_multiple) * row_multiple
    t = fine_bucket(max(len(requests[i].targets) - 1 for _, ids in chunk for i in ids),
                    MIN_SCORED)
    prefix_ids = np.zeros((g, p), np.int32)
    prefix_pos = np.zeros((g, p), np.int32)
    prefix_seg = np.zeros((g, p), np.int32)
    group = np.zeros((r,), np.int32)
    tail_ids = np.zeros((r, t), np.int32)
    tail_pos = np.zeros((r, t), np.int32)
    tail_seg = np.zeros((r, t), np.int32)
    index = np.zeros((r, t + 1), np.int32)
    targets = np.zeros((r, t + 1), np.int32)
    placements = []
    row = 0
    for j, (prefix, ids) in enumerate(chunk):
        n = len(prefix)
        prefix_ids[j, p - n:] = prefix
        prefix_pos[j, p - n:] = np.arange(n)
        prefix_seg[j, p - n:] = 1
        for i in ids:
            req = requests[i]
            tail = req.inputs[n:]
            k = len(req.targets)
            group[row] = j
            tail_ids[row, :len(tail)] = tail
            tail_pos[row, :len(tail)] = np.arange(n, n + len(tail))
            tail_seg[row, :len(tail)] = 1
            index[row, :k] = np.arange(k)  # column 0 is the prefix's last position
            targets[row, :k] = req.targets
            placements.append(Placement(i, row, 0, k))
            row += 1
    return SharedBatch(prefix_ids, prefix_pos, prefix_seg, group, tail_ids, tail_pos,
                       tail_seg, index, targets, placements)
