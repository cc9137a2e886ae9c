"""Checkpoint benchmark: save and restore time, and how long an async save holds up training.

A Llama-shaped model (default ~134M parameters, 537 MB in float32) with AdamW, trained by the
real jitted train step, is checkpointed through :class:`jaxtune.checkpoint.Checkpointer`:

1. a synchronous save (``checkpoint.async_save: false``): the loop waits for the whole write;
2. an asynchronous save: the time ``save()`` holds up the loop (copying arrays off the
   device), then training steps run while Orbax writes in the background; their step time is
   compared with steps without a save in flight;
3. a restore of that checkpoint into the sharded state.

    python scripts/bench_checkpoint.py                      # print the results
    python scripts/bench_checkpoint.py --docs docs/benchmarks.md   # also record them there
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import textwrap
import time


def build(args):
    """(mesh, cfg, state, compiled step, batch) for a Llama of the requested size."""
    import jax
    import numpy as np
    from flax import nnx

    from jaxtune.config import TrainConfig
    from jaxtune.mesh import make_mesh
    from jaxtune.models.llama.model import LlamaConfig
    from jaxtune.objectives import make_loss_fn
    from jaxtune.optim import make_optimizer
    from jaxtune.sharding import batch_sharding, make_rules
    from jaxtune.train_state import create_train_state
    from jaxtune.train_step import jit_train_step, train_step
    from jaxtune.weights import init_model

    cfg = TrainConfig()
    cfg.optimizer.schedule = "constant"
    mesh, rules = make_mesh(cfg.mesh), make_rules()
    heads = args.hidden // 64
    model_cfg = LlamaConfig.from_hf_config({
        "model_type": "llama", "vocab_size": args.vocab, "hidden_size": args.hidden,
        "intermediate_size": args.mlp, "num_hidden_layers": args.layers,
        "num_attention_heads": heads, "num_key_value_heads": heads,
        "max_position_embeddings": args.seq, "tie_word_embeddings": False})
    model = init_model(model_cfg, mesh=mesh, rules=rules, seed=0, param_dtype="float32")
    optimizer = make_optimizer(cfg.optimizer, 1000, nnx.state(model, nnx.Param))
    state = create_train_state(model, optimizer, mesh=mesh, rules=rules)
    step = jit_train_step(train_step, state, mesh, rules, loss_fn=make_loss_fn(cfg),
                          optimizer=optimizer)
    rng = np.random.default_rng(0)
    b, t = args.batch, args.seq
    ids = rng.integers(0, args.vocab, (b, t + 1)).astype(np.int32)
    host = {"input_ids": ids[:, :-1], "targets": ids[:, 1:],
            "loss_mask": np.ones((b, t), np.float32), "segment_ids": np.ones((b, t), np.int32),
            "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1))}
    batch = {k: jax.device_put(v, batch_sharding(mesh)) for k, v in host.items()}
    return mesh, cfg, state, step.lower(state, batch).compile(), batch


class Data:
    """Stands in for the data iterator: only its position is checkpointed."""

    def get_state(self):
        return {"batches": 0}

    def set_state(self, state):
        pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--mlp", type=int, default=2048)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=4, help="training steps per timed phase")
    p.add_argument("--repeats", type=int, default=3, help="timed saves of each kind")
    p.add_argument("--dir", default="", help="where to write (default: a temporary folder)")
    p.add_argument("--docs", default="", help="append/replace the '## Checkpoints' section here")
    args = p.parse_args()

    import jax

    from jaxtune.checkpoint import Checkpointer
    from jaxtune.train_state import count_params, tree_bytes

    mesh, cfg, state, step_fn, batch = build(args)
    root = args.dir or tempfile.mkdtemp(prefix="bench-ckpt-")
    params_mb = tree_bytes(state.params) / 1e6
    saved_mb = (tree_bytes(state.params) + tree_bytes(state.opt_state)) / 1e6
    print(f"model {count_params(state.params) / 1e6:.0f}M params, {params_mb:.0f} MB; "
          f"checkpoint (params + AdamW) {saved_mb:.0f} MB; writing under {root}")

    def train(n: int, ck=None) -> list[float]:
        nonlocal state
        times = []
        for _ in range(n):
            tick = time.perf_counter()
            state, metrics = step_fn(state, batch)
            jax.block_until_ready(metrics["loss"])
            times.append(time.perf_counter() - tick)
            if ck is not None and not ck._manager.is_saving_in_progress():
                break  # count only steps that overlapped the background write
        return times

    train(2)  # warm up
    base = statistics.median(train(args.steps))
    data = Data()
    runs: dict[str, list[float]] = {k: [] for k in ("sync", "blocked", "written", "during",
                                                    "restore")}
    for r in range(args.repeats):
        for mode in ("sync", "async"):
            cfg.run.output_dir = os.path.join(root, f"{mode}{r}")
            cfg.checkpoint.async_save = mode == "async"
            cfg.checkpoint.resume = "none"
            ck = Checkpointer(cfg, mesh)
            tick = time.perf_counter()
            ck.save(int(state.step), state, data, force=True)
            blocked = time.perf_counter() - tick
            overlapped = train(args.steps, ck) if mode == "async" else []
            ck.wait()
            written = time.perf_counter() - tick
            ck.close()
            if mode == "sync":
                runs["sync"].append(written)
            else:
                runs["blocked"].append(blocked)
                runs["written"].append(written)
                runs["during"] += overlapped
        cfg.checkpoint.resume = "auto"
        ck = Checkpointer(cfg, mesh)
        tick = time.perf_counter()
        state = ck.restore(state, data)
        jax.block_until_ready(state.params)
        runs["restore"].append(time.perf_counter() - tick)
        ck.close()
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)

    def cell(values: list[float]) -> str:
        if not values:
            return "n/a"
        med = statistics.median(values)
        return f"{med:.2f}" if len(values) == 1 else \
            f"{med:.2f} ({min(values):.2f}-{max(values):.2f})"

    device = jax.devices()[0]
    intro = (
        f"`python scripts/bench_checkpoint.py` on {jax.device_count()} x "
        f"{device.device_kind} ({jax.default_backend()}), {os.cpu_count()} CPU cores: a "
        f"Llama-shaped model of {count_params(state.params) / 1e6:.0f}M parameters "
        f"({params_mb:.0f} MB float32) with AdamW, {saved_mb:.0f} MB per checkpoint, "
        f"written to local disk; median (range) of {args.repeats} repeats.")
    lines = [
        "## Checkpoints",
        "",
        textwrap.fill(intro, 95),
        "",
        "| what | seconds |",
        "| --- | --- |",
        f"| synchronous save (the loop waits for all of it) | {cell(runs['sync'])} |",
        f"| asynchronous save: loop held up in `save()` | {cell(runs['blocked'])} |",
        f"| asynchronous save: complete on disk after (training meanwhile) | "
        f"{cell(runs['written'])} |",
        f"| train step, no save in flight | {base:.2f} |",
        f"| train step while the background write runs | {cell(runs['during'])} |",
        f"| restore onto the sharded state | {cell(runs['restore'])} |",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.docs:
        write_section(args.docs, text)
        print(f"recorded in {args.docs}")


def write_section(path: str, section: str) -> None:
    """Replace the '## Checkpoints' section of ``path`` (or append it; create the file)."""
    old = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    start = old.find("## Checkpoints")
    if start >= 0:
        end = old.find("\n## ", start + 1)
        old = old[:start] + (old[end + 1:] if end >= 0 else "")
    with open(path, "w") as f:
        f.write(old.rstrip("\n") + "\n\n" + section)


if __name__ == "__main__":
    main()
