"""The distillation quickstart's report: teacher, student by SFT and student by distillation,
side by side on the held-out data.

    python scripts/distill_report.py runs/quickstart-distill --sft-run runs/quickstart-distill-sft

For each model (the teacher, ``distill.teacher`` of the distillation run's config; the two
runs' final checkpoints, read by ``jaxtune.run_dir``): its parameters, its held-out NLL per
answer token on the eval conversations (``data.eval_sources``, the trained tokens of each
assistant turn, computed by jaxtune's loss), and the greedy answers to the 80 held-out support
questions with every key fact of their intent (the count of the SFT quickstart's report,
jaxtune's own generation). The runs' training times come from their ``metrics.jsonl``. Writes
``report.md`` in the distillation run's directory.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.quickstart_report import (  # noqa: E402
    ANSWER_TOKENS,
    ANSWER_TOKENS_HELP,
    chat,
    fact_count,
    jaxtune_answers,
)


def heldout_nll(model, cfg, tokenizer) -> tuple[float, int]:
    """(mean NLL per trained token, trained tokens) over the eval split of ``cfg``."""
    import jax

    from jaxtune.data import make_batch_iterator
    from jaxtune.loss import cross_entropy_loss

    @jax.jit
    def sums(batch):
        _, aux = cross_entropy_loss(model, {**batch, "loss_denominator": 1.0})
        return aux["nll_sum"], aux["num_tokens"]

    nll = tokens = 0.0
    for batch in make_batch_iterator(cfg, tokenizer, split="eval", process_index=0,
                                     process_count=1):
        n, t = jax.device_get(sums(batch))
        nll, tokens = nll + float(n), tokens + float(t)
    return nll / max(tokens, 1.0), int(tokens)


def run_times(run_dir: Path) -> dict[str, float]:
    """Seconds of steps (and of generating on-policy answers) from a run's metrics."""
    steps = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            steps[row["step"]] = row
    return {"steps": len(steps),
            "step_s": sum(r.get("step_time_s", 0.0) for r in steps.values()),
            "generate_s": sum(r.get("time/generate_s", 0.0) for r in steps.values()),
            "on_policy": sum(r.get("distill/on_policy", 0.0) for r in steps.values())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("run_dir", type=Path, help="the distillation run")
    p.add_argument("--sft-run", type=Path, required=True, help="the student's SFT run")
    p.add_argument("--questions", type=Path, default=ROOT / "examples/support/questions.json")
    p.add_argument("--max-new-tokens", type=int, default=ANSWER_TOKENS,
                   help=ANSWER_TOKENS_HELP)
    args = p.parse_args()

    from jaxtune.config import load_config
    from jaxtune.data import load_tokenizer
    from jaxtune.generation.source import load_model_folder, load_run
    from jaxtune.train_state import count_params

    cfg = load_config(str(args.run_dir / "config.yaml"))
    tokenizer = load_tokenizer(cfg)
    spec = json.loads(args.questions.read_text())
    held_out = spec["held_out"]
    held_chats = [chat(spec, q["question"]) for q in held_out]
    models = [("teacher", f"{cfg.distill.teacher} (the SFT quickstart's export)",
               lambda: load_model_folder(str(Path(cfg.distill.teacher).expanduser()))),
              ("student by SFT", str(args.sft_run), lambda: load_run(str(args.sft_run))),
              ("student by distillation", str(args.run_dir), lambda: load_run(str(args.run_dir)))]
    rows = []
    for name, where, load in models:
        print(f"{name}: held-out NLL and answers to the {len(held_chats)} held-out questions",
              flush=True)
        loaded = load()
        from flax import nnx

        params = count_params(nnx.state(loaded.model, nnx.Param))
        nll, tokens = heldout_nll(loaded.model, cfg, tokenizer)
        facts = fact_count(jaxtune_answers(loaded, held_chats, args.max_new_tokens).texts,
                           held_out)
        rows.append((name, where, params, nll, tokens, facts))
    n = len(held_chats)
    distill_t, sft_t = run_times(args.run_dir), run_times(args.sft_run)
    d = cfg.distill
    lines = [
        f"# Distillation quickstart report ({args.run_dir})",
        "",
        f"Teacher: {cfg.distill.teacher}. Student: {cfg.model.path} (every second layer of "
        f"SmolLM2-135M-Instruct). Both students: {cfg.trainer.steps} steps of "
        f"{cfg.trainer.global_batch_size} rows of {cfg.data.seq_len} tokens ("
        f"{'packed conversations' if cfg.data.packing else 'a conversation each'}), the same "
        f"data order and optimizer (learning rate {cfg.optimizer.learning_rate:g}); "
        f"distillation with beta {d.beta}, temperature {d.temperature}, lmbda {d.lmbda} "
        f"({distill_t['on_policy']:.0f} of {distill_t['steps']} steps on the student's own "
        f"answers), ce_weight {d.ce_weight}.",
        "",
        "| model | parameters | held-out NLL per answer token | held-out answers with every "
        "key fact | key facts stated |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, where, params, nll, _, facts in rows:
        lines.append(f"| {name} ({where}) | {params / 1e6:.1f}M | {nll:.3f} | "
                     f"{facts[0]}/{n} | {facts[1]}/{facts[2]} |")
    lines += [
        "",
        f"Held-out NLL over the {rows[0][4]} trained answer tokens of the "
        f"{len(cfg.data.eval_sources)} eval source(s); answers are greedy, at most "
        f"{args.max_new_tokens} new tokens.",
        "",
        f"Training time: student by SFT {sft_t['step_s'] / 60:.1f} min of steps, student by "
        f"distillation {distill_t['step_s'] / 60:.1f} min (of which generating on-policy "
        f"answers {distill_t['generate_s'] / 60:.1f} min).",
    ]
    report = "\n".join(lines) + "\n"
    (args.run_dir / "report.md").write_text(report)
    print("\n" + "=" * 100)
    for line in lines:
        print(line if line.startswith("|") else textwrap.fill(line, 100) if line else "")
    print("=" * 100)
    print(f"Report: {args.run_dir / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
