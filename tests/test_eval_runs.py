"""lm_eval scores of trained runs: ``trainer.eval_harness`` logs them during training (metrics
and TensorBoard), and ``jaxtune eval`` on a LoRA run directory (adapters applied, unmerged)
gives the same answers and scores as on its merged export."""

from __future__ import annotations

import json

import pytest

from jaxtune.cli import main as cli_main
from jaxtune.config import config_from_dict
from tests.eval_helpers import compare, from_json
from tests.fixtures_data import chat_rows, write_jsonl


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_hf_model, data_tokenizers):
    """Three LoRA steps on the tiny model, lm_eval every 2 steps (and at the end), exported
    merged."""
    from jaxtune.trainer import train

    root = tmp_path_factory.mktemp("eval_runs")
    data = write_jsonl(root / "chats.jsonl", chat_rows(24, seed=5))
    cfg = config_from_dict({
        "run": {"output_dir": str(root / "run"), "seed": 3},
        "model": {"path": str(tiny_hf_model("llama")), "tokenizer": data_tokenizers["chatml"]},
        "lora": {"rank": 4, "alpha": 8},
        "data": {"sources": [{"path": data}], "format": "chat", "seq_len": 32,
                 "cache_dir": str(root / "cache")},
        "optimizer": {"learning_rate": 3e-2, "schedule": "constant"},
        "trainer": {"steps": 3, "global_batch_size": 4, "progress": False,
                    "eval_harness": {"tasks": ["nimbrel_support_mc", "nimbrel_support_ppl"],
                                     "every": 2, "limit": 2, "batch_size": 2}},
        "logging": {"stdout": False},
        "export": {"enabled": True, "lora": "merged", "dtype": "float32"},
    })
    result = train(cfg)
    return root / "run", result


def test_training_logs_lm_eval_scores(trained):
    run, _ = trained
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    scored = {r["step"]: r for r in rows if "harness/nimbrel_support_mc/acc" in r}
    assert sorted(scored) == [2, 3]
    for r in scored.values():
        assert 0.0 <= r["harness/nimbrel_support_mc/acc"] <= 1.0
        assert r["harness/nimbrel_support_ppl/word_perplexity"] > 1.0
    # The weights changed between the two evaluations, and so did the perplexity.
    assert scored[2]["harness/nimbrel_support_ppl/word_perplexity"] != \
        scored[3]["harness/nimbrel_support_ppl/word_perplexity"]
    events = list((run / "tensorboard").glob("events.*"))
    assert events and any(b"harness/nimbrel_support_mc/acc" in e.read_bytes() for e in events)


def test_a_run_and_its_merged_export_score_the_same(trained, tmp_path, capsys):
    run, _ = trained
    common = ["--tasks", "nimbrel_support_mc,nimbrel_support_qa", "--limit", "3",
              "--batch-size", "2", "--log-samples", "--max-gen-toks", "24"]
    assert cli_main(["eval", str(run), *common, "--output", str(tmp_path / "run.json")]) == 0
    assert cli_main(["eval", str(run / "hf"), *common,
                     "--output", str(tmp_path / "hf.json")]) == 0
    ours, merged = from_json(tmp_path / "run.json"), from_json(tmp_path / "hf.json")
    assert ours["jaxtune"]["step"] == 3 and "LoRA adapters on" in ours["jaxtune"]["model"]
    seen = compare(ours, merged)  # merged in float32: equal to rounding
    assert seen["loglikelihood"] == 12 and seen["generation"] == 3
    # Without --output, the results go under the run directory.
    assert cli_main(["eval", str(run), "--tasks", "nimbrel_support_mc", "--limit", "1"]) == 0
    assert len(list((run / "eval").glob("results-step3-*.json"))) == 1
