"""``jaxtune.distributed``: processes that cannot join fail in bounded time, saying why.

The subprocess tests run the real ``jaxtune train`` CLI with ``distributed.initialize:
explicit`` on loopback: a wrong coordinator address, a coordinator left alone, more processes
expected than started, and processes that disagree on the count must each exit with status 2
and a message naming the setting (JAX itself would block, then abort the process with
``DEADLINE_EXCEEDED``: another status, no such message). Address checks and cluster detection
run in this process: they finish before JAX is asked to connect.

No test depends on which process starts first or how fast: where one process must meet
another, process 0 is started first and the next one only once process 0's coordinator is
listening (a condition polled, not a sleep), and process 0 then gets a timeout far longer than
the wait it serves. Time bounds only catch hangs; they hold on a loaded machine.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
import yaml

from jaxtune.config import DistributedConfig
from jaxtune.distributed import DistributedError, detect_cluster, initialize, parse_address

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 5  # distributed.timeout_seconds of a process expected to give up
PATIENT = 300  # that of a process that must outlast the others (it is killed, or fails fast)
BOUND = 240  # catches a hang; start-up on a loaded 2-core machine takes far less


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> str:
    # Distributed start-up comes first in the trainer, so nothing else needs to exist.
    path = tmp_path_factory.mktemp("distributed") / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"path": "not-loaded-before-distributed-init"},
        "data": {"sources": [{"path": "unused.jsonl"}]},
        "trainer": {"progress": False},
    }))
    return str(path)


def train(recipe: str, run_dir: str, *, address: str, num: int, pid: int,
          timeout: int = TIMEOUT) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "jaxtune.cli", "train", recipe, f"--run.output_dir={run_dir}",
           "--distributed.initialize=explicit", f"--distributed.coordinator_address={address}",
           f"--distributed.num_processes={num}", f"--distributed.process_id={pid}",
           f"--distributed.timeout_seconds={timeout}"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=ROOT)


def wait_all(procs: list[subprocess.Popen]) -> tuple[list[int], list[str], float]:
    tick = time.monotonic()
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=BOUND)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [p.returncode for p in procs], outs, time.monotonic() - tick


def start_coordinator(recipe: str, run_dir: str, address: str, num: int) -> subprocess.Popen:
    """Process 0 with a long timeout, returned once its coordinator accepts connections."""
    proc = train(recipe, run_dir, address=address, num=num, pid=0, timeout=PATIENT)
    host, port = parse_address(address)
    deadline = time.monotonic() + BOUND
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"process 0 never listened on {address}: {proc.communicate()[0]}")


def error_line(out: str) -> str:
    lines = [line for line in out.splitlines() if line.startswith("error: ")]
    assert lines, out[-3000:]
    return lines[-1]


def test_wrong_coordinator_address_fails_in_bounded_time(recipe, tmp_path):
    port = free_port()  # nothing listens there: process 0 is "elsewhere"
    rcs, outs, took = wait_all([train(recipe, str(tmp_path), address=f"127.0.0.1:{port}",
                                      num=2, pid=1)])
    assert rcs == [2], outs[0][-3000:]
    assert took < BOUND, took
    msg = error_line(outs[0])
    assert f"distributed.coordinator_address=127.0.0.1:{port}" in msg
    assert "nothing answered" in msg and f"timeout_seconds={TIMEOUT}s" in msg
    assert "Traceback" not in outs[0]


def test_coordinator_left_alone_fails_in_bounded_time(recipe, tmp_path):
    rcs, outs, took = wait_all([train(recipe, str(tmp_path), address=f"127.0.0.1:{free_port()}",
                                      num=2, pid=0)])
    assert rcs == [2], outs[0][-3000:]
    assert took < BOUND, took
    msg = error_line(outs[0])
    assert "not all distributed.num_processes=2 processes joined" in msg
    assert f"timeout_seconds={TIMEOUT}s" in msg and "Traceback" not in outs[0]


def test_more_processes_expected_than_started_fails_in_bounded_time(recipe, tmp_path):
    address = f"127.0.0.1:{free_port()}"
    coordinator = start_coordinator(recipe, str(tmp_path), address, num=3)
    try:
        rcs, outs, took = wait_all([train(recipe, str(tmp_path), address=address, num=3,
                                          pid=1)])
        assert coordinator.poll() is None  # process 0 was up for all of process 1's wait
    finally:
        coordinator.kill()
        coordinator.communicate()
    assert rcs == [2], outs[0][-3000:]
    assert took < BOUND, took
    msg = error_line(outs[0])
    assert "reached the coordinator" in msg and "distributed.num_processes" in msg
    assert f"timeout_seconds={TIMEOUT}s" in msg and "Traceback" not in outs[0]


def test_processes_that_disagree_on_the_count_fail_fast(recipe, tmp_path):
    # JAX itself would connect these two happily: only process 0's count is used. Both have
    # a long timeout, so failing at all shows the count check, not a timeout, stopped them.
    address = f"127.0.0.1:{free_port()}"
    procs = [start_coordinator(recipe, str(tmp_path), address, num=2)]
    procs.append(train(recipe, str(tmp_path), address=address, num=3, pid=1, timeout=PATIENT))
    rcs, outs, took = wait_all(procs)
    assert rcs == [2, 2], outs
    assert took < BOUND, took
    for out in outs:
        msg = error_line(out)
        assert "disagree on distributed.num_processes" in msg
        assert "process 0 says 2" in msg or "process 1 says 3" in msg


def explicit(address: str, pid: int = 1) -> DistributedConfig:
    return DistributedConfig(initialize="explicit", coordinator_address=address,
                             num_processes=2, process_id=pid, timeout_seconds=5)


@pytest.mark.parametrize("address", ["127.0.0.1", "host:port", ":8476", "10.0.0.1:70000"])
def test_malformed_address_is_refused_at_once(address):
    with pytest.raises(DistributedError, match="must be host:port of process 0"):
        initialize(explicit(address))


def test_unresolvable_host_is_refused_at_once():
    with pytest.raises(DistributedError, match="'no-such-host.invalid' does not resolve"):
        initialize(explicit("no-such-host.invalid:8476"))


def test_process_0_refuses_a_port_in_use():
    with socket.socket() as s:
        s.bind(("", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(DistributedError, match=f"port {port}.*taken"):
            initialize(explicit(f"127.0.0.1:{port}", pid=0))


def test_parse_address_accepts_ipv6_brackets():
    assert parse_address("[::1]:8476") == ("::1", 8476)
    assert parse_address("node-0.cluster:1234") == ("node-0.cluster", 1234)


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "1",
      "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}, None),  # one task: nothing to connect
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2",
      "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}, "slurm"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, None),  # sbatch script outside srun
    ({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:4000"}, "ompi"),
    ({"TPU_WORKER_HOSTNAMES": "t0,t1"}, "tpu"),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.1:8080"}, "tpu"),
])
def test_detect_cluster(monkeypatch, env, expected):
    for key in list(os.environ):
        if key.startswith(("SLURM_", "OMPI_", "TPU_", "MEGASCALE_")):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert detect_cluster() == expected


def test_auto_and_off_do_nothing_on_one_machine(monkeypatch):
    for key in list(os.environ):
        if key.startswith(("SLURM_", "OMPI_", "TPU_", "MEGASCALE_")):
            monkeypatch.delenv(key)
    from jaxtune import distributed

    initialize(DistributedConfig(initialize="auto"))
    initialize(DistributedConfig(initialize="off"))
    assert not distributed.is_initialized()
    assert distributed.is_main_process()
    distributed.barrier("single-process", timeout_seconds=1)  # no-op with one process


@pytest.mark.parametrize("env, expected", [
    ({"SLURM_NTASKS_PER_NODE": "1", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}, [0, 1, 2, 3]),
    ({"SLURM_TASKS_PER_NODE": "1(x2)", "SLURM_GPUS_ON_NODE": "8"}, list(range(8))),
    ({"SLURM_TASKS_PER_NODE": "8(x2)", "CUDA_VISIBLE_DEVICES": "5"}, [0]),  # gpus-per-task=1
    ({"SLURM_TASKS_PER_NODE": "8(x2)", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}, None),
    ({"SLURM_NTASKS_PER_NODE": "1"}, None),  # CPU nodes: nothing to choose
])
def test_slurm_tasks_drive_the_right_gpus(monkeypatch, env, expected):
    from jaxtune.distributed import _slurm_local_device_ids

    for key in ("SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_GPUS_ON_NODE",
                "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert _slurm_local_device_ids() == expected


def test_a_coordinator_seen_during_the_wait_counts_even_if_gone_at_the_end():
    """Process 1's diagnosis remembers that process 0 answered, even after it gave up."""
    from jaxtune.distributed import _CoordinatorProbe, _join_timeout_message

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        probe = _CoordinatorProbe("127.0.0.1", port, interval=0.05)
        deadline = time.monotonic() + BOUND
        while not probe.reached() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert probe.reached()
    cfg = explicit(f"127.0.0.1:{port}")  # nothing listens there any more
    assert "reached the coordinator" in _join_timeout_message(cfg, reached=True)
    assert "nothing answered" in _join_timeout_message(cfg, reached=False)


class _FakeClient:
    """Records key-value calls; ``blocking_key_value_get`` answers only keys already set."""

    def __init__(self, keys=()):
        self.keys, self.calls = set(keys), []

    def key_value_set(self, key, value):
        self.calls.append(("set", key))
        self.keys.add(key)

    def blocking_key_value_get(self, key, timeout_ms):
        self.calls.append(("wait", key))
        if key not in self.keys:
            raise RuntimeError("DEADLINE_EXCEEDED")
        return "1"


def test_process_0_leaves_only_after_the_others_said_they_are_leaving(monkeypatch):
    # Process 0 hosts the coordination service: leaving first would make the runtime abort a
    # process still on its way out (SIGABRT, no message of its own).
    from jaxtune import distributed

    exits = []
    monkeypatch.setattr(distributed.os, "_exit", exits.append)
    client = _FakeClient(keys={"jaxtune/leaving/1", "jaxtune/leaving/2"})
    distributed._leave(client, 0, 3, 2)
    assert client.calls == [("wait", "jaxtune/leaving/1"), ("wait", "jaxtune/leaving/2")]
    assert exits == [2]

    other = _FakeClient()
    distributed._leave(other, 2, 3, 130)
    assert other.calls == [("set", "jaxtune/leaving/2")] and exits == [2, 130]

    # One that never answers (crashed) delays process 0's exit only until the wait runs out.
    silent = _FakeClient()
    distributed._leave(silent, 0, 2, 1)
    assert silent.calls == [("wait", "jaxtune/leaving/1")] and exits == [2, 130, 1]


# The failure watch polls the coordinator with the GIL released. Python unwinds a daemon thread
# that comes back from such a call after the interpreter began to finalise, which aborts the
# process. Process 1 finishes first and sits in JAX's shutdown barrier until process 0 ends:
# with the watch polling non-stop, that aborted process 1 every time before the watch was
# stopped ahead of JAX's shutdown.
_EXIT_LAUNCHER = """
import atexit, sys, time
from jaxtune import distributed
from jaxtune.config import DistributedConfig

start = distributed._FailureWatch.start.__func__
distributed._FailureWatch.start = classmethod(lambda cls, interval=1.0: start(cls, 0.0))
pid, address = int(sys.argv[1]), sys.argv[2]
distributed.initialize(DistributedConfig(
    initialize="explicit", coordinator_address=address, num_processes=2, process_id=pid,
    timeout_seconds=%d))
client = distributed._client()
if pid == 1:  # registered last, so it runs first: process 1 is on its way out
    atexit.register(lambda: client.key_value_set("test/exiting", "1"))
else:  # stay until process 1 waits in the shutdown barrier, its watch (if any) polling
    client.blocking_key_value_get("test/exiting", %d * 1000)
    time.sleep(1.0)
print("clean end", pid, flush=True)
"""


def test_a_process_that_ends_first_waits_for_the_others_without_aborting(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    code = _EXIT_LAUNCHER % (PATIENT, BOUND)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(pid), address], env=env,
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for pid in (0, 1)]
    codes, outs, _ = wait_all(procs)
    for pid, (rc, out) in enumerate(zip(codes, outs, strict=True)):
        assert rc == 0 and f"clean end {pid}" in out, (pid, rc, out[-2000:])
