"""Multi-device tests need 8 (fake) devices; without them they fail, never skip."""

import jax
import pytest


@pytest.fixture(autouse=True, scope="session")
def _eight_devices():
    if jax.device_count() != 8:
        pytest.fail(
            f"multi-device tests need 8 devices, found {jax.device_count()}: run them with "
            "XLA_FLAGS=--xla_force_host_platform_device_count=8 (scripts/test.sh does)."
        )
