"""``sft``: supervised fine-tuning, masked token cross-entropy over the trained tokens.

The loss is :func:`jaxtune.loss.cross_entropy_loss` (chunked over the vocabulary, normalised
by the trained tokens of the whole global batch); the batch is the token batch every text
format produces (``TOKEN_AXES``), so the objective's other fields are the defaults.
"""

from __future__ import annotations

import functools
from typing import Any

from jaxtune.loss import cross_entropy_loss
from jaxtune.objectives import Objective, register_objective


def _sft(cfg: Any) -> Objective:
    return Objective("sft", functools.partial(cross_entropy_loss,
                                              chunk_size=cfg.trainer.loss_chunk_size,
                                              z_loss=cfg.trainer.z_loss))


register_objective("sft", _sft)
