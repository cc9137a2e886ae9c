#!/usr/bin/env bash
# GPU readiness in one prepared run (< 8 minutes on one H100/H200) for when a GPU machine is
# available: (1) the attention kernel tests on the real device (cuDNN flash attention and the
# Pallas Triton kernel in bf16 against XLA's and the float32 reference), (2) scripts/bench_train.py in bf16 with MFU against
# the device's peak, (3) a one-minute LoRA fine-tune of the SmolLM2 fixture. Prints one summary
# block and writes the figures to $OUT_DIR/device_check.json (default runs/device_check) for
# docs/benchmarks.md.
#   bash scripts/device_check.sh            (needs: pip install -e '.[test,cuda]')
set -uo pipefail
cd "$(dirname "$0")/.."
out_dir="${OUT_DIR:-runs/device_check}"
mkdir -p "$out_dir"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
unset JAX_PLATFORMS
status() { if [ "$1" -eq 0 ]; then echo ok; else echo "FAILED (rc $1)"; fi; }

python - <<'EOF' > "$out_dir/device.txt" 2>&1
import jax
d = jax.devices()[0]
print(f"{d.platform} {d.device_kind} x{jax.device_count()}")
EOF
device=$(tail -1 "$out_dir/device.txt")

# 1. Kernel tests on the device: cuDNN and the Pallas (Triton) kernel in bf16 vs XLA, on the
#    model's own shapes.
timeout 150 python - <<'EOF' > "$out_dir/kernels.txt" 2>&1
import jax, jax.numpy as jnp, numpy as np
from jaxtune.models.layers import AttentionMask, dot_product_attention
from jaxtune.kernels.splash import reference_attention
k = jax.random.split(jax.random.key(0), 3)
q = jax.random.normal(k[0], (2, 1024, 8, 128), jnp.bfloat16)
kk = jax.random.normal(k[1], (2, 1024, 2, 128), jnp.bfloat16)
v = jax.random.normal(k[2], (2, 1024, 2, 128), jnp.bfloat16)
seg = jnp.concatenate([jnp.ones((2, 600), jnp.int32), 2 * jnp.ones((2, 424), jnp.int32)], 1)
worst = 0.0
for window in (None, 256):
    for impl in ("cudnn", "pallas_gpu", "xla"):  # pallas_gpu: XLA (noted) for the window
        got = jax.jit(lambda q, k, v: dot_product_attention(
            q, k, v, mask=AttentionMask.causal(jnp.broadcast_to(jnp.arange(1024), (2, 1024)), seg),
            window=window, implementation=impl))(q, kk, v)
        want = reference_attention(q.astype(jnp.float32), kk.astype(jnp.float32),
                                   v.astype(jnp.float32), segment_ids_BT=seg, window=window)
        err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want)))
        print(f"{impl} window={window}: max |err| vs f32 reference {err:.4f}")
        worst = max(worst, err)
assert worst < 0.05, worst
print(f"KERNELS_MAX_ERR {worst:.4f}")
EOF
kernels_rc=$?

# 2. Throughput and MFU in bf16 against the device's peak (no PyTorch reference here).
timeout 200 python scripts/bench_train.py --sizes S,M --rounds 2 --steps 5 --no-torch \
  > "$out_dir/bench.txt" 2>&1
bench_rc=$?

# 3. One-minute LoRA fine-tune of the SmolLM2 fixture.
fixture=$(timeout 60 python scripts/make_smollm2.py 2>/dev/null | tail -1)
timeout 150 python -m jaxtune.cli train configs/quickstart.yaml --model.path="$fixture" \
  --model.compute_dtype=bfloat16 --trainer.steps=30 --export.enabled=false \
  --checkpoint.enabled=false --run.output_dir="$out_dir/lora" > "$out_dir/lora.txt" 2>&1
lora_rc=$?

python - "$out_dir" "$device" "$kernels_rc" "$bench_rc" "$lora_rc" <<'EOF'
import json, os, re, sys
out, device, *rcs = sys.argv[1:]
def grep(name, pattern):
    path = os.path.join(out, name)
    text = open(path).read() if os.path.exists(path) else ""
    return re.findall(pattern, text)
metrics = os.path.join(out, "lora", "metrics.jsonl")
rows = [json.loads(l) for l in open(metrics)] if os.path.exists(metrics) else []
losses = [r["loss"] for r in rows if "loss" in r]
figures = {
    "device": device,
    "kernels_max_err": (grep("kernels.txt", r"KERNELS_MAX_ERR ([\d.]+)") or [None])[0],
    "bench_lines": grep("bench.txt", r".*(?:tokens/s|MFU).*"),
    "lora_first_loss": losses[0] if losses else None,
    "lora_last_loss": losses[-1] if losses else None,
    "lora_tokens_per_s": rows[-1].get("tokens_per_s") if rows else None,
    "lora_mfu": rows[-1].get("mfu") if rows else None,
    "rc": dict(zip(("kernels", "bench", "lora"), map(int, rcs))),
}
json.dump(figures, open(os.path.join(out, "device_check.json"), "w"), indent=2)
print("==== jaxtune device check ====")
print(f"device:  {device}")
for k in ("kernels", "bench", "lora"):
    print(f"{k + ':':9}{'ok' if figures['rc'][k] == 0 else 'FAILED rc ' + str(figures['rc'][k])}")
print(f"attention max |err| (bf16 vs f32 reference): {figures['kernels_max_err']}")
for line in figures["bench_lines"]:
    print(f"bench:   {line.strip()}")
print(f"LoRA:    loss {figures['lora_first_loss']} -> {figures['lora_last_loss']}, "
      f"{figures['lora_tokens_per_s']} tokens/s, MFU {figures['lora_mfu']}")
print(f"figures: {os.path.join(out, 'device_check.json')}")
EOF
