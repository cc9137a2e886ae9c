"""Shared pytest setup. Multi-device tests live in tests/multidevice and run in their own
process, with XLA_FLAGS for 8 fake CPU devices set before JAX starts: a plain ``pytest tests``
starts that process from tests/test_multidevice_suite.py, and scripts/test.sh runs it itself.
The folder is collected here only with ``JAXTUNE_MULTIDEVICE`` set (the fake devices then must
be configured already; its own conftest fails, never skips, without them). The compile-only
TPU/GPU tier lives in tests/plan_compile (JAXTUNE_PLAN_COMPILE=1, run by scripts/test.sh).

Session-scoped fixtures live in tests/fixtures_<area>.py and are registered here by import,
so each is built once per test session.
"""

import atexit
import os
import shutil
import sys
import tempfile

# One XLA compilation cache for the session and every process it starts (the CLI runs, the
# multi-process tests inherit the environment): tests that build the same tiny model or run the
# same recipe twice (straight vs. resumed) compile it once. Only a speed-up: a fresh directory
# each session, removed at exit, so no test reads what an earlier session compiled.
# Not for the compile-only TPU/GPU tier: those executables are never run, and caching them would
# need the backends this machine lacks.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ and not os.environ.get("JAXTUNE_PLAN_COMPILE"):
    _xla_cache = tempfile.mkdtemp(prefix="jaxtune-tests-xla-cache-")
    atexit.register(shutil.rmtree, _xla_cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _xla_cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # tiny models compile fast
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
    if "jax" in sys.modules:  # imported before this file (a plugin): the environment is read
        import jax

        jax.config.update("jax_compilation_cache_dir", _xla_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)

collect_ignore = [] if os.environ.get("JAXTUNE_MULTIDEVICE") else ["multidevice"]
# Compile-only TPU/GPU tests need the plan extra and minutes of compiler time: their own run.
if not os.environ.get("JAXTUNE_PLAN_COMPILE"):
    collect_ignore.append("plan_compile")
from tests.fixtures_chat_templates import *  # noqa: F401,F403,E402
from tests.fixtures_data import *  # noqa: F401,F403,E402
from tests.fixtures_distill import *  # noqa: F401,F403,E402
from tests.fixtures_gemma import *  # noqa: F401,F403,E402
from tests.fixtures_gemma4 import *  # noqa: F401,F403,E402
from tests.fixtures_models import *  # noqa: F401,F403,E402
from tests.fixtures_moe import *  # noqa: F401,F403,E402
from tests.fixtures_preference import *  # noqa: F401,F403,E402
