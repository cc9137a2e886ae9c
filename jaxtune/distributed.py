"""Multi-process JAX start-up: ``jax.distributed.initialize`` from the config.

Call :func:`initialize` before anything touches a JAX backend. ``auto`` lets JAX detect TPU
VMs, SLURM and GKE clusters (and does nothing on a single machine); ``explicit`` takes the
coordinator address, process count and id from the config; ``off`` never initialises.
"""

from __future__ import annotations

import logging
import os

import jax

from jaxtune.config import DistributedConfig
from jaxtune.errors import JaxtuneError

log = logging.getLogger(__name__)

_CLUSTER_ENV = ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
                "JOBSET_NAME")


class DistributedError(JaxtuneError):
    """The processes could not connect; the message says which setting to check."""


def _in_cluster() -> bool:
    return any(os.environ.get(k) for k in _CLUSTER_ENV)


def initialize(cfg: DistributedConfig) -> None:
    """Connect this process to the others (idempotent; a no-op for single-process runs)."""
    if cfg.initialize == "off" or _already_initialized():
        return
    if cfg.initialize == "auto":
        if not _in_cluster():
            return
        jax.distributed.initialize(initialization_timeout=cfg.timeout_seconds)
        return
    kwargs = dict(
        coordinator_address=cfg.coordinator_address,
        num_processes=cfg.num_processes,
        process_id=cfg.process_id,
        initialization_timeout=cfg.timeout_seconds,
    )
    if cfg.local_device_ids:
        kwargs["local_device_ids"] = cfg.local_device_ids
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # the runtime's errors name neither the setting nor the fix
        raise DistributedError(
            f"Process {cfg.process_id} of {cfg.num_processes} could not join the coordinator "
            f"at {cfg.coordinator_address} within {cfg.timeout_seconds}s ({e}). Check "
            "distributed.coordinator_address (reachable host:port of process 0), that every "
            "process uses the same distributed.num_processes, and that process 0 is running."
        ) from e


def _already_initialized() -> bool:
    try:
        from jax._src import distributed as _dist

        return _dist.global_state.client is not None
    except Exception:  # private API moved: assume not initialised
        return False


def is_main_process() -> bool:
    """Process 0 writes logs, metrics and the resolved config; all processes checkpoint."""
    return jax.process_index() == 0
