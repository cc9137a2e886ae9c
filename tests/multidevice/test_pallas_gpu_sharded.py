"""The Pallas GPU attention kernel (interpret mode) inside shard_map on 8 fake CPU devices: rows
over data x fsdp, GQA heads over tensor, equal to the unsharded XLA reference, forward and
gradients; KV heads that cannot split like the query heads fall back with the note."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxtune.config import MeshConfig
from jaxtune.kernels.pallas_gpu import _note, pallas_gpu_attention
from jaxtune.kernels.splash import reference_attention
from jaxtune.mesh import make_mesh
from jaxtune.sharding import activation_rules

T, H = 128, 32


def _qkv(n, kv):
    kq, kk, kv_ = jax.random.split(jax.random.key(0), 3)
    return (jax.random.normal(kq, (4, T, n, H), jnp.float32),
            jax.random.normal(kk, (4, T, kv, H), jnp.float32),
            jax.random.normal(kv_, (4, T, kv, H), jnp.float32))


def _segments():
    row = np.concatenate([np.full(50, 1), np.full(60, 2), np.zeros(18)])
    return jnp.asarray(np.stack([np.roll(row, 16 * i) for i in range(4)]), jnp.int32)


def _out_and_grads(fn, q, k, v, mesh=None):
    cot = jax.random.normal(jax.random.key(9), q.shape, jnp.float32)

    def run(q, k, v):
        with activation_rules(mesh):
            out, vjp = jax.vjp(fn, q, k, v)
            return out, vjp(cot)
    return jax.jit(run)(q, k, v)


def test_sharded_kernel_matches_reference(caplog):
    _note.cache_clear()
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    q, k, v = _qkv(4, 2)
    seg = _segments()
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    q, k, v = (jax.device_put(x, rows) for x in (q, k, v))
    with caplog.at_level(logging.WARNING, logger="jaxtune.kernels.pallas_gpu"):
        got, got_grads = _out_and_grads(lambda q, k, v: pallas_gpu_attention(
            q, k, v, segment_ids_BT=seg), q, k, v, mesh)
    assert "falls back" not in caplog.text  # the kernel ran, in shard_map
    want, want_grads = _out_and_grads(lambda q, k, v: reference_attention(
        q, k, v, segment_ids_BT=seg), q, k, v)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)


def test_kv_heads_that_cannot_split_like_query_heads_fall_back(caplog):
    _note.cache_clear()
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    q, k, v = _qkv(2, 1)  # one KV head cannot split over tensor=2, two query heads can

    def fallback(q, k, v, *, segment_ids_BT, window):
        return reference_attention(q, k, v, segment_ids_BT=segment_ids_BT)

    with caplog.at_level(logging.WARNING, logger="jaxtune.kernels.pallas_gpu"):
        got, _ = _out_and_grads(lambda q, k, v: pallas_gpu_attention(
            q, k, v, segment_ids_BT=None, fallback=fallback), q, k, v, mesh)
    np.testing.assert_allclose(got, reference_attention(q, k, v), atol=1e-5)
    assert "the 1 KV heads cannot be split like the 2 query heads" in caplog.text
