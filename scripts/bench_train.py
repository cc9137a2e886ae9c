"""Training throughput: jaxtune vs a plain transformers + PyTorch loop, side by side.

Two Llama-shaped models with untied embeddings, random tokens, AdamW, f32 (bf16 compute on a
GPU); ``--family gemma3`` gives the same sizes Gemma 3's architecture (tied embeddings, q/k
norms, sandwich norms, GeGLU, 5 local layers with a 128-token window : 1 global). Both
frameworks run in alternating rounds after a warm-up (the order flips every round), so
machine noise hits both alike. Each runs in a process of its own, started as its users start
it: jaxtune with the environment ``jaxtune train`` runs under (huge pages for the step's
temporaries where glibc and the kernel offer them, ``jaxtune.host_memory``), PyTorch with
none. In one process they would share glibc's settings and heap, and each framework's idle
threads would spin beside the other's step. Per framework it prints the median and the min-max
tokens/s over the rounds; then the ratio of the medians and the median of the per-round paired
ratios (jaxtune's round r over torch's round r). The ``ratio S:`` / ``ratio M:`` lines are the
median paired ratio: one slow round on either side moves it least. The header names the CPU's
vector extensions and the matmul peak measured in the same run, against which both
frameworks' MFU is given.

    python scripts/bench_train.py                 # S and M, as recorded in docs/benchmarks.md
    python scripts/bench_train.py --sizes S --rounds 3 --steps 2   # quick look
    python scripts/bench_train.py --family gemma3   # Gemma3ForCausalLM vs jaxtune's gemma
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

SIZES = {
    "S": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=688,
              vocab_size=8192, seq_len=256, batch=8),
    "M": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=1376,
              vocab_size=8192, seq_len=512, batch=8),
}


FAMILIES = ("llama", "gemma3")


def hf_config(size: dict, family: str = "llama"):
    if family == "gemma3":
        from transformers import Gemma3TextConfig

        heads = size["num_attention_heads"]
        return Gemma3TextConfig(
            hidden_size=size["hidden_size"], num_hidden_layers=size["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=heads,
            head_dim=size["hidden_size"] // heads,
            query_pre_attn_scalar=size["hidden_size"] // heads,
            intermediate_size=size["intermediate_size"], vocab_size=size["vocab_size"],
            max_position_embeddings=size["seq_len"], sliding_window=128,
            sliding_window_pattern=6,
        )
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=size["hidden_size"], num_hidden_layers=size["num_hidden_layers"],
        num_attention_heads=size["num_attention_heads"],
        num_key_value_heads=size["num_attention_heads"],
        intermediate_size=size["intermediate_size"], vocab_size=size["vocab_size"],
        max_position_embeddings=size["seq_len"], tie_word_embeddings=False,
    )


def model_config(size: dict, family: str = "llama"):
    """jaxtune's config of the benchmark model (for its FLOPs per token)."""
    from jaxtune.models import get_family

    hf = hf_config(size, family).to_dict()
    return get_family(hf["model_type"]).config_cls.from_hf_config(hf)


class TorchRunner:
    """The reference: transformers' LlamaForCausalLM (or Gemma3ForCausalLM), sdpa attention,
    torch.optim.AdamW."""

    def __init__(self, size: dict, threads: int, family: str = "llama"):
        import torch
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        torch.set_num_threads(threads)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_config(hf_config(size, family),
                                                      attn_implementation="sdpa")
        self.model.train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, size["vocab_size"], (size["batch"], size["seq_len"]),
                                 generator=g)

    def step(self) -> float:
        loss = self.model(input_ids=self.ids, labels=self.ids).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()


class JaxRunner:
    """jaxtune's own pieces: init_model, TrainState, the jitted train step, chunked CE."""

    def __init__(self, size: dict, compute_dtype: str, family: str = "llama"):
        import jax
        import numpy as np

        from jaxtune.config import MeshConfig, OptimizerConfig, TrainerConfig
        from jaxtune.mesh import make_mesh
        from jaxtune.models.build import init_model
        from jaxtune.objectives import make_loss_fn
        from jaxtune.optim import make_optimizer
        from jaxtune.sharding import make_rules
        from jaxtune.train_state import create_train_state
        from jaxtune.train_step import jit_train_step, train_step

        self.jax = jax
        mesh = make_mesh(MeshConfig(data=-1))
        rules = make_rules()
        cfg = model_config(size, family)
        model = init_model(cfg, mesh=mesh, rules=rules, seed=0, param_dtype="float32",
                           compute_dtype=compute_dtype)
        self.model_config = model.config
        opt_cfg = OptimizerConfig(name="adamw", learning_rate=1e-4, schedule="constant",
                                  max_grad_norm=0.0, weight_decay=0.0)
        from flax import nnx

        optimizer = make_optimizer(opt_cfg, 1000, nnx.state(model, nnx.Param))
        self.state = create_train_state(model, optimizer, mesh=mesh, rules=rules)
        step = jit_train_step(train_step, self.state, mesh, rules,
                              loss_fn=make_loss_fn(TrainerConfig()), optimizer=optimizer)
        rng = np.random.default_rng(0)
        b, t = size["batch"], size["seq_len"]
        ids = rng.integers(0, size["vocab_size"], (b, t + 1)).astype(np.int32)
        host = {"input_ids": ids[:, :-1], "targets": ids[:, 1:],
                "loss_mask": np.ones((b, t), np.float32), "segment_ids": np.ones((b, t), np.int32),
                "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1))}
        from jaxtune.sharding import batch_sharding

        self.batch = {k: jax.device_put(v, batch_sharding(mesh)) for k, v in host.items()}
        self.step_fn = step.lower(self.state, self.batch).compile()

    def step(self) -> float:
        self.state, metrics = self.step_fn(self.state, self.batch)
        return float(metrics["loss"])  # blocks, so the timing covers the whole step


class WorkerProcess:
    """A runner in a process of its own (a script's hidden ``--worker`` mode, started by
    ``cmd``): ``step()`` asks it for one step and waits for the loss, so the caller times the
    step as for an in-process one. The worker prints ``BENCH-READY`` once built, then answers
    each ``step`` line on stdin with ``BENCH-LOSS <loss>``."""

    def __init__(self, cmd: list[str], env: dict[str, str]):
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env, cwd=os.getcwd())
        self._expect("BENCH-READY")

    def _expect(self, marker: str) -> str:
        for line in self.proc.stdout:  # the worker's other output (notes) is passed over
            if line.startswith(marker):
                return line[len(marker):].strip()
        raise RuntimeError(f"benchmark worker {' '.join(self.proc.args[1:4])} exited "
                           f"(code {self.proc.wait()}) before '{marker}'; see its stderr above")

    def step(self) -> float:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return float(self._expect("BENCH-LOSS"))

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def serve_steps(runner) -> None:
    """A worker's side of :class:`WorkerProcess`: ready, then one step per ``step`` line."""
    print("BENCH-READY", flush=True)
    for line in sys.stdin:
        if line.strip() == "step":
            print(f"BENCH-LOSS {runner.step()}", flush=True)


def worker_main(args: argparse.Namespace) -> None:
    """``--worker``: build one runner, then serve its steps."""
    size = SIZES[args.sizes]
    if args.worker == "jaxtune":
        import jax

        platform = jax.devices()[0].platform
        runner = JaxRunner(size, "float32" if platform == "cpu" else "bfloat16", args.family)
    else:
        runner = TorchRunner(size, args.threads, args.family)
    serve_steps(runner)


def worker_command(framework: str, size_name: str, args: argparse.Namespace) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), "--worker", framework, "--sizes",
            size_name, "--family", args.family, "--threads", str(args.threads)]


def timed(runner, steps: int) -> float:
    tick = time.perf_counter()
    for _ in range(steps):
        runner.step()
    return (time.perf_counter() - tick) / steps


def alternating_rates(runners: list, tokens: int, rounds: int, steps: int,
                      warmup: int) -> list[list[float]]:
    """Tokens/s of each runner per round: a warm-up, then ``rounds`` timed rounds of
    ``steps`` steps, the runners' order flipped every round so machine noise hits all alike."""
    for r in runners:
        timed(r, warmup)
    rates: list[list[float]] = [[] for _ in runners]
    order = list(range(len(runners)))
    for i in range(rounds):
        for j in order if i % 2 == 0 else order[::-1]:
            rates[j].append(tokens / timed(runners[j], steps))
    return rates


def paired_ratio(ours: list[float], theirs: list[float]) -> tuple[float, float, float]:
    """(median, min, max) of the per-round ratios ours[r] / theirs[r]."""
    paired = [a / b for a, b in zip(ours, theirs, strict=True)]
    return statistics.median(paired), min(paired), max(paired)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default="S,M")
    p.add_argument("--rounds", type=int, default=7, help="alternating timed rounds per framework")
    p.add_argument("--steps", type=int, default=3, help="steps per timed round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="PyTorch intra-op threads (CPU)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    p.add_argument("--family", default="llama", choices=FAMILIES,
                   help="architecture of both models (default: Llama)")
    p.add_argument("--worker", choices=("jaxtune", "torch"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker_main(args)
        return

    import jax

    from jaxtune.hardware import describe_machine
    from jaxtune.host_memory import huge_page_environment
    from jaxtune.metrics import device_peak_flops, flops_per_token, measure_matmul_peak

    platform = jax.devices()[0].platform
    compute_dtype = "float32" if platform == "cpu" else "bfloat16"
    if platform == "cpu":
        peak, peak_src = measure_matmul_peak(), "measured f32 matmul"
    else:
        peak, peak_src = device_peak_flops(jax.devices()[0], compute_dtype), "device bf16 peak"
    print(f"machine {describe_machine()}")
    print(f"platform {platform}, {jax.device_count()} devices, compute {compute_dtype}, "
          f"peak {peak / 1e9:.0f} GFLOP/s ({peak_src}); {args.rounds} rounds x {args.steps} "
          "steps per framework")
    rows = []
    for name in args.sizes.split(","):
        size = SIZES[name]
        tokens = size["batch"] * size["seq_len"]
        jx = WorkerProcess(worker_command("jaxtune", name, args),
                           huge_page_environment(os.environ) or dict(os.environ))
        th = (None if args.no_torch or platform != "cpu"
              else WorkerProcess(worker_command("torch", name, args), dict(os.environ)))
        runners = [r for r in (jx, th) if r is not None]
        rates = alternating_rates(runners, tokens, args.rounds, args.steps, args.warmup)
        for r in runners:
            r.close()
        fpt = flops_per_token(model_config(size, args.family), size["seq_len"])
        rows.append((name, rates[0], rates[1] if th is not None else [], fpt))

    def mfu(tps: float, fpt: float) -> float:
        return tps * fpt / (peak * jax.device_count()) if peak else float("nan")

    print(f"\n{'size':<5}{'framework':<10}{'median tok/s':>13}{'min-max tok/s':>17}{'MFU':>7}")
    for name, jt, tt, fpt in rows:
        for label, series in (("jaxtune", jt), ("torch", tt)):
            if series:
                med = statistics.median(series)
                spread = f"{min(series):,.0f}-{max(series):,.0f}"
                print(f"{name:<5}{label:<10}{med:>13,.0f}{spread:>17}{mfu(med, fpt):>7.1%}")
    for name, jt, tt, _ in rows:
        if not tt:
            continue
        _, low, high = paired_ratio(jt, tt)
        print(f"{name}: ratio of medians {statistics.median(jt) / statistics.median(tt):.2f}, "
              f"paired ratios {low:.2f}-{high:.2f}")
    for name, jt, tt, _ in rows:
        if tt:
            print(f"ratio {name}: {paired_ratio(jt, tt)[0]:.2f}")

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
