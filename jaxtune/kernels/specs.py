"""``shard_map`` specs for an attention kernel: rows and heads split over the mesh as the
logical rules say, whole sequences on every device.

Mosaic (splash) and Triton kernels cannot be partitioned by XLA, so each wrapper runs its
kernel inside ``shard_map`` with these specs; attention never mixes rows or KV groups, so each
device's share is exact on its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
from jax.sharding import PartitionSpec

from jaxtune.sharding import current_mesh_rules, logical_to_spec


def mesh_specs(q_BTNH, k_BSKH, *, heads_first: bool, kernel: str):
    """:func:`attention_specs` over the mesh and rules of the enclosing
    :func:`jaxtune.sharding.activation_rules`; ``(None, None)`` outside one (one device)."""
    current = current_mesh_rules()
    if current is None:
        return None, None
    return attention_specs(q_BTNH, k_BSKH, *current, heads_first=heads_first, kernel=kernel)


class Fallback(NamedTuple):
    """What :func:`spec_or_fallback` decided: run the kernel with ``spec`` (``out`` None), or
    return ``out``, the caller's XLA attention."""

    spec: Any
    out: jax.Array | None


def spec_or_fallback(kernel: str, reason: str | None, note: Callable[[str], None],
                     fallback: Callable[..., jax.Array] | None, q_BTNH, k_BSKH, v_BSKH, *,
                     segment_ids_BT, window, heads_first: bool,
                     mesh_label: str = "the kernel") -> Fallback:
    """The one decision every kernel wrapper makes: ``reason`` (why the kernel cannot take
    these inputs, or None), then whether the current mesh can split them (:func:`mesh_specs`,
    whose reason names ``mesh_label``). Where either says no, ``fallback`` (the same function
    in XLA ops) runs after ``note``; without a fallback that raises, naming ``kernel``."""
    spec = None
    if reason is None:
        spec, reason = mesh_specs(q_BTNH, k_BSKH, heads_first=heads_first, kernel=mesh_label)
    if reason is not None and fallback is not None:
        note(reason)
        return Fallback(None, fallback(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT=segment_ids_BT,
                                       window=window))
    if reason is not None:
        raise ValueError(f"{kernel} attention cannot run here: {reason}.")
    return Fallback(spec, None)


def shard_attention(local: Callable, spec, q, k, v, seg_BT):
    """``local(q, k, v, seg_BT)`` on each device's rows and heads as ``spec`` (from
    :func:`mesh_specs`) splits them, or once on the whole arrays when ``spec`` is None.
    ``seg_BT`` may be None (no packing): it is then not an operand of the ``shard_map``."""
    if spec is None:  # no mesh: one device (or a test)
        return local(q, k, v, seg_BT)
    mesh, q_spec, kv_spec, seg_spec = spec
    if seg_BT is None:
        body, in_specs, args = (lambda q, k, v: local(q, k, v, None)), (q_spec, kv_spec,
                                                                        kv_spec), ()
    else:
        body, in_specs, args = local, (q_spec, kv_spec, kv_spec, seg_spec), (seg_BT,)
    return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=q_spec,
                         check_vma=False)(q, k, v, *args)


def attention_specs(q_BTNH, k_BSKH, mesh, rules, *, heads_first: bool, kernel: str):
    """``((mesh, q_spec, kv_spec, seg_spec), None)`` for q ``[B, T, N, H]`` and k/v
    ``[B, S, K, H]`` laid out for the kernel as ``[B, N, T, H]`` (``heads_first``) or as they
    are; or ``(None, reason)`` when no split fits (the caller falls back to XLA and says why).
    """
    b, t, n, h = q_BTNH.shape
    kv = k_BSKH.shape[2]
    if heads_first:
        q_axes, kv_axes = ("batch", "heads", "seq", "head_dim"), ("batch", "kv_heads", "seq",
                                                                  "head_dim")
        q_shape, kv_shape, heads, seq = (b, n, t, h), (b, kv, t, h), 1, 2
    else:
        q_axes, kv_axes = ("batch", "seq", "heads", "head_dim"), ("batch", "seq", "kv_heads",
                                                                  "head_dim")
        q_shape, kv_shape, heads, seq = (b, t, n, h), (b, t, kv, h), 2, 1
    q_spec = logical_to_spec(q_axes, rules, mesh, q_shape)
    kv_spec = logical_to_spec(kv_axes, rules, mesh, kv_shape)
    q_parts, kv_parts = _pad(q_spec), _pad(kv_spec)
    if q_parts[0] != kv_parts[0]:
        return None, "query and key rows are split differently over the mesh"
    if q_parts[heads] != kv_parts[heads]:
        # Each device must hold whole KV groups: its query heads' keys and values.
        return None, (f"the {kv} KV heads cannot be split like the {n} query heads over mesh "
                      f"axes {q_parts[heads]} (make 'tensor' divide {math.gcd(n, kv)})")
    if any(p is not None for p in (q_parts[seq], q_parts[3], kv_parts[seq], kv_parts[3])):
        return None, f"the sequence or head dim is sharded ({kernel} needs whole sequences)"
    return (mesh, q_spec, kv_spec, PartitionSpec(q_parts[0], None)), None


def _pad(spec: PartitionSpec) -> tuple:
    parts = tuple(spec)
    return parts + (None,) * (4 - len(parts))
