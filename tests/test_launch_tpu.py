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


def dry_run(capsys, *args: str, local: bool = False) -> list[list[str]]:
    """The gcloud commands ``jaxtune launch tpu ... --dry-run`` prints, through the real CLI
    (with ``local``, the local ones too: building the wheel)."""
    assert cli_main(["launch", "tpu", *args, "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# ")
    cmds = [shlex.split(line) for line in lines if not line.startswith("#")]
    return cmds if local else [c for c in cmds if c[0] == "gcloud"]


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
        # setup: mkdir, copy this checkout's wheel, install it, copy the config
        ("tpu-vm", "ssh"), ("tpu-vm", "scp"), ("tpu-vm", "ssh"), ("tpu-vm", "scp"),
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

    for _, pos, flags in parsed[2:3] + parsed[4:5] + parsed[6:7]:  # setup, start: every worker
        assert pos == ["ft-8b"] and flags["--worker"] == "all"
        bash_ok(flags["--command"])
    wheel = "jaxtune-0.1.0-py3-none-any.whl"
    _, pos, flags = parsed[3]
    assert pos[0].endswith(f"/{wheel}") and pos[1] == "ft-8b:jaxtune-run/"
    install = parsed[4][2]["--command"]
    assert "uv pip install" in install and "--reinstall-package jaxtune" in install
    assert f"\"$HOME\"/'jaxtune-run/{wheel}[tpu,gcs]'" in install
    _, pos, flags = parsed[5]
    assert pos == [RECIPE, "ft-8b:jaxtune-run/config.yaml"] and flags["--worker"] == "all"

    start = parsed[6][2]["--command"]
    assert "nohup" in start and "train.log" in start
    inner = shlex.split(start.split("bash -c ", 1)[1])[0]  # the detached job script
    bash_ok(inner)
    train = shlex.split(inner.split(";")[0])
    assert train == ["venv/bin/jaxtune", "train", "config.yaml", "--run.output_dir=out",
                     "--checkpoint.dir=gs://my-bucket/runs/ft-8b/checkpoints",
                     "--trainer.steps=500"]
    assert "gcloud storage rsync --recursive out gs://my-bucket/runs/ft-8b/" in inner

    _, pos, flags = parsed[7]
    assert pos == ["ft-8b"] and flags["--worker"] == "0"
    bash_ok(flags["--command"])
    assert "tail" in flags["--command"] and "train.rc" in flags["--command"]

    _, pos, flags = parsed[8]
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
        if cmd[0] != "gcloud":  # building the wheel, here
            self.calls.append("build")
            return subprocess.CompletedProcess(cmd, 0)
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


SETUP = ["build", "tpu-vm ssh", "tpu-vm scp", "tpu-vm ssh", "tpu-vm scp"]


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


# --------------------------------------------------------------------------- what is installed


def dry_run_text(capsys, *args: str) -> str:
    assert cli_main(["launch", "tpu", *args, "--dry-run"]) == 0
    return capsys.readouterr().out


def test_the_workers_install_a_wheel_of_the_checkout_being_run(capsys):
    """Not 'jaxtune' from a package index (not published there, and anyone could publish it):
    a wheel of this checkout, built here, copied and installed; the dry run says so."""
    out = dry_run_text(capsys, RECIPE, *BASE, "--phases=setup", "--name=ft")
    assert f"the workers run a wheel built here from the checkout {ROOT} (" in out
    build, mkdir, copy, install, config = [shlex.split(x) for x in out.splitlines()
                                           if not x.startswith("#")]
    assert build[:2] == ["env", f"PYTHONPATH={ROOT}"]
    assert build[3:6] == ["-m", "jaxtune.launch.package", ROOT]
    wheel = os.path.join(build[6], "jaxtune-0.1.0-py3-none-any.whl")
    assert parse(copy)[1] == [wheel, "ft:jaxtune-run/"]
    command = parse(install)[2]["--command"]
    assert "--reinstall-package jaxtune \"$HOME\"/'jaxtune-run/jaxtune-0.1.0-py3-none-any.whl" \
        "[tpu,gcs]'" in command
    bash_ok(command)


def test_an_installed_jaxtune_is_installed_at_its_exact_origin(monkeypatch, tmp_path):
    """Not a checkout: the index's exact version, the wheel file it came from, or its commit;
    an explicit requirement is taken from the index as written, and the dry run says so."""
    import importlib.metadata

    from jaxtune.launch import package

    monkeypatch.setattr(package, "_HERE", tmp_path)  # no pyproject.toml: an installed jaxtune

    class Dist:
        version = "0.3.1"

        def __init__(self, direct_url):
            self.direct_url = direct_url

        def read_text(self, name):
            return self.direct_url if name == "direct_url.json" else None

    def installed(direct_url):
        monkeypatch.setattr(importlib.metadata, "distribution", lambda name: Dist(direct_url))
        job, _, _ = job_from_args([RECIPE, *BASE])
        from jaxtune.launch.tpu import package as job_package
        from jaxtune.launch.tpu import setup_commands

        install = [c for c in setup_commands(job) if "--command=set -e" in " ".join(c)][0]
        return job_package(job), install[-1]

    pkg, install = installed(None)
    assert "jaxtune 0.3.1, the version installed here, from the package index" in pkg.source
    assert "'jaxtune[tpu,gcs]==0.3.1'" in install and "--reinstall" not in install
    wheel = tmp_path / "jaxtune-0.3.1-py3-none-any.whl"
    wheel.write_bytes(b"")
    pkg, install = installed(f'{{"url": "file://{wheel}", "archive_info": {{}}}}')
    assert pkg.local_file == str(wheel) and "jaxtune-0.3.1-py3-none-any.whl[tpu,gcs]" in install
    pkg, install = installed('{"url": "https://github.com/o/jaxtune", "vcs_info": '
                             '{"vcs": "git", "commit_id": "0123456789abcdef"}}')
    assert "'jaxtune[tpu,gcs] @ git+https://github.com/o/jaxtune@0123456789abcdef'" in install
    with pytest.raises(package.PackageError, match="which is gone"):  # before any slice
        installed(f'{{"url": "file://{tmp_path}/gone.whl", "archive_info": {{}}}}')

    job, _, _ = job_from_args([RECIPE, *BASE, "--package=jaxtune==0.3.1"])
    from jaxtune.launch.tpu import package as job_package

    assert "from the package index, as --package gives it" in job_package(job).source


@pytest.mark.slow
def test_the_built_wheel_installs_in_a_fresh_venv(capsys, tmp_path):
    """The dry run's build command, run as printed, makes a wheel of this checkout: installed
    alone (no dependencies) into a bare venv, it imports, and its files are the checkout's."""
    import sys
    import zipfile

    out = dry_run_text(capsys, RECIPE, *BASE, "--phases=setup", "--name=ft")
    build = next(shlex.split(x) for x in out.splitlines() if "jaxtune.launch.package" in x)
    build[-1] = str(tmp_path / "wheel")  # where the wheel goes: this test's folder
    res = subprocess.run(build, capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    wheel = res.stdout.strip().splitlines()[-1]
    assert wheel == str(tmp_path / "wheel" / "jaxtune-0.1.0-py3-none-any.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert z.read("jaxtune/launch/package.py") == open(
            os.path.join(ROOT, "jaxtune", "launch", "package.py"), "rb").read()
    assert "jaxtune/plan/hf_configs/" in "".join(names) and not any("__pycache__" in n
                                                                    for n in names)
    assert not os.path.exists(os.path.join(tmp_path, "build"))

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    res = subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                          wheel], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([python, "-c", "import jaxtune; print(jaxtune.__file__, "
                          "jaxtune.__version__)"], capture_output=True, text=True, env=env,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    path, version = res.stdout.split()
    assert path.startswith(str(venv)) and version == "0.1.0"


def test_slurm_template_installs_the_checkout_it_is_submitted_from(tmp_path):
    """``JAXTUNE_DRY_RUN=1 bash scripts/slurm/jaxtune.sbatch ...``: which code the nodes run,
    and the commands (build this checkout's wheel, install it, srun), nothing run."""
    script = os.path.join(ROOT, "scripts", "slurm", "jaxtune.sbatch")
    bash_ok(open(script).read())

    def dry(**env: str) -> list[str]:
        full = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
                "JAXTUNE_DRY_RUN": "1", "JAXTUNE_VENV": str(tmp_path / "venv"), **env}
        res = subprocess.run(["bash", script, "configs/x.yaml", "--mesh.dcn_data=2"],
                             capture_output=True, text=True, env=full, cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        return res.stdout.splitlines()

    out = dry(SLURM_SUBMIT_DIR=ROOT)
    assert f"jaxtune: the nodes run a wheel built from the checkout {ROOT} (git " in out[1]
    cmds = [shlex.split(line[2:]) for line in out if line.startswith("+ ")]
    venv, wheel = str(tmp_path / "venv"), str(tmp_path / "venv" / "jaxtune-wheel")
    python = f"{venv}/bin/python"
    assert cmds[0] == ["python3", "-m", "venv", venv]
    assert cmds[1] == ["env", f"PYTHONPATH={ROOT}", python, "-m", "jaxtune.launch.package",
                       ROOT, wheel]
    built = f"{wheel}/jaxtune-0.1.0-py3-none-any.whl"
    assert cmds[2] == [python, "-m", "pip", "install", "--quiet", f"{built}[cuda]"]
    assert cmds[3] == [python, "-m", "pip", "install", "--quiet", "--no-deps",
                       "--force-reinstall", built]
    assert cmds[4][:3] == ["srun", "--kill-on-bad-exit=1", f"{venv}/bin/jaxtune"]
    assert cmds[4][-1] == "--mesh.dcn_data=2"

    out = dry(JAXTUNE_PACKAGE="jaxtune[cuda]==0.1.0")
    assert "the nodes run jaxtune[cuda]==0.1.0 from the package index, as JAXTUNE_PACKAGE " \
        "gives it" in out[1]
