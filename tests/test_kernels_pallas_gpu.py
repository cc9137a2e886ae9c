"""The Pallas Triton attention kernel (``attention: pallas_gpu``) in interpret mode on CPU against
the pure-XLA reference and the model's own XLA attention: forward and gradients, float32, tiny
shapes (one row, 256 tokens, forward block 128 and backward block 32, so the kernel walks
several blocks on both passes and skips those above the diagonal)."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.kernels import compiling_for
from jaxtune.kernels.pallas_gpu import _note, block_sizes, pallas_gpu_attention, unsupported_reason
from jaxtune.kernels.splash import reference_attention
from jaxtune.models import layers
from jaxtune.models.layers import dot_product_attention, resolve_attention_impl
from tests.kernel_helpers import assert_same_out_and_grads, out_and_grads, qkv, training_mask

T, H, BLOCK = 256, 64, 128


def _qkv(n: int, kv: int, h: int = H, t: int = T, seed: int = 0):
    return qkv(n, kv, rows=1, t=t, h=h, seed=seed)


def _packed_segments() -> jax.Array:
    """Three documents (one across the block boundary) and trailing padding."""
    row = np.concatenate([np.full(100, 1), np.full(60, 2), np.full(70, 3), np.zeros(26)])
    return jnp.asarray(row[None], jnp.int32)


CASES = {
    "causal": dict(n=2, kv=2),
    "packed": dict(n=2, kv=2, segment_ids_BT=_packed_segments()),
    "gqa": dict(n=4, kv=2, h=32, segment_ids_BT=_packed_segments()),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_matches_reference_forward_and_grads(case):
    opts = dict(CASES[case])
    q, k, v = _qkv(opts.pop("n"), opts.pop("kv"), opts.pop("h", H))
    seg = opts.pop("segment_ids_BT", None)
    got = out_and_grads(lambda q, k, v: pallas_gpu_attention(
        q, k, v, segment_ids_BT=seg, interpret=True, block=BLOCK), q, k, v)
    want = out_and_grads(lambda q, k, v: reference_attention(
        q, k, v, segment_ids_BT=seg), q, k, v)
    assert_same_out_and_grads(got, want)


def test_layers_dispatch_to_the_kernel_and_match_xla():
    """GQA with packing and a custom scale through ``dot_product_attention``, grads included."""
    q, k, v = _qkv(4, 1, 32)
    seg = _packed_segments()

    def attend(impl):
        return lambda q, k, v: dot_product_attention(
            q, k, v, mask=training_mask(q, seg), window=None, implementation=impl, scale=0.3)

    assert_same_out_and_grads(out_and_grads(attend("pallas_gpu"), q, k, v),
                              out_and_grads(attend("xla"), q, k, v))


@pytest.mark.parametrize("change, note", [
    (dict(window=16), "a sliding window"),
    (dict(softcap=5.0), "logit soft-capping"),
    (dict(h=48), "head dim 48 is not a power of two"),
    (dict(t=200), "sequence length 200 is not a multiple of 16"),
])
def test_unsupported_case_falls_back_to_xla_with_a_note(caplog, change, note):
    _note.cache_clear()  # one note per reason and process
    q, k, v = _qkv(2, 2, change.get("h", 32), change.get("t", 64))
    kw = dict(mask=training_mask(q, None), window=change.get("window"),
              softcap=change.get("softcap"))
    with caplog.at_level(logging.WARNING, logger="jaxtune.kernels.pallas_gpu"):
        got = dot_product_attention(q, k, v, implementation="pallas_gpu", **kw)
    want = dot_product_attention(q, k, v, implementation="xla", **kw)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert "pallas_gpu attention falls back to XLA attention: " + note in caplog.text


def test_reasons_and_block_sizes():
    q, k, _ = _qkv(2, 2)
    assert unsupported_reason(q, k, None) is None
    assert unsupported_reason(q, k, T) is None  # a window the sequence long masks nothing
    assert unsupported_reason(q, k, jnp.asarray([4, 8])) is not None  # per-layer windows
    assert unsupported_reason(q, k[:, :128], None).startswith("query length")
    b = block_sizes(256, 64, jnp.float32)
    assert (b.block_q, b.block_k, b.block_q_dq, b.block_kv_dkv) == (128, 128, 32, 32)
    assert block_sizes(256, 128, jnp.float32).block_q == 64  # the 32 KiB tile
    assert block_sizes(256, 128, jnp.bfloat16).block_q == 128
    assert block_sizes(48, 64, jnp.float32).block_q == 16
    assert block_sizes(200, 64, jnp.float32) is None


def test_auto_picks_the_kernel_on_gpu_where_cudnn_does_not_apply(caplog):
    for note in (layers._auto_note, layers._softcap_note):  # once per process: start afresh
        note.cache_clear()
    assert resolve_attention_impl("auto", jnp.float32, 128) == "cpu_flash"  # CPU
    assert resolve_attention_impl("pallas_gpu", jnp.float32, 128) == "pallas_gpu"  # interpret
    with compiling_for("gpu"):
        assert resolve_attention_impl("auto", jnp.bfloat16, 128) == "cudnn"
        assert resolve_attention_impl("auto", jnp.float32, 128) == "pallas_gpu"
        assert resolve_attention_impl("auto", jnp.bfloat16, 256) == "pallas_gpu"
        with caplog.at_level(logging.WARNING):
            assert resolve_attention_impl("auto", jnp.float32, 80) == "xla"
            assert resolve_attention_impl("auto", jnp.float32, 128, softcap=True) == "xla"
    assert "Pallas GPU kernel cannot run: head dim 80" in caplog.text
    assert "cannot soft-cap" in caplog.text
    with compiling_for("tpu"):
        assert resolve_attention_impl("auto", jnp.float32, 128) == "splash"
    for note in (layers._auto_note, layers._softcap_note):  # leave them to other tests
        note.cache_clear()
