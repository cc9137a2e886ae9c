#!/usr/bin/env python
"""Time ``jaxtune.from_pretrained`` and measure its peak host memory against the model size.

    python scripts/bench_load.py                      # SmolLM2-135M-Instruct, float32 (538 MB)
    python scripts/bench_load.py --synthetic-gb 2     # a random Llama of ~2 GB, 1 file a layer
    python scripts/bench_load.py --model DIR --dtype bfloat16 --scan-layers

Prints the loaded size, wall time, the process's RSS before loading (after imports), its
peak RSS, and the peak growth as a multiple of the loaded size; exits 1 if that growth
reaches ``--max-ratio`` (1.5). The loader reads each tensor block by block with the file's
memory map dropped after each read, so growth should stay close to 1x.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def smollm2_dir() -> Path:
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_smollm2.py")],
                         check=True, capture_output=True, text=True).stdout
    return Path(out.strip().splitlines()[-1])


def write_synthetic(out: Path, gigabytes: float) -> Path:
    """A random float32 Llama checkpoint of about ``gigabytes``, one safetensors file per
    layer plus an index (written in a child process, so this one's RSS stays clean)."""
    hidden, inter, vocab, heads, kv = 2048, 5632, 32000, 16, 4
    head_dim = hidden // heads
    per_layer = 4 * (2 * hidden * hidden + 2 * hidden * kv * head_dim + 3 * hidden * inter)
    layers = max(1, math.ceil((gigabytes * 1e9 - 8 * vocab * hidden) / per_layer))
    config = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=vocab,
                  hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv, rms_norm_eps=1e-5,
                  max_position_embeddings=4096, tie_word_embeddings=False)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config))
    code = f"""
import json, numpy as np
from safetensors.numpy import save_file
out, h, f, v, kvd, n = {str(out)!r}, {hidden}, {inter}, {vocab}, {kv * head_dim}, {layers}
rng = np.random.default_rng(0)
r = lambda *s: (0.02 * rng.standard_normal(s, dtype=np.float32))
weight_map = {{}}
def save(name, tensors):
    save_file(tensors, f"{{out}}/{{name}}", metadata={{"format": "pt"}})
    weight_map.update({{k: name for k in tensors}})
save("embed.safetensors", {{"model.embed_tokens.weight": r(v, h), "lm_head.weight": r(v, h),
                           "model.norm.weight": np.ones(h, np.float32)}})
for i in range(n):
    p = f"model.layers.{{i}}."
    save(f"layer-{{i:03d}}.safetensors", {{
        p + "self_attn.q_proj.weight": r(h, h), p + "self_attn.k_proj.weight": r(kvd, h),
        p + "self_attn.v_proj.weight": r(kvd, h), p + "self_attn.o_proj.weight": r(h, h),
        p + "mlp.gate_proj.weight": r(f, h), p + "mlp.up_proj.weight": r(f, h),
        p + "mlp.down_proj.weight": r(h, f),
        p + "input_layernorm.weight": np.ones(h, np.float32),
        p + "post_attention_layernorm.weight": np.ones(h, np.float32)}})
json.dump({{"metadata": {{}}, "weight_map": weight_map}},
          open(f"{{out}}/model.safetensors.index.json", "w"))
"""
    subprocess.run([sys.executable, "-c", code], check=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="HF folder (default: the SmolLM2 fixture)")
    p.add_argument("--synthetic-gb", type=float, default=0.0,
                   help="load a random Llama of this many GB instead")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--scan-layers", action="store_true")
    p.add_argument("--max-ratio", type=float, default=1.5)
    args = p.parse_args()

    tmp = tempfile.TemporaryDirectory(prefix="jaxtune-bench-load-")
    if args.synthetic_gb:
        model_dir = write_synthetic(Path(tmp.name) / "synthetic", args.synthetic_gb)
    else:
        model_dir = args.model or smollm2_dir()

    import jax
    from flax import nnx

    import jaxtune

    jax.devices()  # start the backend before the baseline
    base = rss_mb()
    start = time.perf_counter()
    model = jaxtune.from_pretrained(model_dir, dtype=args.dtype, scan_layers=args.scan_layers)
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    jax.block_until_ready(params)
    wall = time.perf_counter() - start
    peak = peak_rss_mb()
    size = sum(x.nbytes for x in params) / 2**20
    ratio = (peak - base) / size
    print(f"model       {model_dir}")
    print(f"loaded      {size:.0f} MiB ({args.dtype}, {len(params)} arrays, "
          f"scan_layers={args.scan_layers})")
    print(f"wall time   {wall:.2f} s ({size / wall:.0f} MiB/s)")
    print(f"RSS before  {base:.0f} MiB (after imports)")
    print(f"peak RSS    {peak:.0f} MiB ({peak / size:.2f}x the model)")
    print(f"peak growth {peak - base:.0f} MiB = {ratio:.2f}x the model "
          f"(limit {args.max_ratio}x)")
    tmp.cleanup()
    return 0 if ratio < args.max_ratio else 1


if __name__ == "__main__":
    sys.exit(main())
