"""Transparent huge pages for a CPU train step's temporaries, so each step faults in 512x less.

On the CPU backend XLA allocates all of a step's temporaries as one block (0.73 GiB for the
quickstart's LoRA job, 1.7 GiB at ``scripts/bench_train.py``'s M size) and frees it when the
step ends. glibc serves a block that large with a fresh ``mmap`` and gives it back with
``munmap``, so every step faults its whole working set in again, 4 KiB at a time: at M, 437,000
page faults and about 1 s of system time per 5.4 s step, charged to the first op that writes
each buffer (the matmuls).

glibc's ``glibc.malloc.hugetlb=1`` tunable marks such blocks for transparent huge pages
(``madvise(MADV_HUGEPAGE)``), which the kernel then faults in 2 MiB at a time: about 1,200
faults and 0.2-0.3 s of system time per M step, 5% off the step (``docs/benchmarks.md``). The
process's memory is unchanged: the same block, in larger pages.

glibc reads its tunables only when a process starts, so :func:`reexec_with_huge_pages` starts
the command again, in the same process (``execv``), with the tunable added. ``jaxtune train``,
``jaxtune generate`` and ``jaxtune eval`` call it first thing, before anything is imported or
printed. It acts only where it helps:

- Linux with glibc 2.35 or newer (the first with the tunable);
- transparent huge pages on for ``madvise`` or ``always`` (``/sys/kernel/mm/transparent_
  hugepage/enabled``);
- the CPU is JAX's platform: ``JAX_PLATFORMS=cpu``, or no TPU or GPU plugin is installed
  (an accelerator's step memory is on the device);
- ``GLIBC_TUNABLES`` does not set ``glibc.malloc.hugetlb`` already (so it runs once), and
  ``JAXTUNE_HOST_MALLOC`` is not ``default`` (the way to opt out).

It is not applied to the whole of ``import jaxtune``: a process that also runs PyTorch would pay
for it, since PyTorch maps and unmaps many blocks per step and the kernel zeroes a huge page
for each (its M step went from 5.5 to 5.9 s with the tunable, same machine).
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb=1"
_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
#: Packages that give JAX a TPU or GPU platform.
_ACCELERATOR_PLUGINS = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                        "jax_rocm7_plugin")


def cpu_is_the_platform(environ: Mapping[str, str]) -> bool:
    """Whether JAX will run on the CPU: ``JAX_PLATFORMS=cpu``, or no accelerator plugin."""
    platforms = environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms == "cpu"
    return not any(importlib.util.find_spec(name) for name in _ACCELERATOR_PLUGINS)


def _glibc_has_tunable() -> bool:
    name, version = platform.libc_ver()
    if name != "glibc":
        return False
    try:
        return tuple(int(p) for p in version.split(".")[:2]) >= (2, 35)
    except ValueError:
        return False


def _thp_available(path: str = _THP_ENABLED) -> bool:
    """Transparent huge pages on for ``always`` or ``madvise`` (the selected mode is bracketed)."""
    try:
        with open(path, encoding="utf-8") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def huge_page_environment(environ: Mapping[str, str]) -> dict[str, str] | None:
    """``environ`` with the hugetlb tunable added, or None where it should not (or need not) be
    added: see the module docstring for the conditions."""
    if environ.get("JAXTUNE_HOST_MALLOC", "").lower() == "default":
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables:
        return None
    if not (sys.platform.startswith("linux") and _glibc_has_tunable() and _thp_available()
            and cpu_is_the_platform(environ)):
        return None
    return {**environ, "GLIBC_TUNABLES": f"{tunables}:{TUNABLE}" if tunables else TUNABLE}


def reexec_with_huge_pages() -> None:
    """Start this command again with the hugetlb tunable (``execv``: same process id, same
    arguments, nothing returned), or return where it is not wanted. Call it before any work."""
    env = huge_page_environment(os.environ)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
