"""The training loop end to end, in process: metrics, eval, run directory, NaN stop."""

import json
import os
import re

import pytest

from jaxtune.config import config_from_dict
from jaxtune.trainer import TrainingDiverged, train
from tests.fixtures_data import chat_rows, write_jsonl


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_hf_model, data_tokenizers):
    root = tmp_path_factory.mktemp("trainer")
    train_file = write_jsonl(root / "train.jsonl", chat_rows(24, seed=1))
    eval_file = write_jsonl(root / "eval.jsonl", chat_rows(6, seed=2))

    def make(**sections):
        raw = {
            "run": {"name": "t", "output_dir": str(root / sections.pop("name", "run")),
                    "seed": 1},
            "model": {"path": str(tiny_hf_model("llama")), "tokenizer": data_tokenizers["chatml"]},
            "data": {"sources": [{"path": train_file}], "eval_sources": [{"path": eval_file}],
                     "format": "chat", "seq_len": 32, "cache_dir": str(root / "cache")},
            "optimizer": {"learning_rate": 3e-3, "warmup_steps": 1},
            "trainer": {"steps": 6, "global_batch_size": 4, "eval_every": 3,
                        "progress": False},
            "checkpoint": {"enabled": False},
        }
        for key, value in sections.items():
            raw[key] = {**raw.get(key, {}), **value}
        return config_from_dict(raw)

    return make


def test_train_writes_run_dir_and_learns(recipe, caplog):
    cfg = recipe(name="ok")
    with caplog.at_level("INFO", logger="jaxtune"):
        result = train(cfg)
    # The time left, from step 2 (the first timed without the compile): 4 steps, 2 evals.
    assert "of training left for 4 steps, plus 2 evaluation(s)" in caplog.text
    # What the step's activations need, the figure remat / scan / micro-batches change.
    assert re.search(r"compiled the train step in [\d.]+ s \([\d.]+ GiB of temporaries",
                     caplog.text), caplog.text
    run_dir = cfg.run.output_dir
    assert os.path.isfile(os.path.join(run_dir, "config.yaml"))
    lines = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
    steps = [x["step"] for x in lines if "loss" in x]
    assert steps == list(range(1, 7))
    for key in ("loss", "learning_rate", "grad_norm", "param_norm", "tokens_per_s"):
        assert key in lines[-1] or any(key in x for x in lines), key
    assert [e["step"] for e in result.evals] == [0, 3, 6]
    assert result.evals[-1]["eval_loss"] < result.evals[0]["eval_loss"]
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_step_time_leaves_out_the_evaluation_before_it(recipe, monkeypatch):
    """The step after an evaluation is timed from the evaluation's end: an evaluation that
    takes 1000 s (on a fake clock) shows in no step's time or tokens/s."""
    import jaxtune.trainer as trainer_module
    from jaxtune.trainer import Trainer

    clock = {"skew": 0.0}
    real = trainer_module.time.perf_counter
    monkeypatch.setattr(trainer_module.time, "perf_counter", lambda: real() + clock["skew"])
    evaluate = Trainer.evaluate

    def slow_evaluate(self, *args, **kwargs):
        clock["skew"] += 1000.0
        return evaluate(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "evaluate", slow_evaluate)
    result = train(recipe(name="eval-time"))
    assert [e["step"] for e in result.evals] == [0, 3, 6]
    assert max(h["step_time_s"] for h in result.history) < 1000, result.history


def test_nan_stops_run_naming_the_step(recipe):
    cfg = recipe(name="nan", trainer={"loss_fn": "tests.losses_for_tests:nan_at_step_3",
                                      "eval_every": 0})
    with pytest.raises(TrainingDiverged, match="at step 3"):
        train(cfg)
    lines = [json.loads(x) for x in open(os.path.join(cfg.run.output_dir, "metrics.jsonl"))]
    assert max(x["step"] for x in lines if "loss" in x) == 2


def test_custom_loss_and_step_from_the_docs(recipe):
    """docs/custom-train-step.md: both hooks by import path change what the run does."""
    cfg = recipe(name="custom", trainer={
        "steps": 2, "eval_every": 0,
        "loss_fn": "examples.custom_step:label_smoothed_loss",
        "train_step": "examples.custom_step:step_with_update_ratio"})
    custom = train(cfg)
    default = train(recipe(name="default", trainer={"steps": 2, "eval_every": 0}))
    assert custom.history[0]["loss"] != pytest.approx(default.history[0]["loss"], rel=1e-3)
    assert 0 < custom.history[-1]["update_ratio"] < 1
    assert "update_ratio" not in default.history[-1]


def test_lora_dropout_reaches_the_train_step_only(recipe):
    base = {"steps": 3, "eval_every": 0}
    plain = train(recipe(name="lora0", lora={"rank": 4, "dropout": 0.0}, trainer=base))
    dropped = train(recipe(name="lora5", lora={"rank": 4, "dropout": 0.5}, trainer=base))
    # Evaluation is deterministic: before any update both runs are the same model.
    assert dropped.evals[0]["eval_loss"] == pytest.approx(plain.evals[0]["eval_loss"], rel=1e-6)
    # B starts at zero and the warmup's first learning rate is 0, so B first moves at step 2
    # and dropout shows in the loss from step 3 on.
    assert dropped.history[2]["loss"] != pytest.approx(plain.history[2]["loss"], rel=1e-5)


def test_samples_during_training(recipe):
    """trainer.sample_every: greedy answers to held-out chats in samples.jsonl, at steps 3
    and 6, the last equal to generating with the trained model afterwards."""
    import jaxtune
    from jaxtune.generation.samples import held_out_prompts

    cfg = recipe(name="samples", trainer={"sample_every": 3, "sample_count": 2,
                                          "sample_max_new_tokens": 8})
    result = train(cfg)
    rows = [json.loads(x) for x in open(os.path.join(cfg.run.output_dir, "samples.jsonl"))]
    assert [(r["step"], r["prompt_index"]) for r in rows] == [(3, 0), (3, 1), (6, 0), (6, 1)]
    prompts = held_out_prompts(cfg, 2)
    assert [r["prompt"] for r in rows[2:]] == prompts
    assert prompts[0][-1]["role"] == "user"
    from jaxtune.data import load_tokenizer

    again = jaxtune.generate(result.state.model(), load_tokenizer(cfg), prompts,
                             max_new_tokens=8)
    assert [r["answer"] for r in rows[2:]] == again
    assert os.listdir(os.path.join(cfg.run.output_dir, "tensorboard"))


class _OnPolicyData:
    """A batch source that needs the previous step's state (as RL rollouts do): it records the
    step of the state each batch is made from, and keeps a counter in its resumable state."""

    on_policy = True
    seen: list[int] = []

    def __init__(self, trainer):
        from jaxtune import data
        from jaxtune.batches import DataBatches

        self.inner = DataBatches(data.make_batch_iterator(trainer.cfg, trainer.tokenizer),
                                 trainer.mesh)
        self.made = 0

    def next(self, state):
        import jax

        _OnPolicyData.seen.append(int(jax.device_get(state.step)))
        produced = self.inner.next(state)
        self.made += 1
        produced.metrics["toy/made"] = float(self.made)
        return produced

    def get_state(self):
        return {"inner": self.inner.get_state(), "made": self.made}

    def set_state(self, state):
        self.inner.set_state(state["inner"])
        self.made = state["made"]


def test_an_on_policy_batch_source_gets_the_state_of_the_step_before(recipe):
    """The seam: an objective's batch source makes each batch from the state the previous
    step produced, its metrics reach the step's record, and its state is checkpointed and
    restored like the data iterator's."""
    import dataclasses

    from jaxtune.objectives import make_objective, register_objective

    register_objective("toy_on_policy", lambda cfg: dataclasses.replace(
        make_objective(dataclasses.replace(cfg.trainer, objective="sft")),
        name="toy_on_policy", batch_source=_OnPolicyData))
    sections = dict(name="on-policy", checkpoint={"enabled": True},
                    optimizer={"schedule": "constant"},  # the same at steps 3 and 6
                    trainer={"objective": "toy_on_policy", "eval_every": 0})
    _OnPolicyData.seen = []
    first = train(recipe(**{**sections, "trainer": {**sections["trainer"], "steps": 3}}))
    assert _OnPolicyData.seen == [0, 1, 2]
    assert [h["toy/made"] for h in first.history] == [1.0, 2.0, 3.0]
    assert all(0 < h["train_time_s"] <= h["step_time_s"] for h in first.history[1:])
    _OnPolicyData.seen = []
    resumed = train(recipe(**sections))  # steps 6: resumes at 3 with the producer's state
    assert _OnPolicyData.seen == [3, 4, 5]
    assert [h["toy/made"] for h in resumed.history] == [4.0, 5.0, 6.0]
    uninterrupted = train(recipe(**{**sections, "name": "on-policy-whole"}))
    assert [h["loss"] for h in uninterrupted.history[3:]] == [h["loss"] for h in resumed.history]
