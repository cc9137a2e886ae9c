#!/usr/bin/env bash
# RL on top of the main job: GRPO from the SFT quickstart's export, rewarding answers that state
# every key fact of the customer's question (LoRA, CPU), then the report (reward curve, held-out
# answers with every key fact before and after). Runs the SFT quickstart first when its export
# (runs/quickstart/hf, or SFT_RUN/hf) is missing. Extra arguments are config overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh quickstart
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
sft_run="${SFT_RUN:-runs/quickstart}"
if [ ! -f "$sft_run/hf/config.json" ]; then
  echo "== 0/2 the SFT quickstart first: GRPO starts from its export ($sft_run/hf)"
  model_dir="$(python scripts/make_smollm2.py | tail -n 1)"
  jaxtune train configs/quickstart.yaml --run.output_dir="$sft_run" --model.path="$model_dir"
fi
run_dir="runs/quickstart-grpo-$(date +%Y%m%d-%H%M%S)"  # a fresh run each time
echo "== 1/2 GRPO from $sft_run/hf (held-out answers scored every 10 steps), export"
jaxtune train configs/quickstart-grpo.yaml --run.output_dir="$run_dir" \
  --model.path="$sft_run/hf" "$@"
echo "== 2/2 report"
python scripts/grpo_report.py "$run_dir"
