#!/usr/bin/env bash
# Distillation on top of the main job: a half-depth SmolLM2 student learns the support desk
# from the SFT quickstart's export (the teacher), and the same student is fine-tuned by SFT on
# the same data for comparison; then the report sets teacher, student by SFT and student by
# distillation side by side on the held-out data. Runs the SFT quickstart first when its
# export (runs/quickstart/hf, or SFT_RUN/hf) is missing. Extra arguments are config overrides
# for both student runs.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh quickstart
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
sft_run="${SFT_RUN:-runs/quickstart}"
if [ ! -f "$sft_run/hf/config.json" ]; then
  echo "== 0/4 the SFT quickstart first: it is the teacher ($sft_run/hf)"
  model_dir="$(python scripts/make_smollm2.py | tail -n 1)"
  jaxtune train configs/quickstart.yaml --run.output_dir="$sft_run" --model.path="$model_dir"
fi
echo "== 1/4 the student: SmolLM2-135M-Instruct with every second layer (built once)"
student_dir="$(python scripts/make_smollm2_half.py | tail -n 1)"
echo "$student_dir"
stamp="$(date +%Y%m%d-%H%M%S)"  # fresh runs each time; nothing old is lost
sft_student="runs/quickstart-distill-sft-$stamp"
distill_run="runs/quickstart-distill-$stamp"
echo "== 2/4 the student by SFT on the data's answers (the same steps and data order)"
jaxtune train configs/quickstart-distill.yaml --run.output_dir="$sft_student" \
  --model.path="$student_dir" --trainer.objective=sft --export.enabled=false "$@"
echo "== 3/4 the student by distillation from $sft_run/hf"
jaxtune train configs/quickstart-distill.yaml --run.output_dir="$distill_run" \
  --model.path="$student_dir" --distill.teacher="$sft_run/hf" "$@"
echo "== 4/4 report"
python scripts/distill_report.py "$distill_run" --sft-run "$sft_student"
