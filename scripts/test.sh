#!/usr/bin/env bash
# Run the whole test suite on CPU: lint, single-device tests, then the 8-device tests in
# their own process (fake CPU devices must be configured before JAX starts).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh test
export JAX_PLATFORMS=cpu HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m ruff check jaxtune tests scripts examples
JAXTUNE_MULTIDEVICE_LATER=1 python -m pytest tests "$@"  # multidevice: next, in its own process
JAXTUNE_MULTIDEVICE=1 XLA_FLAGS=--xla_force_host_platform_device_count=8 \
  python -m pytest tests/multidevice "$@"
