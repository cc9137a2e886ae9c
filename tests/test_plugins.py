"""Commands other than ``jaxtune plan`` print nothing from JAX's accelerator plugins on a
machine without those accelerators (``jaxtune.plugins``), in real processes: with the plan
extra installed, ``import jax`` alone printed "Could not find cuda drivers on your machine"
three times, and a first backend use added the CUDA plugin's traceback and libtpu's errors."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from jaxtune import plugins

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOISE = ("cuda", "cudart", "libtpu", "tpu worker", "jellyfish", "plugin configuration error")


def _run(args: list[str], **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    full.update(PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=full,
                          cwd=ROOT, timeout=300)


def _noise(text: str) -> list[str]:
    return [line for line in text.splitlines() if any(n in line.lower() for n in NOISE)]


@pytest.mark.skipif(plugins.cuda_usable() or plugins.tpu_usable(),
                    reason="an accelerator is here: its plugin is meant to load")
def test_commands_print_no_plugin_lines():
    """``print-config``, ``launch tpu --dry-run``, and a command that starts jax's backends,
    with ``JAX_PLATFORMS`` unset: no line from the CUDA plugin or libtpu."""
    res = _run(["-m", "jaxtune.cli", "print-config", "configs/quickstart.yaml"])
    assert res.returncode == 0 and not _noise(res.stderr), res.stderr
    res = _run(["-m", "jaxtune.cli", "launch", "tpu", "configs/llama3.1-8b-full-v5p64.yaml",
                "--zone=z", "--accelerator-type=v5p-64", "--dry-run"])
    assert res.returncode == 0 and not _noise(res.stderr), res.stderr
    # What every command that trains or generates does first: keep out, then start jax.
    code = ("from jaxtune.plugins import keep_unusable_plugins_out as k; print(k()); "
            "import jax; print(jax.devices()[0].platform)")
    res = _run(["-c", code])
    assert res.returncode == 0 and not _noise(res.stderr), res.stderr
    assert res.stdout.split() == ["['cuda',", "'tpu']", "cpu"]
    # Without it (as `jaxtune plan`, which needs the compilers), the lines are there where
    # the plan extra is installed: the test above would have failed.
    if importlib.util.find_spec("jax_cuda12_plugin"):
        assert _noise(_run(["-c", "import jax"]).stderr)


def test_what_counts_as_usable(monkeypatch, tmp_path):
    monkeypatch.setattr(plugins, "NVIDIA_DEVICES", (str(tmp_path / "nvidia0"),))
    monkeypatch.setattr(plugins, "TPU_DEVICE_GLOBS", (str(tmp_path / "accel*"),))
    monkeypatch.setattr(plugins.glob, "glob", lambda p, _g=plugins.glob.glob: _g(
        p.replace("/sys/bus/pci/devices", str(tmp_path / "pci"))))
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    assert not plugins.cuda_usable() and not plugins.tpu_usable()
    (tmp_path / "nvidia0").touch()
    (tmp_path / "accel0").touch()
    assert plugins.cuda_usable() and plugins.tpu_usable()
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # the user left them out
    assert not plugins.cuda_usable() and not plugins.tpu_usable()
    monkeypatch.setenv("JAX_PLATFORMS", "tpu,cpu")
    assert not plugins.cuda_usable() and plugins.tpu_usable()
    (tmp_path / "accel0").unlink()
    assert not plugins.tpu_usable()
    (tmp_path / "pci" / "0000:00:04.0").mkdir(parents=True)  # a TPU chip seen on PCI only
    (tmp_path / "pci" / "0000:00:04.0" / "vendor").write_text("0x1ae0\n")
    assert plugins.tpu_usable()
    monkeypatch.setitem(sys.modules, "jax", sys.modules.get("jax") or object())
    assert plugins.keep_unusable_plugins_out() == []  # jax already imported: too late
