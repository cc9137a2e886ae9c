"""A rollout as a training batch: rows of ``[left-padded prompt | completion, right-padded]``.

Every row is ``T = P + C`` tokens: its prompt ends at column ``P - 1`` (padding before it) and
its completion starts at column ``P``, so the completion's log-probs come from the same
``C`` hidden positions of every row, with no gather. Positions count from 0 at each row's
first prompt token (RoPE sees exactly the unpadded sequence) and padding has segment 0, which
attention never lets a real token see.

The completion mask runs through the first stop id (EOS or end of turn), inclusive, and is 0
after it; with ``mask_truncated_completions`` a completion that never stopped (it hit
``max_completion_length``) is masked whole, as TRL does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class Completion:
    """One sampled completion: token ids up to and including the first stop id, their
    sampler log-probs, and whether it stopped (False: cut at max_completion_length)."""

    ids: list[int]
    logps: list[float]
    stopped: bool


def cut_at_stop(ids: Sequence[int], logps: Sequence[float], stop_ids: Sequence[int],
                max_length: int) -> Completion:
    """The generator's tokens for one row, ended at the first stop id (kept)."""
    stops = set(int(s) for s in stop_ids)
    for i, t in enumerate(ids[:max_length]):
        if int(t) in stops:
            return Completion([int(x) for x in ids[:i + 1]], list(logps[:i + 1]), True)
    n = min(len(ids), max_length)
    return Completion([int(x) for x in ids[:n]], list(logps[:n]), False)


def rollout_arrays(prompts: Sequence[Sequence[int]], completions: Sequence[Completion], *,
                   prompt_width: int, completion_width: int, pad_id: int,
                   mask_truncated: bool = False) -> dict[str, np.ndarray]:
    """Host arrays of the rows (see the module docstring): ``input_ids``, ``positions``,
    ``segment_ids`` ``[N, P + C]``; ``completion_mask`` and ``sampler_logps`` ``[N, C]``."""
    n = len(prompts)
    p, c = prompt_width, completion_width
    ids = np.full((n, p + c), pad_id, np.int32)
    positions = np.zeros((n, p + c), np.int32)
    segments = np.zeros((n, p + c), np.int32)
    mask = np.zeros((n, c), np.float32)
    logps = np.zeros((n, c), np.float32)
    for i, (prompt, comp) in enumerate(zip(prompts, completions, strict=True)):
        lp, lc = len(prompt), len(comp.ids)
        if lp > p or lc > c:
            raise ValueError(f"row {i}: prompt {lp} > {p} or completion {lc} > {c} tokens")
        ids[i, p - lp:p] = prompt
        ids[i, p:p + lc] = comp.ids
        positions[i, p - lp:p + lc] = np.arange(lp + lc)
        segments[i, p - lp:p + lc] = 1
        if comp.stopped or not mask_truncated:
            mask[i, :lc] = 1.0
        logps[i, :lc] = comp.logps
    return {"input_ids": ids, "positions": positions, "segment_ids": segments,
            "completion_mask": mask, "sampler_logps": logps}
