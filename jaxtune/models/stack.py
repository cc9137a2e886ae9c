"""The decoder-layer stack every family reuses: a list of layers or one scanned module.

:func:`make_layers` builds ``num_layers`` layers with one ``make_layer(rngs)``. With
``scan_layers`` the layers are one stacked module (each parameter gets a leading ``layers``
axis) that :func:`apply_layers` runs by ``jax.lax.scan``, so compile time does not grow with
depth; otherwise an ``nnx.List``. Either way each layer can be rematerialised (``remat``
policies below).

Layers may differ, as data rather than code (MaxText's ``if decoder_block == ...`` chains are
what this avoids): ``layer_args`` gives each layer its own keyword arguments (a sliding
window on some layers, a RoPE table, a soft-cap). Under scan, an argument that is the same for
every layer stays a static Python value. Arguments that vary in a repeating pattern (Gemma's
five sliding layers then one full) are scanned over blocks of the pattern: the scan's body
runs one block, each of its layers with its own arguments as static values, so a fused
attention kernel sees a static window on every layer (:func:`block_runs`, :func:`apply_slots`).
Only when no short pattern repeats is a varying argument stacked into an array ``[L]`` and
scanned over, so the layer must accept either (e.g. a window as an int or a traced int).

:func:`apply_slots` is the general form: layers kept in several stacked modules (one per kind
of layer, each with its own parameter shapes: Gemma 4's sliding and full layers), each layer
a :class:`Slot` (its module, its index there, its static arguments). The scan runs blocks of
the repeating pattern; a layer outside any repeat runs on its own.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtune.errors import JaxtuneError
from jaxtune.kernels import KERNEL_RESIDUALS

_policies = jax.checkpoint_policies
# A fused attention kernel's output and log-sum-exp are what its backward reads: keeping them
# costs one [B, T, N, H] array a layer and saves running the kernel's forward again.
_KERNEL_RESIDUALS = _policies.save_only_these_names(KERNEL_RESIDUALS)
REMAT_POLICIES = {
    "none": None,
    "full": _policies.nothing_saveable,  # keep only each layer's input
    # keep every matmul output
    "dots_saveable": _policies.save_from_both_policies(_policies.dots_saveable,
                                                       _KERNEL_RESIDUALS),
    # keep weight-matmul outputs, recompute attention scores and elementwise ops
    "minimal": _policies.save_from_both_policies(_policies.dots_with_no_batch_dims_saveable,
                                                 _KERNEL_RESIDUALS),
}


def check_remat(remat: str) -> None:
    if remat not in REMAT_POLICIES:
        raise JaxtuneError(f"remat='{remat}' is not one of {', '.join(REMAT_POLICIES)}.")


def prepend_layers_axis(module: nnx.Module) -> None:
    """Add ``layers`` in front of every variable's logical axes (after stacking by vmap)."""
    for _, var in nnx.iter_graph(module):
        if isinstance(var, nnx.Variable):
            axes = var.get_metadata().get("logical_axes")
            if axes is not None:
                var.set_metadata(logical_axes=("layers",) + tuple(axes))


def _apply(graphdef, static_kwargs, state, x, args, varying_kwargs):
    # A pure function of the layer's state, so jax.checkpoint / lax.scan can wrap it.
    layer = nnx.merge(graphdef, state)
    return layer(x, *args, **static_kwargs, **varying_kwargs)


def _apply_row(graphdef, static_kwargs, states, row, x, args, varying_kwargs):
    """:func:`_apply` of row ``row`` of stacked ``states`` (None: ``states`` is one layer's),
    the row taken inside. Under a checkpoint its inputs are what remat saves per layer: the
    stack, as the scan passes it on, rather than each layer's weights taken outside, which
    the scan could save as a stacked copy of every layer's weights."""
    state = states if row is None else _take_params(states, row)
    return _apply(graphdef, static_kwargs, state, x, args, varying_kwargs)


def make_layers(make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int, *,
                scan_layers: bool, rngs: nnx.Rngs) -> nnx.Module:
    """``num_layers`` layers built by ``make_layer(rngs)``: one stacked module (scan) or an
    ``nnx.List``. The family stores the result where HF keeps its layers (``model.layers``), so
    parameter paths follow HF names in both layouts."""
    if scan_layers:
        @nnx.split_rngs(splits=num_layers)
        @nnx.vmap(in_axes=0, out_axes=0)
        def stacked(rngs: nnx.Rngs) -> nnx.Module:
            return make_layer(rngs)

        layers = stacked(rngs)
        prepend_layers_axis(layers)
        return layers
    return nnx.List([make_layer(rngs) for _ in range(num_layers)])


def apply_layers(layers: nnx.Module, x: jax.Array, *args: Any, num_layers: int,
                 scan_layers: bool, remat: str,
                 layer_args: Sequence[Mapping[str, Any]] | None = None,
                 cache: Any = None) -> jax.Array | tuple[jax.Array, Any]:
    """``x = layer_i(x, *args, **layer_args[i])`` for every layer, in order, scanned when the
    layers are stacked, each rematerialised by the ``remat`` policy.

    ``cache`` (generation): a pytree whose every leaf has a leading ``[L]`` axis (e.g. the
    ``layers`` of ``jaxtune.generate.cache.KVCache``). Layer ``i`` is then called with
    ``cache=`` its slice and must return ``(x, its updated slice)``; the result is
    ``(x, the updated stacked cache)``. Without a cache nothing changes (training)."""
    check_remat(remat)
    layer_args = list(layer_args or [{}] * num_layers)
    if len(layer_args) != num_layers:
        raise JaxtuneError(f"{len(layer_args)} layer_args for {num_layers} layers.")
    policy = REMAT_POLICIES[remat]
    if cache is not None:
        if scan_layers and block_runs(layer_args) is not None:
            x, group_cache = apply_slots({"": layers}, x, *args, slots=_slots(layer_args),
                                         remat=remat, scan_layers=True, cache={"": cache})
            return x, group_cache[""]
        return _apply_layers_cached(layers, x, args, num_layers, scan_layers, policy, remat,
                                    layer_args, cache)
    if scan_layers and block_runs(layer_args) is not None:
        return apply_slots({"": layers}, x, *args, slots=_slots(layer_args), remat=remat,
                           scan_layers=True)
    if not scan_layers:
        for layer, kwargs in zip(layers, layer_args, strict=True):
            graphdef, state = nnx.split(layer)
            fn = functools.partial(_apply, graphdef, dict(kwargs))
            if remat != "none":
                fn = jax.checkpoint(fn, policy=policy)
            x = fn(state, x, args, {})
        return x
    static, varying = _split_layer_args(layer_args)
    graphdef, state = nnx.split(layers)

    def body(x, xs):
        layer_state, kwargs = xs
        return _apply(graphdef, static, layer_state, x, args, kwargs), None

    if remat != "none":
        body = jax.checkpoint(body, policy=policy, prevent_cse=False)
    x, _ = jax.lax.scan(body, x, (state, varying))
    return x


def _apply_layers_cached(layers, x, args, num_layers, scan_layers, policy, remat,
                         layer_args, cache):
    """:func:`apply_layers` threading a stacked per-layer cache through the loop or scan."""
    if not scan_layers:
        new = []
        for i, (layer, kwargs) in enumerate(zip(layers, layer_args, strict=True)):
            graphdef, state = nnx.split(layer)
            fn = functools.partial(_apply, graphdef, dict(kwargs))
            if remat != "none":
                fn = jax.checkpoint(fn, policy=policy)
            layer_cache = jax.tree.map(lambda a, i=i: a[i], cache)
            x, layer_cache = fn(state, x, args, {"cache": layer_cache})
            new.append(layer_cache)
        return x, jax.tree.map(lambda *a: jnp.stack(a), *new)
    static, varying = _split_layer_args(layer_args)
    graphdef, state = nnx.split(layers)

    def body(x, xs):
        layer_state, kwargs, layer_cache = xs
        return _apply(graphdef, static, layer_state, x, args, {**kwargs, "cache": layer_cache})

    if remat != "none":
        body = jax.checkpoint(body, policy=policy, prevent_cse=False)
    return jax.lax.scan(body, x, (state, varying, cache))


def _split_layer_args(layer_args: list[Mapping[str, Any]]) -> tuple[dict, dict]:
    """Arguments equal across layers (static) and the rest stacked into ``[L]`` arrays."""
    keys = set(layer_args[0])
    if any(set(a) != keys for a in layer_args):
        raise JaxtuneError("every layer's layer_args must have the same keys.")
    static, varying = {}, {}
    for k in sorted(keys):
        values = [a[k] for a in layer_args]
        if all(v == values[0] for v in values):
            static[k] = values[0]
        else:
            varying[k] = jnp.asarray(values)
    return static, varying


# --------------------------------------------------------------------------- blocks of a pattern

#: The longest block of a repeating layer pattern that is scanned as one body (its layers are
#: unrolled in the body: compile time grows with it), and the most runs a stack may split into.
MAX_BLOCK = 16
MAX_RUNS = 4


@dataclass(frozen=True)
class Slot:
    """One layer of a stack: its stacked module (``group``), its index there, and its keyword
    arguments (static: a window, a RoPE table's index, a geometry).

    While generating, the layer reads the cache stack ``cache_group`` at ``cache_index``
    (default: its module's group and index). They differ when layers of one parameter stack
    keep different caches: Gemma 2 / 3's sliding layers keep a ring of their window, their
    full layers every slot."""

    group: str
    index: int
    kwargs: tuple[tuple[str, Any], ...] = ()
    cache_group: str | None = None
    cache_index: int | None = None

    @property
    def args(self) -> dict[str, Any]:
        return dict(self.kwargs)

    @property
    def cache_at(self) -> tuple[str, int]:
        """``(cache group, index there)``."""
        return (self.group if self.cache_group is None else self.cache_group,
                self.index if self.cache_index is None else self.cache_index)


@dataclass(frozen=True)
class Run:
    """Layers ``start .. start + p * repeats - 1``: ``repeats`` blocks of the ``p`` slots from
    ``start``; block ``b``'s layer ``k`` is ``slots[start + k]`` with its index moved on by
    ``b * step[k]`` (the layers of its group in one block)."""

    start: int
    period: int
    repeats: int
    step: tuple[int, ...]
    cache_step: tuple[int, ...] | None = None  # the same for cache indices (default: step)


def _slots(layer_args: Sequence[Mapping[str, Any]]) -> list[Slot]:
    return [Slot("", i, tuple(sorted(a.items()))) for i, a in enumerate(layer_args)]


def _repeats(slots: Sequence[Slot], start: int, p: int
             ) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """How many times the block ``slots[start:start + p]`` repeats from ``start``, and how far
    each of its layers' module and cache indices move on from block to block."""
    block = slots[start:start + p]
    step = tuple(sum(s.group == b.group for s in block) for b in block)
    cache_step = tuple(sum(s.cache_at[0] == b.cache_at[0] for s in block) for b in block)
    m = 1
    while start + (m + 1) * p <= len(slots):
        nxt = slots[start + m * p:start + (m + 1) * p]
        if any(n.group != b.group or n.kwargs != b.kwargs or n.index != b.index + m * c
               or n.cache_at != (b.cache_at[0], b.cache_at[1] + m * cc)
               for n, b, c, cc in zip(nxt, block, step, cache_step, strict=True)):
            break
        m += 1
    return m, step, cache_step


def find_runs(slots: Sequence[Slot]) -> list[Run]:
    """The stack as runs of repeated blocks, greedily from the first layer: at each layer the
    block (of at most :data:`MAX_BLOCK` layers) whose repeats cover the most layers; a layer
    that starts no repeat is a run of one."""
    runs, i = [], 0
    while i < len(slots):
        best = Run(i, 1, 1, (1,), (1,))
        for p in range(1, min(MAX_BLOCK, len(slots) - i) + 1):
            m, step, cache_step = _repeats(slots, i, p)
            if m >= 2 and m * p > best.period * best.repeats:
                best = Run(i, p, m, step, cache_step)
        runs.append(best)
        i += best.period * best.repeats
    return runs


def block_runs(layer_args: Sequence[Mapping[str, Any]]) -> list[Run] | None:
    """The runs a scanned stack with these per-layer arguments is split into, or None when
    its arguments follow no short repeating pattern (they are then stacked as arrays ``[L]``)
    or are the same on every layer (one plain scan)."""
    layer_args = list(layer_args)
    if all(a == layer_args[0] for a in layer_args):
        return None
    try:
        slots = _slots(layer_args)
        hash(tuple(slots))
    except TypeError:  # an argument that cannot be static (an array)
        return None
    runs = find_runs(slots)
    return runs if len(runs) <= MAX_RUNS else None


def _consecutive(block: Sequence[Slot]) -> list[tuple[int, int]]:
    """``(start, length)`` of each stretch of a block whose layers are alike (one group, the
    same arguments) at consecutive indices, in their parameter stack and in their cache
    stack: Gemma's five sliding layers, then its full one."""
    parts: list[tuple[int, int]] = []
    for k, slot in enumerate(block):
        if parts:
            start, length = parts[-1]
            prev = block[start + length - 1]
            if (slot.group, slot.kwargs) == (prev.group, prev.kwargs) and \
                    slot.index == prev.index + 1 and \
                    slot.cache_at == (prev.cache_at[0], prev.cache_at[1] + 1):
                parts[-1] = (start, length + 1)
                continue
        parts.append((k, 1))
    return parts


def _take(tree: Any, index: Any) -> Any:
    """Layer ``index`` (a Python int or a traced one) of every leaf of a stacked state."""
    if isinstance(index, int):
        return jax.tree.map(lambda a: a[index], tree)
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, index, keepdims=False), tree)


def _take_params(state: Any, index: Any) -> Any:
    """:func:`_take` of a stacked layer state, each slice held to its variable's sharding
    (its logical axes less the leading one): without that, sharding propagation may choose
    to all-gather a whole stack (or block of layers) where a loop reads it."""
    from jaxtune.sharding import constrain

    def take(var: Any) -> Any:
        if not isinstance(var, nnx.Variable):
            return _take(var, index)
        axes = var.get_metadata().get("logical_axes")
        value = _take(var.get_value(), index)
        if axes is not None and len(axes) == value.ndim + 1:
            value = constrain(value, tuple(axes[1:]))
        return var.replace(value)

    return jax.tree.map(take, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _put(tree: Any, index: Any, value: Any) -> Any:
    return jax.tree.map(
        lambda a, v: jax.lax.dynamic_update_index_in_dim(a, v.astype(a.dtype), index, 0),
        tree, value)


def apply_slots(layers: Mapping[str, nnx.Module] | Sequence[nnx.Module], x: Any, *args: Any,
                slots: Sequence[Slot], remat: str, scan_layers: bool,
                cache: Mapping[str, Any] | None = None, layer_index: bool = False
                ) -> Any:
    """``x = layer_i(x, *args, **slots[i].args)`` for every layer, in order.

    ``layers``: with ``scan_layers``, the stacked modules by group (each parameter ``[layers
    of that group, ...]``); without, the layers as a list (index = layer number). Under scan
    the stack runs as :func:`find_runs` splits it: each run of repeated blocks is one
    ``lax.scan`` whose body calls the block's layers with their own static arguments (a
    layer's parameters are read at its index, ``index + b * step``, in its group's stack);
    a run of one layer is called on its own. Inside a block, alike layers at consecutive
    indices (Gemma's five sliding ones) are a scan of their own, one layer per step, and each
    layer is rematerialised by ``remat`` on its own: a block keeps and recomputes what a scan
    over single layers does, where a body of six unrolled layers lets the compiler keep all
    six layers' recomputed activations at once in the backward pass. With the parameters
    taken inside each checkpoint (:func:`_apply_row`), this took the plan of the Gemma 4 31B
    LoRA recipe on v5e-8 from 28.04 to 14.28 GiB per chip.

    ``cache`` (generation): per group a pytree with a leading axis over that group's layers.
    A layer of a group with a cache is called with ``cache=`` its slice and returns ``(x, its
    updated slice)``; one of a group without (Gemma 4's layers that read another layer's
    keys and values) is called as in training. The result is then ``(x, the updated
    caches)``. ``layer_index``: each layer also gets ``layer=`` its number (a traced int
    inside a scan), e.g. to pick its slice of a per-layer input.
    """
    check_remat(remat)
    policy = REMAT_POLICIES[remat]
    caches = dict(cache) if cache is not None else None

    def call(graphdef, states, row, x, slot, cache_index, number, caches, in_scan):
        """Layer ``slot`` with parameters ``states`` (row ``row`` of them when stacked; None:
        a layer's own); its cache slice is ``cache_index`` of its cache group's stack."""
        kwargs = slot.args
        if layer_index:
            kwargs["layer"] = number
        fn = functools.partial(_apply_row, graphdef, kwargs)
        if remat != "none":
            fn = jax.checkpoint(fn, policy=policy, prevent_cse=not in_scan)
        group = slot.cache_at[0]
        if caches is None or group not in caches:
            return fn(states, row, x, args, {}), caches
        layer_cache = _take(caches[group], cache_index)
        x, layer_cache = fn(states, row, x, args, {"cache": layer_cache})
        return x, {**caches, group: _put(caches[group], cache_index, layer_cache)}

    if not scan_layers:
        for i, slot in enumerate(slots):
            graphdef, state = nnx.split(layers[i])
            x, caches = call(graphdef, state, None, x, slot, slot.cache_at[1], i, caches,
                             False)
        return x if caches is None else (x, caches)

    split = {g: nnx.split(m) for g, m in layers.items()}

    def sub_run(x, caches, slot, states, at, index, length, number, in_scan):
        """``length`` alike layers from parameter row ``at`` of ``states`` (their group's
        stack, or this block's rows of it) and cache row ``index``: a scan of one layer per
        step when more than one, so only one layer's activations are live."""
        graphdef = split[slot.group][0]
        if length == 1:
            return call(graphdef, states, at, x, slot, index, number, caches, in_scan)

        def step(carry, j):
            x, caches = carry
            return call(graphdef, states, at + j, x, slot, index + j, number + j, caches,
                        True), None

        (x, caches), _ = jax.lax.scan(step, (x, caches), jnp.arange(length))
        return x, caches

    for run in find_runs(slots):
        block = list(slots[run.start:run.start + run.period])
        parts = _consecutive(block)
        if run.repeats == 1:
            for k, length in parts:
                slot = block[k]
                x, caches = sub_run(x, caches, slot, split[slot.group][1], slot.index,
                                    slot.cache_at[1], length, run.start + k, False)
            continue
        # A group whose whole stack this run covers is scanned over as blocks of its rows
        # (a free reshape: each step gets its block's parameters as the scan's input); the
        # others (layers left after the last whole block) are indexed in their stack.
        whole = {}
        for k, slot in enumerate(block):
            first = min(s.index for s in block if s.group == slot.group)
            size = jax.tree.leaves(split[slot.group][1])[0].shape[0]
            if first == 0 and run.step[k] * run.repeats == size:
                whole[slot.group] = run.step[k]
        xs = {g: jax.tree.map(lambda a, c=c, m=run.repeats: a.reshape(m, c, *a.shape[1:]),
                              split[g][1]) for g, c in whole.items()}

        cache_steps = run.step if run.cache_step is None else run.cache_step

        def body(carry, inputs, block=block, run=run, parts=parts, cache_steps=cache_steps):
            (x, caches), (b, rows) = carry, inputs
            for k, length in parts:
                slot = block[k]
                index = slot.index + b * run.step[k]
                if slot.group in rows:  # this block's rows of its group: its row in them
                    states = rows[slot.group]
                    at = slot.index - min(s.index for s in block if s.group == slot.group)
                else:
                    states, at = split[slot.group][1], index
                x, caches = sub_run(x, caches, slot, states, at,
                                    slot.cache_at[1] + b * cache_steps[k], length,
                                    run.start + b * run.period + k, True)
            return (x, caches), None

        (x, caches), _ = jax.lax.scan(body, (x, caches), (jnp.arange(run.repeats), xs))
    return x if caches is None else (x, caches)
