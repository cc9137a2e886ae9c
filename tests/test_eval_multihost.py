"""``jaxtune eval`` on two processes on loopback (gloo collectives, 2 CPU devices each, the
model sharded over a data x fsdp mesh spanning both) gives the same per-request results and
scores as one process: process 0 drives lm_eval, process 1 follows its log-likelihood batches
and generations. An error on process 0 (a misspelt task) ends both, each saying why."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.eval_helpers import compare, from_json, write_stop_task
from tests.test_multihost_e2e import free_port

ROOT = Path(__file__).resolve().parents[1]
RUN_CLI = "import sys; from jaxtune.cli import main; sys.exit(main(sys.argv[1:]))"
TASKS = "nimbrel_support_mc,nimbrel_support_ppl,nimbrel_support_qa,tiny_stops"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_hf_model, data_tokenizers) -> Path:
    out = tmp_path_factory.mktemp("eval_multihost") / "model"
    shutil.copytree(tiny_hf_model("llama"), out)
    for f in Path(data_tokenizers["chatml"]).iterdir():
        shutil.copy(f, out)
    return out


def start(args: list[str], devices: int) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-c", RUN_CLI, "eval", *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(procs: list[subprocess.Popen], timeout: float = 900) -> list[tuple[int, str]]:
    """(exit status, output) of each; the timeout only bounds a hang."""
    try:
        return [(p.wait(timeout=timeout), p.communicate()[0]) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def two(args: list[str]) -> list[tuple[int, str]]:
    port = free_port()
    return finish([start([*args, "--coordinator-address", f"127.0.0.1:{port}",
                          "--num-processes", "2", "--process-id", str(i)], 2)
                   for i in range(2)])


@pytest.mark.slow
def test_two_processes_score_like_one(model_dir, tmp_path):
    tasks = write_stop_task(tmp_path / "tasks")
    common = [str(model_dir), "--tasks", TASKS, "--include-path", str(tasks), "--limit", "4",
              "--batch-size", "2", "--log-samples", "--bootstrap-iters", "0"]
    [(rc, out)] = finish([start([*common, "--output", str(tmp_path / "one.json")], 1)])
    assert rc == 0, out[-3000:]
    runs = two([*common, "--fsdp", "2", "--output", str(tmp_path / "two.json")])
    for rc, out in runs:
        assert rc == 0, out[-3000:]
    assert "|nimbrel_support_mc " in runs[0][1] and "|nimbrel_support_mc " not in runs[1][1]
    one, both = from_json(tmp_path / "one.json"), from_json(tmp_path / "two.json")
    assert both["jaxtune"]["processes"] == 2 and both["jaxtune"]["devices"] == 4
    seen = compare(both, one)
    assert seen["loglikelihood"] == 16 and seen["rolling"] == 4 and seen["generation"] == 8


@pytest.mark.slow
def test_an_error_on_process_0_ends_both(model_dir):
    runs = two([str(model_dir), "--tasks", "nimbrel_support_mcq"])
    assert [rc for rc, _ in runs] == [2, 2], [out[-2000:] for _, out in runs]
    assert "Unknown lm_eval task 'nimbrel_support_mcq'" in runs[0][1]
    assert "process 0 stopped the evaluation" in runs[1][1] and "nimbrel_support_mcq" in \
        runs[1][1]
    assert not any("Traceback" in out for _, out in runs)
