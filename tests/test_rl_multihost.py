"""GRPO in two real processes on loopback against one process, through the CLI.

A: one process with 8 fake CPU devices, (data 2, fsdp 2, tensor 2). B: two processes with 4
devices each, the same mesh built the multi-slice way (data across the processes). Every
process generates the whole global batch's rollouts SPMD on the training mesh (no weight sync,
no separate sampler), each scores its share of the rows and the rewards are gathered. The
per-step rewards (so the rollouts) and losses of B's processes must equal A's.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import yaml

from tests.fixtures_data import write_jsonl
from tests.test_multihost_e2e import MESH_1P, MESH_2P, finish, free_port, start
from tests.test_rl import prompt_rows


def _rewards(text: str) -> dict[int, float]:
    """Each step's mean reward from the run's metrics lines (``step N | ... | reward R``)."""
    out = {}
    for line in text.splitlines():
        found = re.search(r"step (\d+) \|.* \| reward (-?[\d.]+(?:e-?\d+)?) ", line + " ")
        if found:
            out[int(found.group(1))] = float(found.group(2))
    return out


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_hf_model, data_tokenizers):
    root = tmp_path_factory.mktemp("rl_multihost")
    prompts = write_jsonl(root / "prompts.jsonl", prompt_rows(24, seed=9))
    cfg = {
        "run": {"name": "rl-multihost", "seed": 4},
        "model": {"path": str(tiny_hf_model("llama")), "tokenizer": data_tokenizers["chatml"]},
        "data": {"format": "prompt", "sources": [{"path": prompts}], "seq_len": 48,
                 "cache_dir": str(root / "cache")},
        "optimizer": {"learning_rate": 1e-2, "schedule": "constant"},
        "trainer": {"objective": "grpo", "steps": 3, "global_batch_size": 16,
                    "grad_accum_steps": 2, "progress": False},
        "rl": {"num_generations": 4, "max_completion_length": 10, "beta": 0.04,
               "rewards": [{"function": "tests.test_rl:band_share"}]},
        "checkpoint": {"enabled": False},
        "logging": {"tensorboard": False},
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return root, str(path)


@pytest.mark.slow
def test_two_processes_generate_score_and_train_as_one(recipe):
    root, path = recipe
    one = finish([start(path, str(root / "a"), 8, MESH_1P)])[0]
    assert one["rc"] == 0, one["out"][-4000:]
    port = free_port()
    two = finish([
        start(path, str(root / "b"), 4, [
            *MESH_2P, "--distributed.initialize=explicit",
            f"--distributed.coordinator_address=127.0.0.1:{port}",
            "--distributed.num_processes=2", f"--distributed.process_id={i}",
            "--distributed.timeout_seconds=600"])
        for i in range(2)])
    for r in two:
        assert r["rc"] == 0, r["out"][-4000:]
    assert [r["pids"] for r in two] == [{0}, {1}]
    want_loss = [one["losses"][s] for s in (1, 2, 3)]
    rewards = _rewards(one["out"])
    assert sorted(rewards) == [1, 2, 3], one["out"][-3000:]
    # Process 0 logs the job; the rollouts (so the rewards) are the one-process run's.
    assert _rewards(two[0]["out"]) == rewards
    for r in two:
        np.testing.assert_allclose([r["losses"][s] for s in (1, 2, 3)], want_loss, rtol=2e-5,
                                   atol=1e-7)
