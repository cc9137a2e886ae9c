"""The decoder-layer stack every family reuses: a list of layers or one scanned module.

:func:`make_layers` builds ``num_layers`` layers with one ``make_layer(rngs)``. With
``scan_layers`` the layers are one stacked module (each parameter gets a leading ``layers``
axis) that :func:`apply_layers` runs by ``jax.lax.scan``, so compile time does not grow with
depth; otherwise an ``nnx.List``. Either way each layer can be rematerialised (``remat``
policies below).

Layers may differ, as data rather than code (MaxText's ``if decoder_block == ...`` chains are
what this avoids): ``layer_args`` gives each layer its own keyword arguments (a sliding
window on some layers, a RoPE table, a soft-cap). Under scan, an argument that is the same for
every layer stays a static Python value; one that varies is stacked into an array ``[L]``
and scanned over, so the layer must accept either (e.g. a window as an int or a traced int).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
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
        return _apply_layers_cached(layers, x, args, num_layers, scan_layers, policy, remat,
                                    layer_args, cache)
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
