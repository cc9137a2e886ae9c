"""Hardware targets ``jaxtune plan`` compiles for: TPU slices and GPU nodes, with their memory.

A target name is what a user rents: ``v5p-64``, ``v5e-8`` (or ``v5litepod-8``), ``v6e-256``,
``v4-32``, a multi-slice ``2xv5e-256``, or a GPU node ``8xh100``, ``8xh200``,
``8xa100-80gb``. :func:`parse_target` turns it into a :class:`Target`: the chip, how many,
the topology the compiler is given, HBM per chip and bf16 peak FLOP/s per chip.

HBM per chip is the capacity the vendor quotes in GiB (v5e 16, v6e 32, v4 32, v5p 95, H100
80, H200 141, A100 40 or 80). On TPU the compiler enforces it itself and fails a program that
does not fit; the GPU compiler does not, so :mod:`jaxtune.plan.report` compares the
compiler's memory analysis with this number explicitly for both.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from jaxtune.errors import JaxtuneError

GIB = 1024**3


class TargetError(JaxtuneError, ValueError):
    """An unknown or malformed ``--target``."""


@dataclass(frozen=True)
class Chip:
    """One kind of accelerator chip."""

    name: str  # as users write it: v5p, h100
    platform: str  # tpu | gpu
    hbm_bytes: int  # memory per chip
    peak_bf16_flops: float  # dense bf16 matmul peak per chip
    topology_prefix: str = ""  # TPU: the libtpu topology name prefix (v5 for v5p)
    chip_config: str = "default"  # TPU: megacore for v4 / v5p (two cores seen as one chip)
    dims: int = 2  # TPU: 2D torus (v5e, v6e) or 3D (v4, v5p)
    cores_per_chip_in_name: int = 1  # v4-N and v5p-N count TensorCores: N / 2 chips
    gpu_spec: str = ""  # GPU: key into jaxtune.plan.gpu.SPECS


CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", "tpu", 32 * GIB, 275e12, "v4", "megacore", 3, 2),
    "v5e": Chip("v5e", "tpu", 16 * GIB, 197e12, "v5e", "default", 2, 1),
    "v5p": Chip("v5p", "tpu", 95 * GIB, 459e12, "v5", "megacore", 3, 2),
    "v6e": Chip("v6e", "tpu", 32 * GIB, 918e12, "v6e", "default", 2, 1),
    "h100": Chip("h100", "gpu", 80 * GIB, 989e12, gpu_spec="h100"),
    "h200": Chip("h200", "gpu", 141 * GIB, 989e12, gpu_spec="h200"),
    "a100-80gb": Chip("a100-80gb", "gpu", 80 * GIB, 312e12, gpu_spec="a100-80gb"),
    "a100-40gb": Chip("a100-40gb", "gpu", 40 * GIB, 312e12, gpu_spec="a100-40gb"),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "a100": "a100-80gb",
            "h100-80gb": "h100", "h200-141gb": "h200"}

EXAMPLES = "v5e-8, v5e-256, v6e-8, v6e-256, v4-32, v5p-64, 2xv5e-256, 8xh100, 8xa100-80gb"


@dataclass(frozen=True)
class Target:
    """A concrete target: ``slices`` x a slice of ``chips_per_slice`` chips (or one GPU node)."""

    name: str
    chip: Chip
    chips_per_slice: int
    slices: int = 1
    topology: str = ""  # TPU: e.g. v5:2x4x4; GPU: partitions x hosts x devices, e.g. 1x1x8

    @property
    def platform(self) -> str:
        return self.chip.platform

    @property
    def num_chips(self) -> int:
        return self.chips_per_slice * self.slices

    @property
    def hbm_bytes(self) -> int:
        return self.chip.hbm_bytes

    def describe(self) -> str:
        where = f"{self.slices} slices x {self.chips_per_slice}" if self.slices > 1 else \
            f"{self.num_chips}"
        return (f"{self.name}: {where} {self.chip.name} chips, "
                f"{self.hbm_bytes / GIB:.0f} GiB HBM each")


def _torus(chips: int, dims: int) -> list[int]:
    """The slice shape Google gives ``chips`` chips: 8 -> 2x4, 256 -> 16x16, 32 -> 2x4x4."""
    if chips < 4:
        return [1] * (dims - 1) + [chips] if dims == 3 else [1, chips]
    shape = [2, 2] + ([1] if dims == 3 else [])
    while math.prod(shape) < chips:
        smallest = min(shape)
        i = max(j for j, s in enumerate(shape) if s == smallest)
        shape[i] *= 2
    return shape


def parse_target(name: str) -> Target:
    """``v5p-64`` / ``2xv5e-256`` / ``8xh100`` -> :class:`Target`; the error lists examples."""
    text = name.strip().lower()
    m = re.fullmatch(r"(?:(\d+)x)?([a-z0-9]+(?:-\d+gb)?)(?:-(\d+))?", text)
    if not m:
        raise TargetError(f"--target '{name}' is not a target name; try one of {EXAMPLES}.")
    count, chip_name, size = m.group(1), m.group(2), m.group(3)
    chip = CHIPS.get(_ALIASES.get(chip_name, chip_name))
    if chip is None:
        raise TargetError(f"--target '{name}': unknown chip '{chip_name}'. Known chips: "
                          f"{', '.join(CHIPS)} (e.g. {EXAMPLES}).")
    if chip.platform == "gpu":
        if size is not None or count is None:
            raise TargetError(f"--target '{name}': a GPU target is COUNTxGPU, e.g. 8x{chip.name}.")
        n = int(count)
        if n < 1:
            raise TargetError(f"--target '{name}' needs at least one GPU.")
        return Target(text, chip, n, 1, f"1x1x{n}")
    if size is None:
        raise TargetError(f"--target '{name}': a TPU target is TYPE-SIZE as Google names it, "
                          f"e.g. {chip.name}-{8 if chip.cores_per_chip_in_name == 1 else 64}.")
    cores = int(size)
    chips = cores // chip.cores_per_chip_in_name
    if chips < 1 or cores % chip.cores_per_chip_in_name or chips & (chips - 1):
        raise TargetError(f"--target '{name}': {chip.name} slices come in power-of-two sizes "
                          f"(e.g. {chip.name}-{8 * chip.cores_per_chip_in_name}).")
    slices = int(count) if count else 1
    shape = "x".join(map(str, _torus(chips, chip.dims)))
    return Target(text, chip, chips, slices, f"{chip.topology_prefix}:{shape}")
