"""MoE training throughput, side by side: jaxtune's grouped dispatch (row tiles on CPU,
ragged_dot elsewhere), jaxtune forced to ragged_dot, jaxtune with a naive per-expert loop, and
transformers + PyTorch on the same model and batch.

A Qwen3-MoE-shaped model (random weights, saved by transformers and loaded by jaxtune, so all
three train the same model), random tokens, AdamW, float32, router aux loss on in all three
(transformers: ``output_router_logits=True``). The runners alternate timed rounds after a
warm-up, so machine noise hits them alike. Prints tokens/s, the ratio to transformers, and
jaxtune's MFU counted on active parameters (top-k experts).

    python scripts/bench_moe.py                  # as recorded in docs/benchmarks.md
    python scripts/bench_moe.py --rounds 2 --steps 2   # quick look
    python scripts/bench_moe.py --expert-mesh 1,2,4    # expert parallelism on 8 fake devices

``--expert-mesh`` compares the default layout of jaxtune's step on 8 devices (fake CPU devices
unless there are real ones) with the expert axis at each size (the rest ``fsdp``, tokens split
over ``data x fsdp``): on CPU it measures what the exchange (all-gather in, psum_scatter out)
and the replicated attention cost against no expert axis, not accelerator speed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

SIZE = dict(vocab_size=4096, hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
            num_experts=16, num_experts_per_tok=2, norm_topk_prob=True,
            max_position_embeddings=512)
BATCH, SEQ = 8, 256


def save_model(folder: str) -> None:
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    Qwen3MoeForCausalLM(Qwen3MoeConfig(**SIZE)).save_pretrained(folder)


class TorchRunner:
    """transformers' Qwen3MoeForCausalLM (its default experts implementation), AdamW."""

    def __init__(self, folder: str, ids, threads: int):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.ids = torch.as_tensor(ids).long()
        self.impl = getattr(self.model.config, "_experts_implementation", None) or "default"

    def step(self) -> float:
        out = self.model(input_ids=self.ids, labels=self.ids, output_router_logits=True)
        out.loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(out.loss.detach())


class JaxRunner:
    """jaxtune's jitted train step (chunked CE + router aux loss), dispatch grouped or naive."""

    def __init__(self, folder: str, ids, dispatch: str, mesh_cfg=None):
        import jax
        import numpy as np
        from flax import nnx

        from jaxtune.config import OptimizerConfig, TrainerConfig
        from jaxtune.mesh import make_mesh
        from jaxtune.models.build import single_device_mesh
        from jaxtune.models.moe.model import MoeForCausalLM
        from jaxtune.objectives import make_loss_fn
        from jaxtune.optim import make_optimizer
        from jaxtune.sharding import make_rules
        from jaxtune.train_state import create_train_state
        from jaxtune.train_step import jit_train_step, train_step
        from jaxtune.weights import from_pretrained

        mesh = single_device_mesh() if mesh_cfg is None else make_mesh(mesh_cfg)
        rules = make_rules()
        model = from_pretrained(folder, mesh=mesh)
        if dispatch != "grouped":
            shape = nnx.eval_shape(lambda: MoeForCausalLM(model.config, dispatch=dispatch,
                                                          rngs=nnx.Rngs(0)))
            model = nnx.merge(nnx.graphdef(shape), nnx.state(model))
        self.config = model.config
        opt = make_optimizer(OptimizerConfig(learning_rate=1e-4, schedule="constant"), 100,
                             nnx.state(model, nnx.Param))
        self.state = create_train_state(model, opt, mesh=mesh, rules=rules)
        self.fn = jit_train_step(train_step, self.state, mesh, rules, optimizer=opt,
                                 loss_fn=make_loss_fn(TrainerConfig()))
        from jaxtune.sharding import batch_sharding

        b, t = ids.shape
        where = batch_sharding(mesh, rules)
        self.batch = {k: jax.device_put(v, where) for k, v in {
            "input_ids": ids, "targets": np.roll(ids, -1, 1), "loss_mask": np.ones((b, t),
                                                                                     np.float32),
            "segment_ids": np.ones((b, t), np.int32),
            "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()}.items()}

    def step(self) -> float:
        self.state, m = self.fn(self.state, self.batch)
        return float(m["loss"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="steps per timed round")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--expert-mesh", default="",
                   help="expert axis sizes to compare on 8 devices, e.g. 1,2,4")
    args = p.parse_args()
    if args.expert_mesh:
        return expert_mesh(args)

    import jax
    import numpy as np

    from jaxtune import metrics

    ids = np.random.default_rng(0).integers(0, SIZE["vocab_size"], (BATCH, SEQ)).astype(np.int32)
    with tempfile.TemporaryDirectory() as folder:
        save_model(folder)
        runners = {"jaxtune grouped (default)": JaxRunner(folder, ids, "grouped"),
                   "jaxtune ragged_dot": JaxRunner(folder, ids, "ragged"),
                   "jaxtune naive per-expert loop": JaxRunner(folder, ids, "naive"),
                   "transformers + PyTorch": TorchRunner(folder, ids, args.threads)}
        for r in runners.values():  # warm-up (compile)
            r.step()
        times: dict[str, list[float]] = {k: [] for k in runners}
        for _ in range(args.rounds):
            for name, r in runners.items():
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    r.step()
                times[name].append((time.perf_counter() - t0) / args.steps)
    tokens = BATCH * SEQ
    cfg = runners["jaxtune grouped (default)"].config
    flops = metrics.flops_per_token(cfg, SEQ) * tokens
    peak = metrics.measure_matmul_peak("float32")
    ref = statistics.median(times["transformers + PyTorch"])
    print(f"Qwen3-MoE {SIZE['num_experts']} experts top-{SIZE['num_experts_per_tok']}, "
          f"{SIZE['num_hidden_layers']} layers, hidden {SIZE['hidden_size']}, batch {BATCH} x "
          f"{SEQ}; jax {jax.__version__} on {jax.devices()[0].platform}, {args.threads} "
          f"torch threads, transformers experts: {runners['transformers + PyTorch'].impl}")
    print(f"{'runner':34s} {'s/step':>8s} {'tokens/s':>10s} {'vs HF':>7s} {'MFU':>6s}")
    for name, ts in times.items():
        s = statistics.median(ts)
        mfu = f"{flops / s / peak:6.1%}" if name.startswith("jaxtune") else "     -"
        print(f"{name:34s} {s:8.3f} {tokens / s:10.0f} {ref / s:6.2f}x {mfu}")


def expert_mesh(args) -> None:
    """The grouped step on 8 devices, one runner per expert-axis size, alternating rounds."""
    if "jax" not in __import__("sys").modules and "device_count" not in os.environ.get(
            "XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_force_host_platform_device_count=8").strip()
    import jax
    import numpy as np

    from jaxtune.config import MeshConfig
    from jaxtune.hardware import describe_machine

    sizes = [int(x) for x in args.expert_mesh.split(",")]
    ids = np.random.default_rng(0).integers(0, SIZE["vocab_size"], (BATCH, SEQ)).astype(np.int32)
    with tempfile.TemporaryDirectory() as folder:
        save_model(folder)
        runners = {f"expert={x} fsdp={8 // x}": JaxRunner(
            folder, ids, "grouped", MeshConfig(data=1, fsdp=8 // x, expert=x)) for x in sizes}
        losses = {name: r.step() for name, r in runners.items()}  # warm-up (compile)
        times: dict[str, list[float]] = {k: [] for k in runners}
        for i in range(args.rounds):
            order = list(runners.items())
            for name, r in (order if i % 2 == 0 else order[::-1]):
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    r.step()
                times[name].append((time.perf_counter() - t0) / args.steps)
    print(f"Qwen3-MoE {SIZE['num_experts']} experts top-{SIZE['num_experts_per_tok']}, batch "
          f"{BATCH} x {SEQ}, grouped dispatch, {jax.device_count()} {jax.devices()[0].platform} "
          f"devices; {describe_machine()}")
    first = statistics.median(times[next(iter(times))])
    print(f"{'mesh':18s} {'s/step':>8s} {'tokens/s':>10s} {'vs first':>9s} {'first loss':>11s}")
    for name, ts in times.items():
        s = statistics.median(ts)
        print(f"{name:18s} {s:8.3f} {BATCH * SEQ / s:10.0f} {first / s:8.2f}x "
              f"{losses[name]:11.6f}")


if __name__ == "__main__":
    main()
