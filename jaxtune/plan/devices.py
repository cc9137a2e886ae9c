"""Compile-only devices for a :class:`~jaxtune.plan.targets.Target`, with no accelerator attached.

TPU: ``libtpu`` (the ``plan`` extra, or ``jax[tpu]`` of the installed jax version) describes
any slice topology, and its devices lower and compile like real ones. GPU: the CUDA plugin
(``jax-cuda12-plugin`` + ``jax-cuda12-pjrt``) compiles for a device described by a
``GpuTargetConfigProto``; :data:`GPU_SPECS` holds the few numbers XLA's GPU compiler reads
(compute capability, SM count, shared memory, cache, bandwidth, memory), written out as that
proto's text format by :func:`gpu_target_config`.

Neither needs ``JAX_PLATFORMS`` changed: the CPU stays the default backend for everything else.
"""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass

from jaxtune.errors import JaxtuneError
from jaxtune.plan.targets import Target


class MissingCompilerError(JaxtuneError):
    """The TPU or GPU compiler package for a target is not installed."""


@dataclass(frozen=True)
class GpuSpec:
    """What XLA's GPU compiler asks of a device (``stream_executor::GpuDeviceInfoProto``)."""

    description: str
    compute_capability: tuple[int, int]
    sm_count: int
    memory_bytes: int
    memory_bandwidth: float  # bytes/s
    l2_cache_bytes: int
    clock_ghz: float
    shared_memory_per_block_optin: int
    shared_memory_per_sm: int
    fp32_units_per_sm: int


GPU_SPECS: dict[str, GpuSpec] = {
    "h100": GpuSpec("NVIDIA H100 80GB HBM3", (9, 0), 132, 80 * 1024**3, 3.35e12, 50 * 2**20,
                    1.98, 227 * 1024, 228 * 1024, 128),
    "h200": GpuSpec("NVIDIA H200", (9, 0), 132, 141 * 1024**3, 4.8e12, 50 * 2**20, 1.98,
                    227 * 1024, 228 * 1024, 128),
    "a100-80gb": GpuSpec("NVIDIA A100-SXM4-80GB", (8, 0), 108, 80 * 1024**3, 2.04e12,
                         40 * 2**20, 1.41, 163 * 1024, 164 * 1024, 64),
    "a100-40gb": GpuSpec("NVIDIA A100-SXM4-40GB", (8, 0), 108, 40 * 1024**3, 1.56e12,
                         40 * 2**20, 1.41, 163 * 1024, 164 * 1024, 64),
}


def gpu_target_config(spec: GpuSpec, cudnn: tuple[int, int, int] = (9, 8, 0)) -> str:
    """``GpuTargetConfigProto`` in text format for ``spec`` (what ``target_config`` takes)."""
    major, minor = spec.compute_capability
    return f"""gpu_device_info {{
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_block_optin: {spec.shared_memory_per_block_optin}
  shared_memory_per_core: {spec.shared_memory_per_sm}
  threads_per_core_limit: 2048
  core_count: {spec.sm_count}
  fpus_per_core: {spec.fp32_units_per_sm}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(spec.memory_bandwidth)}
  l2_cache_size: {spec.l2_cache_bytes}
  clock_rate_ghz: {spec.clock_ghz}
  device_memory_size: {spec.memory_bytes}
}}
platform_name: "CUDA"
dnn_version_info {{ major: {cudnn[0]} minor: {cudnn[1]} patch: {cudnn[2]} }}
device_description_str: "{spec.description}"
"""


_INSTALL = ("pip install 'jaxtune[plan]' (or, matching your jax: pip install "
            "'jax[tpu]=={v}' for TPU targets; pip install --no-deps 'jax-cuda12-plugin=={v}' "
            "'jax-cuda12-pjrt=={v}' for GPU targets)")


def install_hint() -> str:
    import jax

    return _INSTALL.format(v=jax.__version__)


@contextlib.contextmanager
def _quiet_stderr():
    """libtpu prints host-detection warnings on a machine without TPUs; keep them off screen."""
    try:
        fd = os.dup(2)
    except OSError:  # no real stderr (captured by a test runner)
        yield
        return
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(fd, 2)
            os.close(fd)


def compile_only_devices(target: Target) -> list:
    """The target's devices as compile-only ``jax.Device``s, in the topology's order."""
    import jax
    from jax.experimental import topologies

    if target.platform == "tpu":
        import importlib.util

        if importlib.util.find_spec("libtpu") is None:
            raise MissingCompilerError(
                f"Planning for {target.name} needs the TPU compiler (libtpu), which is not "
                f"installed. Install it with: {install_hint()}.")
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no GCE metadata server to ask
        # libtpu takes a machine-wide lock for the chips it drives; compiling for a topology
        # drives none, so several plans (or a plan beside a test run) may load it at once.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        kwargs = dict(chip_config_name=target.chip.chip_config, chips_per_host_bounds=(2, 2, 1),
                      wrap=(False, False, False))
        if target.slices > 1:
            kwargs["num_slices"] = target.slices
        with _quiet_stderr():
            topo = topologies.get_topology_desc(platform="tpu", topology_name=target.topology,
                                                **kwargs)
        return list(topo.devices)
    try:
        import jax_plugins.xla_cuda12  # noqa: F401
    except ImportError:
        raise MissingCompilerError(
            f"Planning for {target.name} needs the CUDA compiler plugin, which is not "
            f"installed. Install it with: {install_hint()}.") from None
    spec = GPU_SPECS[target.chip.gpu_spec]
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf), _quiet_stderr():
        try:
            topo = topologies.get_topology_desc(platform="cuda", topology_name="",
                                                target_config=gpu_target_config(spec),
                                                topology=target.topology)
        except (NotImplementedError, RuntimeError, jax.errors.JaxRuntimeError) as e:
            raise MissingCompilerError(
                f"The CUDA plugin could not describe {target.name} for compilation ({e}). "
                f"Check that it matches jax {jax.__version__}: {install_hint()}.") from None
    return list(topo.devices)
