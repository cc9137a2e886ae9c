"""GRPO on a (2,2,2) mesh: a rollout batch split by rows over devices and micro-batches gives
the same loss, metrics and gradients as on one device at once (the global normalisers), and
a whole RL run generates its rollouts on the training mesh."""

import jax
import numpy as np
import pytest

from jaxtune.config import RLConfig, TrainConfig, TrainerConfig, config_from_dict
from jaxtune.objectives import make_objective
from jaxtune.rl.rollout import Completion, rollout_arrays
from tests.train_helpers import make_stepper, params_numpy, put


def _rollout_batch(vocab: int = 389, rows: int = 16, width: int = 10) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, vocab, rng.integers(2, 9)).tolist() for _ in range(rows)]
    completions = [Completion(rng.integers(3, vocab, n).tolist(), [0.0] * n, bool(n % 2))
                   for n in rng.integers(1, width + 1, rows)]
    batch = rollout_arrays(prompts, completions, prompt_width=12, completion_width=width,
                           pad_id=0)
    batch.pop("sampler_logps")
    batch["advantages"] = rng.normal(size=rows).astype(np.float32)
    # stored log-probs a little off the model's, so ratios leave 1 and clip
    batch["old_logps"] = (-5.0 + 0.3 * rng.normal(size=(rows, width))).astype(np.float32)
    batch["ref_logps"] = (-5.0 + 0.3 * rng.normal(size=(rows, width))).astype(np.float32)
    batch["num_completion_tokens"] = np.float32(batch["completion_mask"].sum())
    batch["num_sequences"] = np.float32(rows)
    return batch


def _two_steps(model_dir, sizes, accum, loss_type):
    cfg = TrainConfig(trainer=TrainerConfig(objective="grpo", loss_chunk_size=8),
                      rl=RLConfig(loss_type=loss_type, beta=0.04, max_completion_length=10,
                                  temperature=0.8))
    state, fn, mesh = make_stepper(model_dir, sizes, grad_accum_steps=accum, optimizer="sgd",
                                   lr=0.5, loss_fn=make_objective(cfg))
    batch = _rollout_batch()
    for _ in range(2):
        before = params_numpy(state)
        state, metrics = fn(state, put(batch, mesh))
    after = params_numpy(state)
    return jax.device_get(metrics), {k: before[k] - after[k] for k in before}


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_grpo_accumulates_exactly_on_a_mesh(tiny_hf_model, loss_type):
    """4 micro-batches of 4 rows over a (2,2,2) mesh == the 16 rows at once on one device."""
    path = tiny_hf_model("llama")
    ref_m, ref_g = _two_steps(path, (1, 1, 1), 1, loss_type)
    m, g = _two_steps(path, (2, 2, 2), 4, loss_type)
    assert ref_m["clip_ratio/region_mean"] > 0  # the ratios left the clip range
    for k in ("loss", "kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean",
              "ratio/deviation_max"):
        np.testing.assert_allclose(m[k], ref_m[k], rtol=1e-5, atol=1e-6, err_msg=k)
    for k in ref_g:
        np.testing.assert_allclose(g[k], ref_g[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_an_rl_run_generates_on_the_training_mesh(tmp_path, tiny_hf_model, data_tokenizers):
    """LoRA GRPO with data x fsdp x tensor = 2 x 2 x 2: the generator reads the sharded
    parameters the step updates; on-policy the ratio is 1 and the sampler agrees."""
    from jaxtune.trainer import train
    from tests.fixtures_data import write_jsonl
    from tests.test_rl import prompt_rows

    prompts = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(12, seed=4))
    cfg = config_from_dict({
        "run": {"output_dir": str(tmp_path / "run"), "seed": 1},
        "model": {"path": str(tiny_hf_model("llama")), "tokenizer": data_tokenizers["chatml"]},
        "data": {"format": "prompt", "sources": [{"path": prompts}], "seq_len": 48,
                 "cache_dir": str(tmp_path / "cache")},
        "mesh": {"data": 2, "fsdp": 2, "tensor": 2},
        "lora": {"rank": 4},
        "trainer": {"objective": "grpo", "steps": 2, "global_batch_size": 8,
                    "grad_accum_steps": 2, "progress": False},
        "rl": {"num_generations": 4, "max_completion_length": 8,
               "rewards": [{"function": "tests.test_rl:band_share"}]},
        "checkpoint": {"enabled": False},
        "logging": {"tensorboard": False},
    })
    result = train(cfg)
    for h in result.history:
        assert h["ratio/deviation_max"] == 0.0
        assert h["sampling/logp_diff_max"] <= 1e-5
    leaf = jax.tree.leaves(result.state.params)[0]
    assert len(leaf.sharding.device_set) == 8
