"""Choosing the next token from logits: greedy, temperature, top-k, top-p (nucleus), min-p.

One function of ``(logits, key, settings)``; the settings are a frozen dataclass, static under
jit, so greedy compiles to an argmax with no random numbers at all. The key of step ``i`` is
``fold_in(key(seed), i)``, so a seed gives the same tokens on every run and batch position.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxtune.generation.errors import GenerateError


@dataclass(frozen=True)
class Sampling:
    """``temperature`` 0 is greedy; ``top_k`` 0, ``top_p`` 1.0 and ``min_p`` 0 switch those
    filters off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0

    def __post_init__(self):
        if self.temperature < 0:
            raise GenerateError(f"temperature={self.temperature} must be >= 0 (0 is greedy).")
        if self.top_k < 0:
            raise GenerateError(f"top_k={self.top_k} must be >= 0 (0 keeps every token).")
        if not 0.0 < self.top_p <= 1.0:
            raise GenerateError(f"top_p={self.top_p} must be in (0, 1] (1 keeps every token).")
        if not 0.0 <= self.min_p < 1.0:
            raise GenerateError(f"min_p={self.min_p} must be in [0, 1) (0 keeps every token).")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def filter_logits(logits_BV: jax.Array, s: Sampling) -> jax.Array:
    """Temperature-scaled logits with the tokens outside top-k / top-p / min-p set to -inf, in
    transformers' order (temperature, top-k, top-p, min-p)."""
    logits_BV = logits_BV.astype(jnp.float32) / s.temperature
    if s.top_k and s.top_k < logits_BV.shape[-1]:
        kth_B1 = jax.lax.top_k(logits_BV, s.top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    if s.top_p < 1.0:
        # Keep the smallest set of most likely tokens whose probability reaches top_p (the
        # first token always stays), as transformers' TopPLogitsWarper does.
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # mass of the more likely ones
        kept_BV = jnp.where(before_BV < s.top_p, sorted_BV, jnp.inf)
        threshold_B1 = jnp.min(kept_BV, axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV < threshold_B1, -jnp.inf, logits_BV)
    if s.min_p > 0.0:
        # Drop tokens less likely than min_p times the likeliest one (MinPLogitsWarper): in
        # logits, below max + log(min_p).
        top_B1 = jnp.max(logits_BV, axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV < top_B1 + jnp.log(s.min_p), -jnp.inf, logits_BV)
    return logits_BV


def token_logps(logits_BV: jax.Array, token_B: jax.Array, s: Sampling) -> jax.Array:
    """``log p(token)`` ``[B]`` under the temperature-scaled softmax over the whole vocabulary
    (before any top-k / top-p / min-p filter): the log-prob a trainer computes for the same
    token, so sampling and training are compared on the same distribution (the filters'
    renormalisation is what biased vLLM's log-probs, trl#6789). Greedy uses temperature 1."""
    scaled_BV = logits_BV.astype(jnp.float32) / (s.temperature or 1.0)
    picked_B = jnp.take_along_axis(scaled_BV, jnp.maximum(token_B, 0)[:, None], axis=-1)[:, 0]
    return picked_B - jax.nn.logsumexp(scaled_BV, axis=-1)


def sample(logits_BV: jax.Array, key: jax.Array, s: Sampling) -> jax.Array:
    """Next token ids ``[B]`` (int32) from float logits ``[B, V]``."""
    if s.greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits_BV, s), axis=-1).astype(jnp.int32)
