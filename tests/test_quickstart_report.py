"""The quickstart's loss curve shows measured held-out points, not a line between them.

``scripts/quickstart_report.py`` is run by ``scripts/quickstart.sh`` after training; here its
plotting runs on synthetic metrics (no model, no training), and the recipe is checked to
evaluate during the run, so the picture has more than its two end points.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from jaxtune.config import load_config
from scripts.quickstart_report import loss_figure, plot, read_metrics

ROOT = Path(__file__).resolve().parents[1]


def synthetic_run(tmp_path, steps=60, every=15):
    rows = [{"step": s, "loss": 3.0 * np.exp(-s / 20) + 0.1} for s in range(1, steps + 1)]
    rows += [{"step": s, "eval_loss": 3.5 * np.exp(-s / 18) + 0.09, "eval_perplexity": 1.0}
             for s in range(0, steps + 1, every)]
    rows.sort(key=lambda r: r["step"])
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return read_metrics(tmp_path)


def test_held_out_evaluations_are_points_with_their_values(tmp_path):
    import matplotlib.pyplot as plt

    train, evals = synthetic_run(tmp_path)
    assert [s for s, _ in evals] == [0, 15, 30, 45, 60] and len(train) == 60
    fig = loss_figure(train, evals)
    ax = fig.axes[0]
    by_label = {line.get_label(): line for line in ax.get_lines()}
    held_out = by_label["held-out loss (5 evaluations)"]
    assert held_out.get_linestyle() == "None"  # no segment suggests a trend between points
    assert held_out.get_marker() == "o"
    np.testing.assert_array_equal(held_out.get_xdata(), [s for s, _ in evals])
    np.testing.assert_allclose(held_out.get_ydata(), [v for _, v in evals])
    curve = by_label["train loss (trained tokens)"]
    assert curve.get_linestyle() == "-" and len(curve.get_xdata()) == 60
    assert [t.get_text() for t in ax.texts] == [f"{v:.2f}" for _, v in evals]
    plt.close(fig)
    plot(train, evals, tmp_path / "loss_curve.png", "SmolLM2-135M-Instruct")
    assert (tmp_path / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quickstart_recipe_evaluates_during_the_run():
    t = load_config(str(ROOT / "configs" / "quickstart.yaml")).trainer
    assert t.eval_every > 0 and t.steps % t.eval_every == 0
    assert t.steps // t.eval_every + 1 >= 4  # start, end and at least two in between


def test_fact_count_needs_every_key_phrase_of_the_intent():
    from scripts.support_intents import fact_count

    held_out = [{"question": "a", "key_terms": ["45 days", "Trash"]},
                {"question": "b", "key_terms": ["$6", "$14"]},
                {"question": "c", "key_terms": ["Business"]}]
    texts = ["Files stay in the trash for 45 DAYS.", "Starter is $6.", "No idea."]
    assert fact_count(texts, held_out) == (1, 3, 5)


def test_report_asks_every_held_out_question():
    spec = json.loads((ROOT / "examples" / "support" / "questions.json").read_text())
    eval_users = {m["content"] for line in (ROOT / "examples" / "support" / "eval.jsonl")
                  .read_text().splitlines() for m in json.loads(line)["messages"]
                  if m["role"] == "user"}
    held = spec["held_out"]
    assert len(held) == 80 and len({q["question"] for q in held}) == 80
    assert all(any(u.endswith(q["question"]) for u in eval_users) for q in held)
    shown = {q["question"] for q in spec["questions"]}
    assert shown <= {q["question"] for q in held}


def test_lm_eval_table_puts_base_and_fine_tuned_side_by_side():
    from scripts.quickstart_report import LM_EVAL_ROWS, lm_eval_table

    base = {f"{t}/{m}": 0.25 for t, m, *_ in LM_EVAL_ROWS}
    tuned = {f"{t}/{m}": 0.75 for t, m, *_ in LM_EVAL_ROWS}
    base["nimbrel_support_ppl/word_perplexity"] = 123.456
    lines = lm_eval_table(base, tuned, 40)
    assert "40 held-out examples per task" in lines[0]
    rows = [line for line in lines if line.startswith("| `")]
    assert len(rows) == len(LM_EVAL_ROWS)
    assert rows[0] == "| `nimbrel_support_mc` | multiple choice: accuracy | 0.250 | 0.750 |"
    assert "| 123.46 | 0.75 |" in rows[-1]
    assert all(len(line) <= 100 for line in lines[2:])  # printed as they are, not wrapped
    # A metric lm_eval did not report is left out, not shown as zero.
    del tuned["nimbrel_support_qa/all_facts"]
    assert len([x for x in lm_eval_table(base, tuned, 40) if x.startswith("| `")]) == \
        len(LM_EVAL_ROWS) - 1


# ------------------------------------------------------------------ the intent check

#: The README's run: the fine-tuned answer to an E-4012 question gives E-1190's fix.
E1190_FOR_E4012 = ("Hi there, thanks for reaching out! E-4012 means the device clock is more "
                   "than 5 minutes off, so your files stay in the Trash. Turn on automatic date "
                   "and time in your system settings, then restart the Nimbrel Sync app and it "
                   "will resume automatically.")


def test_every_reference_answer_gives_its_own_intent():
    """Each intent's reference answers and fact line (intents.json) are told to be its own:
    every intent has a distinctive phrase, and no other intent's phrases outweigh its own."""
    from scripts.support_intents import answered_intent, load_intents

    raw = json.loads((ROOT / "examples" / "support" / "intents.json").read_text())["intents"]
    intents = load_intents()
    assert [i.name for i in intents] == [d["name"] for d in raw] and len(intents) == 40
    assert all(i.distinctive and set(i.distinctive) <= set(i.keys) for i in intents)
    by_name = {i.name: i for i in intents}
    assert "E-4012" in by_name["error_e4012"].distinctive
    assert "Business" not in by_name["audit_log"].distinctive  # several intents state it
    assert "2" not in by_name["error_e3108"].distinctive  # inside "2 TB" of plan_limits
    for d in raw:
        for text in [*d["answers"], d["fact"]]:
            assert answered_intent(text) == d["name"], (d["name"], text)
            assert answered_intent(text, own=d["name"]) == d["name"]


def test_an_answer_with_another_intents_solution_is_counted():
    from scripts.support_intents import answered_intent, gives_other_intent, other_intent_count

    own_reference = json.loads((ROOT / "examples" / "support" / "intents.json").read_text())[
        "intents"][4]["answers"][0]
    assert "E-4012" in own_reference
    # The question's code echoed, the solution of E-1190 (clock) given: another intent's.
    assert answered_intent(E1190_FOR_E4012, "error_e4012") == "error_e1190"
    assert gives_other_intent(E1190_FOR_E4012, "error_e4012")
    # A generic answer gives no intent's solution: not counted as another intent's.
    generic = "When a new product is discovered, take a step back and assess the situation."
    assert answered_intent(generic, "error_e4012") is None
    assert not gives_other_intent(generic, "error_e4012")
    # Its own facts, even with a few other words, win; missing facts do not make it another's.
    partial = "Hi there! Starter is $6 and Team is $14, and the trial lasts 21 days."
    assert answered_intent(partial, "plans_prices") == "plans_prices"
    questions = [{"intent": "error_e4012"}] * 3
    assert other_intent_count([E1190_FOR_E4012, own_reference, generic], questions) == 1


def test_the_intent_check_reads_phrases_as_whole_words():
    """"$6" is not in "$60", "2" not in "E-2207"; case does not matter; deterministic."""
    from scripts.support_intents import answered_intent, mentions

    assert mentions("Starter is $6.", "$6") and not mentions("It costs $60.", "$6")
    assert not mentions("error E-2207", "2") and mentions("up to 2 devices", "2")
    assert mentions("Open SETTINGS > NETWORK now", "Settings > Network")
    assert not mentions("a folder", "old") and mentions("delete old files", "old")
    # Prices stated as other numbers are no intent's answer (nothing distinctive).
    assert answered_intent("Starter is $60 and Team is $140.", "plans_prices") is None
    # A tie between the question's own intent and another goes to its own.
    tie = "Codes E-4012 and E-1190 both show in the desktop app."
    assert answered_intent(tie, "error_e4012") == "error_e4012"
    assert answered_intent(tie, "error_e1190") == "error_e1190"
    assert answered_intent(tie) == "error_e4012"  # no question: intents.json's order
    # Otherwise the intent with more of its key phrases stated wins ("Cmd" is one too).
    assert answered_intent("Press Cmd+Shift+Y, or Ctrl+K to search.", "force_sync") == \
        "keyboard_shortcuts"


def test_intent_summary_and_marks_in_the_report():
    from scripts.quickstart_report import intent_mark, intent_summary

    own = json.loads((ROOT / "examples" / "support" / "intents.json").read_text())[
        "intents"][4]["answers"][1]
    questions = [{"intent": "error_e4012"}] * 3
    line = intent_summary(3, ["no idea", "no idea", own], [E1190_FOR_E4012, own, own],
                          questions, "All 3 held-out questions")
    assert line == ("All 3 held-out questions: answers giving another intent's solution: "
                    "base 0/3, fine-tuned 1/3 (no intent's solution: base 2/3, fine-tuned 0/3).")
    assert intent_mark(E1190_FOR_E4012, "error_e4012") == \
        "ANOTHER INTENT's answer (error_e1190)"
    assert intent_mark(own, "error_e4012") == "its intent's answer"
    assert intent_mark("no idea", "error_e4012") == "no intent's answer"


def test_shown_and_held_out_questions_name_their_intent():
    from scripts.support_intents import load_intents

    spec = json.loads((ROOT / "examples" / "support" / "questions.json").read_text())
    names = {i.name for i in load_intents()}
    assert all(q["intent"] in names for q in spec["questions"] + spec["held_out"])


# ------------------------------------------------------------------ progress

class _Log(io.StringIO):
    """A stream that is not a terminal (a CI log), or one that says it is."""

    def __init__(self, tty: bool = False):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_progress_in_a_log_is_one_plain_line_per_stage():
    from scripts.report_progress import Progress

    log = _Log()
    with Progress(12, stream=log) as progress:
        progress.stage("base model: 6 shown questions")
        progress.advance(6)
        progress.stage("transformers, merged export: question 1/6")
        for _ in range(6):
            progress.advance()
    text = log.getvalue()
    assert "\r" not in text and "\x1b" not in text  # no bar redrawn into the log
    lines = text.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("report [0/12, ") and lines[0].endswith(
        "]: base model: 6 shown questions")
    assert lines[1].startswith("report [6/12, ")
    assert lines[2].startswith("report [12/12, ") and lines[2].endswith("]: done")


def test_progress_on_a_terminal_is_a_bar():
    from scripts.report_progress import Progress

    term = _Log(tty=True)
    progress = Progress(4, stream=term)
    progress.stage("fine-tuned: 4 held-out questions")
    progress.advance(4)
    progress.close()
    text = term.getvalue()
    # A tqdm bar, redrawn in place (its updates are rate-limited, so only the start is sure).
    assert text.startswith("\rreport:") and "| 0/4 [" in text
    assert "\rreport: fine-tuned: 4 held-out questions:" in text and progress.done == 4
    assert "report [" not in text  # no log lines on a terminal


def test_support_accuracy_counts_like_the_report():
    """The answer-curve script's counts: every key fact, another intent's, none."""
    from scripts.quickstart_report import chat
    from scripts.support_accuracy import score

    spec = json.loads((ROOT / "examples" / "support" / "questions.json").read_text())
    chats = [chat(spec, q["question"]) for q in spec["held_out"]]
    assert len(chats) == 80 and chats[0][0] == {"role": "system",
                                                "content": spec["system_prompt"]}
    held = [q for q in spec["held_out"] if q["intent"] in ("plans_prices", "error_e4012")][:3]
    texts = ["Starter $6, Team $14, Business $27, save 20% annually.",  # its own, complete
             "Starter $6 only.",  # its own intent, incomplete
             "Check Admin Console > Billing > Cancel plan."]  # cancel_subscription's
    counts = score(texts, held)
    assert counts["complete"] == 1 and counts["n"] == 3
    assert counts["other_intent"] == 1 and counts["no_intent"] == 0
    assert score(["No idea, sorry."], held[:1])["no_intent"] == 1  # a generic answer


def test_answer_curve_is_drawn(tmp_path):
    from scripts.support_accuracy import plot_curve

    counts = {0: {"complete": 0, "other_intent": 2, "n": 80},
              100: {"complete": 17, "other_intent": 44, "n": 80}}
    plot_curve(counts, tmp_path / "curve.png", "run")
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
