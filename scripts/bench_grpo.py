"""GRPO steps side by side: jaxtune against TRL's ``GRPOTrainer`` on the CPU.

The same job in both: SmolLM2-135M-Instruct (the real model, built by
``scripts/make_smollm2.py``) with LoRA (rank 16, all linear layers), the support set's RL
prompts (``examples/support/prompts.jsonl``), ``--prompts`` prompts x ``--generations``
completions per step of exactly ``--completion-length`` tokens each (no stop token: TRL gets
``min_new_tokens``, jaxtune no stop id, so both generate and train on the same number of
tokens whatever the sampled text), temperature 1, the key-facts reward, TRL's default
``dapo`` loss, beta 0, float32. One optimizer step is: generate, score, train.

Each framework runs in a worker process of its own (jaxtune with the environment ``jaxtune
train`` runs under), started once, and the steps alternate in rounds after a warm-up (the
order flips every round), so machine noise hits both alike; the parent times each step. Per
framework it prints the median step time, generation tokens/s (completion tokens over the
generation's time) and training tokens/s (prompt + completion tokens over the rest of the
step), then ``ratio grpo:``, the median of the per-round paired step-time ratios (TRL's over
jaxtune's: above 1, jaxtune is faster).

    python scripts/bench_grpo.py --rounds 2       # as recorded in docs/benchmarks.md
    python scripts/bench_grpo.py --rounds 1   # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.bench_train import paired_ratio  # noqa: E402

PROMPTS = ROOT / "examples" / "support" / "prompts.jsonl"


def _prompt_rows(n: int) -> list[dict]:
    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines()]
    return rows[:n]


def key_facts_reward(prompts, completions, completion_ids, key_facts, **kwargs):
    """The share of each completion's key facts it states (both frameworks call this one)."""
    from jaxtune.rl import rewards

    return rewards.key_facts(prompts, completions, completion_ids, key_facts=key_facts)


class JaxtuneJob:
    """jaxtune's trainer pieces: the rollout producer and the jitted step of ``jaxtune train``."""

    def __init__(self, args, model_dir: str, data: str):
        from jaxtune.config import config_from_dict
        from jaxtune.trainer import Trainer

        cfg = config_from_dict({
            "run": {"output_dir": tempfile.mkdtemp(prefix="bench-grpo-"), "seed": 0},
            "model": {"path": model_dir, "scan_layers": True, "remat": "minimal"},
            "lora": {"rank": 16, "alpha": 32},
            "data": {"format": "prompt", "sources": [{"path": data}],
                     "seq_len": 72 + args.completion_length,
                     "cache_dir": tempfile.mkdtemp(prefix="bench-grpo-cache-")},
            "optimizer": {"learning_rate": 1e-5, "schedule": "constant"},
            "trainer": {"objective": "grpo", "steps": 1000,
                        "global_batch_size": args.prompts * args.generations,
                        "progress": False},
            "rl": {"num_generations": args.generations,
                   "max_completion_length": args.completion_length, "temperature": 1.0,
                   "rewards": [{"function": "scripts.bench_grpo:key_facts_reward"}]},
            "checkpoint": {"enabled": False},
            "logging": {"tensorboard": False, "jsonl": False, "stdout": False},
        })
        self.trainer = Trainer(cfg)
        self.trainer.batches.stop_ids = []  # exactly completion_length tokens, as TRL below
        self.compiled = None

    def step(self) -> dict:
        import jax

        t = self.trainer
        tick = time.perf_counter()
        produced = t.batches.next(t.state)
        if self.compiled is None:
            self.compiled = t.train_step.lower(t.state, produced.batch).compile()
        t.state, metrics = self.compiled(t.state, produced.batch)
        loss = float(jax.device_get(metrics["loss"]))
        done = time.perf_counter()
        m = produced.metrics
        return {"loss": loss, "generate_s": m["time/generate_s"], "inner_s": done - tick,
                "generated": m["completions/mean_length"] * t.cfg.trainer.global_batch_size,
                "tokens": produced.tokens}


class TRLJob:
    """TRL's GRPOTrainer on the same model, prompts and settings, driven step by step."""

    def __init__(self, args, model_dir: str, data: str):
        import threading

        import torch
        from datasets import Dataset
        from peft import LoraConfig
        from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
        from trl import GRPOConfig, GRPOTrainer

        torch.set_num_threads(args.threads)
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        rows = [json.loads(line) for line in Path(data).read_text().splitlines()]
        ds = Dataset.from_list([{"prompt": r["prompt"], "key_facts": r["key_facts"]}
                                for r in rows] * 50)
        batch = args.prompts * args.generations
        gargs = GRPOConfig(
            output_dir=tempfile.mkdtemp(prefix="bench-grpo-trl-"), report_to=[], use_cpu=True,
            bf16=False, per_device_train_batch_size=batch, num_generations=args.generations,
            max_completion_length=args.completion_length, temperature=1.0, beta=0.0,
            learning_rate=1e-5, max_steps=10_000, logging_steps=10_000, save_strategy="no",
            generation_kwargs={"min_new_tokens": args.completion_length},
            dataloader_num_workers=0, seed=0)
        self.trainer = GRPOTrainer(
            model=model, args=gargs, train_dataset=ds, reward_funcs=[key_facts_reward],
            processing_class=tok, peft_config=LoraConfig(r=16, lora_alpha=32,
                                                         target_modules="all-linear",
                                                         task_type="CAUSAL_LM"))
        self.generate_s = 0.0
        generate = self.trainer._generate

        def timed_generate(*a, **k):
            tick = time.perf_counter()
            try:
                return generate(*a, **k)
            finally:
                self.generate_s = time.perf_counter() - tick

        self.trainer._generate = timed_generate
        self.go, self.done = threading.Semaphore(0), threading.Semaphore(0)
        job = self

        class Stepper(TrainerCallback):
            def on_step_begin(self, *a, **k):
                job.go.acquire()

            def on_step_end(self, *a, **k):
                job.done.release()

        self.trainer.add_callback(Stepper())
        self.thread = threading.Thread(target=self.trainer.train, daemon=True)
        self.thread.start()
        self.rows = batch
        self.completion_length = args.completion_length

    def step(self) -> dict:
        tick = time.perf_counter()
        self.go.release()
        self.done.acquire()
        took = time.perf_counter() - tick
        return {"loss": 0.0, "generate_s": self.generate_s, "inner_s": took,
                "generated": self.rows * self.completion_length, "tokens": None}


def worker_main(args) -> None:
    from scripts.make_smollm2 import default_dir

    model_dir = str(default_dir())
    data = tempfile.mktemp(suffix=".jsonl")
    Path(data).write_text("".join(json.dumps(r) + "\n" for r in _prompt_rows(args.prompts * 8)))
    job = JaxtuneJob(args, model_dir, data) if args.worker == "jaxtune" else TRLJob(
        args, model_dir, data)
    print("BENCH-READY", flush=True)
    for line in sys.stdin:
        if line.strip() == "step":
            print("BENCH-STEP " + json.dumps(job.step()), flush=True)


class Worker:
    def __init__(self, framework: str, args, env: dict):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", framework,
               "--prompts", str(args.prompts), "--generations", str(args.generations),
               "--completion-length", str(args.completion_length), "--threads",
               str(args.threads)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env, cwd=str(ROOT))
        self._expect("BENCH-READY")

    def _expect(self, marker: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(marker):
                return line[len(marker):].strip()
        raise RuntimeError(f"worker exited (code {self.proc.wait()}) before '{marker}'")

    def step(self) -> dict:
        tick = time.perf_counter()
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        out = json.loads(self._expect("BENCH-STEP"))
        out["step_s"] = time.perf_counter() - tick
        return out

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.kill()
        self.proc.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="alternating timed rounds")
    p.add_argument("--steps", type=int, default=1, help="steps per framework per round")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--prompts", type=int, default=4, help="prompts per step")
    p.add_argument("--generations", type=int, default=4, help="completions per prompt")
    p.add_argument("--completion-length", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="PyTorch intra-op threads")
    p.add_argument("--worker", choices=("jaxtune", "trl"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker_main(args)
        return
    from jaxtune.hardware import describe_machine
    from jaxtune.host_memory import huge_page_environment

    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1"}
    print(f"machine {describe_machine()}")
    print(f"SmolLM2-135M-Instruct + LoRA r16, {args.prompts} prompts x {args.generations} "
          f"completions of {args.completion_length} tokens per step; {args.rounds} rounds x "
          f"{args.steps} steps per framework after {args.warmup} warm-up steps", flush=True)
    workers = {"jaxtune": Worker("jaxtune", args, huge_page_environment(env) or env),
               "trl": Worker("trl", args, env)}
    for w in workers.values():
        for _ in range(args.warmup):
            w.step()
    steps: dict[str, list[dict]] = {k: [] for k in workers}
    per_round: dict[str, list[float]] = {k: [] for k in workers}
    names = list(workers)
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            got = [workers[name].step() for _ in range(args.steps)]
            steps[name] += got
            per_round[name].append(statistics.mean(s["step_s"] for s in got))
    for w in workers.values():
        w.close()
    tokens = steps["jaxtune"][0]["tokens"]  # prompt + completion tokens per step (the same)
    print(f"\n{'framework':<10}{'step s':>9}{'min-max':>14}{'gen tok/s':>11}{'train tok/s':>13}")
    for name, got in steps.items():
        times = [s["step_s"] for s in got]
        gen = statistics.median(s["generated"] / s["generate_s"] for s in got)
        train = statistics.median(tokens / max(s["step_s"] - s["generate_s"], 1e-9) for s in got)
        print(f"{name:<10}{statistics.median(times):>9.2f}{min(times):>7.2f}-{max(times):<6.2f}"
              f"{gen:>11.0f}{train:>13.0f}")
    ratio, low, high = paired_ratio(per_round["trl"], per_round["jaxtune"])
    print(f"paired step-time ratios (TRL / jaxtune) per round: {low:.2f}-{high:.2f}")
    print(f"ratio grpo: {ratio:.2f}")


if __name__ == "__main__":
    main()
