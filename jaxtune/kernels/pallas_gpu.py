"""Flash attention on GPU by jax's Pallas Triton kernel, for what cuDNN's fused kernel refuses.

Axis letters: B batch, T query length, S key length, N query heads, K key/value heads, H head
dim.

:func:`pallas_gpu_attention` is what ``attention: pallas_gpu`` runs, and what ``auto`` takes
on a GPU target where cuDNN cannot run (float32 compute, a head dim above 128): causal
grouped-query attention with packing (segment ids), by
``jax.experimental.pallas.ops.gpu.attention.mha`` (the maintained kernel, forward and a fused
Triton backward under its own custom VJP; nothing here is a kernel of ours). The kernel wants
as many key/value heads as query heads, so each KV head is repeated over its group of query
heads: exact, and the gradient of the repeat sums the group's key/value gradients.

As for splash (:mod:`jaxtune.kernels.splash`), XLA cannot partition a Pallas call, so the
kernel runs inside ``shard_map`` over the mesh of the enclosing
:func:`jaxtune.sharding.activation_rules`: rows split as the ``batch`` rule says, query and
key/value heads as the ``heads`` / ``kv_heads`` rules say; exact because attention never mixes
rows or KV groups. When the program is compiled for a GPU the kernel is lowered to Triton; on
any other platform it runs in Pallas' interpret mode (slow, for tests on CPU). A case the kernel
cannot take (sliding window, soft-capping, a head dim Triton's tiles cannot take, a length no
block divides) falls back to the caller's XLA attention with a one-line note naming the reason
(see :func:`unsupported_reason`).

Block sizes (:func:`block_sizes`) are the kernel's defaults (128 forward, 32 backward) cut down
to divide the sequence, and the forward tile to fit 32 KiB for wide heads in float32. They are
not tuned on hardware.
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

#: Forward blocks tried, largest first (the kernel's default is 128); Triton's dot needs >= 16.
FORWARD_BLOCKS = (128, 64, 32, 16)
#: Backward blocks tried (the kernel's default is 32 for all four backward blocks).
BACKWARD_BLOCKS = (32, 16)
#: Largest forward tile ``block x H`` in bytes: keeps q, k and v tiles of a wide float32 head
#: (H = 256, or 128 in float32) within an SM's shared memory.
MAX_TILE_BYTES = 32 * 1024
#: Head dims the kernel's tiles take: powers of two (Triton block shapes) in this range.
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
DTYPES = ("float32", "bfloat16", "float16")


def static_reason(dtype: Any, head_dim: int) -> str | None:
    """Why the kernel cannot run for this compute dtype and head dim at all (None when it can):
    what :func:`jaxtune.models.layers.resolve_attention_impl` can know before tracing."""
    if jnp.dtype(dtype).name not in DTYPES:
        return f"compute dtype {jnp.dtype(dtype).name} is not one of {', '.join(DTYPES)}"
    if head_dim & (head_dim - 1) or not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        return (f"head dim {head_dim} is not a power of two in {MIN_HEAD_DIM}..{MAX_HEAD_DIM} "
                "(Triton's tile shapes)")
    return None


def block_sizes(seq_len: int, head_dim: int, dtype: Any, block: int | None = None):
    """The kernel's ``BlockSizes`` for this length, or None when no block divides it.

    Forward: the largest of :data:`FORWARD_BLOCKS` dividing ``seq_len`` whose ``block x H`` tile
    fits :data:`MAX_TILE_BYTES` (or ``block`` when given). Backward: the largest of
    :data:`BACKWARD_BLOCKS` dividing ``seq_len``, no larger than the forward block; the fused
    backward needs its query and key blocks equal when queries are the keys.
    """
    from jax.experimental.pallas.ops.gpu.attention import BlockSizes

    itemsize = jnp.dtype(dtype).itemsize
    fits = [b for b in FORWARD_BLOCKS if seq_len % b == 0]
    if block is not None:
        forward = block if block in FORWARD_BLOCKS and seq_len % block == 0 else 0
    else:
        small = [b for b in fits if b * head_dim * itemsize <= MAX_TILE_BYTES]
        forward = (small or fits[-1:] or [0])[0]
    backward = next((b for b in BACKWARD_BLOCKS if seq_len % b == 0 and b <= forward), 0)
    if not forward or not backward:
        return None
    return BlockSizes(block_q=forward, block_k=forward, block_q_dkv=backward,
                      block_kv_dkv=backward, block_q_dq=backward, block_kv_dq=backward)


def unsupported_reason(q_BTNH: jax.Array, k_BSKH: jax.Array, window: Any,
                       softcap: float | None = None) -> str | None:
    """Why the kernel cannot take these inputs (None when it can)."""
    t, s, h = q_BTNH.shape[1], k_BSKH.shape[1], q_BTNH.shape[-1]
    if t != s:
        return f"query length {t} differs from key length {s} (the kernel is for training)"
    if window is not None and not (isinstance(window, int) and window >= t):
        # A static window at least the sequence long masks nothing: the kernel is exact then.
        return "a sliding window (the kernel has causal and segment masks only)"
    if softcap is not None:
        return "logit soft-capping (the kernel has none)"
    if h != k_BSKH.shape[-1]:
        return "query and key head dims differ"
    reason = static_reason(q_BTNH.dtype, h)
    if reason is not None:
        return reason
    if block_sizes(t, h, q_BTNH.dtype) is None:
        return f"sequence length {t} is not a multiple of {FORWARD_BLOCKS[-1]}"
    return None


@functools.lru_cache(maxsize=32)
def _note(reason: str) -> None:
    log.warning("pallas_gpu attention falls back to XLA attention: %s.", reason)


def _local_mha(q_BTNH, k_BSKH, v_BSKH, seg_BT, *, scale, blocks, interpret):
    """The kernel over one device's rows and heads: KV heads repeated up to the query heads."""
    from jax.experimental.pallas.ops.gpu.attention import mha

    groups = q_BTNH.shape[2] // k_BSKH.shape[2]
    if groups > 1:  # query head n reads KV head n // groups, as the model's reshape does
        k_BSKH = jnp.repeat(k_BSKH, groups, axis=2)
        v_BSKH = jnp.repeat(v_BSKH, groups, axis=2)
    return mha(q_BTNH, k_BSKH, v_BSKH, seg_BT, sm_scale=scale, causal=True,
               block_sizes=blocks, interpret=interpret)


def pallas_gpu_attention(
    q_BTNH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    *,
    segment_ids_BT: jax.Array | None,
    window: int | jax.Array | None = None,
    softcap: float | None = None,
    fallback: Callable[..., jax.Array] | None = None,
    scale: float | None = None,
    interpret: bool | None = None,
    block: int | None = None,
) -> jax.Array:
    """Causal GQA attention by the Pallas Triton kernel, sharded over the current mesh.

    Same contract as :func:`jaxtune.models.layers.dot_product_attention` (and
    :func:`jaxtune.kernels.splash.reference_attention`). ``fallback(q, k, v, segment_ids_BT=...,
    window=...)`` runs when the kernel cannot (see :func:`unsupported_reason`); without one that
    case raises. ``interpret`` defaults to "not compiling for GPU"; ``block`` (one of
    :data:`FORWARD_BLOCKS` dividing the length) overrides the forward block.
    """
    reason = unsupported_reason(q_BTNH, k_BSKH, window, softcap)
    t, h = q_BTNH.shape[1], q_BTNH.shape[-1]
    blocks = None if reason is not None else block_sizes(t, h, q_BTNH.dtype, block)
    if reason is None and blocks is None:
        raise ValueError(f"block {block} must be one of {FORWARD_BLOCKS} dividing the sequence "
                         f"length {t}.")
    # The fallback computes the same function (soft cap, window and scale: the caller's).
    spec, out = spec_or_fallback("pallas_gpu", reason, _note, fallback, q_BTNH, k_BSKH, v_BSKH,
                                 segment_ids_BT=segment_ids_BT, window=window, heads_first=False)
    if out is not None:
        return out
    if interpret is None:
        interpret = target_platform() != "gpu"
    scale = h ** -0.5 if scale is None else float(scale)
    seg_BT = None if segment_ids_BT is None else segment_ids_BT.astype(jnp.int32)
    local = functools.partial(_local_mha, scale=scale, blocks=blocks, interpret=interpret)
    return shard_attention(local, spec, q_BTNH, k_BSKH, v_BSKH, seg_BT)


