"""Shared pytest setup. Multi-device tests live in tests/multidevice and run in their own
process, with XLA_FLAGS for 8 fake CPU devices set before JAX starts: a plain ``pytest tests``
starts that process from tests/test_multidevice_suite.py, and scripts/test.sh runs it itself.
The folder is collected here only with ``JAXTUNE_MULTIDEVICE`` set (the fake devices then must
be configured already; its own conftest fails, never skips, without them). The compile-only
TPU/GPU tier lives in tests/plan_compile (JAXTUNE_PLAN_COMPILE=1, run by scripts/test.sh).

Session-scoped fixtures live in tests/fixtures_<area>.py and are registered here by import,
so each is built once per test session.
"""

import os

collect_ignore = [] if os.environ.get("JAXTUNE_MULTIDEVICE") else ["multidevice"]
# Compile-only TPU/GPU tests need the plan extra and minutes of compiler time: their own run.
if not os.environ.get("JAXTUNE_PLAN_COMPILE"):
    collect_ignore.append("plan_compile")
from tests.fixtures_chat_templates import *  # noqa: F401,F403,E402
from tests.fixtures_data import *  # noqa: F401,F403,E402
from tests.fixtures_gemma import *  # noqa: F401,F403,E402
from tests.fixtures_models import *  # noqa: F401,F403,E402
from tests.fixtures_moe import *  # noqa: F401,F403,E402
from tests.fixtures_preference import *  # noqa: F401,F403,E402
