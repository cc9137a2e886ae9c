"""RoPE: ``apply_rope`` is transformers' ``rotate_half`` rotation, bit for bit the half-wise
formula (its one-pass form must not change a number), and equal to transformers' own."""

import jax.numpy as jnp
import numpy as np

from jaxtune.models.layers import RopeParameters, apply_rope, rope_cos_sin


def _inputs(b=2, t=7, n=3, h=10):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((b, t, n, h)).astype(np.float32)
    positions = np.stack([np.arange(t), np.r_[np.arange(4), np.arange(t - 4)]]).astype(np.int32)
    rope = RopeParameters.from_hf({"rope_theta": 10000.0}, max_position_embeddings=64)
    cos, sin = rope_cos_sin(jnp.asarray(positions), rope, h, jnp.float32)
    return x, np.asarray(cos), np.asarray(sin)


def test_rope_is_the_half_wise_rotation_bit_for_bit():
    x, cos, sin = _inputs()
    x1, x2 = np.split(x, 2, axis=-1)
    c, s = cos[:, :, None], sin[:, :, None]
    expected = np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
    np.testing.assert_array_equal(np.asarray(apply_rope(jnp.asarray(x), cos, sin)), expected)


def test_rope_matches_transformers():
    import torch
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    x, cos, sin = _inputs()
    # transformers: [B, N, T, H] with full-width tables [B, T, H].
    xt = torch.from_numpy(x).transpose(1, 2)
    cos_full = torch.from_numpy(np.concatenate([cos, cos], -1))
    sin_full = torch.from_numpy(np.concatenate([sin, sin], -1))
    q, _ = apply_rotary_pos_emb(xt, xt, cos_full, sin_full)
    np.testing.assert_allclose(np.asarray(apply_rope(jnp.asarray(x), cos, sin)),
                               q.transpose(1, 2).numpy(), rtol=1e-6, atol=1e-6)
