"""A plain ``pytest tests`` runs tests/multidevice too: in a pytest process of its own.

Those tests need 8 fake CPU devices, which XLA reads from ``XLA_FLAGS`` before JAX starts, so
they cannot share this process (``tests/conftest.py`` leaves the folder out of its collection
unless ``JAXTUNE_MULTIDEVICE`` is set). This test starts a child pytest on the folder with the
flags set and fails, showing the child's report, when any of them fails. Nothing is skipped
silently: ``scripts/test.sh`` runs the folder itself right after the main run (so its output
streams) and sets ``JAXTUNE_MULTIDEVICE_LATER=1`` so it does not run twice; a run that
collects the folder in this process (``JAXTUNE_MULTIDEVICE=1``) skips this test, saying why.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLAG = "--xla_force_host_platform_device_count=8"


def test_multidevice_tests_pass_in_their_own_process():
    if os.environ.get("JAXTUNE_MULTIDEVICE"):
        pytest.skip("tests/multidevice is collected in this process (JAXTUNE_MULTIDEVICE)")
    if os.environ.get("JAXTUNE_MULTIDEVICE_LATER"):
        pytest.skip("scripts/test.sh runs tests/multidevice in its own process next")
    env = {**os.environ, "JAXTUNE_MULTIDEVICE": "1", "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {FLAG}".strip(),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/multidevice", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, (
        f"tests/multidevice failed in its own process (exit {proc.returncode}); rerun with\n"
        f"  JAXTUNE_MULTIDEVICE=1 XLA_FLAGS={FLAG} python -m pytest tests/multidevice\n"
        + (proc.stdout + proc.stderr)[-12000:])
