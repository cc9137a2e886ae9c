"""Splash attention (jax's Pallas TPU kernel) for training, with a pure-XLA reference beside it.

Axis letters: B batch, T query length, S key length, N query heads, K key/value heads, H head
dim.

:func:`splash_attention` is what ``attention: splash`` (and ``auto`` on TPU) runs: causal
grouped-query attention with packing (segment ids), an optional sliding window and optional
logit soft-capping. Mosaic kernels cannot be partitioned by XLA, so the kernel runs inside
``shard_map`` over the mesh of the enclosing :func:`jaxtune.sharding.activation_rules`: rows
split as the ``batch`` rule says, query and key/value heads as the ``heads`` / ``kv_heads``
rules say (``tensor`` by default). Each device then runs the kernel over its own rows and
heads, which is exact because attention never mixes rows or KV groups.

On a TPU target the kernel is compiled by Mosaic; on any other platform it runs in Pallas'
interpret mode (slow, for tests on CPU). A case the kernel cannot take falls back to the
caller's XLA attention with a one-line note naming the reason (see
:func:`unsupported_reason`).

:func:`reference_attention` is the same maths in plain ``jnp`` (float32 softmax), which the
interpret-mode tests compare the kernel with, forward and backward.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxtune.kernels import target_platform
from jaxtune.kernels.specs import shard_attention, spec_or_fallback

log = logging.getLogger(__name__)

#: The kernel's lane width: sequence blocks are multiples of it.
LANES = 128
#: Largest block tried first (MaxText's default for training on v4/v5).
MAX_BLOCK = 512


# --------------------------------------------------------------------------- reference


def reference_attention(
    q_BTNH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    *,
    segment_ids_BT: jax.Array | None = None,
    window: int | None = None,
    attn_logits_soft_cap: float | None = None,
    scale: float | None = None,
) -> jax.Array:
    """Causal GQA attention in plain XLA: the semantics :func:`splash_attention` must match.

    A query at position t sees keys s <= t of its own segment, and with ``window`` only
    ``t - s < window``. Logits are ``scale * q.k`` (default ``1/sqrt(H)``), then
    ``cap * tanh(logits / cap)`` when soft-capped, softmax in float32.
    """
    b, t, n, h = q_BTNH.shape
    s, kv = k_BSKH.shape[1], k_BSKH.shape[2]
    scale = h ** -0.5 if scale is None else scale
    q_BTKGH = q_BTNH.reshape(b, t, kv, n // kv, h)
    logits_BKGTS = jnp.einsum("BTKGH,BSKH->BKGTS", q_BTKGH, k_BSKH,
                              preferred_element_type=jnp.float32) * scale
    if attn_logits_soft_cap is not None:
        logits_BKGTS = attn_logits_soft_cap * jnp.tanh(logits_BKGTS / attn_logits_soft_cap)
    q_pos, k_pos = jnp.arange(t)[:, None], jnp.arange(s)[None, :]
    mask_BTS = jnp.broadcast_to(q_pos >= k_pos, (b, t, s))
    if window is not None:
        mask_BTS = mask_BTS & (q_pos - k_pos < window)
    if segment_ids_BT is not None:
        mask_BTS = mask_BTS & (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])
    logits_BKGTS = jnp.where(mask_BTS[:, None, None], logits_BKGTS, -1e30)
    probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(v_BSKH.dtype)
    out_BTKGH = jnp.einsum("BKGTS,BSKH->BTKGH", probs_BKGTS, v_BSKH)
    return out_BTKGH.reshape(b, t, n, h)


# --------------------------------------------------------------------------- the kernel


def block_size(seq_len: int) -> int:
    """The largest of 512, 256, 128 that divides ``seq_len`` (0 when none does)."""
    for block in (MAX_BLOCK, 256, LANES):
        if seq_len % block == 0:
            return block
    return 0


def unsupported_reason(q_BTNH: jax.Array, k_BSKH: jax.Array, window: Any) -> str | None:
    """Why the kernel cannot take these inputs (None when it can)."""
    t, s = q_BTNH.shape[1], k_BSKH.shape[1]
    if t != s:
        return f"query length {t} differs from key length {s} (the kernel is for training)"
    if block_size(t) == 0:
        return f"sequence length {t} is not a multiple of {LANES}"
    if window is not None and not isinstance(window, int):
        return ("a per-layer window array (scanned layers that mix sliding and full "
                "attention) is not a static mask")
    if q_BTNH.shape[-1] != k_BSKH.shape[-1]:
        return "query and key head dims differ"
    return None


@functools.lru_cache(maxsize=32)
def _note(reason: str) -> None:
    log.warning("splash attention falls back to XLA attention: %s.", reason)


@functools.lru_cache(maxsize=64)
def _make_kernel(heads: int, seq_len: int, window: int | None, soft_cap: float | None,
                 interpret: bool, block: int):
    """One kernel per (heads, length, window, cap): mask processing is numpy work at trace."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    if window is None:
        mask = sa.CausalMask((seq_len, seq_len))
    else:  # itself and the window - 1 tokens before it
        mask = sa.LocalMask((seq_len, seq_len), window_size=(window - 1, 0), offset=0)
    b = block
    blocks = sa.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                           block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    # Concrete mask arrays even when first built under a trace: the kernel is cached.
    with jax.ensure_compile_time_eval():
        return sa.make_splash_mha(sa.MultiHeadMask([mask] * heads), block_sizes=blocks,
                                  head_shards=1, q_seq_shards=1, attn_logits_soft_cap=soft_cap,
                                  interpret=interpret)


def _local_splash(q_BNTH, k_BKSH, v_BKSH, seg_BT, *, window, soft_cap, interpret, block):
    """The kernel over one device's rows and heads (``[B, N, T, H]`` layout)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    kernel = _make_kernel(q_BNTH.shape[1], q_BNTH.shape[2], window, soft_cap, interpret,
                          block or block_size(q_BNTH.shape[2]))
    if seg_BT is None:
        return jax.vmap(kernel)(q_BNTH, k_BKSH, v_BKSH)
    return jax.vmap(lambda q, k, v, seg: kernel(q, k, v, segment_ids=SegmentIds(seg, seg)))(
        q_BNTH, k_BKSH, v_BKSH, seg_BT)


def splash_attention(
    q_BTNH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    *,
    segment_ids_BT: jax.Array | None,
    window: int | jax.Array | None,
    fallback: Callable[..., jax.Array] | None = None,
    attn_logits_soft_cap: float | None = None,
    scale: float | None = None,
    interpret: bool | None = None,
    block: int | None = None,
) -> jax.Array:
    """Causal GQA attention by the splash kernel, sharded over the current mesh.

    Same contract as :func:`jaxtune.models.layers.dot_product_attention` (and
    :func:`reference_attention`). ``fallback(q, k, v, segment_ids_BT=..., window=...)`` runs
    when the kernel cannot (see :func:`unsupported_reason`); without one that case raises.
    ``interpret`` defaults to "not compiling for TPU"; ``block`` (a multiple of 128 dividing
    the length) overrides :func:`block_size` for every kernel block.
    """
    # The fallback computes the same function (soft cap and scale included: the caller's).
    spec, out = spec_or_fallback("splash", unsupported_reason(q_BTNH, k_BSKH, window), _note,
                                 fallback, q_BTNH, k_BSKH, v_BSKH, segment_ids_BT=segment_ids_BT,
                                 window=window, heads_first=True, mesh_label="splash")
    if out is not None:
        return out
    if interpret is None:
        interpret = target_platform() != "tpu"
    h = q_BTNH.shape[-1]
    scale = h ** -0.5 if scale is None else scale
    # The kernel takes unscaled logits: scale q once (in its dtype, as XLA's attention does).
    q_BNTH = jnp.swapaxes(q_BTNH * jnp.asarray(scale, q_BTNH.dtype), 1, 2)
    k_BKSH, v_BKSH = jnp.swapaxes(k_BSKH, 1, 2), jnp.swapaxes(v_BSKH, 1, 2)
    seg_BT = None if segment_ids_BT is None else segment_ids_BT.astype(jnp.int32)
    if block is not None and (block % LANES or q_BTNH.shape[1] % block):
        raise ValueError(f"block {block} must be a multiple of {LANES} dividing the sequence "
                         f"length {q_BTNH.shape[1]}.")
    local = functools.partial(_local_splash, window=window, soft_cap=attn_logits_soft_cap,
                              interpret=interpret, block=block)
    out_BNTH = shard_attention(local, spec, q_BNTH, k_BKSH, v_BKSH, seg_BT)
    return jnp.swapaxes(out_BNTH, 1, 2)
