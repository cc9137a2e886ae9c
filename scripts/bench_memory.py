"""Where a training job's host memory goes, part by part (default: the quickstart's LoRA job).

    python scripts/bench_memory.py                          # configs/quickstart.yaml
    python scripts/bench_memory.py CONFIG.yaml --model.remat=full   # any config + overrides

It builds the job as ``jaxtune train`` does (same Trainer), then walks through its phases and
prints, for each, the resident memory after it and the peak so far (``ru_maxrss``): the Python
and library imports, the model load, the train state, compiling the train step, one step,
compiling and running the evaluation. For the compiled steps it also prints XLA's own
accounting (``memory_analysis``: the arguments, the outputs and the temporaries, which are the
activations saved for the backward pass plus the loss's working buffers). Nothing is written
outside a temporary run directory. The model path defaults to the SmolLM2 fixture
(``scripts/make_smollm2.py``).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile

GIB = 1024**3


def rss_gib() -> float:
    """Resident memory now, from /proc/self/status (VmRSS)."""
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / GIB
    return float("nan")


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # KiB on Linux


class Phases:
    """Prints one line per phase: resident now, growth over the previous phase, peak so far."""

    def __init__(self):
        self.last = rss_gib()
        print(f"{'phase':<34}{'RSS GiB':>9}{'growth':>9}{'peak GiB':>10}")
        self.mark("python + imports")

    def mark(self, name: str) -> None:
        now = rss_gib()
        print(f"{name:<34}{now:>9.2f}{now - self.last:>+9.2f}{peak_gib():>10.2f}", flush=True)
        self.last = now


def xla_parts(name: str, compiled) -> None:
    """XLA's accounting of a compiled program's buffers."""
    m = compiled.memory_analysis()
    if m is None:
        print(f"  {name}: no memory analysis on this backend")
        return
    print(f"  {name}: arguments {m.argument_size_in_bytes / GIB:.2f} GiB, outputs "
          f"{m.output_size_in_bytes / GIB:.2f} GiB (aliased {m.alias_size_in_bytes / GIB:.2f}), "
          f"temporaries {m.temp_size_in_bytes / GIB:.2f} GiB, code "
          f"{m.generated_code_size_in_bytes / GIB:.3f} GiB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("config", nargs="?", default="configs/quickstart.yaml")
    args, overrides = p.parse_known_args()
    phases = Phases()
    import jax

    from jaxtune.config import load_config
    from jaxtune.hardware import describe_machine
    from jaxtune.trainer import Trainer

    if not any(o.startswith("--model.path") for o in overrides):
        sys.path.insert(0, os.path.dirname(__file__))
        from make_smollm2 import default_dir

        overrides.append(f"--model.path={default_dir()}")
    run_dir = tempfile.mkdtemp(prefix="jaxtune-bench-memory-")
    overrides += [f"--run.output_dir={run_dir}", "--checkpoint.enabled=false",
                  "--export.enabled=false"]
    cfg = load_config(args.config, overrides)
    print(f"machine {describe_machine()}; config {args.config} {' '.join(overrides[:-3])}")
    phases.mark("jax + jaxtune imported")
    trainer = Trainer(cfg)
    phases.mark("model loaded, state + steps built")
    batch = trainer.batches.next(trainer.state).batch
    compiled = trainer.train_step.lower(trainer.state, batch).compile()
    phases.mark("train step compiled")
    xla_parts("train step", compiled)
    trainer.state, out = compiled(trainer.state, batch)
    jax.block_until_ready(out)
    phases.mark("one train step run")
    trainer.state, out = compiled(trainer.state, batch)
    jax.block_until_ready(out)
    phases.mark("second train step run")
    if cfg.data.eval_sources:
        from jaxtune import data

        eval_batch = trainer.to_global(next(data.make_batch_iterator(cfg, trainer.tokenizer,
                                                                     split="eval")))
        eval_compiled = trainer.eval_step.lower(trainer.state, eval_batch).compile()
        phases.mark("eval step compiled")
        xla_parts("eval step", eval_compiled)
        jax.block_until_ready(eval_compiled(trainer.state, eval_batch))
        phases.mark("one eval step run")
    print(f"peak RSS {peak_gib():.2f} GiB")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
