#!/usr/bin/env bash
# The main job. Until the full quickstart lands, this runs the most complete path there is.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh quickstart
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}" HF_HUB_OFFLINE=1
jaxtune print-config configs/tiny.yaml
