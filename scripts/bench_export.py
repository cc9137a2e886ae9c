#!/usr/bin/env python
"""Time ``jaxtune export`` on a real checkpoint and measure its peak host memory.

    python scripts/bench_export.py                   # SmolLM2-135M-Instruct, float32 (538 MB)
    python scripts/bench_export.py --scan-layers     # the same, layers stacked in the checkpoint
    python scripts/bench_export.py --dtype bfloat16  # written as bf16
    python scripts/bench_export.py --model DIR       # any local HF folder (with a tokenizer)
    python scripts/bench_export.py --synthetic-gb 2  # a random f32 Llama of 2 GB

A child process loads the model with jaxtune and saves it, untrained, as an Orbax checkpoint
in a run directory (the layout training writes). A second, fresh child process runs
``export_run`` on that run directory and reports its wall time, its RSS after imports and
after loading the tokenizer (the fixed part: libraries, torch through transformers), and its
peak RSS (``ru_maxrss``). The export streams parameters one at a time, so the growth (peak
minus that fixed part) should stay under ``2 x the largest tensor + 64 MiB`` (Orbax metadata,
the abstract model, write buffers); the script exits 1 otherwise, or if the exported tensors
differ from the original's by a single bit (float32, real models).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXED_MIB = 64

MAKE_RUN = textwrap.dedent("""
    import sys, optax
    from jaxtune.checkpoint import Checkpointer
    from jaxtune.config import config_from_dict, save_config
    from jaxtune.models.build import single_device_mesh
    from jaxtune.train_state import create_train_state
    from jaxtune.weights import from_pretrained
    model_dir, run, scan = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    cfg = config_from_dict({"run": {"output_dir": run},
                            "model": {"path": model_dir, "scan_layers": scan},
                            "checkpoint": {"async_save": False}})
    save_config(cfg, run + "/config.yaml")
    mesh = single_device_mesh()
    model = from_pretrained(model_dir, scan_layers=scan, mesh=mesh)
    state = create_train_state(model, optax.set_to_zero(), mesh=mesh)
    ckpt = Checkpointer(cfg, mesh)
    ckpt.save(1, state, None, force=True)
    ckpt.close()
""")

MAKE_SYNTHETIC = textwrap.dedent("""
    import json, math, sys, optax
    from jaxtune.checkpoint import Checkpointer
    from jaxtune.config import config_from_dict, save_config
    from jaxtune.models import get_family, init_model
    from jaxtune.models.build import single_device_mesh
    from jaxtune.train_state import create_train_state
    model_dir, run, scan, tokenizer, gb = sys.argv[1:6]
    hidden, inter, vocab, heads, kv = 1024, 2816, 49152, 16, 4
    per_layer = 4 * (2 * hidden * hidden + 2 * hidden * kv * hidden // heads + 3 * hidden * inter)
    layers = max(1, math.ceil((float(gb) * 1e9 - 8 * vocab * hidden) / per_layer))
    hf = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=vocab,
              hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=kv, rms_norm_eps=1e-5,
              max_position_embeddings=4096, tie_word_embeddings=False, dtype="float32")
    open(model_dir + "/config.json", "w").write(json.dumps(hf))
    cfg = config_from_dict({"run": {"output_dir": run},
                            "model": {"path": model_dir, "tokenizer": tokenizer,
                                      "scan_layers": scan == "1"},
                            "checkpoint": {"async_save": False}})
    save_config(cfg, run + "/config.yaml")
    mesh = single_device_mesh()
    model = init_model(get_family("llama").config_cls.from_hf_config(hf), mesh,
                       scan_layers=scan == "1")
    state = create_train_state(model, optax.set_to_zero(), mesh=mesh)
    ckpt = Checkpointer(cfg, mesh)
    ckpt.save(1, state, None, force=True)
    ckpt.close()
""")

MEASURE = textwrap.dedent("""
    import json, math, resource, sys, time
    from pathlib import Path
    from jaxtune.data import load_tokenizer
    from jaxtune.export import export_run
    from jaxtune.run_dir import open_run
    def rss_mib():
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    run, out, dtype = sys.argv[1], sys.argv[2], sys.argv[3]
    ckpt = open_run(run)
    load_tokenizer(ckpt.config)  # the fixed part: libraries (torch via transformers), tokenizer
    largest = max(math.prod(a.shape) * a.dtype.itemsize
                  for n, a in ckpt.arrays.items() if n.startswith("params."))
    base = rss_mib()
    tick = time.perf_counter()
    export_run(run, out, dtype=dtype, echo=lambda _: None)
    wall = time.perf_counter() - tick
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"wall_s": wall, "base_mib": base, "peak_mib": peak,
                      "largest_mib": largest / 2**20}))
""")


def smollm2_dir() -> Path:
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_smollm2.py")],
                         check=True, capture_output=True, text=True).stdout
    return Path(out.strip().splitlines()[-1])


def child(code: str, *args: str) -> str:
    env_cmd = [sys.executable, "-c", code, *args]
    proc = subprocess.run(env_cmd, capture_output=True, text=True, cwd=ROOT,
                          env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
    if proc.returncode:
        sys.exit(f"child failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def folder_mib(folder: Path, pattern: str = "*") -> float:
    return sum(f.stat().st_size for f in folder.rglob(pattern) if f.is_file()) / 2**20


def bit_exact(original: Path, exported: Path) -> bool:
    """Every tensor of ``exported`` equals ``original``'s, compared one tensor at a time."""
    import numpy as np
    from safetensors import safe_open

    def index(folder: Path) -> dict[str, Path]:
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(f, framework="numpy") as h:
                out.update({k: f for k in h.keys()})
        return out

    a, b = index(original), index(exported)
    if set(a) != set(b):
        return False
    for key in a:
        with safe_open(a[key], framework="numpy") as fa, safe_open(b[key], framework="numpy") as fb:
            x, y = fa.get_tensor(key), fb.get_tensor(key)
            if x.dtype != y.dtype or not np.array_equal(x.view(np.uint8), y.view(np.uint8)):
                return False
    return True


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="local HF folder (default: SmolLM2-135M)")
    p.add_argument("--synthetic-gb", type=float, default=0.0,
                   help="instead, a random float32 Llama of this many GB (incompressible), "
                        "with the SmolLM2 tokenizer")
    p.add_argument("--scan-layers", action="store_true")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16",
                                                       "float16"))
    args = p.parse_args()
    scan = "1" if args.scan_layers else "0"
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        run, out = Path(tmp) / "run", Path(tmp) / "hf"
        if args.synthetic_gb:
            model_dir = Path(tmp) / f"random-llama-{args.synthetic_gb:g}gb"
            model_dir.mkdir()
            child(MAKE_SYNTHETIC, str(model_dir), str(run), scan, str(smollm2_dir()),
                  str(args.synthetic_gb))
        else:
            model_dir = args.model or smollm2_dir()
            child(MAKE_RUN, str(model_dir), str(run), scan)
        ckpt_mib = folder_mib(run / "checkpoints")
        m = json.loads(child(MEASURE, str(run), str(out), args.dtype).strip().splitlines()[-1])
        out_mib = folder_mib(out, "*.safetensors")
        exact = None
        if args.dtype in ("auto", "float32") and not args.synthetic_gb:
            exact = bit_exact(model_dir, out)
    growth = m["peak_mib"] - m["base_mib"]
    limit = 2 * m["largest_mib"] + FIXED_MIB
    print(f"model: {model_dir.name}{' (scan_layers)' if args.scan_layers else ''}; checkpoint "
          f"{ckpt_mib:.0f} MiB; export {out_mib:.0f} MiB ({args.dtype})")
    print(f"wall {m['wall_s']:.1f} s; RSS after imports + tokenizer {m['base_mib']:.0f} MiB; peak "
          f"{m['peak_mib']:.0f} MiB; growth {growth:.0f} MiB = "
          f"{growth / m['largest_mib']:.2f} x the largest tensor ({m['largest_mib']:.0f} MiB); "
          f"limit 2 x largest + {FIXED_MIB} MiB = {limit:.0f} MiB")
    if exact is not None:
        print(f"bit-exact against the original: {'yes' if exact else 'NO'}")
    ok = growth <= limit and exact is not False
    assert math.isfinite(growth)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
