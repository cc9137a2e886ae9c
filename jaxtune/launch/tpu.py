"""``jaxtune launch tpu``: a training run on a Cloud TPU slice, driven through ``gcloud``.

The phases, each a plain ``gcloud compute tpus`` command (``--dry-run`` prints them all):

1. create: ``queued-resources create`` (on-demand, ``--spot`` or ``--reserved``; several slices
   with ``--slices N``), then ``queued-resources describe`` until the slice is ACTIVE. A slice
   of that name that is already ACTIVE is reused; a preempted one is deleted and re-created.
2. setup: build a wheel of the jaxtune checkout running here (or take the installed
   version: :mod:`jaxtune.launch.package`), then on every worker (``tpu-vm ssh --worker=all``)
   create a Python 3.12 venv with uv (the TPU images ship Python 3.10) and install that
   jaxtune with the ``tpu`` extra (and ``gcs`` for a ``gs://`` run directory); copy the config
   and any ``--copy`` files (``tpu-vm scp``).
3. train: start ``jaxtune train config.yaml [overrides]`` on all workers at once, detached
   (``nohup``), so a dropped connection does not stop the run.
4. logs: stream worker 0's log until training ends; its exit status is the launcher's.
5. delete: ``queued-resources delete --force --quiet`` (skipped with ``--keep``).

With a ``gs://`` run directory the checkpoints go straight there (the workers write them
together), and worker 0 copies the rest of the run directory (config, metrics, export) there
when training ends. Running the same command again resumes from the latest checkpoint;
``--max-restarts`` does that automatically when a spot slice is preempted.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from jaxtune.errors import JaxtuneError
from jaxtune.launch.package import DIST, Package, requirement_with_extras
from jaxtune.launch.package import resolve as resolve_package

PHASES = ("create", "setup", "train", "logs", "delete")
REMOTE_DIR = "jaxtune-run"  # on each worker, relative to the home directory

#: Accelerator family -> (runtime version to use, TensorCores per chip in the type's number).
#: From the Cloud TPU "TPU software versions" table for JAX.
FAMILIES = {
    "v4": ("tpu-ubuntu2204-base", 2),
    "v5p": ("v2-alpha-tpuv5", 2),
    "v5litepod": ("v2-alpha-tpuv5-lite", 1),
    "v6e": ("v2-alpha-tpuv6e", 1),
}


class LaunchError(JaxtuneError):
    """The launch cannot go ahead (bad option, config, or a gcloud step that failed)."""


@dataclasses.dataclass
class TpuJob:
    """Everything one launch needs; the command builders below read only this."""

    name: str  # queued resource id; the node is named the same (or <name>-<i> per slice)
    zone: str
    accelerator_type: str  # e.g. v5p-64, v5litepod-16, v6e-8, v4-32
    config: str  # local YAML recipe, copied to each worker as config.yaml
    project: str = ""  # empty: gcloud's configured project
    runtime_version: str = ""  # empty: the recommended one for the accelerator family
    slices: int = 1  # several slices (multislice) joined by data parallelism over DCN
    provisioning: str = "on-demand"  # on-demand | spot | reserved
    run_dir: str = ""  # gs://bucket/path for checkpoints and outputs
    package: str = ""  # empty: the jaxtune running here; or a wheel/sdist, checkout, requirement
    copies: list[str] = dataclasses.field(default_factory=list)  # extra relative paths
    overrides: list[str] = dataclasses.field(default_factory=list)  # --section.key=value
    env: dict[str, str] = dataclasses.field(default_factory=dict)  # set for training (secrets)

    @property
    def family(self) -> str:
        return self.accelerator_type.rsplit("-", 1)[0]

    @property
    def chips(self) -> int:
        """TPU chips (JAX devices) in one slice."""
        cores_per_chip = FAMILIES.get(self.family, ("", 1))[1]
        return int(self.accelerator_type.rsplit("-", 1)[1]) // cores_per_chip

    @property
    def hosts(self) -> int:
        """Worker VMs per slice: 4 chips each, except single-host 8-chip v5e/v6e machines."""
        if self.family in ("v5litepod", "v6e") and self.chips <= 8:
            return 1
        return max(1, self.chips // 4)

    @property
    def runtime(self) -> str:
        return self.runtime_version or FAMILIES[self.family][0]

    @property
    def multislice(self) -> bool:
        return self.slices > 1


# --------------------------------------------------------------------------- commands


def _where(job: TpuJob) -> list[str]:
    return [f"--zone={job.zone}"] + ([f"--project={job.project}"] if job.project else [])


def create_command(job: TpuJob) -> list[str]:
    cmd = ["gcloud", "compute", "tpus", "queued-resources", "create", job.name]
    if job.multislice:
        cmd += [f"--node-count={job.slices}", f"--node-prefix={job.name}"]
    else:
        cmd += [f"--node-id={job.name}"]
    cmd += _where(job) + [f"--accelerator-type={job.accelerator_type}",
                          f"--runtime-version={job.runtime}"]
    if job.provisioning == "spot":
        cmd.append("--spot")
    elif job.provisioning == "reserved":
        cmd.append("--reserved")
    return cmd


def describe_command(job: TpuJob) -> list[str]:
    return ["gcloud", "compute", "tpus", "queued-resources", "describe", job.name,
            *_where(job), "--format=value(state.state)"]


def delete_command(job: TpuJob) -> list[str]:
    # --force deletes the slice's nodes too; --quiet skips the confirmation prompt.
    return ["gcloud", "compute", "tpus", "queued-resources", "delete", job.name, *_where(job),
            "--force", "--quiet"]


def ssh_command(job: TpuJob, command: str, worker: str = "all") -> list[str]:
    """Run ``command`` on ``worker`` ("all" or an index) of every slice (or of slice 0)."""
    if job.multislice:
        node = "all" if worker == "all" else "0"
        return ["gcloud", "compute", "tpus", "queued-resources", "ssh", job.name, *_where(job),
                f"--node={node}", f"--worker={worker}", f"--command={command}"]
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", job.name, *_where(job),
            f"--worker={worker}", f"--command={command}"]


def scp_command(job: TpuJob, src: str, dest: str, recurse: bool = False) -> list[str]:
    """Copy local ``src`` to ``dest`` (relative to the home directory) on every worker."""
    group = "queued-resources" if job.multislice else "tpu-vm"
    cmd = ["gcloud", "compute", "tpus", group, "scp", src, f"{job.name}:{dest}", *_where(job)]
    if job.multislice:
        cmd.append("--node=all")
    cmd.append("--worker=all")
    if recurse:
        cmd.append("--recurse")
    return cmd


def package(job: TpuJob) -> Package:
    """What the workers install (``--package``, or the jaxtune running here): see
    :mod:`jaxtune.launch.package`. A checkout's wheel is built under the temp folder."""
    return resolve_package(job.package, Path(tempfile.gettempdir()) / f"jaxtune-launch-{job.name}")


def _requirement(job: TpuJob, pkg: Package) -> str:
    """The requirement ``uv pip install`` gets on the workers, with the extras the run needs."""
    extras = "tpu,gcs" if job.run_dir.startswith("gs://") else "tpu"
    if pkg.local_file:
        remote = f"{REMOTE_DIR}/{pkg.local_file.replace(chr(92), '/').rsplit('/', 1)[-1]}"
        return f"$HOME/{remote}[{extras}]"
    return requirement_with_extras(pkg.requirement, extras)


def setup_commands(job: TpuJob) -> list[list[str]]:
    """Build the wheel to install (from a checkout, here), install it on every worker, and
    copy the config and ``--copy`` files there."""
    pkg = package(job)
    dirs = sorted({f"$HOME/{REMOTE_DIR}/{p.rsplit('/', 1)[0]}" for p in job.copies if "/" in p})
    prepare = f"mkdir -p $HOME/{REMOTE_DIR} {' '.join(dirs)}".strip()
    # A wheel of local code keeps its version when the code changes: replace the one a reused
    # slice's venv already has.
    reinstall = f"--reinstall-package {DIST} " if pkg.reinstall else ""
    install = "; ".join([
        "set -e",
        "export PATH=$HOME/.local/bin:$PATH",
        "command -v uv > /dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh > /dev/null",
        f"uv venv --quiet --allow-existing --python 3.12 $HOME/{REMOTE_DIR}/venv",
        f"uv pip install --quiet --python $HOME/{REMOTE_DIR}/venv/bin/python {reinstall}"
        f"{_quote_keep_home(_requirement(job, pkg))}",
    ])
    cmds = [list(pkg.build)] if pkg.build else []
    cmds.append(ssh_command(job, prepare))
    if pkg.local_file:
        cmds.append(scp_command(job, pkg.local_file, f"{REMOTE_DIR}/"))
    cmds.append(ssh_command(job, install))
    cmds.append(scp_command(job, job.config, f"{REMOTE_DIR}/config.yaml"))
    for path in job.copies:
        cmds.append(scp_command(job, path, f"{REMOTE_DIR}/{path}", recurse=True))
    return cmds


def _quote_keep_home(text: str) -> str:
    # Quote for the remote shell but let $HOME expand.
    if text.startswith("$HOME/"):
        return '"$HOME"/' + shlex.quote(text[len("$HOME/"):])
    return shlex.quote(text)


def train_args(job: TpuJob) -> list[str]:
    """``jaxtune train`` arguments on the workers (run from the remote directory)."""
    args = ["train", "config.yaml"]
    if job.run_dir:
        base = job.run_dir.rstrip("/")
        # Orbax writes the checkpoint from all hosts into gs:// directly; the rest of the run
        # directory is written by process 0 locally and copied up when training ends.
        args += ["--run.output_dir=out", f"--checkpoint.dir={base}/checkpoints"]
    return args + list(job.overrides)


def start_command(job: TpuJob) -> list[str]:
    """Start training on all workers at once, detached, logging to train.log."""
    env = [f"{k}={v}" for k, v in job.env.items()]
    train = " ".join(shlex.quote(a) for a in [*(["env", *env] if env else []),
                                              "venv/bin/jaxtune", *train_args(job)])
    upload = ""
    if job.run_dir:
        dest = shlex.quote(job.run_dir.rstrip("/") + "/")
        upload = f"; if [ -d out ]; then gcloud storage rsync --recursive out {dest}; fi"
    job_script = f"{train}; rc=$?{upload}; echo $rc > train.rc"
    command = (f"cd $HOME/{REMOTE_DIR} && rm -f train.rc && : > train.log && "
               f"(nohup bash -c {shlex.quote(job_script)} > train.log 2>&1 < /dev/null &"
               " echo $! > train.pid)")
    return ssh_command(job, command)


def logs_command(job: TpuJob) -> list[str]:
    """Follow worker 0's log until training ends; exit with training's status."""
    command = (f"cd $HOME/{REMOTE_DIR} && tail -n +1 -f --pid=$(cat train.pid) train.log; "
               "exit $(cat train.rc 2>/dev/null || echo 1)")
    return ssh_command(job, command, worker="0")


def plan(job: TpuJob, phases: Sequence[str]) -> list[tuple[str, list[list[str]]]]:
    """The commands of each phase in order, as ``--dry-run`` prints them."""
    out: list[tuple[str, list[list[str]]]] = []
    for phase in phases:
        if phase == "create":
            out.append((f"create {job.accelerator_type} x {job.slices} ({job.provisioning}), "
                        "then poll until ACTIVE", [create_command(job), describe_command(job)]))
        elif phase == "setup":
            out.append((f"install jaxtune and copy the config to every worker; the workers run "
                        f"{package(job).source}", setup_commands(job)))
        elif phase == "train":
            out.append(("start jaxtune train on all workers at once", [start_command(job)]))
        elif phase == "logs":
            out.append(("stream worker 0's log until training ends", [logs_command(job)]))
        elif phase == "delete":
            out.append(("delete the slice", [delete_command(job)]))
    return out


# --------------------------------------------------------------------------- running


Runner = Callable[[list[str], bool], subprocess.CompletedProcess]


def subprocess_runner(cmd: list[str], capture: bool) -> subprocess.CompletedProcess:
    """Run ``cmd``; with ``capture`` return its stdout instead of showing it."""
    try:
        return subprocess.run(cmd, text=True, check=False,
                              stdout=subprocess.PIPE if capture else None)
    except FileNotFoundError:
        raise LaunchError("gcloud is not installed or not on PATH; install the Google Cloud "
                          "CLI (https://cloud.google.com/sdk/docs/install) and run "
                          "'gcloud auth login'.") from None


class Launcher:
    """Runs the phases with ``runner`` (tests pass a fake one) and reports each command."""

    def __init__(self, job: TpuJob, runner: Runner = subprocess_runner, poll_seconds: float = 30,
                 echo: Callable[[str], None] = print, sleep: Callable[[float], None] = time.sleep):
        self.job, self.runner, self.poll_seconds = job, runner, poll_seconds
        self.echo, self.sleep = echo, sleep

    def run(self, phases: Sequence[str], max_restarts: int = 0) -> int:
        rc = 0
        todo = [p for p in PHASES if p in phases and p != "delete"]
        for attempt in range(max_restarts + 1):
            rc = self._phases(todo)
            if rc == 0 or "logs" not in todo or attempt == max_restarts:
                break
            state = self.state()
            if state == "ACTIVE":  # training itself failed: restarting would fail again
                break
            self.echo(f"# slice is {state or 'gone'} (preempted?): re-creating it and resuming "
                      f"from the latest checkpoint (restart {attempt + 1} of {max_restarts})")
            todo = [p for p in PHASES if p in ("create", "setup", "train", "logs")]
        if "delete" in phases:
            self._run(delete_command(self.job), "delete the slice")
        return rc

    def _phases(self, phases: Sequence[str]) -> int:
        rc = 0
        for phase in phases:
            if phase == "create":
                self.create()
            elif phase == "setup":
                for cmd in setup_commands(self.job):
                    self._run(cmd, "setup")
            elif phase == "train":
                self._run(start_command(self.job), "start training")
            elif phase == "logs":
                rc = self.runner(self._show(logs_command(self.job)), False).returncode
                self.echo(f"# training ended with status {rc}")
        return rc

    def state(self) -> str:
        """The queued resource's state (ACTIVE, WAITING_FOR_RESOURCES...), "" if absent."""
        res = self.runner(describe_command(self.job), True)
        return (res.stdout or "").strip() if res.returncode == 0 else ""

    def create(self) -> None:
        state = self.state()
        if state in ("SUSPENDED", "SUSPENDING", "FAILED"):
            self._run(delete_command(self.job), f"remove the {state} slice")
            state = ""
        if state == "ACTIVE":
            self.echo(f"# {self.job.name} is already ACTIVE: reusing it")
            return
        if not state:
            self._run(create_command(self.job), "create the slice")
        last = None
        while (state := self.state()) != "ACTIVE":
            if state in ("FAILED", "SUSPENDED", ""):
                raise LaunchError(
                    f"The queued resource {self.job.name} is {state or 'gone'}; see "
                    f"'gcloud compute tpus queued-resources describe {self.job.name} "
                    f"--zone={self.job.zone}'. Try another zone, --spot, or later.")
            if state != last:
                self.echo(f"# {self.job.name}: {state}")
                last = state
            self.sleep(self.poll_seconds)

    def _run(self, cmd: list[str], what: str) -> None:
        res = self.runner(self._show(cmd), False)
        if res.returncode != 0:
            raise LaunchError(f"Step '{what}' failed (exit {res.returncode}): {shlex.join(cmd)}")

    def _show(self, cmd: list[str]) -> list[str]:
        self.echo(f"+ {redact(shlex.join(cmd), self.job)}")
        return cmd


def redact(text: str, job: TpuJob) -> str:
    """``text`` with the values of ``--env`` variables (tokens) replaced by ***."""
    for name, value in job.env.items():
        text = text.replace(f"{name}={value}", f"{name}=***")
        if len(value) >= 8:  # a token, also where quoting split it from its name
            text = text.replace(value, "***")
    return text


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jaxtune launch tpu",
        description="Create a Cloud TPU slice, run 'jaxtune train' on all its workers, stream "
                    "worker 0's log and delete the slice. See docs/tpu-pods.md.",
        epilog="Any --section.key=value is passed to 'jaxtune train' as a config override.")
    p.add_argument("config", nargs="?", help="YAML recipe (or --config)")
    p.add_argument("--config", dest="config_opt", metavar="CONFIG", help="YAML recipe")
    p.add_argument("--name", help="queued resource / TPU name (default: jaxtune-<run.name>)")
    p.add_argument("--project", default="", help="GCP project (default: gcloud's)")
    p.add_argument("--zone", required=True, help="zone with capacity, e.g. us-east5-a")
    p.add_argument("--accelerator-type", required=True,
                   help="v4-N, v5p-N, v5litepod-N or v6e-N, e.g. v5p-64")
    p.add_argument("--runtime-version", default="",
                   help="TPU software version (default: the recommended one per family)")
    p.add_argument("--slices", type=int, default=1,
                   help="number of slices (multislice); set mesh.dcn_data to the same number")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--spot", action="store_true", help="spot capacity (preemptible)")
    kind.add_argument("--reserved", action="store_true", help="use your reservation")
    p.add_argument("--run-dir", default="",
                   help="gs://bucket/path for checkpoints and outputs (default: run.output_dir "
                        "if it is gs://); required with more than one worker")
    p.add_argument("--package", default="",
                   help="what the workers install (default: the jaxtune running here: a wheel "
                        "of its checkout, or its exact installed version): a local .whl/.tar.gz, "
                        "a checkout folder, or a requirement from the package index")
    p.add_argument("--copy", action="append", default=[], metavar="PATH",
                   help="relative file or folder to copy to the workers (e.g. local data)")
    p.add_argument("--env", action="append", default=[], metavar="NAME",
                   help="pass this variable from your environment to training (e.g. "
                        "HF_TOKEN for gated models); its value is never printed")
    p.add_argument("--phases", default=",".join(PHASES),
                   help=f"comma-separated subset of {','.join(PHASES)} (e.g. 'logs' to "
                        "re-attach, 'delete' to tear down)")
    p.add_argument("--keep", action="store_true", help="do not delete the slice at the end")
    p.add_argument("--max-restarts", type=int, default=0,
                   help="re-create a preempted slice and resume this many times")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    return p


def job_from_args(argv: list[str]) -> tuple[TpuJob, list[str], argparse.Namespace]:
    """Parse the launcher's arguments; check the recipe locally before anything is created."""
    args, rest = _parser().parse_known_args(argv)
    config = args.config_opt or args.config
    if not config:
        raise LaunchError("Give the recipe: jaxtune launch tpu CONFIG.yaml --zone ... "
                          "--accelerator-type ...")
    bad = [a for a in rest if not a.startswith("--") or "." not in a.split("=", 1)[0]]
    if bad:
        raise LaunchError(f"Unknown launcher arguments {bad}; config overrides look like "
                          "--section.key=value. See 'jaxtune launch tpu --help'.")
    from jaxtune.config import load_config

    cfg = load_config(config, rest)  # a typo fails here, not after the slice is up
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        raise LaunchError(f"--phases {unknown} not in {', '.join(PHASES)}.")
    if args.keep:
        phases = [p for p in phases if p != "delete"]
    env = {}
    for name in args.env:
        if name not in os.environ:
            raise LaunchError(f"--env {name}: {name} is not set in this shell; export it first.")
        env[name] = os.environ[name]
    run_dir = args.run_dir or (cfg.run.output_dir if cfg.run.output_dir.startswith("gs://")
                               else "")
    job = TpuJob(
        name=args.name or _default_name(cfg.run.name), zone=args.zone, project=args.project,
        accelerator_type=args.accelerator_type, config=config,
        runtime_version=args.runtime_version, slices=args.slices,
        provisioning="spot" if args.spot else "reserved" if args.reserved else "on-demand",
        run_dir=run_dir, package=args.package, copies=list(args.copy), overrides=rest,
        env=env)
    check_job(job, cfg)
    if "setup" in phases:
        package(job)  # what the workers install must be known before any slice is created
    return job, phases, args


def _default_name(run_name: str) -> str:
    slug = re.sub(r"[^a-z0-9-]+", "-", run_name.lower()).strip("-")
    return f"jaxtune-{slug}"[:50].rstrip("-")


def check_job(job: TpuJob, cfg) -> None:
    """Refuse launches that cannot work, before any resource is created."""
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", job.name):
        raise LaunchError(f"--name '{job.name}': use lowercase letters, digits and hyphens, "
                          "starting with a letter.")
    m = re.fullmatch(r"([a-z0-9]+)-(\d+)", job.accelerator_type)
    if not m or (m.group(1) not in FAMILIES and not job.runtime_version):
        hint = " (v5e is named v5litepod-N)" if job.accelerator_type.startswith("v5e") else ""
        raise LaunchError(
            f"--accelerator-type '{job.accelerator_type}' is not one of v4-N, v5p-N, "
            f"v5litepod-N, v6e-N{hint}; for another type also give --runtime-version.")
    if job.slices < 1:
        raise LaunchError("--slices must be >= 1.")
    if job.run_dir and not job.run_dir.startswith("gs://"):
        raise LaunchError(f"--run-dir '{job.run_dir}' must be a gs://bucket/path: the workers "
                          "write there together and it outlives the slice.")
    shared_checkpoints = cfg.checkpoint.dir.startswith("gs://")
    if job.hosts * job.slices > 1 and not job.run_dir and cfg.checkpoint.enabled \
            and not shared_checkpoints:
        raise LaunchError(
            f"{job.accelerator_type} x {job.slices} has {job.hosts * job.slices} workers, which "
            "write each checkpoint together and share no disk: give --run-dir "
            "gs://BUCKET/runs/NAME (or set run.output_dir or checkpoint.dir to a gs:// path).")
    if cfg.mesh.dcn_data != job.slices:
        raise LaunchError(
            f"mesh.dcn_data is {cfg.mesh.dcn_data} but --slices is {job.slices}: set "
            f"--mesh.dcn_data={job.slices} (data parallelism across the slices).")
    if job.family in FAMILIES:
        from jaxtune.mesh import MeshError, resolve_axis_sizes

        try:
            resolve_axis_sizes(cfg.mesh, job.chips * job.slices)
        except MeshError as e:
            raise LaunchError(f"{job.accelerator_type} x {job.slices} has "
                              f"{job.chips * job.slices} chips: {e}") from None
    for path in job.copies:
        if path.startswith("/") or ".." in path.split("/"):
            raise LaunchError(f"--copy '{path}': give a path relative to this folder, as the "
                              "config names it (it lands at the same place on the workers).")


def main(argv: list[str]) -> int:
    job, phases, args = job_from_args(argv)
    if args.dry_run:
        job = dataclasses.replace(job, env={k: "REDACTED" for k in job.env})  # no secrets
        print(f"# {job.accelerator_type} x {job.slices}: {job.chips * job.slices} chips on "
              f"{job.hosts * job.slices} workers, runtime {job.runtime}")
        for title, cmds in plan(job, phases):
            print(f"# {title}")
            for cmd in cmds:
                print(shlex.join(cmd))
        return 0
    try:
        return Launcher(job).run(phases, max_restarts=args.max_restarts)
    except KeyboardInterrupt:
        print(f"\ninterrupted: training goes on if it was started. Re-attach with --phases "
              f"logs; tear down with: {shlex.join(delete_command(job))}", file=sys.stderr)
        return 130
