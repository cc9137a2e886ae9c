"""Device mesh with named axes ``data``, ``fsdp`` and ``tensor``, built from the config.

Devices are laid out so that ``tensor`` (the innermost, most communication-heavy axis) stays
within a host, ``fsdp`` next, and ``data`` outermost (it may span hosts or slices). Every error
says what was asked, what the machine has, and which layouts would fit instead.

With ``mesh.expert > 1`` the mesh gains an ``expert`` axis between ``fsdp`` and ``tensor``
(MoE experts shard over it, see ``jaxtune.sharding.DEFAULT_RULES``); with 1 it has none.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from jaxtune.config import MeshConfig
from jaxtune.errors import JaxtuneError
from jaxtune.sharding import Rules, batch_axis_size, batch_mesh_axes

AXES = ("data", "fsdp", "tensor")
EXPERT_AXES = ("data", "fsdp", "expert", "tensor")  # with mesh.expert > 1


class MeshError(JaxtuneError, ValueError):
    """The requested mesh or batch does not fit the devices; the message says what does."""


def _factorizations(n: int) -> list[tuple[int, int, int]]:
    out = []
    for d in range(1, n + 1):
        if n % d:
            continue
        for f in range(1, n // d + 1):
            if (n // d) % f == 0:
                out.append((d, f, n // d // f))
    return out


def _fits_hint(n: int) -> str:
    shapes = _factorizations(n)
    # Show the common, sensible layouts first: pure data, pure fsdp, then mixed ones.
    shapes.sort(key=lambda s: (s[2], -s[0]))
    shown = ", ".join(f"({d},{f},{t})" for d, f, t in shapes[:8])
    return f"Layouts (data, fsdp, tensor) that fit {n} devices include {shown}."


def resolve_axis_sizes(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """Turn the configured sizes (one may be -1) into concrete sizes using all devices
    (``mesh.expert`` devices form each expert group; the three sizes fill the rest)."""
    expert = getattr(cfg, "expert", 1)
    if expert > 1:
        if num_devices % expert:
            raise MeshError(f"mesh.expert={expert} does not divide the {num_devices} "
                            "available devices; pick a divisor.")
        num_devices //= expert
    sizes = [cfg.data * cfg.dcn_data if cfg.data > 0 else -1, cfg.fsdp, cfg.tensor]
    asked = f"mesh (data={cfg.data}, fsdp={cfg.fsdp}, tensor={cfg.tensor}"
    asked += f", dcn_data={cfg.dcn_data})" if cfg.dcn_data > 1 else ")"
    if sizes.count(-1) > 1:
        raise MeshError(f"{asked}: at most one axis may be -1. {_fits_hint(num_devices)}")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if num_devices % known:
            raise MeshError(
                f"{asked}: the fixed axes multiply to {known}, which does not divide the "
                f"{num_devices} available devices. {_fits_hint(num_devices)}"
            )
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise MeshError(
            f"{asked} needs {math.prod(sizes)} devices, but {num_devices} are available; the "
            f"axis sizes must multiply to the device count. {_fits_hint(num_devices)}"
        )
    return sizes[0], sizes[1], sizes[2]


def make_mesh(cfg: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Build the (data, fsdp, tensor) mesh over ``devices`` (default: all of them)."""
    cfg = cfg or MeshConfig()
    devices = list(devices if devices is not None else jax.devices())
    data, fsdp, tensor = resolve_axis_sizes(cfg, len(devices))
    local = jax.local_device_count()
    if tensor > 1 and local % tensor and jax.process_count() > 1:
        raise MeshError(
            f"mesh.tensor={tensor} would span hosts ({local} devices per host); tensor "
            f"parallelism needs fast links, so pick a tensor size that divides {local}."
        )
    if cfg.dcn_data > 1:
        if data % cfg.dcn_data:
            raise MeshError(
                f"mesh.dcn_data={cfg.dcn_data} slices need a data axis that is a multiple of "
                f"{cfg.dcn_data}, but it is {data}. Set mesh.data to the data-parallel size "
                "within one slice (often 1) and mesh.dcn_data to the number of slices."
            )
        grid = _hybrid_grid(_with_expert((data // cfg.dcn_data, fsdp, tensor), cfg),
                            cfg.dcn_data, devices)
    else:
        grid = _ici_grid(_with_expert((data, fsdp, tensor), cfg), devices)
    return _mesh(grid)


def _with_expert(shape: tuple[int, int, int], cfg: MeshConfig) -> tuple[int, ...]:
    """(data, fsdp, expert, tensor) when mesh.expert > 1, else (data, fsdp, tensor): a model
    without experts never sees an expert axis."""
    expert = getattr(cfg, "expert", 1)
    return shape if expert == 1 else (shape[0], shape[1], expert, shape[2])


def _ici_grid(shape: tuple[int, ...], devices: Sequence[jax.Device]) -> np.ndarray:
    """Devices of one slice (or host group) arranged as ``shape``, topology-aware on TPU."""
    try:
        return mesh_utils.create_device_mesh(shape, devices)
    except (AssertionError, NotImplementedError, ValueError):
        # Topology-aware placement is only known for some TPU shapes; elsewhere devices
        # sorted by (process, id) reshaped row-major keep the last axis within a host.
        ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
        return np.asarray(ordered).reshape(shape)


def _hybrid_grid(ici: tuple[int, ...], dcn: int,
                 devices: Sequence[jax.Device]) -> np.ndarray:
    """``dcn`` granules (TPU slices, else hosts) stacked along ``data``, each laid out as ``ici``.

    Multislice TPUs carry ``slice_index`` and go through ``create_hybrid_device_mesh``.
    Elsewhere (GPU nodes, CPU processes) the granules are groups of consecutive processes,
    and a single process splits its devices into ``dcn`` consecutive blocks.
    """
    slices = {getattr(d, "slice_index", None) for d in devices}
    if None not in slices and len(slices) == dcn:
        return mesh_utils.create_hybrid_device_mesh(ici, (dcn,) + (1,) * (len(ici) - 1),
                                                    devices)
    by_process: dict[int, list[jax.Device]] = {}
    for d in sorted(devices, key=lambda d: (d.process_index, d.id)):
        by_process.setdefault(d.process_index, []).append(d)
    hosts = list(by_process.values())
    if len(hosts) == 1:
        size = len(devices) // dcn
        granules = [hosts[0][i * size:(i + 1) * size] for i in range(dcn)]
    elif len(hosts) % dcn == 0:
        per = len(hosts) // dcn
        granules = [sum(hosts[i * per:(i + 1) * per], []) for i in range(dcn)]
    else:
        raise MeshError(
            f"mesh.dcn_data={dcn}, but the devices belong to {len(hosts)} processes, which do "
            f"not split into {dcn} equal groups. Set mesh.dcn_data to the number of slices or "
            f"nodes (a divisor of {len(hosts)})."
        )
    return np.concatenate([_ici_grid(ici, g) for g in granules], axis=0)


def _mesh(grid: np.ndarray) -> Mesh:
    axes = AXES if grid.ndim == 3 else EXPERT_AXES
    # The jit-with-shardings style needs Auto axes; newer JAX defaults to Explicit in make_mesh.
    axis_type = getattr(jax.sharding, "AxisType", None)
    if axis_type is not None:
        return Mesh(grid, axes, axis_types=(axis_type.Auto,) * len(axes))
    return Mesh(grid, axes)


def check_batch(global_batch_size: int, mesh: Mesh, grad_accum_steps: int = 1,
                rules: Rules | None = None) -> None:
    """Fail early when a micro-batch cannot be split evenly over the mesh axes the rules
    give the ``batch`` axis (data x fsdp by default)."""
    ways = batch_axis_size(mesh, rules)
    micro = global_batch_size // grad_accum_steps
    if micro % ways == 0:
        return
    axes = batch_mesh_axes(rules)
    good = [ways * k * grad_accum_steps for k in range(1, 5)]
    raise MeshError(
        f"The micro-batch of {micro} rows (trainer.global_batch_size={global_batch_size} / "
        f"grad_accum_steps={grad_accum_steps}) does not divide over {' x '.join(axes)} = "
        f"{' x '.join(str(mesh.shape.get(a, 1)) for a in axes)} = {ways} devices. Use "
        f"trainer.global_batch_size in {good}, or a mesh whose {' x '.join(axes)} divides "
        f"{micro}."
    )
