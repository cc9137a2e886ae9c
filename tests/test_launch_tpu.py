"""``jaxtune launch tpu``: the commands follow the documented ``gcloud compute tpus`` syntax.

The dry run for the v5p-64 recipe is parsed back with ``shlex`` and each command is checked
against the synopsis of its ``gcloud`` reference page (positional arguments and allowed flags),
and every remote ``--command`` is checked by ``bash -n``. The launcher's control flow (wait for
ACTIVE, reuse, restart after preemption, tear down) runs against a fake ``gcloud``. No network.
"""

from __future__ import annotations

import os
import shlex
import subprocess

import pytest
import yaml

from jaxtune.cli import main as cli_main
from jaxtune.config import ConfigError
from jaxtune.launch.tpu import Launcher, LaunchError, job_from_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "configs", "llama3.1-8b-full-v5p64.yaml")
BASE = ["--zone=us-east5-a", "--project=my-proj", "--accelerator-type=v5p-64"]

# Flags each command accepts, from the synopses of the gcloud reference pages
# (cloud.google.com/sdk/gcloud/reference/compute/tpus/...), plus the gcloud-wide flags used.
GLOBAL = {"--project", "--format", "--quiet"}
DOCUMENTED = {
    ("queued-resources", "create"): {
        "--zone", "--runtime-version", "--accelerator-type", "--topology", "--type",
        "--node-id", "--node-count", "--node-prefix", "--async", "--boot-disk", "--data-disk",
        "--description", "--guaranteed", "--internal-ips", "--labels", "--metadata",
        "--metadata-from-file", "--network", "--range", "--reserved", "--scopes",
        "--service-account", "--shielded-secure-boot", "--spot", "--subnetwork", "--tags",
        "--valid-after-duration", "--valid-after-time", "--valid-until-duration",
        "--valid-until-time"},
    ("queued-resources", "describe"): {"--zone"},
    ("queued-resources", "delete"): {"--zone", "--async", "--force"},
    ("queued-resources", "ssh"): {
        "--batch-size", "--dry-run", "--node", "--plain", "--ssh-flag", "--worker", "--zone",
        "--command", "--internal-ip", "--tunnel-through-iap", "--strict-host-key-checking"},
    ("queued-resources", "scp"): {
        "--batch-size", "--compress", "--node", "--recurse", "--scp-flag", "--worker",
        "--zone", "--internal-ip", "--tunnel-through-iap", "--strict-host-key-checking"},
    ("tpu-vm", "ssh"): {
        "--dry-run", "--internal-ip", "--plain", "--ssh-flag", "--ssh-key-file",
        "--strict-host-key-checking", "--worker", "--zone", "--command", "--output-directory"},
    ("tpu-vm", "scp"): {
        "--compress", "--dry-run", "--internal-ip", "--plain", "--recurse", "--scp-flag",
        "--ssh-key-file", "--strict-host-key-checking", "--worker", "--zone"},
}


def dry_run(capsys, *args: str) -> list[list[str]]:
    """The commands ``jaxtune launch tpu ... --dry-run`` prints, through the real CLI."""
    assert cli_main(["launch", "tpu", *args, "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# ")
    return [shlex.split(line) for line in lines if not line.startswith("#")]


def parse(cmd: list[str]) -> tuple[tuple[str, str], list[str], dict[str, str]]:
    """Split a gcloud command into (group, verb), positionals, {flag: value}; check syntax."""
    assert cmd[:3] == ["gcloud", "compute", "tpus"], cmd
    group, verb = cmd[3], cmd[4]
    positionals, flags = [], {}
    for arg in cmd[5:]:
        if arg.startswith("--"):
            name, _, value = arg.partition("=")
            assert name not in flags, f"{name} given twice in {cmd}"
            flags[name] = value
        else:
            positionals.append(arg)
    allowed = DOCUMENTED[(group, verb)] | GLOBAL
    assert set(flags) <= allowed, f"undocumented flags {set(flags) - allowed} in {cmd}"
    return (group, verb), positionals, flags


def bash_ok(script: str) -> None:
    res = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True)
    assert res.returncode == 0, (script, res.stderr)


def test_v5p_64_dry_run_follows_the_documented_syntax(capsys):
    cmds = dry_run(capsys, RECIPE, *BASE, "--spot", "--name=ft-8b",
                   "--run-dir=gs://my-bucket/runs/ft-8b", "--trainer.steps=500")
    parsed = [parse(c) for c in cmds]
    verbs = [p[0] for p in parsed]
    assert verbs == [
        ("queued-resources", "create"), ("queued-resources", "describe"),
        ("tpu-vm", "ssh"), ("tpu-vm", "ssh"), ("tpu-vm", "scp"),  # setup
        ("tpu-vm", "ssh"),  # start training on all workers
        ("tpu-vm", "ssh"),  # stream worker 0's log
        ("queued-resources", "delete")]
    where = {"--zone": "us-east5-a", "--project": "my-proj"}
    for _, _, flags in parsed:
        assert {k: flags[k] for k in where} == where

    _, pos, flags = parsed[0]
    assert pos == ["ft-8b"]
    assert flags == {**where, "--node-id": "ft-8b", "--accelerator-type": "v5p-64",
                     "--runtime-version": "v2-alpha-tpuv5", "--spot": ""}
    _, pos, flags = parsed[1]
    assert pos == ["ft-8b"] and flags["--format"] == "value(state.state)"

    for _, pos, flags in parsed[2:4] + parsed[5:6]:  # setup and start: every worker
        assert pos == ["ft-8b"] and flags["--worker"] == "all"
        bash_ok(flags["--command"])
    install = parsed[3][2]["--command"]
    assert "uv pip install" in install and "'jaxtune[tpu,gcs]'" in install
    _, pos, flags = parsed[4]
    assert pos == [RECIPE, "ft-8b:jaxtune-run/config.yaml"] and flags["--worker"] == "all"

    start = parsed[5][2]["--command"]
    assert "nohup" in start and "train.log" in start
    inner = shlex.split(start.split("bash -c ", 1)[1])[0]  # the detached job script
    bash_ok(inner)
    train = shlex.split(inner.split(";")[0])
    assert train == ["venv/bin/jaxtune", "train", "config.yaml", "--run.output_dir=out",
                     "--checkpoint.dir=gs://my-bucket/runs/ft-8b/checkpoints",
                     "--trainer.steps=500"]
    assert "gcloud storage rsync --recursive out gs://my-bucket/runs/ft-8b/" in inner

    _, pos, flags = parsed[6]
    assert pos == ["ft-8b"] and flags["--worker"] == "0"
    bash_ok(flags["--command"])
    assert "tail" in flags["--command"] and "train.rc" in flags["--command"]

    _, pos, flags = parsed[7]
    assert pos == ["ft-8b"] and flags == {**where, "--force": "", "--quiet": ""}


def test_recipe_gs_output_dir_is_the_run_dir_and_on_demand_by_default(capsys):
    cmds = dry_run(capsys, "--config", RECIPE, *BASE, "--phases=create,train")
    create, _, start = cmds
    assert "--spot" not in create and "--reserved" not in create
    assert create[5] == "jaxtune-llama3-1-8b-full"  # from run.name
    # The recipe's output_dir is gs://BUCKET/runs/llama3.1-8b-full: checkpoints go there.
    assert "--checkpoint.dir=gs://BUCKET/runs/llama3.1-8b-full/checkpoints" in start[-1]


def test_multislice_uses_node_count_and_all_nodes(capsys):
    cmds = dry_run(capsys, RECIPE, *BASE, "--slices=2", "--mesh.dcn_data=2", "--name=ms",
                   "--phases=create,setup,logs")
    (_, pos, create), *_ = [parse(c) for c in cmds[:1]]
    assert pos == ["ms"] and create["--node-count"] == "2" and create["--node-prefix"] == "ms"
    assert "--node-id" not in create
    for cmd in cmds[2:]:
        verb, pos, flags = parse(cmd)
        assert verb[0] == "queued-resources"
        if verb[1] == "ssh" and flags["--worker"] == "0":  # the log of slice 0's worker 0
            assert flags["--node"] == "0"
        else:
            assert flags["--node"] == "all" and flags["--worker"] == "all"


def test_local_wheel_is_copied_then_installed(capsys, tmp_path):
    wheel = "dist/jaxtune-0.1.0-py3-none-any.whl"
    cmds = dry_run(capsys, RECIPE, *BASE, f"--package={wheel}", "--copy=examples/support",
                   "--phases=setup")
    parsed = [parse(c) for c in cmds]
    mkdir, copy_wheel, install, config, data = parsed
    assert "$HOME/jaxtune-run/examples" in mkdir[2]["--command"]
    assert copy_wheel[1] == [wheel, "jaxtune-llama3-1-8b-full:jaxtune-run/"]
    assert '"$HOME"/\'jaxtune-run/jaxtune-0.1.0-py3-none-any.whl[tpu,gcs]\'' in \
        install[2]["--command"]
    assert data[1][1].endswith(":jaxtune-run/examples/support") and "--recurse" in data[2]


@pytest.mark.parametrize("args, error, match", [
    (["--accelerator-type=v5e-16"], LaunchError, "v5litepod"),
    (["--accelerator-type=v5p-64", "--run-dir=/tmp/x"], LaunchError, "gs://"),
    (["--accelerator-type=v5p-64", "--run.output_dir=runs/x"], LaunchError,
     "8 workers.*--run-dir"),
    (["--accelerator-type=v5p-64", "--slices=2"], LaunchError, "--mesh.dcn_data=2"),
    (["--accelerator-type=v5p-64", "--mesh.fsdp=48"], LaunchError, "32 chips.*48 devices"),
    (["--accelerator-type=v5p-64", "--trainer.stepz=5"], ConfigError, "stepz"),
    (["--accelerator-type=v5p-64", "--name=Bad_Name"], LaunchError, "lowercase"),
    (["--accelerator-type=v5p-64", "--copy=/etc/data"], LaunchError, "relative"),
    (["--accelerator-type=v5p-64", "stray"], LaunchError, "stray"),
])
def test_launches_that_cannot_work_are_refused_before_creating_anything(args, error, match):
    with pytest.raises(error, match=match):
        job_from_args([RECIPE, "--zone=z", *args])


def test_single_host_slice_needs_no_bucket(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"run": {"name": "lora", "output_dir": "runs/lora"},
                                      "model": {"path": "m"}}))
    job, phases, _ = job_from_args([str(recipe), "--zone=z", "--accelerator-type=v5litepod-8"])
    assert (job.chips, job.hosts, job.runtime) == (8, 1, "v2-alpha-tpuv5-lite")
    assert job.run_dir == "" and phases == ["create", "setup", "train", "logs", "delete"]


# --------------------------------------------------------------------------- control flow


class FakeGcloud:
    """Answers describe with the next scripted state and logs with the next exit status."""

    def __init__(self, states: list[str], train_status: list[int]):
        self.states, self.train_status, self.calls = list(states), list(train_status), []

    def __call__(self, cmd: list[str], capture: bool) -> subprocess.CompletedProcess:
        verb = f"{cmd[3]} {cmd[4]}"
        self.calls.append("logs" if "--worker=0" in cmd else verb)
        if verb == "queued-resources describe":
            state = self.states.pop(0)
            return subprocess.CompletedProcess(cmd, 0 if state else 1, stdout=state + "\n")
        if "--worker=0" in cmd:
            return subprocess.CompletedProcess(cmd, self.train_status.pop(0))
        return subprocess.CompletedProcess(cmd, 0)


def launcher(fake: FakeGcloud) -> Launcher:
    job, _, _ = job_from_args([RECIPE, *BASE, "--spot"])
    return Launcher(job, runner=fake, poll_seconds=0, echo=lambda s: None, sleep=lambda s: None)


SETUP = ["tpu-vm ssh", "tpu-vm ssh", "tpu-vm scp"]


def test_creates_waits_for_active_trains_and_deletes():
    fake = FakeGcloud(["", "WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"], [0])
    assert launcher(fake).run(["create", "setup", "train", "logs", "delete"]) == 0
    assert fake.calls == [
        "queued-resources describe", "queued-resources create", "queued-resources describe",
        "queued-resources describe", "queued-resources describe", *SETUP, "tpu-vm ssh", "logs",
        "queued-resources delete"]


def test_preempted_spot_slice_is_recreated_and_training_resumes():
    fake = FakeGcloud(["ACTIVE", "SUSPENDED", "SUSPENDED", "ACTIVE"], [1, 0])
    assert launcher(fake).run(["create", "setup", "train", "logs", "delete"],
                              max_restarts=1) == 0
    assert fake.calls == [
        "queued-resources describe", *SETUP, "tpu-vm ssh", "logs",  # reused the ACTIVE slice
        "queued-resources describe",  # after the failure: SUSPENDED, so preempted
        "queued-resources describe", "queued-resources delete", "queued-resources create",
        "queued-resources describe", *SETUP, "tpu-vm ssh", "logs", "queued-resources delete"]


def test_a_failing_run_on_a_healthy_slice_is_not_restarted():
    fake = FakeGcloud(["ACTIVE", "ACTIVE"], [1])
    assert launcher(fake).run(["create", "setup", "train", "logs", "delete"],
                              max_restarts=3) == 1
    assert fake.calls[-3:] == ["logs", "queued-resources describe", "queued-resources delete"]


def test_a_failed_queued_resource_stops_with_a_message():
    fake = FakeGcloud(["", "WAITING_FOR_RESOURCES", "FAILED"], [])
    with pytest.raises(LaunchError, match="FAILED.*another zone"):
        launcher(fake).run(["create"])


def test_env_values_reach_training_but_are_never_printed(capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret123")
    job, _, _ = job_from_args([RECIPE, *BASE, "--env=HF_TOKEN"])
    from jaxtune.launch.tpu import start_command

    assert "HF_TOKEN=hf_secret123" in start_command(job)[-1]  # what really runs
    out = "\n".join(shlex.join(c) for c in dry_run(capsys, RECIPE, *BASE, "--env=HF_TOKEN"))
    assert "hf_secret123" not in out and "HF_TOKEN=REDACTED" in out
    shown = []
    Launcher(job, runner=FakeGcloud([], [0]), echo=shown.append).run(["train"])
    assert "HF_TOKEN=***" in shown[0] and "hf_secret123" not in shown[0]
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(LaunchError, match="HF_TOKEN is not set"):
        job_from_args([RECIPE, *BASE, "--env=HF_TOKEN"])
