"""JAX's accelerator plugins, kept out of the commands that cannot use them.

The ``plan`` extra installs JAX's TPU runtime (``libtpu``) and CUDA plugin so that ``jaxtune
plan`` can compile for chips the machine does not have. On a machine without an NVIDIA GPU,
``import jax`` then loads the CUDA plugin's extension modules, and each one prints "Could not
find cuda drivers on your machine, GPU will not be used" from C++ (absl logging, which no
setting turns off before jax has started); the first use of a backend adds a traceback from
the CUDA plugin's ``initialize()`` and, without a TPU, libtpu's errors about TPU hosts it cannot
find. Only ``jaxtune plan`` needs the plugins there. Every other command calls
:func:`keep_unusable_plugins_out` before it imports jax: a plugin whose hardware is not here
(or that ``JAX_PLATFORMS`` leaves out) has its modules marked absent, so jax runs as it does
without that plugin installed (on the CPU, where it would have fallen back anyway) and prints
nothing about it. Where the hardware is visible, nothing changes.
"""

from __future__ import annotations

import glob
import os
import sys
import types

#: The CUDA plugin's Python packages (kernels, solver, versions) and its PJRT plugin modules.
CUDA_PACKAGES = ("jax_cuda12_plugin", "jax_cuda13_plugin")
CUDA_PJRT_PLUGINS = ("jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13")
#: What jax itself looks for to decide that an NVIDIA GPU is visible
#: (``jax._src.hardware_utils.has_visible_nvidia_gpu``).
NVIDIA_DEVICES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg")
#: Google's PCI vendor id (jax's ``hardware_utils`` finds TPU chips by it), and the device
#: files TPU VMs have (``/dev/accel*`` on v4 / v5p, VFIO groups on v5e and later).
GOOGLE_PCI_VENDOR = "0x1ae0"
TPU_DEVICE_GLOBS = ("/dev/accel*", "/dev/vfio/[0-9]*")


def _platforms_allow(*names: str) -> bool:
    """``JAX_PLATFORMS`` unset, or naming one of ``names``."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    return not platforms or bool(set(names) & {p.strip() for p in platforms.split(",")})


def cuda_usable() -> bool:
    """Whether the CUDA plugin could run here: allowed by ``JAX_PLATFORMS`` and an NVIDIA
    device visible."""
    return _platforms_allow("cuda", "gpu") and any(os.path.exists(d) for d in NVIDIA_DEVICES)


def tpu_usable() -> bool:
    """Whether libtpu could run here: allowed by ``JAX_PLATFORMS`` and a TPU device file or a
    Google PCI device visible (any of them: a doubtful machine keeps its plugin)."""
    if not _platforms_allow("tpu"):
        return False
    if any(glob.glob(pattern) for pattern in TPU_DEVICE_GLOBS):
        return True
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor, encoding="utf-8") as f:
                if f.read().strip() == GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return False


def keep_unusable_plugins_out() -> list[str]:
    """Mark absent the plugins whose hardware is not here; returns their names ("cuda",
    "tpu"). Without a TPU, ``TPU_LIBRARY_PATH`` is dropped too: jax sets it in a process that
    imports it, and a command started from there would load libtpu by that path. Does nothing
    once jax is imported (too late)."""
    if "jax" in sys.modules:
        return []
    out = []
    if not cuda_usable():
        for name in CUDA_PACKAGES:  # jaxlib imports these optionally: absent means no CUDA
            sys.modules.setdefault(name, None)
        for name in CUDA_PJRT_PLUGINS:  # jax imports every jax_plugins.* and initialises it
            sys.modules.setdefault(name, _not_registered(name))
        out.append("cuda")
    if not tpu_usable():
        sys.modules.setdefault("libtpu", None)  # jax then finds no TPU runtime to start
        # ... unless a parent process that imported jax left the runtime's path here
        os.environ.pop("TPU_LIBRARY_PATH", None)
        out.append("tpu")
    return out


def _not_registered(name: str) -> types.ModuleType:
    """A PJRT plugin module whose ``initialize()`` registers nothing (jax would warn about a
    plugin module that fails to import)."""
    module = types.ModuleType(name, "A JAX plugin kept out: its hardware is not here "
                                    "(jaxtune.plugins).")
    module.initialize = lambda: None
    return module
