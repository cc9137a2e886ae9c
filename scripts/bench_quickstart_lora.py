"""The quickstart's real job, two ways, side by side: jaxtune vs transformers + peft.

Both train SmolLM2-135M-Instruct (the fixture of ``scripts/make_smollm2.py``) with LoRA r32,
alpha 64 on all linear layers, AdamW at the recipe's learning rate, float32, on the same
packed batches of 8 x 256 tokens: the first batches jaxtune's own loader makes from
``configs/quickstart.yaml`` (chat template, packing, completion-only loss mask). jaxtune is
the recipe as ``jaxtune train`` builds it (its ``Trainer`` and compiled train step). The
PyTorch side is the loop a user would write: ``AutoModelForCausalLM`` (sdpa attention), a
``peft`` ``LoraConfig(target_modules="all-linear")``, ``torch.optim.AdamW`` over the adapters,
the loss over the masked targets; ``position_ids`` restart at every packed document, from which
transformers builds the same block-diagonal causal mask jaxtune uses.

Each framework runs in a process of its own, as ``scripts/bench_train.py`` runs them: jaxtune
with the environment ``jaxtune train`` runs under (``jaxtune.host_memory``), PyTorch with none.
The jaxtune worker writes its host batches to a ``.npz`` file in a temporary directory, from
which the PyTorch worker reads the same batches. Rounds alternate after a warm-up (the order
flips every round), timed in this process. It prints the median and
min-max tokens/s of each, the ratio of the medians, the spread of the per-round paired ratios
and a ``ratio lora:`` line (the median paired ratio), with the CPU's description.

    python scripts/bench_quickstart_lora.py                # 7 rounds x 2 steps
    python scripts/bench_quickstart_lora.py --rounds 3 --steps 1   # a quick look
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class JaxtuneJob:
    """The recipe as ``jaxtune train`` builds it, stepping over ``batches`` in turn."""

    def __init__(self, cfg, n_batches: int):
        from jaxtune.trainer import Trainer

        self.trainer = Trainer(cfg)
        self.host_batches = [next(self.trainer.batches.iterator) for _ in range(n_batches)]
        self.batches = [self.trainer.to_global(b) for b in self.host_batches]
        self.step_fn = self.trainer.train_step.lower(self.trainer.state,
                                                     self.batches[0]).compile()
        self.i = 0

    def step(self) -> float:
        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        self.trainer.state, metrics = self.step_fn(self.trainer.state, batch)
        return float(metrics["loss"])  # blocks, so the timing covers the whole step


class TorchPeftJob:
    """transformers + peft on the same host batches: the loop a user would write."""

    def __init__(self, cfg, host_batches: list, threads: int, micro_batches: int = 1):
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        torch.set_num_threads(threads)
        self.torch = torch
        model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32,
                                                     attn_implementation="sdpa")
        lora = LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha,
                          lora_dropout=cfg.lora.dropout, target_modules="all-linear",
                          task_type="CAUSAL_LM")
        self.model = get_peft_model(model, lora)
        self.model.train()
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad],
                                     lr=cfg.optimizer.learning_rate,
                                     weight_decay=cfg.optimizer.weight_decay)
        self.batches = []
        for b in host_batches:
            mask = torch.as_tensor(b["loss_mask"]) > 0
            targets = torch.as_tensor(b["targets"]).long().masked_fill(~mask, -100)
            self.batches.append((torch.as_tensor(b["input_ids"]).long(),
                                 torch.as_tensor(b["positions"]).long(), targets))
        self.micro_batches = micro_batches
        self.i = 0

    def step(self) -> float:
        """One optimizer step; with micro-batches, each backward adds its share of the mean
        over the whole batch's trained tokens (what jaxtune's accumulation computes)."""
        ids, positions, targets = self.batches[self.i % len(self.batches)]
        self.i += 1
        trained = (targets != -100).sum()
        total = 0.0
        for rows in zip(*(t.chunk(self.micro_batches) for t in (ids, positions, targets)),
                        strict=True):
            logits = self.model(input_ids=rows[0], position_ids=rows[1]).logits
            loss = self.torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), rows[2].flatten(), ignore_index=-100,
                reduction="sum") / trained
            loss.backward()
            total += loss.item()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return total


def save_batches(path: str, host_batches: list[dict]) -> None:
    """The host batches as plain arrays (``<batch>/<key>``), read back without pickle."""
    import numpy as np

    np.savez(path, **{f"{i}/{k}": np.asarray(v) for i, b in enumerate(host_batches)
                      for k, v in b.items()})


def load_batches(path: str) -> list[dict]:
    import numpy as np

    with np.load(path, allow_pickle=False) as f:
        batches: dict[int, dict] = {}
        for name in f.files:
            i, key = name.split("/", 1)
            batches.setdefault(int(i), {})[key] = f[name]
    return [batches[i] for i in sorted(batches)]


def worker_main(args: argparse.Namespace, cfg) -> None:
    """``--worker``: build one framework's job on the shared batches, then serve its steps."""
    from scripts.bench_train import serve_steps

    if args.worker == "jaxtune":
        job = JaxtuneJob(cfg, args.batches)
        save_batches(args.batches_file, job.host_batches)
    else:
        job = TorchPeftJob(cfg, load_batches(args.batches_file), args.threads,
                           args.torch_micro_batches)
    serve_steps(job)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("config", nargs="?", default="configs/quickstart.yaml")
    p.add_argument("--rounds", type=int, default=7, help="alternating timed rounds")
    p.add_argument("--steps", type=int, default=2, help="steps per timed round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batches", type=int, default=4, help="distinct batches cycled through")
    p.add_argument("--threads", type=int, default=2, help="PyTorch intra-op threads")
    p.add_argument("--torch-micro-batches", type=int, default=None,
                   help="PyTorch's micro-batches per step (default: the recipe's "
                        "trainer.grad_accum_steps, as TRL's gradient_accumulation_steps would)")
    p.add_argument("--worker", choices=("jaxtune", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--batches-file", help=argparse.SUPPRESS)
    args, overrides = p.parse_known_args()

    from jaxtune.config import load_config
    from scripts.make_smollm2 import default_dir

    if not any(o.startswith("--model.path") for o in overrides):
        overrides.append(f"--model.path={default_dir()}")
    if not args.worker:
        run_dir = tempfile.mkdtemp(prefix="jaxtune-bench-lora-")
        overrides += [f"--run.output_dir={run_dir}", "--checkpoint.enabled=false",
                      "--export.enabled=false"]
    cfg = load_config(args.config, overrides)
    args.torch_micro_batches = args.torch_micro_batches or cfg.trainer.grad_accum_steps
    if args.worker:
        worker_main(args, cfg)
        return

    from jaxtune.hardware import describe_machine
    from jaxtune.host_memory import huge_page_environment
    from scripts.bench_train import WorkerProcess, alternating_rates, paired_ratio

    tokens = cfg.trainer.global_batch_size * cfg.data.seq_len
    print(f"machine {describe_machine()}")
    print(f"job: {cfg.model.path}, LoRA r{cfg.lora.rank} alpha {cfg.lora.alpha} on "
          f"{','.join(cfg.lora.targets)}, {cfg.trainer.global_batch_size} x {cfg.data.seq_len} "
          f"tokens, remat {cfg.model.remat}, scan_layers {cfg.model.scan_layers}, "
          f"micro-batches {cfg.trainer.grad_accum_steps}; "
          f"{args.rounds} rounds x {args.steps} steps")
    batches_file = os.path.join(run_dir, "batches.npz")

    def command(framework: str) -> list[str]:
        return [sys.executable, os.path.abspath(__file__), "--worker", framework,
                "--batches-file", batches_file, "--batches", str(args.batches),
                "--threads", str(args.threads),
                "--torch-micro-batches", str(args.torch_micro_batches), args.config, *overrides]

    jx = WorkerProcess(command("jaxtune"), huge_page_environment(os.environ) or dict(os.environ))
    th = WorkerProcess(command("torch"), dict(os.environ))  # after jaxtune wrote the batches
    micro = args.torch_micro_batches
    print(f"PyTorch: {micro} micro-batch{'es' if micro > 1 else ''} per step")
    host_batches = load_batches(batches_file)
    trained = sum(float(b["loss_mask"].sum()) for b in host_batches) / (tokens * args.batches)
    print(f"batches: {args.batches} packed batches, {trained:.0%} of tokens trained")
    jt, tt = alternating_rates([jx, th], tokens, args.rounds, args.steps, args.warmup)
    for worker in (jx, th):
        worker.close()
    print(f"\n{'framework':<16}{'median tok/s':>13}{'min-max tok/s':>17}")
    for label, series in (("jaxtune", jt), ("torch + peft", tt)):
        print(f"{label:<16}{statistics.median(series):>13,.0f}"
              f"{f'{min(series):,.0f}-{max(series):,.0f}':>17}")
    median, low, high = paired_ratio(jt, tt)
    print(f"lora: ratio of medians {statistics.median(jt) / statistics.median(tt):.2f}, "
          f"paired ratios {low:.2f}-{high:.2f}")
    print(f"ratio lora: {median:.2f}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
