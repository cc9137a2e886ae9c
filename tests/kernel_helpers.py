"""Shared pieces of the attention-kernel tests (splash, Pallas GPU; single- and multi-device):
random q/k/v, one jitted forward + backward, the model's training mask, and the comparison."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.models.layers import AttentionMask
from jaxtune.sharding import activation_rules


def qkv(n: int, kv: int, *, rows: int, t: int, h: int, seed: int = 0):
    """Random float32 ``q [rows, t, n, h]`` and ``k, v [rows, t, kv, h]``."""
    kq, kk, kv_ = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(kq, (rows, t, n, h), jnp.float32),
            jax.random.normal(kk, (rows, t, kv, h), jnp.float32),
            jax.random.normal(kv_, (rows, t, kv, h), jnp.float32))


def out_and_grads(fn, q, k, v, mesh=None):
    """``fn(q, k, v)`` and its input gradients for a fixed random cotangent, as one jitted
    program (interpret mode is slow op by op), traced under ``mesh``'s activation rules."""
    cot = jax.random.normal(jax.random.key(9), q.shape, jnp.float32)

    def run(q, k, v):
        with activation_rules(mesh):
            out, vjp = jax.vjp(fn, q, k, v)
            return out, vjp(cot)
    return jax.jit(run)(q, k, v)


def training_mask(q, seg):
    """The model's training mask for a ``[B, T, ...]`` batch: positions 0..T-1, segments."""
    b, t = q.shape[:2]
    return AttentionMask.causal(jnp.broadcast_to(jnp.arange(t), (b, t)), seg)


def assert_same_out_and_grads(got, want, tol: float = 1e-4) -> None:
    """``(out, (dq, dk, dv))`` pairs equal within ``tol`` (absolute and relative)."""
    np.testing.assert_allclose(got[0], want[0], atol=tol, rtol=tol)
    for name, g, w in zip("qkv", got[1], want[1], strict=True):
        np.testing.assert_allclose(g, w, atol=tol, rtol=tol, err_msg=f"d{name}")
