"""Logical axis names -> mesh axes, for parameters, batches and activation constraints.

Every parameter carries ``logical_axes`` metadata (e.g. ``("embed", "mlp")``). One rules table
maps logical names to mesh axes; a new parallelism layout is a change to that table (or the
``mesh.rules`` config), never to model code. A dimension that a mesh axis does not divide
evenly is replicated instead, and a mesh axis is used at most once per array.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MeshAxes = tuple[str, ...]
Rules = dict[str, MeshAxes]

#: Default layout: batch over data and fsdp, weights' embed dim over fsdp (ZeRO-3 style),
#: heads / mlp / vocab over tensor (Megatron style). Unlisted names are replicated.
DEFAULT_RULES: Rules = {
    "batch": ("data", "fsdp"),
    "seq": (),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
    "layers": (),
    # MoE experts over the expert axis (a mesh has it only with mesh.expert > 1). Tokens stay
    # split over data x fsdp only, so with an expert axis they are replicated over it; add
    # "expert" to "batch" (mesh.rules) to split them too (see jaxtune/models/moe/dispatch.py).
    "experts": ("expert",),
    # LoRA adapters: A is [*in, r], B [r, *out], and only one of in / out is the embed dim, so
    # without this the other half (B of q/k/v/gate/up, A of o/down) and its Adam moments would
    # be whole on every chip of an FSDP mesh. The rank dim goes over fsdp, or, where fsdp does
    # not divide the rank, another dim of the adapter that it divides (see SPREAD).
    "lora_rank": ("fsdp",),
}

#: Logical names whose mesh axes, where they do not divide that dim, go on another dim of the
#: same array that they divide (the largest such dim still unsharded; never a stacked
#: ``layers`` / ``experts`` dim). Only layout changes: the values and the maths are the same.
SPREAD = frozenset({"lora_rank"})
_STACKED = frozenset({"layers", "experts"})


def make_rules(overrides: Mapping[str, Sequence[str] | str | None] | None = None) -> Rules:
    """The default rules with ``overrides`` (from ``mesh.rules``) applied on top."""
    rules = dict(DEFAULT_RULES)
    for name, axes in (overrides or {}).items():
        if axes is None:
            rules[name] = ()
        elif isinstance(axes, str):
            rules[name] = (axes,)
        else:
            rules[name] = tuple(axes)
    for name, axes in rules.items():
        for axis in axes:
            if axis not in ("data", "fsdp", "expert", "tensor"):
                raise ValueError(
                    f"Sharding rule '{name}: {list(axes)}' names mesh axis '{axis}'; "
                    "mesh axes are data, fsdp, expert and tensor."
                )
    return rules


def logical_to_spec(
    names: Sequence[str | None] | None,
    rules: Rules | None = None,
    mesh: Mesh | None = None,
    shape: Sequence[int] | None = None,
) -> PartitionSpec:
    """PartitionSpec for an array with the given logical axis names.

    With ``mesh`` and ``shape`` given, mesh axes that do not divide a dimension (or have size 1)
    are dropped, so odd sizes replicate instead of failing.
    """
    if names is None:
        return PartitionSpec()
    rules = DEFAULT_RULES if rules is None else rules
    used: set[str] = set()
    spec: list[Any] = []
    left_over: list[str] = []  # axes of a SPREAD name that its own dim could not take
    for dim, name in enumerate(names):
        axes = [a for a in rules.get(name, ()) if a not in used] if name else []
        if mesh is not None:  # axes the mesh lacks (expert without mesh.expert) or of size 1
            axes = [a for a in axes if mesh.shape.get(a, 1) > 1]
            if shape is not None:
                kept, size = [], shape[dim]
                for a in axes:
                    if size % mesh.shape[a] == 0:
                        kept.append(a)
                        size //= mesh.shape[a]
                if name in SPREAD:
                    left_over += [a for a in axes if a not in kept]
                axes = kept
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    for a in left_over:
        if a in used:
            continue
        free = [d for d, name in enumerate(names) if spec[d] is None
                and name not in _STACKED and shape[d] % mesh.shape[a] == 0]
        if free:
            dim = max(free, key=lambda d: shape[d])
            spec[dim] = a
            used.add(a)
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def named_sharding(
    mesh: Mesh, names: Sequence[str | None] | None, rules: Rules | None = None,
    shape: Sequence[int] | None = None,
) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, rules, mesh, shape))


def variable_axes(var: nnx.Variable) -> tuple[str | None, ...] | None:
    """The logical axis names stored on an NNX variable (None when it has none)."""
    meta = var.get_metadata()
    return meta.get("logical_axes")


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(state: Any, mesh: Mesh, rules: Rules | None = None) -> Any:
    """A tree of NamedShardings matching ``state`` (an nnx.State, abstract or concrete).

    Variables without logical axes (RNG counters, step counts) are replicated.
    """

    def one(var: Any) -> Any:
        if _is_variable(var):
            shape = var.get_value().shape
            names = variable_axes(var)
            # Derived leaves (e.g. Adafactor's factored moments) keep the parameter's
            # metadata but not its rank: replicate those rather than mis-shard them.
            if names is not None and len(names) != len(shape):
                names = None
            return named_sharding(mesh, names, rules, shape)
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, state, is_leaf=_is_variable)


def state_specs(state: Any, rules: Rules | None = None, mesh: Mesh | None = None) -> Any:
    """Like :func:`state_shardings` but PartitionSpecs."""
    return jax.tree.map(lambda s: s.spec, state_shardings(state, mesh, rules))


def batch_mesh_axes(rules: Rules | None = None) -> tuple[str, ...]:
    """The mesh axes the rules split the ``batch`` axis over."""
    return tuple((DEFAULT_RULES if rules is None else rules).get("batch", ()))


def batch_axis_size(mesh: Mesh, rules: Rules | None = None) -> int:
    """How many ways the batch dimension is split on ``mesh`` under ``rules``."""
    return math.prod(mesh.shape.get(a, 1) for a in batch_mesh_axes(rules))


def batch_sharding(mesh: Mesh, rules: Rules | None = None, ndim: int = 2) -> NamedSharding:
    """Sharding of a ``[batch, seq, ...]`` input array: batch split, the rest replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + ("seq",) * (ndim - 1),
                                               present_rules(rules, mesh)))


def present_rules(rules: Rules | None, mesh: Mesh) -> Rules:
    """``rules`` without the mesh axes ``mesh`` lacks (``expert`` when mesh.expert is 1)."""
    rules = DEFAULT_RULES if rules is None else rules
    return {k: tuple(a for a in v if a in mesh.shape) for k, v in rules.items()}


# --------------------------------------------------------------------------- activations

_context = threading.local()


@contextlib.contextmanager
def activation_rules(mesh: Mesh | None, rules: Rules | None = None) -> Iterator[None]:
    """Within this context (at trace time), :func:`constrain` pins activation shardings."""
    prev = getattr(_context, "value", None)
    _context.value = (mesh, rules if rules is not None else DEFAULT_RULES) if mesh else None
    try:
        yield
    finally:
        _context.value = prev


def current_mesh_rules() -> tuple[Mesh, Rules] | None:
    """The ``(mesh, rules)`` of the enclosing :func:`activation_rules`, or None outside it."""
    return getattr(_context, "value", None)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical names; a no-op outside :func:`activation_rules`."""
    current = current_mesh_rules()
    if current is None:
        return x
    mesh, rules = current
    spec = logical_to_spec(names, rules, mesh, x.shape)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def host_array(x: jax.Array) -> np.ndarray:
    """A jax array on this host as numpy (gathered from every process when it is not fully
    addressable): the one host-gather helper for export, LoRA layouts and checkpoints."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
