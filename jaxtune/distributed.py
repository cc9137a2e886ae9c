"""Multi-process JAX start-up: ``jax.distributed.initialize`` from the config, failing clearly.

JAX's multi-controller runtime runs the same program on every host; :func:`initialize` connects
this process to the others and must run before anything touches a JAX backend (the trainer
calls it first). ``distributed.initialize`` picks how:

- ``auto``: connect when JAX can read the cluster from the environment (Cloud TPU VMs and
  multislice, GKE, SLURM with more than one task, Open MPI); on one machine do nothing.
- ``explicit``: ``coordinator_address`` (host:port of process 0), ``num_processes`` and
  ``process_id`` from the config (or ``--distributed.*`` overrides).
- ``off``: never connect.

A process that cannot join never hangs: the address is checked before JAX sees it, and a
watchdog thread ends the process after ``distributed.timeout_seconds`` with a message that
names the setting to check (JAX itself would wait, then abort with ``DEADLINE_EXCEEDED``).
After connecting, the processes compare their ``num_processes``, since JAX only uses process
0's. On CPU, collectives between processes use gloo. Once connected, a process that fails
calls :func:`fail_fast`: it tells the others, which stop within seconds naming it, instead of
all of them waiting minutes on each other in collectives and JAX's shutdown barrier.

Only process 0 (:func:`is_main_process`) writes logs, metrics and the resolved config; every
process reads its own rows of each batch and writes its own shards of each checkpoint.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import sys
import threading
import time

import jax

from jaxtune.config import DistributedConfig
from jaxtune.errors import JaxtuneError

log = logging.getLogger("jaxtune")

#: Exit status of a process the watchdog ends (the CLI's status for user-fixable errors).
EXIT_CODE = 2


class DistributedError(JaxtuneError):
    """The processes could not connect; the message says which setting to check."""


# --------------------------------------------------------------------------- detection


def detect_cluster() -> str | None:
    """The multi-process environment JAX can bootstrap from here, or None on one machine.

    Returns a name JAX's ``cluster_detection_method`` accepts, or ``"tpu"`` for Cloud TPU
    VMs (JAX then tells GCE from GKE itself). A SLURM allocation with one task is not a
    cluster: starting a coordinator there would only risk port clashes.
    """
    env = os.environ
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
             "SLURM_LOCALID")
    if all(k in env for k in slurm) and _int(env["SLURM_NTASKS"]) > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in env:
        return "ompi"
    if env.get("MEGASCALE_COORDINATOR_ADDRESS") or env.get("TPU_WORKER_HOSTNAMES"):
        return "tpu"
    if _running_on_cloud_tpu_vm():
        return "tpu"
    return None


def _running_on_cloud_tpu_vm() -> bool:
    try:  # JAX's own check (libtpu installed and TPU device files present)
        from jax._src.cloud_tpu_init import running_in_cloud_tpu_vm

        return bool(running_in_cloud_tpu_vm)
    except Exception:  # private API moved
        return False


def _slurm_local_device_ids() -> list[int] | None:
    """The GPUs this SLURM task should drive, where JAX's own guess would be wrong.

    JAX gives each task the one GPU numbered by its SLURM_LOCALID, which is right for one task
    per GPU with every GPU visible. With one task per node the task must drive all visible
    GPUs, and with ``--gpus-per-task=1`` its single visible GPU is number 0.
    """
    env = os.environ
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    count = len(visible) or _int(env.get("SLURM_GPUS_ON_NODE", ""))
    per_node = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "")
    tasks_here = _int(per_node.split("(")[0].split(",")[0])
    if count and tasks_here == 1:
        return list(range(count))
    if len(visible) == 1:
        return [0]
    return None  # JAX's default: [SLURM_LOCALID]


def _int(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        return 0


# --------------------------------------------------------------------------- initialize


def initialize(cfg: DistributedConfig) -> None:
    """Connect this process to the others (idempotent; a no-op for single-process runs).

    Raises :class:`DistributedError` for a bad address or disagreeing settings; ends the
    process with a message (status :data:`EXIT_CODE`) when the others do not all join within
    ``cfg.timeout_seconds``.
    """
    if cfg.initialize == "off" or is_initialized():
        return
    if cfg.initialize == "auto":
        cluster = detect_cluster()
        if cluster is None:
            return
        _initialize_auto(cfg, cluster)
    else:
        _initialize_explicit(cfg)
    log.info("process %d of %d joined (%d local devices, %d in all)", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    if jax.process_count() > 1:
        # One small request per process per interval to the coordinator: slower on big jobs.
        _FailureWatch.start(interval=max(1.0, jax.process_count() / 100))


def _initialize_auto(cfg: DistributedConfig, cluster: str) -> None:
    _cpu_collectives()
    method = None if cluster == "tpu" else cluster
    watchdog = _Watchdog(cfg.timeout_seconds, lambda: (
        f"Could not connect the processes of this {cluster} job within "
        f"distributed.timeout_seconds={cfg.timeout_seconds}s (distributed.initialize: auto). "
        "Every worker/task must run the same command at about the same time; check that all "
        "of them started and that none failed early (see their logs). To connect "
        "explicitly, set distributed.initialize: explicit with coordinator_address, "
        "num_processes and process_id."))
    local = list(cfg.local_device_ids) or (_slurm_local_device_ids() if cluster == "slurm"
                                           else None)
    try:
        jax.distributed.initialize(cluster_detection_method=method, local_device_ids=local,
                                   initialization_timeout=_jax_timeout(cfg))
    except Exception as e:
        watchdog.cancel()
        hint = _BACKEND_HINT if "must be called before" in str(e) else (
            "Set distributed.initialize: explicit (coordinator_address, num_processes, "
            "process_id) or off.")
        raise DistributedError(
            f"jax.distributed.initialize failed in a {cluster} environment: {e}. {hint}"
        ) from e
    watchdog.cancel()


def _initialize_explicit(cfg: DistributedConfig) -> None:
    host, port = parse_address(cfg.coordinator_address)
    _resolve(host, cfg)
    if cfg.process_id == 0:
        _check_port_free(port, cfg)
    _cpu_collectives()
    # A process other than 0 watches for the coordinator during the whole wait, so the
    # diagnosis does not depend on whether process 0 is still up at the very end.
    probe = None if cfg.process_id == 0 else _CoordinatorProbe(host, port)
    watchdog = _Watchdog(cfg.timeout_seconds, lambda: _join_timeout_message(
        cfg, reached=probe is not None and probe.reached()))
    kwargs = dict(coordinator_address=cfg.coordinator_address,
                  num_processes=cfg.num_processes, process_id=cfg.process_id,
                  initialization_timeout=_jax_timeout(cfg))
    if cfg.local_device_ids:
        kwargs["local_device_ids"] = list(cfg.local_device_ids)
    try:
        jax.distributed.initialize(**kwargs)
        _check_same_process_count(cfg)
    except DistributedError:
        watchdog.cancel()
        raise
    except Exception as e:  # the runtime's errors name neither the setting nor the fix
        watchdog.cancel()
        if probe is not None:
            probe.stop()
        hint = _BACKEND_HINT if "must be called before" in str(e) else (
            "Check distributed.coordinator_address (reachable host:port of process 0), that "
            "every process uses the same distributed.num_processes, and that each has its own "
            "distributed.process_id.")
        raise DistributedError(
            f"Process {cfg.process_id} of {cfg.num_processes} could not join the coordinator "
            f"at {cfg.coordinator_address}: {e}. {hint}"
        ) from e
    watchdog.cancel()
    if probe is not None:
        probe.stop()


_BACKEND_HINT = (
    "JAX was already in use in this process (a backend was initialised) before "
    "jaxtune.distributed.initialize ran; call it first, before any jax.devices() or array "
    "operation.")


def _jax_timeout(cfg: DistributedConfig) -> int:
    # JAX aborts the process (no Python exception) when its own deadline passes; giving it
    # more time than the watchdog lets the watchdog report the problem first.
    return int(cfg.timeout_seconds) + 30


def _cpu_collectives() -> None:
    """Collectives between processes on CPU need gloo (some JAX versions default to none)."""
    try:
        if jax.config.jax_cpu_collectives_implementation not in ("gloo", "mpi"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except AttributeError:  # an older/newer JAX without the option
        pass


# --------------------------------------------------------------------------- address checks


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6addr]:port`` too) -> (host, port); DistributedError if malformed."""
    host, sep, port = address.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedError(
            f"distributed.coordinator_address is '{address}'; it must be host:port of process "
            "0, e.g. 10.0.0.2:8476 (any free port, the same on every process)."
        )
    return host, int(port)


def _resolve(host: str, cfg: DistributedConfig) -> None:
    try:
        socket.getaddrinfo(host, None)
    except OSError as e:
        raise DistributedError(
            f"distributed.coordinator_address is '{cfg.coordinator_address}', but the host "
            f"'{host}' does not resolve on this machine ({e}). Use the hostname or IP address "
            "of the machine running process 0."
        ) from None


def _check_port_free(port: int, cfg: DistributedConfig) -> None:
    """Process 0 serves the coordinator on ``port``: fail clearly if something holds it."""
    family = socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("::" if family == socket.AF_INET6 else "", port))
    except OSError as e:
        raise DistributedError(
            f"Process 0 must serve the coordinator on port {port} "
            f"(distributed.coordinator_address={cfg.coordinator_address}), but that port is "
            f"taken on this machine ({e.strerror}). An earlier run may still be running; stop "
            "it or choose another port for every process."
        ) from None


def _reachable(host: str, port: int, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class _CoordinatorProbe:
    """Polls process 0's port until it answers once (a plain TCP connect, then closed)."""

    def __init__(self, host: str, port: int, interval: float = 0.5):
        self._reached = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(host, port, interval),
                                        name="jaxtune-coordinator-probe", daemon=True)
        self._thread.start()

    def _run(self, host: str, port: int, interval: float) -> None:
        while not self._stop.is_set():
            if _reachable(host, port, timeout=interval):
                self._reached.set()
                return
            self._stop.wait(interval)

    def reached(self) -> bool:
        return self._reached.is_set()

    def stop(self) -> None:
        self._stop.set()


def _join_timeout_message(cfg: DistributedConfig, reached: bool = False) -> str:
    """Why the processes did not all join, as far as this process can tell.

    ``reached``: the coordinator answered at some point during the wait (it may have given
    up and gone since).
    """
    host, port = parse_address(cfg.coordinator_address)
    waited = f"within distributed.timeout_seconds={cfg.timeout_seconds}s"
    same = (f"Start all {cfg.num_processes} processes with the same "
            f"distributed.num_processes={cfg.num_processes} and coordinator_address, and "
            f"each with its own distributed.process_id in 0..{cfg.num_processes - 1}.")
    if cfg.process_id == 0:
        return (f"Process 0 served the coordinator on port {port} but not all "
                f"distributed.num_processes={cfg.num_processes} processes joined {waited}. "
                f"{same} Check that the others can reach {cfg.coordinator_address} (firewall, "
                "the address of this machine) and that none of them failed at start-up.")
    if not (reached or _reachable(host, port)):
        return (f"Process {cfg.process_id} found no coordinator at "
                f"distributed.coordinator_address={cfg.coordinator_address} {waited}: nothing "
                f"answered on port {port} of {host}. Check the address (it must be the machine "
                "running process 0 and the port it uses) and that process 0 is running.")
    return (f"Process {cfg.process_id} reached the coordinator at {cfg.coordinator_address} but "
            f"the processes did not all join {waited}. The coordinator (process 0) waits for "
            f"its own distributed.num_processes; this process says {cfg.num_processes}. {same}")


# --------------------------------------------------------------------------- after connecting


def _check_same_process_count(cfg: DistributedConfig) -> None:
    """JAX uses only process 0's num_processes; a disagreeing process would go unnoticed."""
    client = _client()
    if client is None:
        return
    mine = str(cfg.num_processes)
    client.key_value_set(f"jaxtune/num_processes/{cfg.process_id}", mine)
    wait_ms = max(1000, int(cfg.timeout_seconds * 1000))
    said = {0: client.blocking_key_value_get("jaxtune/num_processes/0", wait_ms)}
    if cfg.process_id == 0:  # every process sets its key before reading, so none is missing
        for pid in range(1, cfg.num_processes):
            said[pid] = client.blocking_key_value_get(f"jaxtune/num_processes/{pid}", wait_ms)
    wrong = {pid: n for pid, n in said.items() if n != mine}
    if wrong:
        got = ", ".join(f"process {pid} says {n}" for pid, n in sorted(wrong.items()))
        raise DistributedError(
            f"The processes disagree on distributed.num_processes: process {cfg.process_id} "
            f"says {cfg.num_processes}, {got}. Give every process the same "
            "distributed.num_processes (the number of processes started)."
        )


def _state():
    try:
        from jax._src import distributed as _dist

        return _dist.global_state
    except Exception:  # private API moved
        return None


def _client():
    state = _state()
    return getattr(state, "client", None)


def is_initialized() -> bool:
    """Whether ``jax.distributed`` is connected in this process."""
    return _client() is not None


def is_main_process() -> bool:
    """Process 0 writes logs, metrics and the resolved config; all processes checkpoint."""
    return jax.process_index() == 0


def barrier(name: str, timeout_seconds: float) -> None:
    """Wait until every process reaches ``name`` (no-op with one process; no device work).

    Use it where process 0 does something alone (export) while the others must stay up.
    """
    client = _client()
    if client is None or jax.process_count() == 1:
        return
    client.wait_at_barrier(f"jaxtune/{name}", int(timeout_seconds * 1000))


# --------------------------------------------------------------------------- failures


_FAILURE_KEY = "jaxtune/failure"
_LEAVING_KEY = "jaxtune/leaving"


def fail_fast(err: BaseException) -> None:
    """In a multi-process run, report ``err`` to the other processes and exit now.

    Without this a process that fails alone would wait in JAX's shutdown barrier while the
    others wait for it in the next collective, until timeouts minutes later. Here it prints the
    error, tells the others (they stop within seconds, naming this process and its error) and
    leaves without the barrier. Does nothing with one process: the caller re-raises.
    """
    client = _client()
    state = _state()
    # The runtime's own numbers: asking jax.process_count() could start a backend, itself a
    # step all processes must take together.
    if client is None or state is None or (state.num_processes or 1) == 1:
        return
    me = state.process_id
    if isinstance(err, KeyboardInterrupt):
        text, code = "interrupted", 130
    elif isinstance(err, JaxtuneError):
        text, code = str(err), EXIT_CODE
    else:
        import traceback

        traceback.print_exception(err)
        text, code = f"{type(err).__name__}: {err}", 1
    print(f"error: {text}", file=sys.stderr, flush=True)
    try:
        client.key_value_set(_FAILURE_KEY, f"process {me}: {text}")
    except Exception:  # another process reported first, or the coordinator is gone
        pass
    _leave(client, me, state.num_processes, code)


#: How long process 0 waits for the others to say they are leaving. Only a fallback for a
#: process that can no longer answer (crashed, or stuck outside Python): the others answer
#: within one poll of the failure watch.
_LEAVE_WAIT_SECONDS = 60


def _leave(client, me: int, num_processes: int, code: int) -> None:
    """Exit with ``code``; process 0 last, once every other process has said it is leaving.

    Process 0 hosts the coordination service. Were it to exit first, the runtime in a process
    still on its way out would find the service gone and abort (``SIGABRT``, no message)
    before that process printed its own error and exited with its own status.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        if me == 0:
            deadline = time.monotonic() + _LEAVE_WAIT_SECONDS
            for pid in range(1, num_processes):
                left = max(1, int((deadline - time.monotonic()) * 1000))
                client.blocking_key_value_get(f"{_LEAVING_KEY}/{pid}", left)
        else:
            client.key_value_set(f"{_LEAVING_KEY}/{me}", "1")
    except Exception:  # a process that cannot answer, or the coordinator is gone: leave now
        pass
    os._exit(code)


class _FailureWatch:
    """Polls the coordinator for a failure another process reported; then exits with it.

    The poll is a C++ call that releases the GIL. Python ends a daemon thread that wakes from
    one after the interpreter began to finalise by unwinding it from inside that call, which
    aborts the process ("terminate called after throwing an instance of ''"). A process that
    finished first waits in JAX's shutdown barrier (an ``atexit`` hook) for the others, polling
    all the while, so that abort hit whichever process was done first. :meth:`stop` runs as an
    ``atexit`` hook registered after JAX's, so it runs before it: the thread has ended before
    JAX shuts the client down.
    """

    _thread: threading.Thread | None = None
    _stop = threading.Event()

    @classmethod
    def start(cls, interval: float = 1.0) -> None:
        if cls._thread is None:
            cls._stop.clear()
            cls._thread = threading.Thread(target=cls._run, args=(interval,), daemon=True,
                                           name="jaxtune-failure-watch")
            cls._thread.start()
            atexit.register(cls.stop)

    @classmethod
    def stop(cls) -> None:
        """End the watch and wait for its last poll (a no-op when it is not running)."""
        thread, cls._thread = cls._thread, None
        if thread is None:
            return
        cls._stop.set()
        if thread is not threading.current_thread():
            # A poll returns at once; only a watch already leaving (process 0 waiting for the
            # others' goodbyes) takes longer, and it ends the process itself. Bounded anyway:
            # a hung exit is worse than the abort this avoids.
            thread.join(timeout=_LEAVE_WAIT_SECONDS + 30)

    @classmethod
    def _run(cls, interval: float) -> None:
        while not cls._stop.is_set() and (client := _client()) is not None:
            try:
                reported = client.key_value_try_get(_FAILURE_KEY)
            except Exception:  # not set (the normal case)
                cls._stop.wait(interval)
                continue
            print(f"error: stopping because {reported}", file=sys.stderr, flush=True)
            state = _state()
            _leave(client, state.process_id, state.num_processes or 1, EXIT_CODE)


# --------------------------------------------------------------------------- watchdog


class _Watchdog:
    """Ends the process with a clear message if not cancelled within ``seconds``.

    JAX's connect call blocks in C++ and then aborts the process, so a Python exception cannot
    be raised from it; a daemon thread can still print the diagnosis and exit.
    """

    def __init__(self, seconds: float, message):
        self._done = threading.Event()
        self._message = message
        self._seconds = seconds
        self._thread = threading.Thread(target=self._run, name="jaxtune-distributed-watchdog",
                                        daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        self._done.set()

    def _run(self) -> None:
        if self._done.wait(self._seconds):
            return
        try:
            text = self._message()
        except Exception as e:  # never let the diagnosis keep the process alive
            text = f"jax.distributed did not connect in time ({e})."
        if self._done.is_set():  # connected while diagnosing
            return
        print(f"error: {text}", file=sys.stderr, flush=True)
        time.sleep(0.1)
        os._exit(EXIT_CODE)
