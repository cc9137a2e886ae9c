"""Attention kernels beyond XLA's: Pallas splash attention for TPU (``splash.py``), jax's
Pallas Triton flash attention for GPU (``pallas_gpu.py``) and a fused C++ kernel for CPU
(``cpu_attention.py``).

Which kernel a model picks depends on the platform the program is *compiled for*, which is not
always the one this process runs on: ``jaxtune plan`` builds a TPU or GPU program on a CPU
host. :func:`target_platform` answers the question for the whole package (layers ask it
when they resolve ``attention: auto``; the kernel wrappers ask it to decide between the
compiled kernel (Mosaic, Triton) and the CPU interpreter), and :func:`compiling_for` sets it.

This module stays import-light: Pallas is imported only when a kernel is built.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

_context = threading.local()

#: ``checkpoint_name`` of what a fused attention kernel's forward keeps for its backward (its
#: output and each row's log-sum-exp): the remat policies that keep matmul outputs keep these
#: too, so the backward does not run the kernel's forward again (``jaxtune.models.stack``).
KERNEL_RESIDUALS = "attention_kernel_residuals"

#: jax.default_backend() names and the names a target may give.
_PLATFORMS = {"cpu": "cpu", "tpu": "tpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu"}


def target_platform() -> str:
    """``cpu``, ``gpu`` or ``tpu``: the platform being compiled for (default: this backend)."""
    forced = getattr(_context, "platform", None)
    if forced is not None:
        return forced
    import jax

    return _PLATFORMS.get(jax.default_backend(), jax.default_backend())


@contextlib.contextmanager
def compiling_for(platform: str) -> Iterator[None]:
    """Within this context (model build and tracing), kernels are chosen for ``platform``."""
    if platform not in _PLATFORMS:
        raise ValueError(f"platform '{platform}' is not one of {sorted(set(_PLATFORMS))}")
    prev = getattr(_context, "platform", None)
    _context.platform = _PLATFORMS[platform]
    try:
        yield
    finally:
        _context.platform = prev
