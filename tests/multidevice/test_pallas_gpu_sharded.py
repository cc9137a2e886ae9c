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
from tests.kernel_helpers import assert_same_out_and_grads, out_and_grads, qkv

T, H = 128, 32


def _qkv(n, kv):
    return qkv(n, kv, rows=4, t=T, h=H)


def _segments():
    row = np.concatenate([np.full(50, 1), np.full(60, 2), np.zeros(18)])
    return jnp.asarray(np.stack([np.roll(row, 16 * i) for i in range(4)]), jnp.int32)


def test_sharded_kernel_matches_reference(caplog):
    _note.cache_clear()
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    q, k, v = _qkv(4, 2)
    seg = _segments()
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    q, k, v = (jax.device_put(x, rows) for x in (q, k, v))
    with caplog.at_level(logging.WARNING, logger="jaxtune.kernels.pallas_gpu"):
        got, got_grads = out_and_grads(lambda q, k, v: pallas_gpu_attention(
            q, k, v, segment_ids_BT=seg), q, k, v, mesh)
    assert "falls back" not in caplog.text  # the kernel ran, in shard_map
    want, want_grads = out_and_grads(lambda q, k, v: reference_attention(
        q, k, v, segment_ids_BT=seg), q, k, v)
    assert_same_out_and_grads((got, got_grads), (want, want_grads))


def test_kv_heads_that_cannot_split_like_query_heads_fall_back(caplog):
    _note.cache_clear()
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    q, k, v = _qkv(2, 1)  # one KV head cannot split over tensor=2, two query heads can

    def fallback(q, k, v, *, segment_ids_BT, window):
        return reference_attention(q, k, v, segment_ids_BT=segment_ids_BT)

    with caplog.at_level(logging.WARNING, logger="jaxtune.kernels.pallas_gpu"):
        got, _ = out_and_grads(lambda q, k, v: pallas_gpu_attention(
            q, k, v, segment_ids_BT=None, fallback=fallback), q, k, v, mesh)
    np.testing.assert_allclose(got, reference_attention(q, k, v), atol=1e-5)
    assert "the 1 KV heads cannot be split like the 2 query heads" in caplog.text
