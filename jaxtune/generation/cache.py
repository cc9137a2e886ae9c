"""The functional KV cache every family's model threads through its layers when generating.

Layout (left padding, see ``jaxtune.generation.loop``): ``S`` slots per row, the same slot
index for every row at every step. Keys and values are stacked on the layers axis,
``[L, B, S, K, H]`` in the model's compute dtype, so a scanned model carries them through its
``lax.scan`` and an unrolled one slices them per layer. Each slot also has a position and a
segment id, shared by all layers: an empty (or padding) slot has segment 0, which no real
query sees, so :class:`~jaxtune.models.layers.AttentionMask` over the slots is the whole
story (causality, padding, sliding windows).

Sliding-window layers keep only their window when the family says which they are (its
``kv_cache_layout()`` gives a window: ``(layers, kv_heads, head_dim, window)``): their keys
and values are a **ring** of ``min(window, S)`` slots, ``[L, B, W, K, H]``, as transformers'
sliding-window cache keeps the window, with each ring slot's own position and segment id
(``[L, B, W]``; :meth:`~jaxtune.models.layers.LayerKV.write_and_read`). The slot index is
still shared by every row (left padding), so token ``index`` lives in ring slot
``index % W``. A prompt longer than the window attends over itself in full, then the ring
keeps its last ``W`` tokens; each decoded token overwrites the one ``W`` positions before it,
which its window no longer sees. Full-attention layers keep every slot.

Sharding follows the logical rules: ``batch`` over data/fsdp, ``kv_heads`` over tensor,
``layers`` / ``seq`` / ``head_dim`` as the rules say (replicated by default).

A model whose layers differ in key/value geometry (Gemma 4: sliding and full layers with their
own head counts and head dims) keeps one stack per kind of layer: its ``kv_cache_layout()``
returns ``{kind: (layers, kv_heads, head_dim[, window])}`` and ``layers`` is then ``{kind:
LayerKV}`` (the model threads it through ``stack.apply_slots``). Gemma 2 / 3 keep their
sliding and full layers in two stacks this way (a ring and a full cache) though their
parameters are one stack. Layers that read another layer's keys
and values (Gemma 4's KV sharing) have no slots of their own.
"""

from __future__ import annotations

import inspect
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh

from jaxtune.models.layers import AttentionMask, LayerKV
from jaxtune.sharding import Rules, constrain, named_sharding

KV_AXES = ("layers", "batch", "seq", "kv_heads", "head_dim")
SLOT_AXES = ("batch", "seq")
RING_SLOT_AXES = ("layers", "batch", "seq")  # a ring's own slot positions / segment ids


@struct.dataclass
class KVCache:
    """Keys/values of every layer plus each slot's position and segment id.

    A family's model uses it in two calls (see ``jaxtune.models.family.CausalLM``)::

        mask, cache = cache.attend(positions_BT, segment_ids_BT)   # instead of causal()
        x, layers = apply_layers(..., cache=cache.layers)
        cache = cache.update(layers)
    """

    layers: LayerKV | dict[str, LayerKV]  # k/v [L, B, S or W, K, H]; index [L] (the same)
    positions_BS: jax.Array  # int32
    segment_ids_BS: jax.Array  # int32; 0 = empty slot or padding
    index: jax.Array  # int32 scalar: the next slot to write

    @property
    def num_slots(self) -> int:
        return self.positions_BS.shape[1]

    def attend(self, positions_BT: jax.Array, segment_ids_BT: jax.Array | None
               ) -> tuple[AttentionMask, KVCache]:
        """Claim slots ``index .. index + T - 1`` for ``T`` new tokens: the mask of those
        queries over every slot, and the cache whose layers write there."""
        b, t = positions_BT.shape
        if segment_ids_BT is None:
            segment_ids_BT = jnp.ones((b, t), jnp.int32)
        at = (0, self.index)
        pos_BS = jax.lax.dynamic_update_slice(self.positions_BS,
                                              positions_BT.astype(jnp.int32), at)
        seg_BS = jax.lax.dynamic_update_slice(self.segment_ids_BS,
                                              segment_ids_BT.astype(jnp.int32), at)
        pos_BS, seg_BS = constrain(pos_BS, SLOT_AXES), constrain(seg_BS, SLOT_AXES)
        layers = _at_index(self.layers, self.index)
        mask = AttentionMask(positions_BT, pos_BS, segment_ids_BT.astype(jnp.int32), seg_BS)
        return mask, self.replace(layers=layers, positions_BS=pos_BS, segment_ids_BS=seg_BS,
                                  index=self.index + t)

    def update(self, layers: LayerKV | dict[str, LayerKV]) -> KVCache:
        """The cache with the layers' updated keys and values (from ``apply_layers``)."""
        return self.replace(layers=layers)


def _at_index(layers: LayerKV | dict[str, LayerKV], index: jax.Array) -> Any:
    """Every layer's write index set to ``index``."""
    if isinstance(layers, dict):
        return {k: _at_index(v, index) for k, v in layers.items()}
    return layers.replace(index=jnp.full(layers.index.shape, index, jnp.int32))


#: ``(layers, kv_heads, head_dim)``, or with a sliding window ``(..., window)`` (a ring).
Layout = tuple[int, ...]


def cache_layout(model: Any, *, ring: bool = True) -> Layout | dict[str, Layout]:
    """``(num_layers, kv_heads, head_dim[, window])`` of a family's model: its
    ``kv_cache_layout()`` if it has one (a dict of them for a model with one cache stack per
    kind of layer), else its config's ``num_hidden_layers``, ``num_key_value_heads``,
    ``head_dim``. ``ring=False`` asks for a cache of every slot on every layer (a caller that
    builds its own single-stack cache, e.g. the scorer of shared prefixes)."""
    custom = getattr(model, "kv_cache_layout", None)
    if custom is not None:
        try:
            takes_ring = "ring" in inspect.signature(custom).parameters
        except (TypeError, ValueError):
            takes_ring = False
        layout = custom(ring=ring) if takes_ring else custom()
        if isinstance(layout, dict):
            return {k: _layout(v, ring) for k, v in layout.items()}
        return _layout(layout, ring)
    cfg = model.config
    kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers, kv, head_dim


def _layout(layout: Any, ring: bool) -> Layout:
    """A layout as a tuple, its window dropped when none is wanted (or it is None)."""
    layout = tuple(layout)
    if len(layout) == 4 and (not ring or layout[3] is None):
        return layout[:3]
    return layout


def ring_slots(layout: Layout, slots: int) -> int:
    """The slots a stack of ``layout`` keeps for ``slots`` tokens: its window, at most."""
    return min(layout[3], slots) if len(layout) == 4 else slots


def _kv_shardings(mesh: Mesh, rules: Rules | None, shape: tuple[int, ...], ring: bool
                  ) -> LayerKV:
    kv = named_sharding(mesh, KV_AXES, rules, shape)
    rep = named_sharding(mesh, None)
    if not ring:
        return LayerKV(kv, kv, rep)
    slots = named_sharding(mesh, RING_SLOT_AXES, rules, shape[:3])
    return LayerKV(kv, kv, rep, slots, slots)


def cache_shardings(mesh: Mesh | None, rules: Rules | None, shape: tuple[int, ...],
                    ring: bool = False, slots: int | None = None) -> Any:
    """Shardings of a :class:`KVCache` with k/v of ``shape`` (None without a mesh); ``ring``:
    the k/v are a ring (``shape[2]`` is the window) of a cache of ``slots`` slots."""
    if mesh is None:
        return None
    slot_shape = (shape[1], shape[2] if slots is None else slots)
    slot = named_sharding(mesh, SLOT_AXES, rules, slot_shape)
    rep = named_sharding(mesh, None)
    return KVCache(_kv_shardings(mesh, rules, shape, ring), slot, slot, rep)


def _kv_shape(layout: Layout, batch: int, slots: int) -> tuple[int, ...]:
    """``[L, B, S or W, K, H]`` of a stack of ``layout`` in a cache of ``slots`` slots."""
    n, kv_heads, head_dim = layout[:3]
    return n, batch, ring_slots(layout, slots), kv_heads, head_dim


def _empty_layer(layout: Layout, batch: int, slots: int, dtype: Any) -> LayerKV:
    shape = _kv_shape(layout, batch, slots)
    n = shape[0]
    zeros = jnp.zeros(shape, dtype)
    index = jnp.zeros((n,), jnp.int32)
    if len(layout) == 3:
        return LayerKV(zeros, zeros, index)
    ring = jnp.zeros(shape[:3], jnp.int32)
    return LayerKV(zeros, zeros, index, ring, ring)


def empty_cache(num_layers: int, batch: int, slots: int, kv_heads: int, head_dim: int,
                dtype: Any, mesh: Mesh | None = None, rules: Rules | None = None,
                window: int | None = None) -> KVCache:
    """A cache with every slot empty (segment 0), created directly with its shardings;
    with a ``window``, its keys and values are a ring of ``min(window, slots)`` slots."""
    layout = (num_layers, kv_heads, head_dim) + (() if window is None else (window,))

    def make() -> KVCache:
        return KVCache(_empty_layer(layout, batch, slots, dtype),
                       jnp.zeros((batch, slots), jnp.int32), jnp.zeros((batch, slots), jnp.int32),
                       jnp.zeros((), jnp.int32))

    if mesh is None:
        return jax.jit(make)()
    shape = _kv_shape(layout, batch, slots)
    return jax.jit(make, out_shardings=cache_shardings(mesh, rules, shape, window is not None,
                                                       slots))()


def empty_grouped_cache(layout: dict[str, Layout], batch: int, slots: int, dtype: Any,
                        mesh: Mesh | None = None, rules: Rules | None = None) -> KVCache:
    """:func:`empty_cache` with one key/value stack per kind of layer (``layout``: ``{kind:
    (layers, kv_heads, head_dim[, window])}``; a kind with a window is a ring)."""
    layout = {k: _layout(v, True) for k, v in layout.items()}

    def make() -> KVCache:
        layers = {k: _empty_layer(kind, batch, slots, dtype) for k, kind in layout.items()}
        return KVCache(layers, jnp.zeros((batch, slots), jnp.int32),
                       jnp.zeros((batch, slots), jnp.int32), jnp.zeros((), jnp.int32))

    if mesh is None:
        return jax.jit(make)()
    kinds = {k: _kv_shardings(mesh, rules, _kv_shape(lay, batch, slots), len(lay) == 4)
             for k, lay in layout.items()}
    slot = named_sharding(mesh, SLOT_AXES, rules, (batch, slots))
    shardings = KVCache(kinds, slot, slot, named_sharding(mesh, None))
    return jax.jit(make, out_shardings=shardings)()


def cache_bytes(cache: KVCache) -> int:
    """Bytes of a cache's arrays (what generating with it holds besides the model)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
