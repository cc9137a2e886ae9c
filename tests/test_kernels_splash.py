"""Splash attention in Pallas interpret mode (CPU) against the pure-XLA reference and the
model's own XLA attention: forward and gradients, float32, tiny shapes (256 tokens, block 128,
so the kernel walks a 2 x 2 grid of blocks and skips the one above the diagonal)."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.kernels import compiling_for, target_platform
from jaxtune.kernels.splash import reference_attention, splash_attention, unsupported_reason
from jaxtune.models.layers import dot_product_attention, resolve_attention_impl
from tests.kernel_helpers import assert_same_out_and_grads, out_and_grads, qkv, training_mask

T, H, BLOCK = 256, 64, 128


def _qkv(n: int, kv: int, seed: int = 0):
    return qkv(n, kv, rows=2, t=T, h=H, seed=seed)


def _packed_segments() -> jax.Array:
    """Row 0: three documents and trailing padding; row 1: two documents."""
    row0 = np.concatenate([np.full(100, 1), np.full(60, 2), np.full(70, 3), np.zeros(26)])
    row1 = np.concatenate([np.full(130, 1), np.full(126, 2)])
    return jnp.asarray(np.stack([row0, row1]), jnp.int32)


CASES = {
    "causal": dict(n=2, kv=2),
    "packed": dict(n=2, kv=2, segment_ids_BT=_packed_segments()),
    "window": dict(n=2, kv=2, window=96),
    "soft_cap": dict(n=2, kv=2, attn_logits_soft_cap=5.0),
    "gqa": dict(n=4, kv=2, segment_ids_BT=_packed_segments()),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_splash_matches_reference_forward_and_grads(case):
    opts = dict(CASES[case])
    q, k, v = _qkv(opts.pop("n"), opts.pop("kv"))
    seg, window = opts.pop("segment_ids_BT", None), opts.pop("window", None)
    def kernel(q, k, v):
        return splash_attention(q, k, v, segment_ids_BT=seg, window=window, interpret=True,
                                block=BLOCK, **opts)

    def ref(q, k, v):
        return reference_attention(q, k, v, segment_ids_BT=seg, window=window, **opts)

    assert_same_out_and_grads(out_and_grads(kernel, q, k, v), out_and_grads(ref, q, k, v))


def test_reference_equals_the_models_xla_attention():
    """The reference is the model's semantics (causal, packing, window, GQA)."""
    q, k, v = _qkv(4, 2)
    seg = _packed_segments()
    for window in (None, 96):
        want = jax.jit(lambda q, k, v, w=window: dot_product_attention(
            q, k, v, mask=training_mask(q, seg), window=w, implementation="xla"))(q, k, v)
        got = jax.jit(lambda q, k, v, w=window: reference_attention(
            q, k, v, segment_ids_BT=seg, window=w))(q, k, v)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_layers_dispatch_to_splash_and_match_xla():
    q, k, v = _qkv(2, 1)
    seg = _packed_segments()
    want = dot_product_attention(
            q, k, v, mask=training_mask(q, seg), window=None, implementation="xla")
    got = jax.jit(lambda q, k, v: dot_product_attention(
            q, k, v, mask=training_mask(q, seg), window=None, implementation="splash"))(q, k, v)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_unsupported_length_falls_back_to_xla_with_a_note(caplog):
    q, k, v = (x[:, :100] for x in _qkv(2, 2))
    with caplog.at_level(logging.WARNING, logger="jaxtune.kernels.splash"):
        got = dot_product_attention(
            q, k, v, mask=training_mask(q, None), window=None,
                                    implementation="splash")
    want = dot_product_attention(
            q, k, v, mask=training_mask(q, None), window=None, implementation="xla")
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert "sequence length 100 is not a multiple of 128" in caplog.text
    assert unsupported_reason(q, k, jnp.asarray([4, 8])) is not None  # array window
    assert unsupported_reason(*_qkv(2, 2)[:2], 96) is None


def test_auto_picks_splash_only_when_compiling_for_tpu():
    assert target_platform() == "cpu"
    assert resolve_attention_impl("auto", jnp.bfloat16, 128) == "xla"
    with compiling_for("tpu"):
        assert target_platform() == "tpu"
        assert resolve_attention_impl("auto", jnp.bfloat16, 128) == "splash"
        assert resolve_attention_impl("xla", jnp.bfloat16, 128) == "xla"
    with compiling_for("gpu"):
        assert resolve_attention_impl("auto", jnp.bfloat16, 128) == "cudnn"
        assert resolve_attention_impl("auto", jnp.float32, 128) == "pallas_gpu"
    assert target_platform() == "cpu"
