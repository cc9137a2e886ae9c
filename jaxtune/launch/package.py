"""Which jaxtune the launched workers run: the code being run here, and where it came from.

``jaxtune launch tpu`` without ``--package`` installs on the workers the jaxtune that runs the
launcher, never whatever a package index serves under the name:

- from a source checkout (a folder whose ``pyproject.toml`` names the project ``jaxtune``,
  on the path or installed editable): a wheel built from that checkout, working-tree changes
  included, copied to the workers and installed in place of any earlier one (the version in a
  checkout does not change with its code);
- installed from a wheel file that is still there: that wheel;
- installed from a git URL: that commit;
- installed from a package index: exactly the installed version, ``jaxtune==X.Y.Z``.

``--package`` chooses: a ``.whl`` / ``.tar.gz`` file (copied), a checkout folder (built), or a
requirement installed from the package index as written. :func:`resolve` says which, in words
the dry run prints. ``python -m jaxtune.launch.package CHECKOUT OUT_DIR`` builds the wheel (the
command the launcher runs, and prints): the checkout's ``pyproject.toml``, ``README.md`` and
``jaxtune/`` are staged in a fresh folder first, so no stale file of an earlier in-tree build
(``build/lib``) can slip into the wheel and nothing is written into the checkout.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from urllib.parse import unquote, urlparse

from jaxtune.errors import JaxtuneError

DIST = "jaxtune"
#: The folder holding the running jaxtune package: its checkout, or site-packages. The build
#: command imports this module from there, whatever else is on the path.
_HERE = Path(__file__).resolve().parents[2]


class PackageError(JaxtuneError):
    """What to install on the workers cannot be worked out, or the wheel cannot be built."""


@dataclasses.dataclass(frozen=True)
class Package:
    """What the workers install, and where it came from."""

    source: str  # in words, for the dry run: which code, from where
    requirement: str  # the requirement ``uv pip install`` gets ("" for a local file)
    local_file: str = ""  # a wheel / sdist copied to the workers first
    build: tuple[str, ...] = ()  # the local command that writes ``local_file`` (a checkout)
    reinstall: bool = False  # replace an installed jaxtune of the same version (local code)


def resolve(package: str = "", build_dir: str | os.PathLike = "") -> Package:
    """The package the workers install: ``package`` (``--package``), or by default the jaxtune
    running here (see the module docstring). A checkout's wheel is built into ``build_dir``."""
    if package:
        if package.endswith((".whl", ".tar.gz")):
            return Package(f"the file {package}", "", local_file=package, reinstall=True)
        if _is_checkout(Path(package)):
            return _from_checkout(Path(package), build_dir)
        return Package(f"{package} from the package index, as --package gives it (whatever is "
                       "published under that name there)", package)
    if _is_checkout(_HERE):
        return _from_checkout(_HERE, build_dir)
    return _from_installed()


def _is_checkout(folder: Path) -> bool:
    try:
        project = tomllib.loads((folder / "pyproject.toml").read_text())["project"]
    except (OSError, KeyError, ValueError):
        return False
    return project.get("name") == DIST and (folder / DIST / "__init__.py").is_file()


def _from_checkout(folder: Path, build_dir: str | os.PathLike) -> Package:
    folder = folder.resolve()
    version = tomllib.loads((folder / "pyproject.toml").read_text())["project"]["version"]
    out = Path(build_dir or tempfile.gettempdir()) / "jaxtune-wheel"
    wheel = out / f"{DIST}-{version}-py3-none-any.whl"
    return Package(f"a wheel built here from the checkout {folder} ({_git_state(folder)})", "",
                   local_file=str(wheel), reinstall=True,
                   build=("env", f"PYTHONPATH={_HERE}", sys.executable, "-m",
                          "jaxtune.launch.package", str(folder), str(out)))


def _git_state(folder: Path) -> str:
    """``git 1a2b3c4`` (``, with uncommitted changes``), or ``not a git repository``."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "pyproject.toml", "README.md", DIST)
    except (OSError, subprocess.CalledProcessError):
        return "not a git repository"
    return f"git {commit}" + (", with uncommitted changes" if dirty else "")


def _from_installed() -> Package:
    try:
        dist = importlib.metadata.distribution(DIST)
    except importlib.metadata.PackageNotFoundError:
        raise PackageError("jaxtune runs here from neither a checkout nor an installed "
                           "distribution, so what to install on the workers is unknown: give "
                           "--package (a wheel, a checkout folder, or a requirement).") from None
    origin = json.loads(dist.read_text("direct_url.json") or "null")
    if origin is None:  # no direct URL: installed from a package index
        return Package(f"jaxtune {dist.version}, the version installed here, from the package "
                       "index", f"{DIST}=={dist.version}")
    url = origin.get("url", "")
    path = Path(unquote(urlparse(url).path)) if url.startswith("file:") else None
    if "vcs_info" in origin:
        commit = origin["vcs_info"].get("commit_id", "")
        return Package(f"jaxtune {dist.version} from {url} at {commit[:12]}, as installed here",
                       f"{DIST} @ {origin['vcs_info'].get('vcs', 'git')}+{url}@{commit}")
    if path is not None and path.is_file():
        return Package(f"the file {path}, as installed here", "", local_file=str(path),
                       reinstall=True)
    raise PackageError(f"jaxtune {dist.version} was installed here from {url}, which is gone; "
                       "give --package a wheel or checkout of the code to run.")


def requirement_with_extras(requirement: str, extras: str) -> str:
    """``jaxtune==1.2`` -> ``jaxtune[tpu]==1.2``; a requirement that names extras, or is a URL,
    is kept as it is."""
    if "[" in requirement or "://" in requirement.split("@")[0]:
        return requirement
    m = re.match(r"^\s*([A-Za-z0-9._-]+)(.*)$", requirement)
    return f"{m.group(1)}[{extras}]{m.group(2)}" if m else requirement


# --------------------------------------------------------------------------- building


def build_wheel(checkout: Path, out_dir: Path) -> Path:
    """Build the wheel of ``checkout`` into ``out_dir`` (emptied first); return its path."""
    if not _is_checkout(checkout):
        raise PackageError(f"{checkout} is not a jaxtune checkout (no pyproject.toml naming "
                           "the project jaxtune beside a jaxtune/ package).")
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="jaxtune-stage-") as stage:
        for name in ("pyproject.toml", "README.md"):
            if (checkout / name).is_file():
                shutil.copy2(checkout / name, stage)
        shutil.copytree(checkout / DIST, Path(stage) / DIST,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))
        subprocess.run(_wheel_command(Path(stage), out_dir), check=True,
                       stdout=subprocess.DEVNULL)
    wheels = sorted(out_dir.glob("*.whl"))
    if len(wheels) != 1:
        raise PackageError(f"building {checkout} left {len(wheels)} wheels in {out_dir}.")
    return wheels[0]


def _wheel_command(source: Path, out_dir: Path) -> list[str]:
    """pip (without build isolation where setuptools here is new enough, so no download), or
    uv's build where pip is missing."""
    if importlib.util.find_spec("pip") is not None:
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet",
               "--wheel-dir", str(out_dir), str(source)]
        if _setuptools_major() >= 77:
            cmd.insert(5, "--no-build-isolation")
        return cmd
    if shutil.which("uv"):
        return ["uv", "build", "--wheel", "--quiet", "--out-dir", str(out_dir), str(source)]
    raise PackageError("building the wheel needs pip or uv in this environment; install one, "
                       "or give --package a wheel file.")


def _setuptools_major() -> int:
    try:
        return int(importlib.metadata.version("setuptools").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return 0


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m jaxtune.launch.package CHECKOUT OUT_DIR", file=sys.stderr)
        return 2
    try:
        wheel = build_wheel(Path(argv[0]), Path(argv[1]))
    except (JaxtuneError, subprocess.CalledProcessError) as e:
        print(f"error: building the wheel failed: {e}", file=sys.stderr)
        return 2
    print(wheel)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
