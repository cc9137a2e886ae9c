"""Shared pytest setup. Multi-device tests live in tests/multidevice and run in their own
process (scripts/test.sh sets XLA_FLAGS for 8 fake CPU devices before JAX starts).

Session-scoped fixtures live in tests/fixtures_<area>.py and are registered here by import,
so each is built once per test session.
"""

import os

collect_ignore = [] if os.environ.get("JAXTUNE_MULTIDEVICE") else ["multidevice"]
from tests.fixtures_chat_templates import *  # noqa: F401,F403,E402
from tests.fixtures_data import *  # noqa: F401,F403,E402
from tests.fixtures_models import *  # noqa: F401,F403,E402
