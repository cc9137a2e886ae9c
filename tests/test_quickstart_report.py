"""The quickstart's loss curve shows measured held-out points, not a line between them.

``scripts/quickstart_report.py`` is run by ``scripts/quickstart.sh`` after training; here its
plotting runs on synthetic metrics (no model, no training), and the recipe is checked to
evaluate during the run, so the picture has more than its two end points.
"""

from __future__ import annotations

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
    from scripts.quickstart_report import fact_count

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
