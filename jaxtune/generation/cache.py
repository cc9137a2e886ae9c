"""The functional KV cache every family's model threads through its layers when generating.

Layout (left padding, see ``jaxtune.generation.loop``): ``S`` slots per row, the same slot
index for every row at every step. Keys and values are stacked on the layers axis,
``[L, B, S, K, H]`` in the model's compute dtype, so a scanned model carries them through its
``lax.scan`` and an unrolled one slices them per layer. Each slot also has a position and a
segment id, shared by all layers: an empty (or padding) slot has segment 0, which no real
query sees, so :class:`~jaxtune.models.layers.AttentionMask` over the slots is the whole
story (causality, padding, sliding windows).

Sliding-window layers keep the full ``S`` slots (no ring buffer): the window is applied in the
mask from the slot positions, exactly as in training. A ring buffer would save memory only
for windows shorter than prompt + answer and needs per-layer slot bookkeeping under scan;
it is left out for correctness first.

Sharding follows the logical rules: ``batch`` over data/fsdp, ``kv_heads`` over tensor,
``layers`` / ``seq`` / ``head_dim`` as the rules say (replicated by default).

A model whose layers differ in key/value geometry (Gemma 4: sliding and full layers with their
own head counts and head dims) keeps one stack per kind of layer: its ``kv_cache_layout()``
returns ``{kind: (layers, kv_heads, head_dim)}`` and ``layers`` is then ``{kind: LayerKV}``
(the model threads it through ``stack.apply_slots``). Layers that read another layer's keys
and values (Gemma 4's KV sharing) have no slots of their own.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh

from jaxtune.models.layers import AttentionMask, LayerKV
from jaxtune.sharding import Rules, constrain, named_sharding

KV_AXES = ("layers", "batch", "seq", "kv_heads", "head_dim")
SLOT_AXES = ("batch", "seq")


@struct.dataclass
class KVCache:
    """Keys/values of every layer plus each slot's position and segment id.

    A family's model uses it in two calls (see ``jaxtune.models.family.CausalLM``)::

        mask, cache = cache.attend(positions_BT, segment_ids_BT)   # instead of causal()
        x, layers = apply_layers(..., cache=cache.layers)
        cache = cache.update(layers)
    """

    layers: LayerKV | dict[str, LayerKV]  # k/v [L, B, S, K, H]; index [L] (the same value)
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


Layout = tuple[int, int, int]


def cache_layout(model: Any) -> Layout | dict[str, Layout]:
    """``(num_layers, kv_heads, head_dim)`` of a family's model: its ``kv_cache_layout()`` if
    it has one (a dict of them for a model with one cache stack per kind of layer), else its
    config's ``num_hidden_layers``, ``num_key_value_heads``, ``head_dim``."""
    custom = getattr(model, "kv_cache_layout", None)
    if custom is not None:
        layout = custom()
        if isinstance(layout, dict):
            return {k: tuple(v) for k, v in layout.items()}
        return tuple(layout)
    cfg = model.config
    kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers, kv, head_dim


def cache_shardings(mesh: Mesh | None, rules: Rules | None, shape: tuple[int, ...]) -> Any:
    """Shardings of a :class:`KVCache` with k/v of ``shape`` (None without a mesh)."""
    if mesh is None:
        return None
    kv = named_sharding(mesh, KV_AXES, rules, shape)
    slots = named_sharding(mesh, SLOT_AXES, rules, shape[1:3])
    rep = named_sharding(mesh, None)
    return KVCache(LayerKV(kv, kv, rep), slots, slots, rep)


def empty_cache(num_layers: int, batch: int, slots: int, kv_heads: int, head_dim: int,
                dtype: Any, mesh: Mesh | None = None, rules: Rules | None = None) -> KVCache:
    """A cache with every slot empty (segment 0), created directly with its shardings."""
    shape = (num_layers, batch, slots, kv_heads, head_dim)

    def make() -> KVCache:
        zeros = jnp.zeros(shape, dtype)
        return KVCache(LayerKV(zeros, zeros, jnp.zeros((num_layers,), jnp.int32)),
                       jnp.zeros((batch, slots), jnp.int32), jnp.zeros((batch, slots), jnp.int32),
                       jnp.zeros((), jnp.int32))

    if mesh is None:
        return jax.jit(make)()
    return jax.jit(make, out_shardings=cache_shardings(mesh, rules, shape))()


def empty_grouped_cache(layout: dict[str, Layout], batch: int, slots: int, dtype: Any,
                        mesh: Mesh | None = None, rules: Rules | None = None) -> KVCache:
    """:func:`empty_cache` with one key/value stack per kind of layer (``layout``: ``{kind:
    (layers, kv_heads, head_dim)}``)."""
    shapes = {k: (n, batch, slots, kv, h) for k, (n, kv, h) in layout.items()}

    def make() -> KVCache:
        layers = {k: LayerKV(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                             jnp.zeros((shape[0],), jnp.int32)) for k, shape in shapes.items()}
        return KVCache(layers, jnp.zeros((batch, slots), jnp.int32),
                       jnp.zeros((batch, slots), jnp.int32), jnp.zeros((), jnp.int32))

    if mesh is None:
        return jax.jit(make)()
    per_kind = {k: cache_shardings(mesh, rules, shape) for k, shape in shapes.items()}
    first = next(iter(per_kind.values()))
    shardings = KVCache({k: c.layers for k, c in per_kind.items()}, first.positions_BS,
                        first.segment_ids_BS, first.index)
    return jax.jit(make, out_shardings=shardings)()
