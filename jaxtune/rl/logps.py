"""Log-probabilities of a rollout's completion tokens under a model.

One function, shared by the GRPO loss (the policy's log-probs inside the train step) and the
rollout producer (the old and reference log-probs stored with the batch), so that both compute
them the same way: same vocabulary, same temperature, same chunking.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from jaxtune.loss import chunked_token_logps
from jaxtune.models.family import hidden_states_and_aux


def completion_logps(model: Any, batch: dict[str, Any], *, temperature: float, chunk_size: int):
    """``(logps [B, C], entropy [B, C], model_aux)`` of each row's completion tokens."""
    ids_BT = batch["input_ids"]
    hidden_BTD, model_aux = hidden_states_and_aux(model, ids_BT, batch["positions"],
                                                  batch["segment_ids"])
    t, c = ids_BT.shape[1], batch["completion_mask"].shape[1]
    p = t - c  # the completion starts at column P in every row (prompts are left-padded)
    logps_BC, entropy_BC = chunked_token_logps(
        model.unembed, hidden_BTD[:, p - 1:t - 1], ids_BT[:, p:].astype(jnp.int32),
        temperature=temperature, chunk_size=chunk_size)
    return logps_BC, entropy_BC, model_aux
