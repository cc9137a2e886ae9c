"""What machine a run or a benchmark ran on, in words a reader can compare.

CPU speed differs by a factor of four between machines with and without AVX-512 (and again with
AMX), so every recorded time names the vector extensions next to the CPU model. On an
accelerator the device kind is the description.
"""

from __future__ import annotations

import os
import platform

#: The extensions that decide matmul speed on x86, as /proc/cpuinfo spells them -> how we print.
_VECTOR_FLAGS = (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_bf16", "AVX-512-BF16"),
                 ("amx_tile", "AMX"))


def cpu_model_and_flags(cpuinfo: str | None = None) -> tuple[str, set[str]]:
    """The CPU's model name and its flags, from ``/proc/cpuinfo`` (empty where unreadable)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                cpuinfo = f.read()
        except OSError:
            return platform.processor() or platform.machine(), set()
    model, flags = "", set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return model or platform.machine(), flags


def vector_extensions(flags: set[str]) -> list[str]:
    """The matmul-relevant vector extensions present, e.g. ``["AVX2", "AVX-512", "AMX"]``."""
    return [name for flag, name in _VECTOR_FLAGS if flag in flags]


def describe_cpu(cpuinfo: str | None = None) -> str:
    """``"<model>, <n> cores, AVX2 + AVX-512 + AMX"`` (or ``"no AVX2"`` on older x86 / ARM)."""
    model, flags = cpu_model_and_flags(cpuinfo)
    ext = vector_extensions(flags)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {cores} cores, {' + '.join(ext) if ext else 'no AVX2'}"


def describe_machine() -> str:
    """The default JAX device in words: the CPU description, or the accelerator's kind."""
    import jax

    device = jax.devices()[0]
    if device.platform == "cpu":
        return "CPU: " + describe_cpu()
    return f"{device.platform.upper()}: {jax.device_count()} x {device.device_kind}"
