"""The fused CPU attention kernel inside shard_map on 8 fake CPU devices: rows over data x fsdp,
GQA heads over tensor, equal to the unsharded XLA reference, forward and gradients, with a
window traced per layer (as a scan over layers gives it); KV heads that cannot split like the
query heads fall back with the note."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxtune.config import MeshConfig
from jaxtune.kernels.cpu_attention import _note, cpu_attention
from jaxtune.kernels.splash import reference_attention
from jaxtune.mesh import make_mesh
from tests.kernel_helpers import assert_same_out_and_grads, out_and_grads, qkv

T, H = 72, 12


def _segments():
    row = np.concatenate([np.full(30, 1), np.full(33, 2), np.zeros(9)])
    return jnp.asarray(np.stack([np.roll(row, 16 * i) for i in range(4)]), jnp.int32)


def _sharded_qkv(mesh, n, kv):
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    return tuple(jax.device_put(x, rows) for x in qkv(n, kv, rows=4, t=T, h=H))


def test_sharded_kernel_matches_reference(caplog):
    _note.cache_clear()
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    q, k, v = _sharded_qkv(mesh, 4, 2)
    seg = _segments()
    with caplog.at_level(logging.WARNING, logger="jaxtune.kernels.cpu_attention"):
        got = out_and_grads(lambda q, k, v: cpu_attention(q, k, v, segment_ids_BT=seg), q, k, v,
                            mesh)
    assert "falls back" not in caplog.text  # the kernel ran, in shard_map
    want = out_and_grads(lambda q, k, v: reference_attention(q, k, v, segment_ids_BT=seg),
                         q, k, v)
    assert_same_out_and_grads(got, want, tol=2e-5)


def test_sharded_kernel_takes_a_traced_window():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    q, k, v = _sharded_qkv(mesh, 4, 2)
    windows = jnp.asarray([7, 2**30], jnp.int32)

    def per_layer(q, k, v):
        def body(carry, w):
            return carry, cpu_attention(q, k, v, segment_ids_BT=None, window=w)
        return jax.lax.scan(body, 0, windows)[1].sum(0)

    got = out_and_grads(per_layer, q, k, v, mesh)
    want = out_and_grads(lambda q, k, v: reference_attention(q, k, v, window=7)
                         + reference_attention(q, k, v), q, k, v)
    assert_same_out_and_grads(got, want, tol=2e-5)


def test_kv_heads_that_cannot_split_like_query_heads_fall_back(caplog):
    _note.cache_clear()
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    q, k, v = _sharded_qkv(mesh, 2, 1)  # one KV head cannot split over tensor=2

    def fallback(q, k, v, *, segment_ids_BT, window):
        return reference_attention(q, k, v, segment_ids_BT=segment_ids_BT)

    with caplog.at_level(logging.WARNING, logger="jaxtune.kernels.cpu_attention"):
        got, _ = out_and_grads(lambda q, k, v: cpu_attention(
            q, k, v, segment_ids_BT=None, fallback=fallback), q, k, v, mesh)
    np.testing.assert_allclose(got, reference_attention(q, k, v), atol=1e-5)
    assert "the 1 KV heads cannot be split like the 2 query heads" in caplog.text
