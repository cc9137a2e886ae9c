"""The quickstart's report: held-out loss before and after, a loss curve, and answers side by side.

    python scripts/quickstart_report.py runs/quickstart

Reads the run directory jaxtune wrote (config.yaml, metrics.jsonl, its last checkpoint, the
exported Hugging Face folders), draws ``loss_curve.png`` there, and asks the base model and the
fine-tuned run (a LoRA run's adapters applied, unmerged) the same held-out questions with
jaxtune's own greedy generation, then counts the facts both state over every held-out question
(80 wordings: which intent a greedy answer picks varies run to run, so 6 questions alone cannot
compare two runs). One transformers check shows that the merged export loads as
it is and answers every question token for token like jaxtune; a LoRA run's PEFT adapter is loaded
with ``peft`` on the base and must answer every one like the merged export. Last, both models
are scored with lm-evaluation-harness on jaxtune's offline support tasks (``jaxtune eval``'s
backend; ``--lm-eval-limit`` examples per task, 0 skips it) and the report gains the
before/after table.

Every answer is also checked for its intent (``scripts/support_intents.py``): an answer that
gives another intent's solution (stating that intent's facts, not its own) is counted, over the
6 shown questions and all held-out ones, and each shown answer is marked. Progress goes to
stderr: a bar on a terminal, one line per stage in a log. Writes ``report.md`` next to the
metrics, and the answers it read (``report_answers.json``), so its counts can be checked again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.report_progress import Progress  # noqa: E402
from scripts.support_intents import (  # noqa: E402
    answered_intent,
    fact_count,
    no_intent_count,
    other_intent_count,
    stated,
)


def read_metrics(run_dir: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(train losses, eval losses) as (step, value) lists; a resumed run's repeats dropped."""
    train, evals = {}, {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            train[row["step"]] = row["loss"]
        if "eval_loss" in row:
            evals[row["step"]] = row["eval_loss"]
    return sorted(train.items()), sorted(evals.items())


def loss_figure(train, evals, model_name: str = "SmolLM2-135M-Instruct",
                method: str = "full fine-tuning"):
    """The loss curve: train loss at every step (a line), held-out loss where it was measured.

    Held-out evaluations are few, so they are drawn as points with their values, not joined:
    a line between two of them would read as a measured trend.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss (trained tokens)", lw=1.2)
    if evals:
        steps, losses = zip(*evals, strict=True)
        ax.plot(steps, losses, linestyle="none", marker="o", markersize=7, color="C1",
                label=f"held-out loss ({len(evals)} evaluations)")
        for step, loss in evals:
            ax.annotate(f"{loss:.2f}", (step, loss), textcoords="offset points",
                        xytext=(0, 8), ha="center", fontsize=8, color="C1")
    ax.set_xlabel("step")
    ax.set_ylabel("token cross-entropy")
    ax.set_title(f"jaxtune quickstart: {model_name}, {method}, on Nimbrel Sync support",
                 fontsize=10)
    ax.margins(x=0.04, y=0.12)  # room for the value labels above the points
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def plot(train, evals, out: Path, model_name: str, method: str = "full fine-tuning") -> None:
    import matplotlib.pyplot as plt

    fig = loss_figure(train, evals, model_name, method)
    fig.savefig(out)
    plt.close(fig)


#: Answer length limit of the support reports: every reference answer (sign-off included, at
#: most 114 SmolLM2 tokens) fits, so a right answer is never cut short.
ANSWER_TOKENS = 128
ANSWER_TOKENS_HELP = (f"answer length limit (default {ANSWER_TOKENS}: every reference answer, "
                      "sign-off included, fits)")


def answer_ids(model, tokenizer, messages, max_new_tokens: int, stop_ids=None) -> list[int]:
    """transformers' greedy answer (token ids, the stop id included) to one chat."""
    import torch

    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_ids)
    ids = out[0, enc["input_ids"].shape[1]:].tolist()
    ends = [i for i, t in enumerate(ids) if stop_ids and t in stop_ids]
    return ids[:ends[0] + 1] if ends else ids


def jaxtune_answers(loaded, chats, max_new_tokens: int):
    """jaxtune's greedy answers (``jaxtune.generation.api.Answers``) to every chat at once."""
    from jaxtune.generation.api import generate

    return generate(loaded.model, loaded.tokenizer, chats, max_new_tokens=max_new_tokens,
                    generation_config=loaded.generation_config, details=True)


def intent_mark(text: str, intent: str) -> str:
    """What the intent check found in one answer to a question of ``intent``, in words."""
    found = answered_intent(text, intent)
    if found == intent:
        return "its intent's answer"
    return "no intent's answer" if found is None else f"ANOTHER INTENT's answer ({found})"


def intent_summary(n: int, base: list[str], tuned: list[str], questions: list[dict],
                   label: str) -> str:
    """The line counting answers that give another intent's solution (and no intent's)."""
    other = [other_intent_count(texts, questions) for texts in (base, tuned)]
    none = [no_intent_count(texts, questions) for texts in (base, tuned)]
    return (f"{label}: answers giving another intent's solution: base {other[0]}/{n}, "
            f"fine-tuned {other[1]}/{n} (no intent's solution: base {none[0]}/{n}, "
            f"fine-tuned {none[1]}/{n}).")


def chat(spec: dict, question: str) -> list[dict[str, str]]:
    """One held-out question as a chat, after the report's system prompt if it has one."""
    messages = [{"role": "system", "content": spec["system_prompt"]}] \
        if spec.get("system_prompt") else []
    return messages + [{"role": "user", "content": question}]


#: The lm_eval table: (task, metric, label, format), the metrics lm_eval reports for
#: jaxtune's offline support tasks (jaxtune/evaluation/offline_tasks/nimbrel_support).
LM_EVAL_ROWS = [
    ("nimbrel_support_mc", "acc", "multiple choice: accuracy", "{:.3f}"),
    ("nimbrel_support_mc", "acc_norm", "multiple choice: accuracy (length-normalised)",
     "{:.3f}"),
    ("nimbrel_support_qa", "all_facts", "answers: every key fact stated", "{:.3f}"),
    ("nimbrel_support_qa", "fact_recall", "answers: share of key facts stated", "{:.3f}"),
    ("nimbrel_support_ppl", "word_perplexity", "held-out chats: word perplexity", "{:.2f}"),
]
LM_EVAL_TASKS = sorted({task for task, *_ in LM_EVAL_ROWS})


def lm_eval_scores(loaded, system_prompt: str | None, limit: int, label: str
                   ) -> dict[str, float]:
    """``{task/metric: value}`` of one model on the offline support tasks, through lm_eval with
    jaxtune's backend (chat template, the report's system prompt)."""
    import logging

    from jaxtune.evaluation.engine import Engine
    from jaxtune.evaluation.harness import HarnessOptions, run_harness, scores
    from jaxtune.generation.api import default_stop_ids

    logging.getLogger("lm_eval").setLevel(logging.WARNING)  # the table is the report's
    options = HarnessOptions(
        tasks=LM_EVAL_TASKS, limit=limit, apply_chat_template=True,
        system_instruction=system_prompt,
        bootstrap_iters=0, lm_args=dict(batch_size=8, description=label, stop_ids=(
            default_stop_ids(loaded.tokenizer, loaded.generation_config))))
    return scores(run_harness(Engine(loaded.model, loaded.tokenizer), options))


def lm_eval_table(base: dict[str, float], tuned: dict[str, float], limit: int) -> list[str]:
    """The before/after table, Markdown (lines)."""
    lines = [f"lm-evaluation-harness on the offline support tasks ({limit} held-out examples "
             "per task, chat template; `jaxtune eval`'s backend):", "",
             "| task | metric | base | fine-tuned |", "|---|---|---:|---:|"]
    for task, metric, label, fmt in LM_EVAL_ROWS:
        key = f"{task}/{metric}"
        if key in base and key in tuned:
            lines.append(f"| `{task}` | {label} | {fmt.format(base[key])} | "
                         f"{fmt.format(tuned[key])} |")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--questions", type=Path, default=ROOT / "examples/support/questions.json")
    p.add_argument("--max-new-tokens", type=int, default=ANSWER_TOKENS,
                   help=ANSWER_TOKENS_HELP)
    p.add_argument("--lm-eval-limit", type=int, default=20,
                   help="examples per offline lm_eval task (0 skips the table)")
    args = p.parse_args()
    run_dir = args.run_dir
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    export_dir = Path(cfg["export"]["out_dir"] or run_dir / "hf")
    adapter_dir = export_dir.parent / f"{export_dir.name}-adapter"
    base_dir = Path(os.path.expanduser(cfg["model"]["path"]))

    train, evals = read_metrics(run_dir)
    rank = (cfg.get("lora") or {}).get("rank", 0)
    plot(train, evals, run_dir / "loss_curve.png", base_dir.name,
         f"LoRA rank {rank}" if rank else "full fine-tuning")
    before, after = evals[0][1], evals[-1][1]
    drop = (before - after) / before

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jaxtune.generation.api import default_stop_ids
    from jaxtune.generation.source import load_model_folder, load_run

    torch.set_num_threads(os.cpu_count() or 1)
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    spec = json.loads(args.questions.read_text())
    shown = spec["questions"]
    chats = [chat(spec, q["question"]) for q in shown]
    held_out = spec.get("held_out", [])
    held_chats = [chat(spec, q["question"]) for q in held_out]
    n, n_all = len(chats), len(held_chats)
    checked = n * (2 + adapter_dir.is_dir())  # jaxtune, transformers (and peft) answers
    lm_items = args.lm_eval_limit * len(LM_EVAL_TASKS)
    progress = Progress(2 * n_all + checked + 2 * lm_items)
    if not progress.interactive:  # transformers' loading bars would redraw lines in a log
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    progress.stage("loading the base model")
    base_run = load_model_folder(str(base_dir))
    progress.stage(f"base model: {n} shown questions")
    base_out = jaxtune_answers(base_run, chats, args.max_new_tokens)
    progress.advance(n)
    progress.stage("loading the fine-tuned run")
    tuned_run = load_run(str(run_dir))
    progress.stage(f"fine-tuned: {n} shown questions")
    tuned_out = jaxtune_answers(tuned_run, chats, args.max_new_tokens)
    progress.advance(n)
    base_held = tuned_held = []
    if held_chats:  # every held-out wording, one batch per model
        progress.stage(f"base model: {n_all} held-out questions")
        base_held = jaxtune_answers(base_run, held_chats, args.max_new_tokens).texts
        progress.advance(n_all)
        progress.stage(f"fine-tuned: {n_all} held-out questions")
        tuned_held = jaxtune_answers(tuned_run, held_chats, args.max_new_tokens).texts
        progress.advance(n_all)
        base_all, tuned_all = fact_count(base_held, held_out), fact_count(tuned_held, held_out)
    (run_dir / "report_answers.json").write_text(json.dumps({
        "base": {"shown": base_out.texts, "held_out": base_held},
        "fine_tuned": {"shown": tuned_out.texts, "held_out": tuned_held}}, indent=1) + "\n")
    progress.stage("loading the merged export in transformers")
    tuned = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
    stops = default_stop_ids(tuned_run.tokenizer, tuned_run.generation_config)
    # Every shown question, greedy, in transformers: the merged export against jaxtune, and
    # the PEFT adapter (on the base, with peft) against the merged export.
    merged_ids = []
    for i, messages in enumerate(chats):
        progress.stage(f"transformers, merged export: question {i + 1}/{n}")
        merged_ids.append(answer_ids(tuned, tokenizer, messages, args.max_new_tokens, stops))
        progress.advance()
    export_same = sum(m == t for m, t in zip(merged_ids, tuned_out.tokens, strict=True))
    lines = [
        f"# Quickstart report ({run_dir})",
        "",
        f"Held-out loss: {before:.3f} before, {after:.3f} after fine-tuning "
        f"({drop:.0%} lower) over {evals[-1][0]} steps.",
        "",
        "Held-out loss by step: " + ", ".join(f"{step}: {loss:.3f}" for step, loss in evals)
        + ".",
        "",
        "![loss curve](loss_curve.png)",
        "",
    ]
    base_hits = tuned_hits = total = 0
    for q, a_base, a_tuned in zip(shown, base_out.texts, tuned_out.texts, strict=True):
        a_base, a_tuned = a_base.strip(), a_tuned.strip()
        base_hits += stated(a_base, q["key_terms"])
        tuned_hits += stated(a_tuned, q["key_terms"])
        total += len(q["key_terms"])
        lines += [f"## {q['question']}", f"*Expected:* {q['expected']}", "",
                  f"**Base model:** {a_base}", "", f"**Fine-tuned:** {a_tuned}", "",
                  f"*Intent check:* base model: {intent_mark(a_base, q['intent'])}; "
                  f"fine-tuned: {intent_mark(a_tuned, q['intent'])}.", ""]
    lines.append(f"Product facts (key terms) in these answers: base {base_hits}/{total}, "
                 f"fine-tuned {tuned_hits}/{total}.")
    lines.append(intent_summary(n, base_out.texts, tuned_out.texts, shown,
                                f"The {n} questions above"))
    if held_chats:
        lines.append(f"All {n_all} held-out questions: answers with every key fact of their "
                     f"intent: base {base_all[0]}/{n_all}, fine-tuned {tuned_all[0]}/{n_all} "
                     f"(key facts: base {base_all[1]}/{base_all[2]}, fine-tuned "
                     f"{tuned_all[1]}/{tuned_all[2]}).")
        lines.append(intent_summary(n_all, base_held, tuned_held, held_out,
                                    f"All {n_all} held-out questions"))
    verdict = (f"answers all {n} questions token for token like jaxtune" if export_same == n
               else f"DIFFERS from jaxtune on {n - export_same} of {n} questions")
    lines.append(f"Answers generated by jaxtune (decode {tuned_out.stats.decode_tokens_per_s:.0f}"
                 f" tokens/s); the merged export ({export_dir.name}) loaded in transformers "
                 f"{verdict}.")
    if adapter_dir.is_dir():
        from peft import PeftModel

        progress.stage("loading the PEFT adapter with peft")
        peft_model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), adapter_dir)
        peft_model.eval()
        same = 0
        for i, (messages, m) in enumerate(zip(chats, merged_ids, strict=True)):
            progress.stage(f"peft adapter: question {i + 1}/{n}")
            same += answer_ids(peft_model, tokenizer, messages, args.max_new_tokens,
                               stops) == m
            progress.advance()
        verdict = (f"answers all {n} questions token for token like the merged export"
                   if same == n else f"DIFFERS from the merged export on {n - same} of {n}")
        lines.append(f"PEFT adapter ({adapter_dir.name}) loaded with peft on the base model: "
                     f"{verdict}.")
    if args.lm_eval_limit > 0:
        system = spec.get("system_prompt") or None
        stage = f"lm_eval, {len(LM_EVAL_TASKS)} tasks of {args.lm_eval_limit} examples"
        progress.stage(f"{stage}: base model")
        base_scores = lm_eval_scores(base_run, system, args.lm_eval_limit, "base model")
        progress.advance(lm_items)
        progress.stage(f"{stage}: fine-tuned")
        tuned_scores = lm_eval_scores(tuned_run, system, args.lm_eval_limit, "fine-tuned")
        progress.advance(lm_items)
        lines += ["", *lm_eval_table(base_scores, tuned_scores, args.lm_eval_limit)]
    progress.close()
    report = "\n".join(lines) + "\n"
    (run_dir / "report.md").write_text(report)
    width = 100
    print("\n" + "=" * width)
    for line in lines:
        if line.startswith("!["):
            print(f"Loss curve: {run_dir / 'loss_curve.png'}")
            continue
        print(textwrap.fill(line, width) if line and not line.startswith("|") else line)
    print("=" * width)
    print(f"Report: {run_dir / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
