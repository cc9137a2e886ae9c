"""NEFTune: uniform noise on the input embeddings while training (Jain et al., 2023).

``trainer.neftune_noise_alpha`` (TRL's and axolotl's ``neftune_noise_alpha``) adds
``Uniform(-m, m)`` noise with ``m = alpha / sqrt(T * D)`` to the token embeddings of every
training forward pass, ``T`` the row length and ``D`` the embedding width, as transformers'
NEFTune hook does (``T`` is the padded or packed row length there too). The noise is drawn
from the micro-batch's ``rng`` (``jaxtune.train_step``), so a run stays reproducible and
a resumed run draws what the uninterrupted one would have.

Only the train step's loss is wrapped (:func:`with_neftune`): evaluation, generation, RL
rollouts and the exported model are untouched. The noise is added to the embedding table's
output (``jaxtune.models.layers.Embed``), before any scaling a family applies after it
(Gemma's ``sqrt(D)``), which is where transformers' hook on ``get_input_embeddings()`` adds it
for Llama, Mistral, Qwen and Gemma 1/2.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp

_context = threading.local()

#: Folded into the micro-batch's key, so the noise is independent of LoRA dropout's draws.
_SALT = 0x4EF7


@contextlib.contextmanager
def embedding_noise(key: jax.Array, alpha: float) -> Iterator[None]:
    """Within this context (at trace time) token embeddings get NEFTune noise of ``alpha``."""
    prev = getattr(_context, "value", None)
    _context.value = (key, float(alpha))
    try:
        yield
    finally:
        _context.value = prev


def add_noise(x_BTD: jax.Array) -> jax.Array:
    """``x_BTD`` plus NEFTune noise inside :func:`embedding_noise`; unchanged outside it."""
    active = getattr(_context, "value", None)
    if active is None or active[1] <= 0.0:
        return x_BTD
    key, alpha = active
    magnitude = alpha / math.sqrt(x_BTD.shape[-2] * x_BTD.shape[-1])
    noise = jax.random.uniform(key, x_BTD.shape, jnp.float32, -magnitude, magnitude)
    return (x_BTD.astype(jnp.float32) + noise).astype(x_BTD.dtype)


def with_neftune(loss_fn: Callable[[Any, dict], Any], alpha: float
                 ) -> Callable[[Any, dict], Any]:
    """The training loss: ``loss_fn`` with NEFTune noise keyed by the micro-batch's ``rng``.

    Give it to the train step only. An objective (``jaxtune.objectives.Objective``) stays
    one, with its axes and normaliser.
    """

    def train_loss(model: Any, batch: dict) -> Any:
        with embedding_noise(jax.random.fold_in(batch["rng"], _SALT), alpha):
            return loss_fn(model, batch)

    with_loss = getattr(loss_fn, "with_loss", None)
    return with_loss(train_loss) if with_loss is not None else train_loss
