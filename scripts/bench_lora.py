"""Full fine-tuning vs LoRA vs quantised-base LoRA on one model: what each trains and costs.

For one random Llama-shaped model (stacked layers, AdamW, random tokens) each variant runs in
its own process (so peak RSS is its own) and reports: parameters trained, optimizer-state bytes,
model bytes (trainable + frozen, as held during training), the compiled train step's memory
(XLA's own accounting: arguments + outputs - donated aliases + temporaries), the growth of the
process's peak and final RSS over its RSS before the model was built, the device's peak memory
where the backend reports one (GPU / TPU), and tokens/s. The peak RSS includes building the
float32 model that a quantised variant is then made from.

    python scripts/bench_lora.py                         # all variants, as in docs/benchmarks.md
    python scripts/bench_lora.py --variants full,r8 --steps 2   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

#: name -> LoraConfig fields (rank 0: full fine-tuning).
VARIANTS = {
    "full": dict(rank=0),
    "r8": dict(rank=8),
    "r64": dict(rank=64),
    "r8-bf16": dict(rank=8, base_dtype="bfloat16"),
    "r8-int8": dict(rank=8, quantize_base="int8"),
    "r8-nf4": dict(rank=8, quantize_base="nf4"),
}
MODEL = dict(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
             num_attention_heads=8, num_key_value_heads=8, head_dim=64)


def _rss_mib() -> tuple[float, float]:
    """(peak, current) resident set size of this process in MiB (Linux /proc)."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM:", "VmRSS:")):
                key, kb = line.split()[:2]
                values[key] = int(kb) / 1024
    return values["VmHWM:"], values["VmRSS:"]


def run_one(name: str, batch: int, seq: int, steps: int, remat: str) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    from jaxtune.config import LoraConfig, MeshConfig, OptimizerConfig, TrainerConfig
    from jaxtune.lora import apply_lora
    from jaxtune.mesh import make_mesh
    from jaxtune.models import init_model
    from jaxtune.models.llama import LlamaConfig
    from jaxtune.objectives import make_loss_fn
    from jaxtune.optim import make_optimizer
    from jaxtune.sharding import batch_sharding, make_rules
    from jaxtune.train_state import count_params, create_train_state, tree_bytes
    from jaxtune.train_step import jit_train_step, train_step

    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    _, rss_before = _rss_mib()  # JAX and jaxtune imported, no model yet
    rules = make_rules()
    cfg = LlamaConfig(model_type="llama", max_position_embeddings=seq, **MODEL)
    model = init_model(cfg, mesh, rules, seed=0, scan_layers=True, remat=remat)
    base_params = count_params(nnx.state(model))
    lora_cfg = LoraConfig(**VARIANTS[name])
    model, trainable = apply_lora(model, lora_cfg, mesh=mesh, rules=rules, seed=0)
    opt = make_optimizer(OptimizerConfig(name="adamw", learning_rate=1e-4, schedule="constant"),
                         steps + 1, nnx.state(model, trainable))
    state = create_train_state(model, opt, mesh=mesh, rules=rules, trainable=trainable)
    del model
    fn = jit_train_step(train_step, state, mesh, rules,
                        loss_fn=make_loss_fn(TrainerConfig()), optimizer=opt)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
    host = {"input_ids": ids[:, :-1], "targets": ids[:, 1:],
            "loss_mask": np.ones((batch, seq), np.float32),
            "segment_ids": np.ones((batch, seq), np.int32),
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy()}
    data = {k: jax.device_put(v, batch_sharding(mesh, rules)) for k, v in host.items()}

    tick = time.perf_counter()
    compiled = fn.lower(state, data).compile()
    compile_s = time.perf_counter() - tick
    mem = compiled.memory_analysis()
    step_bytes = None
    if mem is not None:
        step_bytes = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                      - mem.alias_size_in_bytes + mem.temp_size_in_bytes)
    state, m = compiled(state, data)  # warm-up
    jax.block_until_ready(m)
    tick = time.perf_counter()
    for _ in range(steps):
        state, m = compiled(state, data)
    jax.block_until_ready(m)
    elapsed = time.perf_counter() - tick
    stats = jax.devices()[0].memory_stats() or {}
    peak_rss, rss = _rss_mib()
    return {
        "variant": name,
        "params_base": base_params,
        "params_trained": count_params(state.params),
        "model_bytes": tree_bytes(state.params) + tree_bytes(state.frozen),
        "opt_state_bytes": tree_bytes(state.opt_state),
        "step_bytes": step_bytes,
        "device_peak_bytes": stats.get("peak_bytes_in_use"),
        "peak_rss_mib": peak_rss - rss_before,
        "end_rss_mib": rss - rss_before,
        "tokens_per_s": batch * seq * steps / elapsed,
        "compile_s": compile_s,
        "loss": float(m["loss"]),
        "backend": jax.default_backend(),
    }


def _mib(x) -> str:
    return "-" if x is None else f"{x / 2**20:,.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma-separated subset of {', '.join(VARIANTS)}")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    ap.add_argument("--remat", default="full", help="activation checkpointing (model.remat)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # run one variant, print JSON
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.batch, args.seq, args.steps, args.remat)))
        return
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    rows = []
    for name in names:
        cmd = [sys.executable, __file__, "--one", name, "--batch", str(args.batch),
               "--seq", str(args.seq), "--steps", str(args.steps), "--remat", args.remat]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        if proc.returncode:
            sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"done {name}", file=sys.stderr)
    first = rows[0]
    print(f"model: Llama {MODEL}, {first['params_base'] / 1e6:.1f}M params, stacked layers, "
          f"remat {args.remat}; AdamW; batch {args.batch} x {args.seq} tokens; "
          f"backend {first['backend']}")
    print("| variant | trained params | model MiB | optimizer state MiB | step memory MiB | "
          "device peak MiB | peak RSS growth MiB | end RSS growth MiB | tokens/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        share = r["params_trained"] / r["params_base"]
        print(f"| {r['variant']} | {r['params_trained'] / 1e6:.2f}M ({share:.1%}) | "
              f"{_mib(r['model_bytes'])} | {_mib(r['opt_state_bytes'])} | "
              f"{_mib(r['step_bytes'])} | {_mib(r['device_peak_bytes'])} | "
              f"{r['peak_rss_mib']:,.0f} | {r['end_rss_mib']:,.0f} | "
              f"{r['tokens_per_s']:,.0f} |")


if __name__ == "__main__":
    main()
