"""Two real ``jaxtune train`` processes on loopback against one process, through the CLI.

A: one process with 8 fake CPU devices trains 8 steps on a (data 2, fsdp 2, tensor 2) mesh.
B: two processes with 4 fake CPU devices each join through ``jax.distributed`` (explicit
   coordinator on 127.0.0.1, gloo collectives) and train 6 steps of the same recipe on the
   same (2, 2, 2) mesh built the multi-slice way (``mesh.data=1, mesh.dcn_data=2``: FSDP and
   tensor within a process, data across the two). Their losses must equal A's (f32, tight
   tolerance); together they must read exactly A's rows of each batch, neither the other's.
C: one process resumes B's checkpoint of step 6 and trains to step 8: steps 7-8 must equal A's.

The learning-rate schedule is constant so the 6- and 8-step runs share their first steps.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import yaml

from tests.fixtures_data import chat_rows, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs the real CLI; prints each step's loss and, per process, the source rows of each batch.
# Each such line is one write(2) of a whole line, which other writers to the pipe (gloo's C++
# logging shares it) cannot split; they can still leave half a line of theirs before it, so the
# parser finds the marker anywhere in a line (:func:`e2e_lines`).
LAUNCHER = textwrap.dedent("""
    import json, os, sys
    import jax
    from jaxtune import trainer
    from jaxtune.data import loader

    finish, next_batch = trainer.Trainer._finish_step, loader.BatchIterator.__next__

    def emit(line):
        sys.stdout.flush()
        os.write(1, (line + "\\n").encode())

    def printed_finish(self, step, *args, **kwargs):
        if os.environ.get("E2E_FAIL") == f"{jax.process_index()}:{step}":
            from jaxtune.errors import JaxtuneError
            raise JaxtuneError(f"injected failure at step {step}")
        values = finish(self, step, *args, **kwargs)
        emit(f"E2E-LOSS {jax.process_index()} {step} {values['loss']!r}")
        return values

    def recorded_next(self):
        batch = next_batch(self)
        if self.train:
            emit(f"E2E-ROWS {self.process_index} {self.batches} "
                 f"{json.dumps(self.last_examples)}")
        return batch

    trainer.Trainer._finish_step = printed_finish
    loader.BatchIterator.__next__ = recorded_next
    from jaxtune.cli import main
    sys.exit(main(sys.argv[1:]))
""")

MESH_1P = ["--mesh.data=2", "--mesh.fsdp=2", "--mesh.tensor=2"]
MESH_2P = ["--mesh.data=1", "--mesh.dcn_data=2", "--mesh.fsdp=2", "--mesh.tensor=2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_hf_model, data_tokenizers):
    root = tmp_path_factory.mktemp("multihost_e2e")
    data = write_jsonl(root / "chats.jsonl", chat_rows(120, seed=7, turns=1, system=False))
    cfg = {
        "run": {"name": "multihost-e2e", "seed": 11},
        "model": {"path": str(tiny_hf_model("llama")), "tokenizer": data_tokenizers["chatml"],
                  "dtype": "float32", "compute_dtype": "float32"},
        "data": {"sources": [{"path": data}], "format": "chat", "seq_len": 32, "packing": True,
                 "shuffle": True, "cache_dir": str(root / "cache")},
        "optimizer": {"learning_rate": 3e-3, "schedule": "constant", "weight_decay": 0.01},
        "trainer": {"steps": 8, "global_batch_size": 8, "progress": False},
        "checkpoint": {"save_every": 3, "keep": 2, "async_save": False},
        "logging": {"tensorboard": False},
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return root, str(path)


def start(recipe_path: str, run_dir: str, devices: int, args: list[str],
          **env_extra: str) -> subprocess.Popen:
    env = {**os.environ, **env_extra, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-c", LAUNCHER, "train", recipe_path, f"--run.output_dir={run_dir}",
           *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=ROOT)


def e2e_lines(text: str):
    """``(kind, fields)`` of each launcher line (``LOSS`` or ``ROWS``), wherever it starts."""
    for line in text.splitlines():
        found = re.search(r"E2E-(LOSS|ROWS) (.*)$", line)
        if found:
            yield found.group(1), found.group(2)


def finish(procs: list[subprocess.Popen], timeout: float = 900) -> list[dict]:
    """Wait for the processes (the timeout only bounds a hang: a loaded machine is slow); per
    process: rc, {step: loss}, {step: rows}, output."""
    out = []
    try:
        for p in procs:
            text = p.communicate(timeout=timeout)[0]
            losses, rows, pids = {}, {}, set()
            for kind, fields in e2e_lines(text):
                if kind == "LOSS":
                    pid, step, value = fields.split()
                    losses[int(step)] = float(value)
                    pids.add(int(pid))
                else:
                    _, step, data = fields.split(" ", 2)
                    rows[int(step)] = [tuple(map(tuple, r)) for r in json.loads(data)]
            out.append({"rc": p.returncode, "losses": losses, "rows": rows, "pids": pids,
                        "out": text})
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return out


@pytest.fixture(scope="module")
def runs(recipe):
    root, path = recipe
    ref = finish([start(path, str(root / "a"), 8, [*MESH_1P, "--checkpoint.enabled=false"])])[0]
    assert ref["rc"] == 0, ref["out"][-4000:]
    port = free_port()
    two = finish([
        start(path, str(root / "b"), 4, [
            *MESH_2P, "--trainer.steps=6", "--distributed.initialize=explicit",
            f"--distributed.coordinator_address=127.0.0.1:{port}",
            "--distributed.num_processes=2", f"--distributed.process_id={i}",
            "--distributed.timeout_seconds=600"])  # only bounds a hang; a loaded machine is slow
        for i in range(2)])
    for r in two:
        assert r["rc"] == 0, r["out"][-4000:]
    resumed = finish([start(path, str(root / "b"), 8, MESH_1P)])[0]
    assert resumed["rc"] == 0, resumed["out"][-4000:]
    return ref, two, resumed


@pytest.mark.slow
def test_two_processes_match_one_process(runs):
    ref, two, _ = runs
    assert sorted(ref["losses"]) == list(range(1, 9))
    assert [r["pids"] for r in two] == [{0}, {1}]  # really two JAX processes
    want = np.array([ref["losses"][s] for s in range(1, 7)])
    for r in two:  # every process reads back the same global loss
        assert sorted(r["losses"]) == list(range(1, 7)), r["out"][-3000:]
        got = np.array([r["losses"][s] for s in range(1, 7)])
        print("two-process vs one-process loss, max relative difference:",
              np.max(np.abs(got - want) / want))
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=0)
    assert ref["losses"][6] < ref["losses"][1]  # it trained, so the comparison means something


@pytest.mark.slow
def test_each_process_read_only_its_rows(runs):
    ref, two, _ = runs
    seen: list[list] = [[], []]  # (source, shard, row) of every document each process read
    for step in range(1, 7):
        p0, p1 = two[0]["rows"][step], two[1]["rows"][step]
        assert len(p0) == len(p1) == 4  # 8 rows per global batch, half each
        assert p0 + p1 == ref["rows"][step]  # process 0 holds the first half, in order
        for i, rows in enumerate((p0, p1)):
            seen[i] += [doc for row in rows for doc in row]
    # The 6 steps stay within the first epoch, so no document may be read twice anywhere.
    assert len(seen[0]) >= 24 and len(seen[1]) >= 24
    assert len(set(seen[0] + seen[1])) == len(seen[0]) + len(seen[1])


@pytest.mark.slow
def test_one_process_resumes_the_two_process_checkpoint(recipe, runs):
    root, _ = recipe
    ref, _, resumed = runs
    assert "resumed from step 6" in resumed["out"], resumed["out"][-3000:]
    assert sorted(resumed["losses"]) == [7, 8], resumed["out"][-3000:]
    np.testing.assert_allclose([resumed["losses"][s] for s in (7, 8)],
                               [ref["losses"][s] for s in (7, 8)], rtol=2e-5, atol=0)
    # Only process 0 wrote the run directory's files; both wrote the checkpoint together.
    assert sorted(os.listdir(root / "b" / "checkpoints")) == ["6", "8"]
    lines = (root / "b" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines if '"loss"' in line]
    assert steps == list(range(1, 9))  # each step once: process 1 wrote no metrics


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_saved_step(recipe):
    """A preemption notice reaches one worker; JAX's sync point stops all at one step."""
    root, path = recipe
    run_dir = str(root / "sigterm")
    port = free_port()
    procs = [start(path, run_dir, 4, [
        *MESH_2P, "--trainer.steps=500", "--checkpoint.save_every=1000",
        "--distributed.initialize=explicit",
        f"--distributed.coordinator_address=127.0.0.1:{port}",
        "--distributed.num_processes=2", f"--distributed.process_id={i}"]) for i in range(2)]
    for line in procs[1].stdout:
        if "E2E-LOSS 1 3 " in line:
            procs[1].send_signal(signal.SIGTERM)
            break
    runs = finish(procs, timeout=600)
    for r in runs:
        assert r["rc"] == 0, r["out"][-4000:]
    saved = os.listdir(os.path.join(run_dir, "checkpoints"))
    assert len(saved) == 1 and 3 <= int(saved[0]) < 500, saved
    for r in runs:  # both stopped after the saved step
        assert max(r["losses"]) == int(saved[0]), (saved, sorted(r["losses"]))


@pytest.mark.slow
def test_an_error_in_one_process_stops_the_other_at_once(recipe):
    """Without fail_fast both would wait minutes (shutdown barrier vs. next collective)."""
    root, path = recipe
    port = free_port()
    procs = [start(path, str(root / "fail"), 4, [
        *MESH_2P, "--trainer.steps=500", "--checkpoint.enabled=false",
        "--distributed.initialize=explicit",
        f"--distributed.coordinator_address=127.0.0.1:{port}",
        "--distributed.num_processes=2", f"--distributed.process_id={i}"], E2E_FAIL="1:3")
        for i in range(2)]
    # Time from process 1's failure to process 0's exit (start-up and compiling, which a
    # loaded machine slows down, are not part of what fail_fast bounds).
    head = []
    try:
        for line in procs[1].stdout:
            head.append(line)
            if "error: injected failure" in line:
                break
        failed_at = time.monotonic()
        procs[0].wait(timeout=600)
        took = time.monotonic() - failed_at
    finally:
        runs = finish(procs, timeout=600)
    # No deadline (a loaded machine is slow): the message below exists only on fail_fast's
    # path; without it process 0 would end on a collective's timeout error instead.
    print(f"process 0 exited {took:.1f} s after process 1's failure")
    runs[1]["out"] = "".join(head) + runs[1]["out"]
    assert [r["rc"] for r in runs] == [2, 2], [r["out"][-2000:] for r in runs]
    assert "error: injected failure at step 3" in runs[1]["out"]
    assert "error: stopping because process 1: injected failure at step 3" in runs[0]["out"]
