#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install jaxtune with an extra.
# Usage: source scripts/setup_env.sh [extras]  (test | quickstart | test,plan; default test)
# torch==2.13.0 (CPU) is installed first, so nothing later pulls a multi-GB CUDA build.
set -euo pipefail
extra="${1:-test}"
venv="${JAXTUNE_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"
stamp="$venv/.jaxtune-$extra-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  python -m pip install -q --upgrade pip
  python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
  python -m pip install -q -e ".[$extra]"
  touch "$stamp"
fi
