"""RL end to end: ``trainer.objective: grpo`` through the one loop, with rollouts from jaxtune's
own generator on the training mesh.

A tiny random Llama learns to favour a band of token ids (a reward a program checks), so the
reward must rise within a few steps. On-policy (``num_iterations`` 1) the importance ratio is
exactly 1 and the sampler's log-probs equal the trainer's within 1e-5 (float32). The loss
and gradients do not change with ``grad_accum_steps`` (the global normalisers), a resumed
run after ``kill -9`` is bitwise the uninterrupted one (prompt order, sampling keys, a rollout
batch with uses left), and bad input stops the run with one paragraph naming what to fix.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
import yaml

from jaxtune.config import config_from_dict
from jaxtune.data.errors import BadRowError
from jaxtune.errors import JaxtuneError
from jaxtune.trainer import train
from tests.fixtures_data import random_text, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BAND = (10, 60)  # token ids the reward favours: about 13% of a random model's samples


def band_share(prompts, completions, completion_ids, **kwargs):
    """The share of a completion's tokens in BAND."""
    return [sum(BAND[0] <= t < BAND[1] for t in ids) / max(len(ids), 1)
            for ids in completion_ids]


def prompt_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": [{"role": "user", "content": random_text(rng, rng.randint(2, 6))}],
             "tag": i} for i in range(n)]


@pytest.fixture(scope="module")
def rl_recipe(tmp_path_factory, tiny_hf_model, data_tokenizers):
    root = tmp_path_factory.mktemp("rl")
    train_file = write_jsonl(root / "prompts.jsonl", prompt_rows(24, seed=1))
    eval_file = write_jsonl(root / "eval.jsonl", prompt_rows(6, seed=2))

    def make(**sections) -> dict:
        raw = {
            "run": {"name": "rl", "output_dir": str(root / sections.pop("name", "run")),
                    "seed": 3},
            "model": {"path": str(tiny_hf_model("llama")), "tokenizer": data_tokenizers["chatml"]},
            "data": {"format": "prompt", "sources": [{"path": train_file}],
                     "eval_sources": [{"path": eval_file}], "seq_len": 48,
                     "cache_dir": str(root / "cache")},
            "optimizer": {"learning_rate": 1e-2, "schedule": "constant"},
            "trainer": {"objective": "grpo", "steps": 10, "global_batch_size": 16,
                        "progress": False},
            "rl": {"num_generations": 4, "max_completion_length": 12,
                   "rewards": [{"function": "tests.test_rl:band_share"}]},
            "checkpoint": {"enabled": False},
            "logging": {"tensorboard": False},
        }
        for key, value in sections.items():
            raw[key] = {**raw.get(key, {}), **value}
        return raw

    make.root = root
    return make


def test_grpo_raises_the_reward_on_policy(rl_recipe):
    result = train(config_from_dict(rl_recipe(name="learns")))
    rewards = [h["reward"] for h in result.history]
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.3, rewards
    for h in result.history:
        assert h["ratio/deviation_max"] == 0.0  # on-policy: exactly 1
        assert h["sampling/logp_diff_max"] <= 1e-5, h["sampling/logp_diff_max"]
        assert h["rl/iteration"] == 1.0
        for key in ("rewards/band_share/mean", "completions/mean_length",
                    "completions/clipped_ratio", "entropy", "clip_ratio/region_mean",
                    "time/generate_s", "time/score_s", "rollout/tokens_per_s",
                    "train_time_s", "tokens_per_s", "frac_reward_zero_std"):
            assert key in h, key
    # held-out prompts answered greedily and scored, at the start and at the end
    assert [e["step"] for e in result.evals] == [0, 10]
    assert result.evals[-1]["eval_reward"] > result.evals[0]["eval_reward"]
    assert result.evals[0]["eval_prompts"] == 6.0


def test_lora_with_kl_and_reused_rollouts(rl_recipe):
    """LoRA (the reference is the base with adapters off), beta > 0, num_iterations 2 with
    stored old log-probs, and DAPO's dynamic sampling."""
    raw = rl_recipe(name="lora", lora={"rank": 4, "alpha": 8},
                    trainer={"steps": 4, "grad_accum_steps": 2},
                    rl={"beta": 0.04, "num_iterations": 2, "dynamic_sampling": True,
                        "loss_type": "grpo", "importance_sampling_level": "sequence"})
    raw["data"]["eval_sources"] = []
    result = train(config_from_dict(raw))
    h = result.history
    assert [x["rl/iteration"] for x in h] == [1.0, 2.0, 1.0, 2.0]
    assert h[0]["reward"] == h[1]["reward"] and h[2]["reward"] == h[3]["reward"]
    assert h[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # adapters start at zero: the base
    assert h[1]["ratio/deviation_max"] > 0  # the second use is off-policy by one step
    assert h[0]["sampling/logp_diff_max"] <= 1e-5  # old log-probs vs the sampler's
    assert all(1 <= x["dynamic_sampling/rounds"] <= 3 for x in h)


def test_accumulation_does_not_change_the_step(rl_recipe):
    """The same rollout batch: grad_accum_steps 1 and 4 give the same loss and update, for
    each loss type (bnpo is TRL's per-micro-batch mean, so it is compared with that)."""
    from jaxtune.trainer import Trainer

    raw = rl_recipe(name="accum", rl={"num_iterations": 2, "beta": 0.04})
    trainer = Trainer(config_from_dict(raw))
    produced = trainer.batches.next(trainer.state)
    batch = jax.device_get(produced.batch)
    # what `jaxtune plan` compiles the step with: the same keys, the rows at most seq_len wide
    shapes = trainer.loss_fn.batch_shapes(trainer.cfg)
    assert set(shapes) == set(batch)
    assert all(batch[k].shape[0] == shapes[k].shape[0] if shapes[k].shape else True
               for k in shapes)
    assert batch["input_ids"].shape[1] <= shapes["input_ids"].shape[1]
    from tests.train_helpers import make_stepper, params_numpy, put

    path = raw["model"]["path"]
    for loss_type in ("grpo", "dr_grpo", "dapo", "bnpo"):
        cfg = config_from_dict({**raw, "rl": {**raw["rl"], "loss_type": loss_type}})
        from jaxtune.objectives import make_objective

        out = {}
        for accum in (1, 4):
            state, step, mesh = make_stepper(path, loss_fn=make_objective(cfg),
                                             grad_accum_steps=accum, keep_reference=True,
                                             optimizer="sgd")  # updates: lr x gradients
            state, metrics = step(state, put(batch, mesh))
            out[accum] = (float(metrics["loss"]), params_numpy(state), metrics)
        if loss_type == "bnpo":
            assert out[1][0] != pytest.approx(out[4][0], rel=1e-4)  # local, as TRL
            continue
        assert out[4][0] == pytest.approx(out[1][0], rel=1e-5, abs=1e-7), loss_type
        for k, v in out[1][1].items():
            np.testing.assert_allclose(out[4][1][k], v, rtol=1e-5, atol=1e-6, err_msg=k)
        for k in ("kl", "entropy", "clip_ratio/region_mean"):
            assert float(out[4][2][k]) == pytest.approx(float(out[1][2][k]), rel=1e-5,
                                                        abs=1e-7), k


# --------------------------------------------------------------------------- resume


def test_kill_9_at_a_random_step_then_resume_is_bitwise_the_straight_run(rl_recipe):
    from tests.test_resume_e2e import final_state, launch, read_folder, rewards_of

    raw = rl_recipe(lora={"rank": 4, "alpha": 8}, trainer={"steps": 6},
                    rl={"num_iterations": 2, "beta": 0.04},
                    checkpoint={"enabled": True, "save_every": 1, "keep": 2},
                    export={"enabled": True, "lora": "both"})
    raw["data"]["eval_sources"] = []
    raw["run"].pop("output_dir")
    recipe = rl_recipe.root / "resume.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    straight_dir, resumed_dir = str(rl_recipe.root / "straight"), str(rl_recipe.root / "kill")
    rc, straight, out = launch(str(recipe), straight_dir)
    assert rc == 0 and sorted(straight) == list(range(1, 7)), out[-3000:]
    straight_rewards = rewards_of(out)
    kill_at = random.Random().randint(2, 5)  # mid-rollout (odd) or at a boundary (even)
    rc, first, out = launch(str(recipe), resumed_dir, stop_after=kill_at)
    assert rc == -signal.SIGKILL, out[-3000:]
    rc, second, out = launch(str(recipe), resumed_dir)
    assert rc == 0, out[-3000:]
    assert min(second) == kill_at + 1, (kill_at, out[-3000:])
    rewards = rewards_of(out)
    for step in range(kill_at + 1, 7):
        assert second[step] == straight[step], (kill_at, step)
        assert rewards[step] == straight_rewards[step], (kill_at, step)
    for got, want in zip(final_state(resumed_dir, 6), final_state(straight_dir, 6),
                         strict=True):
        np.testing.assert_array_equal(got, want)
    for folder in ("hf", "hf-adapter"):
        got = read_folder(os.path.join(resumed_dir, folder))
        want = read_folder(os.path.join(straight_dir, folder))
        assert sorted(got) == sorted(want)
        assert all(got[k] == want[k] for k in want), (kill_at, folder)


# --------------------------------------------------------------------------- bad input


def test_num_generations_must_divide_the_batch(rl_recipe):
    with pytest.raises(JaxtuneError, match=r"'trainer.global_batch_size' \(16\) counts "
                       r"completions and must hold whole groups of 'rl.num_generations' \(5\)"):
        config_from_dict(rl_recipe(rl={"num_generations": 5}))


def test_a_prompt_longer_than_the_budget_names_file_and_row(rl_recipe):
    rows = prompt_rows(4, seed=5)
    rows[2]["prompt"][0]["content"] = " ".join(["word"] * 60)
    path = write_jsonl(rl_recipe.root / "long.jsonl", rows)
    raw = rl_recipe(name="long", data={"sources": [{"path": path}]})
    with pytest.raises(BadRowError, match=r"long.jsonl, row 2: field 'prompt' has \d+ tokens, "
                       r"more than the prompt budget data.seq_len - rl.max_completion_length"):
        train(config_from_dict(raw))
    assert not os.path.exists(raw["run"]["output_dir"])  # nothing written


@pytest.mark.parametrize("change,message", [
    ({"data": {"format": "chat"}}, r"trainer.objective 'grpo' trains on data.format prompt, "
                                   r"but data.format is 'chat'"),
    ({"trainer": {"objective": "sft"}}, r"data.format 'prompt' holds prompts without answers, "
                                        r"which trainer.objective 'sft' cannot train on"),
])
def test_objective_and_format_must_agree(rl_recipe, change, message):
    with pytest.raises(JaxtuneError, match=message):
        train(config_from_dict(rl_recipe(name="mismatch", **change)))


def failing_at_step_2(prompts, completions, completion_ids, trainer_state, tag, **kwargs):
    if trainer_state.global_step >= 2 and 7 in tag:
        raise KeyError("score")
    return [0.5] * len(completions)


def test_a_reward_failing_mid_run_ends_with_one_paragraph_and_keeps_the_checkpoint(rl_recipe):
    raw = rl_recipe(trainer={"steps": 4},
                    rl={"rewards": [{"function": "tests.test_rl:failing_at_step_2"}]},
                    checkpoint={"enabled": True, "save_every": 1})
    raw["data"]["eval_sources"] = []
    raw["data"]["shuffle"] = False  # rows 0-3 at step 1, 4-7 at step 2
    raw["run"]["output_dir"] = str(rl_recipe.root / "failing")
    recipe = rl_recipe.root / "failing.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "jaxtune.cli", "train", str(recipe)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert ("reward function 'tests.test_rl:failing_at_step_2' raised KeyError: 'score' (on "
            "the completion of prompt ") in proc.stderr
    assert "prompts.jsonl, row 7)" in proc.stderr
    assert os.listdir(os.path.join(raw["run"]["output_dir"], "checkpoints")) == ["1"]


def test_inspect_data_shows_prompts_as_generated_from(rl_recipe, capsys):
    from jaxtune.data.inspect import inspect_data

    stats = inspect_data(config_from_dict(rl_recipe(name="inspect")), n=1)
    out = capsys.readouterr().out
    assert "prompts.jsonl, row 0" in out and "<|im_start|>user" in out and "tag: 0" in out
    assert stats["prompts"] == 24 and stats["prompt_budget"] == 48 - 12
    assert f"at most {stats['max_prompt_tokens']} (budget" in out
