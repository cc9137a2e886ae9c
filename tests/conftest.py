"""Shared pytest setup. Multi-device tests live in tests/multidevice and run in their own
process (scripts/test.sh sets XLA_FLAGS for 8 fake CPU devices before JAX starts)."""

import os

collect_ignore = [] if os.environ.get("JAXTUNE_MULTIDEVICE") else ["multidevice"]
