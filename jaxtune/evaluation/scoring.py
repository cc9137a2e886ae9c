"""The log-likelihood forward pass: one jitted call per packed batch, no generation.

``score(params, ids, positions, segment_ids, index, targets) -> (logp_BC, greedy_BC)``: the
model's hidden states over packed rows (``jaxtune.evaluation.packing``), then, only at the
scored positions ``index_BC``, each target token's log-probability and whether it is the
argmax. The vocabulary projection runs a slab of positions at a time (every row's next
``S`` scored positions), so ``[B, T, V]`` logits are never built: a slab's float32 logits
take ``4 * B * S * V`` bytes (about ``4 * chunk_size * V`` per device). Axis letters: B rows,
T row length, C scored positions per row, S positions per slab, K slabs, D embed, V vocab.

The executable is compiled once per shape bucket and reused for new parameters of the same
model (the training hook scores each evaluation's weights with the same programs).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxtune.models.family import hidden_states_and_aux
from jaxtune.sharding import (
    Rules,
    activation_rules,
    batch_axis_size,
    batch_sharding,
    constrain,
    host_array,
)

#: Scored tokens each device projects to the vocabulary at a time.
DEFAULT_CHUNK_SIZE = 512


def token_logprobs(unembed, hidden_BCD: jax.Array, targets_BC: jax.Array, *,
                   chunk_size: int = DEFAULT_CHUNK_SIZE, rows_per_device: int | None = None
                   ) -> tuple[jax.Array, jax.Array]:
    """Per-position ``log p(target)`` (float32) and ``argmax == target`` ``[B, C]``, the
    vocabulary projected one slab of positions at a time (rows keep their sharding)."""
    b, c, d = hidden_BCD.shape
    rows = rows_per_device or b
    s = max(1, min(c, chunk_size // max(1, rows)))
    k = -(-c // s)
    if k * s != c:
        hidden_BCD = jnp.pad(hidden_BCD, ((0, 0), (0, k * s - c), (0, 0)))
        targets_BC = jnp.pad(targets_BC, ((0, 0), (0, k * s - c)))
    hidden_KBSD = jnp.moveaxis(hidden_BCD.reshape(b, k, s, d), 1, 0)
    targets_KBS = jnp.moveaxis(targets_BC.reshape(b, k, s), 1, 0)

    def slab(_, xs):
        hidden_BSD, targets_BS = xs
        hidden_BSD = constrain(hidden_BSD, ("batch", "seq", "embed"))
        logits_BSV = unembed(hidden_BSD).astype(jnp.float32)
        lse_BS = jax.nn.logsumexp(logits_BSV, axis=-1)
        target_BS = jnp.take_along_axis(logits_BSV, targets_BS[..., None], axis=-1)[..., 0]
        # argmax, not "target logit is the max": ties go to the first index, as in torch.
        greedy_BS = jnp.argmax(logits_BSV, axis=-1).astype(jnp.int32) == targets_BS
        return None, (target_BS - lse_BS, greedy_BS)

    _, (logp_KBS, greedy_KBS) = jax.lax.scan(slab, None, (hidden_KBSD, targets_KBS))
    logp_BC = jnp.moveaxis(logp_KBS, 0, 1).reshape(b, k * s)[:, :c]
    greedy_BC = jnp.moveaxis(greedy_KBS, 0, 1).reshape(b, k * s)[:, :c]
    return logp_BC, greedy_BC


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def score(graphdef, ctx, chunk_size: int, state, ids_BT, positions_BT, segment_ids_BT,
          index_BC, targets_BC):
    """``(logp_BC, greedy_BC)`` of the targets at the scored positions of packed rows."""
    mesh, rules = ctx if ctx is not None else (None, None)
    rules = dict(rules) if rules else None
    with activation_rules(mesh, rules):
        model = nnx.merge(graphdef, state)
        hidden_BTD, _ = hidden_states_and_aux(model, ids_BT, positions_BT, segment_ids_BT)
        hidden_BCD = jnp.take_along_axis(hidden_BTD, index_BC[..., None], axis=1)
        rows = ids_BT.shape[0] // (batch_axis_size(mesh, rules) if mesh is not None else 1)
        return token_logprobs(model.unembed, hidden_BCD, targets_BC, chunk_size=chunk_size,
                              rows_per_device=rows)


def _cache_spec(model: nnx.Module, graphdef, state) -> tuple | None:
    """``((layers, kv heads, head dim), dtype)`` of the model's generation cache, or None
    for a family without one (it scores every request by packing)."""
    from jaxtune.generation.cache import cache_layout
    from jaxtune.generation.loop import supports_cache

    if not supports_cache(model):
        return None
    probe = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    dtype = jax.eval_shape(lambda st, ids: nnx.merge(graphdef, st).hidden_states(ids), state,
                           probe).dtype
    # One stack of every slot: the tails continue each prefix's cache (no ring needed for a
    # prefix and a short tail). A model with a stack per kind of layer scores by packing.
    layout = cache_layout(model, ring=False)
    if isinstance(layout, dict):
        return None
    return tuple(layout), jnp.dtype(dtype)


def _state_mesh(state: Any) -> Mesh | None:
    """The mesh the parameters are sharded over (None: plain single-device arrays)."""
    for leaf in jax.tree.leaves(state):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return sharding.mesh
    return None


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def score_shared(graphdef, ctx, chunk_size: int, cache_spec, state, prefix_ids_GP,
                 prefix_positions_GP, prefix_segment_ids_GP, group_R, tail_ids_RT,
                 tail_positions_RT, tail_segment_ids_RT, index_RC, targets_RC):
    """``(logp_RC, greedy_RC)`` of requests sharing contexts (``packing.SharedBatch``): each
    prefix runs once into a KV cache, each request's tail against its group's copy."""
    from jaxtune.generation.cache import KVCache
    from jaxtune.models.layers import LayerKV

    mesh, rules = ctx if ctx is not None else (None, None)
    rules = dict(rules) if rules else None
    (layers, kv_heads, head_dim), dtype = cache_spec
    g, p = prefix_ids_GP.shape
    r, t = tail_ids_RT.shape
    with activation_rules(mesh, rules):
        model = nnx.merge(graphdef, state)
        zeros = jnp.zeros((layers, g, p + t, kv_heads, head_dim), dtype)
        cache = KVCache(LayerKV(zeros, zeros, jnp.zeros((layers,), jnp.int32)),
                        jnp.zeros((g, p + t), jnp.int32), jnp.zeros((g, p + t), jnp.int32),
                        jnp.zeros((), jnp.int32))
        hidden_GPD, cache = model.hidden_states(prefix_ids_GP, prefix_positions_GP,
                                                prefix_segment_ids_GP, cache=cache)
        # Each tail row continues its group's cache (a copy per row: rows never see each
        # other, since each has its own cache row).
        rows = cache.replace(
            layers=cache.layers.replace(k_BSKH=cache.layers.k_BSKH[:, group_R],
                                        v_BSKH=cache.layers.v_BSKH[:, group_R]),
            positions_BS=cache.positions_BS[group_R],
            segment_ids_BS=cache.segment_ids_BS[group_R])
        hidden_RTD, _ = model.hidden_states(tail_ids_RT, tail_positions_RT,
                                            tail_segment_ids_RT, cache=rows)
        # Column 0: the prefix's last position (predicts the first continuation token).
        hidden_RXD = jnp.concatenate([hidden_GPD[group_R, -1][:, None], hidden_RTD], axis=1)
        hidden_RCD = jnp.take_along_axis(hidden_RXD, index_RC[..., None], axis=1)
        per_device = r // (batch_axis_size(mesh, rules) if mesh is not None else 1)
        return token_logprobs(model.unembed, hidden_RCD, targets_RC, chunk_size=chunk_size,
                              rows_per_device=per_device)


_COMPILED: dict[Any, Any] = {}
_MAX_COMPILED = 32


class Scorer:
    """The forward pass of one model: its parameters split once, on its mesh."""

    def __init__(self, model: nnx.Module, *, mesh: Mesh | None = None,
                 rules: Rules | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE):
        self.graphdef, self.state = nnx.split(model)
        self.mesh = mesh or _state_mesh(self.state)
        self.rules = rules
        self.ctx = None if self.mesh is None else (
            self.mesh, tuple(sorted(rules.items())) if rules else None)
        self.chunk_size = chunk_size
        self.row_multiple = 1 if self.mesh is None else batch_axis_size(self.mesh, rules)
        self.compiles = 0  # programs this scorer compiled (shape buckets)
        self._state_key = tuple((x.shape, x.dtype, getattr(x, "sharding", None))
                                for x in jax.tree.leaves(self.state))
        self.cache_spec = _cache_spec(model, self.graphdef, self.state)

    def _put(self, x: np.ndarray) -> jax.Array:
        if self.mesh is None:
            return jnp.asarray(x)
        sharding = batch_sharding(self.mesh, self.rules, x.ndim)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    def __call__(self, ids_BT, positions_BT, segment_ids_BT, index_BC, targets_BC
                 ) -> tuple[np.ndarray, np.ndarray]:
        """Packed rows: host arrays in (the same on every process), host arrays out."""
        return self._run(score, (self.graphdef, self.ctx, self.chunk_size),
                         ids_BT, positions_BT, segment_ids_BT, index_BC, targets_BC)

    def shared(self, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Requests sharing contexts (``SharedBatch.arrays()``), through the KV cache."""
        if self.cache_spec is None:
            raise ValueError("this family's hidden_states takes no cache")
        names = ("prefix_ids_GP", "prefix_positions_GP", "prefix_segment_ids_GP", "group_R",
                 "tail_ids_RT", "tail_positions_RT", "tail_segment_ids_RT", "index_RC",
                 "targets_RC")
        return self._run(score_shared, (self.graphdef, self.ctx, self.chunk_size,
                                        self.cache_spec), *(arrays[n] for n in names))

    def _run(self, fn, static: tuple, *host: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        args = [self._put(np.asarray(a, np.int32)) for a in host]
        key = (fn, static, self._state_key, tuple((a.shape, a.sharding) for a in args))
        compiled = _COMPILED.get(key)
        if compiled is None:
            compiled = fn.lower(*static, self.state, *args).compile()
            self.compiles += 1
            if len(_COMPILED) >= _MAX_COMPILED:
                _COMPILED.pop(next(iter(_COMPILED)))
            _COMPILED[key] = compiled
        logp, greedy = compiled(self.state, *args)
        return host_array(logp), host_array(greedy)
