"""Distillation end to end: ``trainer.objective: distill`` through the one loop.

A small Llama student learns from a tiny Qwen2 teacher (same vocabulary). The teacher sits
beside the train state: no optimizer state, no bytes in a checkpoint (its size equals the
same student's SFT checkpoint). Precomputed top-k teacher log-probs give the trajectory of the
same top-k taken on the fly, with no teacher loaded during training. On-policy steps (lmbda)
train on the student's own completions and sequence-level KD (seq_kd) on the teacher's; a
resumed run makes exactly the batches of an uninterrupted one. A teacher given as a run
directory is its trained model. Bad teachers stop the run with one paragraph, before any
weight is read.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from jaxtune.config import config_from_dict
from jaxtune.distill.batches import generated_rows, prompt_of, step_kind
from jaxtune.rl.rollout import Completion
from jaxtune.trainer import Trainer, train
from tests.fixtures_data import chat_rows, write_jsonl


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, distill_pair, data_tokenizers):
    root = tmp_path_factory.mktemp("distill")
    train_file = write_jsonl(root / "chats.jsonl", chat_rows(24, seed=4, turns=1))
    eval_file = write_jsonl(root / "eval.jsonl", chat_rows(8, seed=5, turns=1))

    def make(name: str, **sections) -> dict:
        raw = {
            "run": {"output_dir": str(root / name), "seed": 1},
            "model": {"path": str(distill_pair["student"]),
                      "tokenizer": data_tokenizers["chatml"]},
            "data": {"sources": [{"path": train_file}], "eval_sources": [{"path": eval_file}],
                     "seq_len": 48, "cache_dir": str(root / "cache")},
            "optimizer": {"learning_rate": 1e-2, "schedule": "constant"},
            "trainer": {"objective": "distill", "steps": 3, "global_batch_size": 4,
                        "progress": False},
            "distill": {"teacher": str(distill_pair["teacher"]), "lmbda": 0.0},
            "checkpoint": {"enabled": False},
            "logging": {"tensorboard": False},
        }
        for key, value in sections.items():
            raw[key] = {**raw.get(key, {}), **value}
        return raw

    make.root = root
    return make


@pytest.mark.parametrize("lora", [0, 4])
def test_the_student_moves_towards_the_teacher(recipe, lora):
    """Full fine-tuning, and LoRA (the student's head frozen: its gradient is never made)."""
    result = train(config_from_dict(recipe(f"learns-{lora}", trainer={"steps": 8},
                                           lora={"rank": lora, "alpha": 2 * lora})))
    first, last = result.evals[0], result.evals[-1]
    assert last["eval_divergence"] < first["eval_divergence"] - 0.02, (first, last)
    for h in result.history:
        for key in ("loss", "divergence", "entropy", "nll_sum", "trained_tokens"):
            assert key in h, key
        assert h["loss"] == pytest.approx(h["divergence"], rel=1e-6)  # no ce_weight


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(str(path)).rglob("*") if f.is_file())


def test_the_teacher_is_in_no_checkpoint_and_no_optimizer_state(recipe, distill_pair):
    """A distillation checkpoint holds exactly what the same student's SFT checkpoint holds:
    the same arrays, the same bytes; the teacher is none of them."""
    from jaxtune.run_dir import open_run

    both = {}
    for objective in ("distill", "sft"):
        trainer = Trainer(config_from_dict(recipe(
            f"ckpt-{objective}", trainer={"steps": 1, "objective": objective},
            checkpoint={"enabled": True}, data={"eval_sources": []})))
        result = trainer.run()
        both[objective] = (trainer, result, open_run(result.run_dir))
    (d_trainer, d_result, d_ckpt), (_, s_result, s_ckpt) = both["distill"], both["sft"]
    assert d_trainer.teacher is not None and d_trainer.teacher.num_params > 0
    assert {k: (v.shape, v.dtype) for k, v in d_ckpt.arrays.items()} == \
        {k: (v.shape, v.dtype) for k, v in s_ckpt.arrays.items()}
    shapes = jax.tree.map(lambda x: (x.shape, x.dtype), d_result.state.opt_state)
    assert shapes == jax.tree.map(lambda x: (x.shape, x.dtype), s_result.state.opt_state)
    logical = [sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
                   for a in c.arrays.values()) for c in (d_ckpt, s_ckpt)]
    assert logical[0] == logical[1]
    # On disk (compressed, so the values move it a little): the same size; a checkpoint that
    # also held the teacher would be larger by more than half.
    d_bytes, s_bytes = _dir_bytes(d_ckpt.state_dir), _dir_bytes(s_ckpt.state_dir)
    teacher_bytes = sum(x.nbytes for x in jax.tree.leaves(d_trainer.teacher.state))
    assert teacher_bytes > 0.5 * logical[0]
    assert abs(d_bytes - s_bytes) <= 0.05 * s_bytes, (d_bytes, s_bytes)


def test_precomputed_top_k_gives_the_on_the_fly_trajectory(recipe):
    """top_k 6 computed in the step from the teacher, and cached once before training (no
    teacher loaded while training): the same losses and held-out metrics."""
    common = dict(trainer={"steps": 3}, data={"packing": True})
    live = Trainer(config_from_dict(recipe("topk-live", distill={"top_k": 6}, **common)))
    cached_cfg = config_from_dict(recipe("topk-cached", distill={
        "top_k": 6, "precompute_teacher": True}, **common))
    cached = Trainer(cached_cfg)
    assert live.teacher is not None and cached.teacher is None
    assert list(Path(cached_cfg.data.cache_dir).glob("teacher-topk-*.npz"))
    a, b = live.run(), cached.run()
    for x, y in zip(a.history, b.history, strict=True):
        for key in ("loss", "divergence", "grad_norm"):
            np.testing.assert_allclose(y[key], x[key], rtol=2e-5, err_msg=key)
    for x, y in zip(a.evals, b.evals, strict=True):
        np.testing.assert_allclose(y["eval_divergence"], x["eval_divergence"], rtol=2e-5)


def test_generated_rows_train_exactly_the_completion():
    ids = np.array([5, 6, 7, 8, 9, 10, 0, 0], np.int32)
    mask = np.array([0, 0, 1, 1, 1, 0, 0, 0], np.float32)  # targets 8, 9, 10 trained
    prompt = prompt_of(ids, mask)
    assert prompt == [5, 6, 7]
    assert prompt_of(ids, np.zeros(8, np.float32)) is None
    two_turns = np.array([1, 1, 1, 1, 0, 0, 1, 1], np.float32)
    assert prompt_of(np.arange(8), two_turns) == list(range(7))  # the last span answers
    rows = generated_rows([prompt, None, [4]], [Completion([20, 21, 2], [0.0] * 3, True), None,
                                                Completion([30], [0.0], False)], 8, pad_id=0)
    assert rows["input_ids"][0].tolist() == [5, 6, 7, 20, 21, 2, 0, 0]
    trained = rows["targets"][0][rows["loss_mask"][0] > 0].tolist()
    assert trained == [20, 21, 2]
    assert rows["positions"][0, :6].tolist() == list(range(6))
    assert rows["loss_mask"][1].sum() == 0 and rows["segment_ids"][1].sum() == 0
    # left-padded to the widest prompt: the answer's first token is predicted at column 2
    assert rows["input_ids"][2, :4].tolist() == [0, 0, 4, 30]
    assert rows["segment_ids"][2, :4].tolist() == [0, 0, 1, 1]
    assert rows["targets"][2][rows["loss_mask"][2] > 0].tolist() == [30]


def test_step_kinds_are_seeded_draws_at_the_rate_lmbda():
    kinds = [step_kind(7, s, 0.3, False) for s in range(1, 2001)]
    assert kinds == [step_kind(7, s, 0.3, False) for s in range(1, 2001)]
    assert abs(kinds.count("student") / 2000 - 0.3) < 0.03
    assert set(step_kind(7, s, 0.0, True) for s in range(1, 50)) == {"teacher"}
    assert set(step_kind(7, s, 1.0, True) for s in range(1, 50)) == {"student"}


def test_on_policy_and_seq_kd_steps_resume_exactly(recipe):
    """lmbda 0.5 with seq_kd: the student's own answers on some steps, the teacher's on the
    others. Stopped after 2 steps and resumed, steps 3 and 4 are the uninterrupted run's."""
    gen = dict(data={"packing": False}, trainer={"steps": 4},
               distill={"lmbda": 0.5, "seq_kd": True, "max_new_tokens": 10,
                        "ce_weight": 0.5},
               checkpoint={"enabled": True, "save_every": 2, "async_save": False})
    kinds = [step_kind(1, s, 0.5, True) for s in range(1, 5)]
    assert set(kinds) == {"student", "teacher"}  # seed 1 gives both kinds in 4 steps
    straight = train(config_from_dict(recipe("gen-straight", **gen)))
    for h, kind in zip(straight.history, kinds, strict=True):
        assert h["distill/on_policy"] == float(kind == "student")
        assert 1 <= h["completions/mean_length"] <= 10
        assert h["ce"] == 0.0  # generated answers: no cross-entropy on them
        assert h["trained_tokens"] > 0
    first = recipe("gen-resumed", **gen)
    train(config_from_dict({**first, "trainer": {**first["trainer"], "steps": 2}}))
    resumed = train(config_from_dict(first))
    assert [h["step"] for h in resumed.history] == [3, 4]
    for x, y in zip(straight.history[2:], resumed.history, strict=True):
        for key in ("loss", "divergence", "completions/mean_length", "grad_norm"):
            assert x[key] == y[key], key


def test_a_run_directory_is_a_teacher(recipe, distill_pair, data_tokenizers, tmp_path):
    """distill.teacher names a LoRA run of the teacher: its adapters are part of the teacher
    (the same logits as the run's model read by jaxtune.run_dir.load_run)."""
    from jaxtune.distill.teacher import load_teacher
    from jaxtune.mesh import make_mesh
    from jaxtune.run_dir import load_run
    from jaxtune.sharding import make_rules

    sft = recipe("teacher-run", model={"path": str(distill_pair["teacher"])},
                 trainer={"objective": "sft", "steps": 2}, lora={"rank": 4, "alpha": 8},
                 checkpoint={"enabled": True}, data={"eval_sources": []})
    run_dir = train(config_from_dict(sft)).run_dir
    cfg = config_from_dict(recipe("from-run", distill={"teacher": run_dir}))
    mesh = make_mesh(cfg.mesh)
    teacher = load_teacher(cfg, mesh, make_rules())
    ids = np.arange(3, 19, dtype=np.int32)[None]
    pos, seg = np.arange(16, dtype=np.int32)[None], np.ones((1, 16), np.int32)

    def logits(model):
        return np.asarray(model.unembed(model.hidden_states(ids, pos, seg)))

    loaded = load_run(run_dir).model
    np.testing.assert_allclose(logits(teacher.model()), logits(loaded), rtol=1e-5, atol=1e-5)
    base = load_teacher(config_from_dict(recipe("base-teacher")), mesh, make_rules()).model()
    assert np.abs(logits(base) - logits(loaded)).max() > 1e-4  # the adapters count
    assert len(train(cfg).history) == 3


# --------------------------------------------------------------------------- bad input


def _write(recipe_raw: dict, tmp_path: Path) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_raw))
    return str(path)


def test_mismatched_vocabularies_stop_before_any_weight_is_read(recipe, distill_pair,
                                                                 tmp_path, capsys,
                                                                 monkeypatch):
    from tests.test_user_errors import fails

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were read before the vocabularies were compared")

    monkeypatch.setattr("jaxtune.weights.from_pretrained", no_weights)
    monkeypatch.setattr("jaxtune.trainer.Trainer._load_model", no_weights)
    err = fails(capsys, "train", _write(recipe(
        "vocab", distill={"teacher": str(distill_pair["other_vocab"])}), tmp_path))
    assert "401 tokens" in err and "389" in err and "same tokenizer" in err, err


def test_a_teacher_path_that_does_not_exist(recipe, tmp_path, capsys):
    from tests.test_user_errors import fails

    missing = tmp_path / "no-such-teacher"
    err = fails(capsys, "train", _write(recipe("missing", distill={"teacher": str(missing)}),
                                        tmp_path))
    assert f"distill.teacher is '{missing}'" in err and "does not exist" in err, err
    folder = tmp_path / "empty"
    folder.mkdir()
    err = fails(capsys, "train", _write(recipe("empty", distill={"teacher": str(folder)}),
                                        tmp_path))
    assert "neither config.json" in err and "config.yaml" in err, err


def test_a_teacher_of_a_family_jaxtune_cannot_load(recipe, distill_pair, tmp_path, capsys):
    from tests.test_user_errors import fails

    err = fails(capsys, "train", _write(recipe(
        "family", distill={"teacher": str(distill_pair["unloadable"])}), tmp_path))
    assert "cannot be loaded" in err and "gpt2" in err and "llama" in err, err


@pytest.mark.parametrize("section, message", [
    ({"distill": {"lmbda": 0.5}, "data": {"packing": True}}, "data.packing: false"),
    ({"distill": {"precompute_teacher": True}}, "set 'distill.top_k'"),
    ({"distill": {"beta": 1.5}}, "'distill.beta' must be in [0, 1]"),
    ({"distill": {"teacher": ""}}, "'distill.teacher' is empty"),
])
def test_settings_that_cannot_work(recipe, tmp_path, capsys, section, message):
    from tests.test_user_errors import fails

    err = fails(capsys, "train", _write(recipe("bad", **section), tmp_path))
    assert message in err, err


os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
