#!/usr/bin/env bash
# The main job: fully fine-tune SmolLM2-135M-Instruct on the Nimbrel Sync support set on
# the CPU, evaluate on the held-out split every 100 steps, export to Hugging Face format, and
# report (held-out loss, loss curve, base vs fine-tuned answers through transformers).
# Extra arguments are config overrides, e.g. --lora.rank=32 --lora.alpha=64
# --optimizer.learning_rate=3e-3 for LoRA.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh quickstart
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
run_dir="runs/quickstart-$(date +%Y%m%d-%H%M%S)"  # a fresh run each time; nothing old is lost
echo "== 1/3 model fixture: SmolLM2-135M-Instruct (built once, cached outside git)"
model_dir="$(python scripts/make_smollm2.py | tail -n 1)"  # honours JAXTUNE_CACHE
echo "$model_dir"
echo "== 2/3 fine-tune (held-out eval every 100 steps), export"
jaxtune train configs/quickstart.yaml --run.output_dir="$run_dir" --model.path="$model_dir" "$@"
echo "== 3/3 report"
python scripts/quickstart_report.py "$run_dir"
