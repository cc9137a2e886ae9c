"""jaxtune.host_memory: when `jaxtune train` restarts itself with glibc's hugetlb tunable."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from jaxtune import host_memory
from jaxtune.host_memory import TUNABLE, huge_page_environment


@pytest.fixture
def capable(monkeypatch):
    """A Linux + glibc >= 2.35 + THP machine, whatever this one is."""
    monkeypatch.setattr(host_memory.sys, "platform", "linux")
    monkeypatch.setattr(host_memory, "_glibc_has_tunable", lambda: True)
    monkeypatch.setattr(host_memory, "_thp_available", lambda: True)


def test_cpu_runs_get_the_tunable(capable):
    env = huge_page_environment({"JAX_PLATFORMS": "cpu", "HOME": "/h"})
    assert env == {"JAX_PLATFORMS": "cpu", "HOME": "/h", "GLIBC_TUNABLES": TUNABLE}


def test_other_tunables_are_kept(capable):
    env = huge_page_environment({"JAX_PLATFORMS": "cpu",
                                 "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{TUNABLE}"


@pytest.mark.parametrize("environ", [
    {"JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"},  # the user's choice
    {"JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": TUNABLE},  # already restarted: no loop
    {"JAX_PLATFORMS": "cpu", "JAXTUNE_HOST_MALLOC": "default"},  # opted out
    {"JAX_PLATFORMS": "tpu"},  # the step's memory is on the device
    {"JAX_PLATFORMS": "cuda,cpu"},
])
def test_left_alone(capable, environ):
    assert huge_page_environment(environ) is None


def test_without_jax_platforms_an_installed_accelerator_plugin_decides(capable, monkeypatch):
    monkeypatch.setattr(host_memory.importlib.util, "find_spec",
                        lambda name: object() if name == "libtpu" else None)
    assert huge_page_environment({}) is None
    monkeypatch.setattr(host_memory.importlib.util, "find_spec", lambda name: None)
    assert huge_page_environment({})["GLIBC_TUNABLES"] == TUNABLE


def test_nothing_without_glibc_or_huge_pages(monkeypatch):
    monkeypatch.setattr(host_memory.sys, "platform", "linux")
    monkeypatch.setattr(host_memory, "_thp_available", lambda: True)
    monkeypatch.setattr(host_memory, "_glibc_has_tunable", lambda: False)
    assert huge_page_environment({"JAX_PLATFORMS": "cpu"}) is None
    monkeypatch.setattr(host_memory, "_glibc_has_tunable", lambda: True)
    monkeypatch.setattr(host_memory, "_thp_available", lambda: False)
    assert huge_page_environment({"JAX_PLATFORMS": "cpu"}) is None


@pytest.mark.parametrize("content,expected", [
    ("always [madvise] never\n", True), ("[always] madvise never\n", True),
    ("always madvise [never]\n", False)])
def test_transparent_huge_page_mode(tmp_path, content, expected):
    path = tmp_path / "enabled"
    path.write_text(content)
    assert host_memory._thp_available(str(path)) is expected
    assert host_memory._thp_available(str(tmp_path / "missing")) is False


_RESTARTED = textwrap.dedent("""
    import os, sys
    with open(sys.argv[1], "a") as f:
        f.write(os.environ.get("GLIBC_TUNABLES", "-") + "\\n")
    from jaxtune.host_memory import reexec_with_huge_pages
    reexec_with_huge_pages()
    print("args", sys.argv[2:])
""")


@pytest.mark.skipif(huge_page_environment({"JAX_PLATFORMS": "cpu"}) is None,
                    reason="this machine has no glibc >= 2.35 or no transparent huge pages")
@pytest.mark.parametrize("opt_out", [False, True])
def test_the_command_restarts_once_with_its_arguments(tmp_path, opt_out):
    script, starts = tmp_path / "cmd.py", tmp_path / "starts"
    script.write_text(_RESTARTED)
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env.update(JAX_PLATFORMS="cpu", JAXTUNE_HOST_MALLOC="default" if opt_out else "")
    out = subprocess.run([sys.executable, str(script), str(starts), "a b", "--c=1"], env=env,
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "args ['a b', '--c=1']"  # printed once, by the process that ran on
    assert starts.read_text().split() == (["-"] if opt_out else ["-", TUNABLE])
