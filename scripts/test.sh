#!/usr/bin/env bash
# Run the whole test suite on CPU: lint, single-device tests, the 8-device tests in their own
# process (fake CPU devices must be configured before JAX starts), then the compile-only
# TPU/GPU tier in its own process (it needs the plan extra: libtpu and the CUDA plugin).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh test,plan
export JAX_PLATFORMS=cpu HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m ruff check jaxtune tests scripts examples
JAXTUNE_MULTIDEVICE_LATER=1 python -m pytest tests "$@"  # multidevice: next, in its own process
JAXTUNE_MULTIDEVICE=1 XLA_FLAGS=--xla_force_host_platform_device_count=8 \
  python -m pytest tests/multidevice "$@"
JAXTUNE_PLAN_COMPILE=1 python -m pytest tests/plan_compile -m tpu_compile "$@"
