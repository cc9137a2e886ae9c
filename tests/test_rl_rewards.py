"""Reward functions: the built-ins (DAPO's overlong penalty against TRL's own), loading from the
config, and the errors a bad reward function gets (naming it and the prompt row)."""

from __future__ import annotations

import numpy as np
import pytest

from jaxtune.config import RewardConfig, RLConfig
from jaxtune.rl.advantages import advantages, informative_groups, nanstd
from jaxtune.rl.rewards import (
    RewardError,
    TrainerStateView,
    exact_answer,
    final_number,
    format_match,
    key_facts,
    load_rewards,
    overlong,
    score,
)

STATE = TrainerStateView(3, 10)


def _rl(*rewards, **kw) -> RLConfig:
    return RLConfig(rewards=[RewardConfig(*r) if isinstance(r, tuple) else RewardConfig(r)
                             for r in rewards], **kw)


# --------------------------------------------------------------------------- built-ins


@pytest.mark.parametrize("text,number", [
    ("so 3 + 4 = 7 apples", "7"), ("#### 1,234", "1234"), ("The answer: $12.50.", "12.5"),
    ("12.0 and then #### -3", "-3"), ("no number", None), ("#### 40.00", "40"),
])
def test_final_number(text, number):
    assert final_number(text) == number


def test_exact_answer_gsm8k_style():
    completions = ["She has 5 left.\n#### 5", "#### 6", "the answer is 72", "I don't know"]
    answers = ["Natalia sold 48/2 = 24 ...\n#### 5", "#### 5", "#### 72", "#### 1"]
    assert exact_answer(None, completions, None, answer=answers) == [1.0, 0.0, 1.0, 0.0]
    chat = [[{"role": "assistant", "content": "#### 5"}]]
    assert exact_answer(None, chat, None, answer=["#### 5"]) == [1.0]
    assert exact_answer(None, ["5"], None, answer=[None]) == [None]


def test_format_and_key_facts():
    assert format_match(None, ["x #### 3", "x 3"], None) == [1.0, 0.0]
    assert format_match(None, ["<a>b</a>", "<a>b</a> c"], None, pattern=r"<a>.*</a>",
                        full_match=True) == [1.0, 0.0]
    facts = [["$6", "20%"], ["Sign out", "30 days"], []]
    out = key_facts(None, ["Starter is $6, save 20%", "sign OUT now", "x"], None,
                    key_facts=facts)
    assert out == [1.0, 0.5, None]
    assert key_facts(None, ["sign out"], None, key_facts=[facts[1]],
                     all_or_nothing=True) == [0.0]


def test_overlong_penalty_equals_trls():
    from trl.rewards import get_soft_overlong_punishment

    ids = [[1] * n for n in (0, 5, 12, 15, 16, 17, 20, 30)]
    ours = overlong(None, None, ids, max_length=20, buffer=8)
    assert ours == get_soft_overlong_punishment(20, 8)(completion_ids=ids)
    assert ours[0] == 0.0 and ours[-1] == -1.0 and -1 < ours[4] < 0


# --------------------------------------------------------------------------- advantages


def test_nanstd_is_trls():
    import torch
    from trl.trainer.utils import nanstd as trl_nanstd

    x = np.asarray([[1.0, np.nan, 3.0, 4.0], [2.0, 2.0, np.nan, np.nan],
                    [np.nan, 1.0, np.nan, np.nan]], np.float32)
    np.testing.assert_allclose(nanstd(x, axis=1), trl_nanstd(torch.tensor(x), dim=1).numpy(),
                               rtol=1e-6)


def test_informative_groups_and_unscored_rows():
    r = np.asarray([[1, 0], [1, 0], [0, 1], [np.nan, np.nan], [2, 2], [2, 2]], np.float32)
    # groups of 2: rewards (1, 1) equal, (1, NaN) one scored, (4, 4) equal
    assert informative_groups(r, np.ones(2, np.float32), 2).tolist() == [False, False, False]
    adv, _ = advantages(r, np.ones(2, np.float32), 2, "group")
    assert adv[3] == 0.0  # a completion no function scored has no advantage (TRL)
    r[1, 0] = 3
    assert informative_groups(r, np.ones(2, np.float32), 2).tolist() == [True, False, False]


# --------------------------------------------------------------------------- loading


def good_reward(prompts, completions, completion_ids, **kwargs):
    return [float(len(ids)) for ids in completion_ids]


def reward_with_option(prompts, completions, completion_ids, *, scale, **kwargs):
    return [scale * len(ids) for ids in completion_ids]


def raises_on_second_row(prompts, completions, completion_ids, answer, **kwargs):
    return [float(int(a)) for a in answer]  # "x" cannot be parsed


def wrong_length(prompts, completions, completion_ids, **kwargs):
    return [1.0]


def all_nan(prompts, completions, completion_ids, **kwargs):
    return [float("nan")] * len(completions)


def not_a_number(prompts, completions, completion_ids, **kwargs):
    return ["high"] * len(completions)


def test_load_rewards_binds_options_and_checks_them():
    rewards = load_rewards(_rl("key_facts", ("tests.test_rl_rewards:reward_with_option", 2.0,
                                             {"scale": 0.5}), "overlong",
                               max_completion_length=40))
    assert [r.name for r in rewards] == ["key_facts", "reward_with_option_scale_0.5",
                                         "overlong"]
    assert rewards[1].weight == 2.0
    twice = load_rewards(_rl("key_facts", "key_facts", ("key_facts", 1.0,
                                                        {"all_or_nothing": True})))
    assert [r.name for r in twice] == ["key_facts", "key_facts_2",
                                       "key_facts_all_or_nothing_True"]
    assert rewards[1].fn(None, None, [[1, 2]]) == [1.0]
    assert rewards[2].fn.keywords["max_length"] == 40  # defaults to max_completion_length
    with pytest.raises(RewardError, match=r"overlong: options.buffer \(64\) must be in "
                       r"\(0, max_length=40\]"):
        load_rewards(_rl(("overlong", 1.0, {"max_length": 40, "buffer": 64})))
    with pytest.raises(RewardError, match=r"takes no option\(s\) \['scal'\]"):
        load_rewards(_rl(("tests.test_rl_rewards:reward_with_option", 1.0, {"scal": 1})))


@pytest.mark.parametrize("name,message", [
    ("tests.test_rl_rewards:missing", r"rl.rewards\[0\].function 'tests.test_rl_rewards:missing'"
                                      r" cannot be loaded: .*has no attribute 'missing'"),
    ("no_such_pkg.mod:fn", r"cannot be loaded: Import path 'no_such_pkg.mod:fn': .*no_such_pkg"),
    ("key_fact", r"is 'key_fact', which is neither a built-in reward \(exact_answer, format, "
                 r"key_facts, overlong\)"),
])
def test_a_reward_that_cannot_be_loaded_is_named(name, message):
    with pytest.raises(RewardError, match=message):
        load_rewards(_rl(name))


def _score(fn_name, answers=("1", "x", "3")):
    rewards = load_rewards(_rl(f"tests.test_rl_rewards:{fn_name}"))
    n = len(answers)
    return score(rewards, ["p"] * n, ["c"] * n, [[1, 2]] * n, {"answer": list(answers)},
                 [f"prompts.jsonl, row {i}" for i in range(n)], STATE)


def test_score_collects_rewards_with_none_as_nan():
    rewards = load_rewards(_rl("tests.test_rl_rewards:good_reward", "key_facts"))
    out = score(rewards, ["p", "q"], ["has $6", "no"], [[1], [1, 2]],
                {"key_facts": [["$6"], []]}, ["f, row 0", "f, row 1"], STATE)
    assert out.shape == (2, 2) and out[1, 0] == 2.0 and np.isnan(out[1, 1])


@pytest.mark.parametrize("fn,message", [
    ("raises_on_second_row", r"reward function 'tests.test_rl_rewards:raises_on_second_row' "
                             r"raised ValueError: .*on the completion of prompt prompts.jsonl, "
                             r"row 1\)"),
    ("wrong_length", r"returned 1 rewards for 3 completions \(prompts from prompts.jsonl, row 0"),
    ("all_nan", r"gave no number \(NaN or None\) for any of the 3 completions"),
    ("not_a_number", r"returned 'high' for completion 0 \(prompt prompts.jsonl, row 0\)"),
])
def test_a_failing_reward_names_the_function_and_the_row(fn, message):
    with pytest.raises(RewardError, match=message):
        _score(fn)


# --------------------------------------------------------------------------- example data


def _generator(folder: str, module: str):
    """An example folder's generator script, loaded from its file (two folders each have a
    ``generate.py``; their sibling imports resolve in the folder)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / folder
    spec = importlib.util.spec_from_file_location(f"examples_{folder}_{module}",
                                                  path / f"{module}.py")
    loaded = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path))
    try:
        spec.loader.exec_module(loaded)
    finally:
        sys.path.remove(str(path))
    return path, loaded


def test_support_prompts_are_fresh_and_the_eval_ones_are_the_reports():
    """examples/support/prompts*.jsonl are generate_prompts.py's output; the eval prompts are
    the report's 80 held-out questions with their key phrases; no training wording is held out."""
    import json

    support, gen = _generator("support", "generate_prompts")
    train, evals = gen.build()
    for name, rows in (("prompts.jsonl", train), ("prompts_eval.jsonl", evals)):
        lines = (support / name).read_text().splitlines()
        assert [json.loads(line) for line in lines] == rows, (
            f"examples/support/{name} is stale: run python examples/support/generate_prompts.py")
    spec = json.loads((support / "questions.json").read_text())
    assert [r["prompt"][-1]["content"] for r in evals] == [q["question"] for q in
                                                           spec["held_out"]]
    assert all(r["key_facts"] for r in train + evals) and len(train) == 400
    assert not {r["prompt"][-1]["content"] for r in train} & {r["prompt"][-1]["content"]
                                                            for r in evals}


def test_gsm8k_shaped_files_are_fresh_and_their_answers_score_1(tmp_path):
    import json

    folder, gen = _generator("gsm8k", "generate")
    gen.main(["--out", str(tmp_path)])
    for name in ("train.jsonl", "test.jsonl"):
        assert (folder / name).read_bytes() == (tmp_path / name).read_bytes(), (
            f"examples/gsm8k/{name} is stale: run python examples/gsm8k/generate.py")
    rows = [json.loads(line) for line in (folder / "test.jsonl").read_text().splitlines()]
    answers = [r["answer"] for r in rows]
    assert exact_answer(None, answers, None, answer=answers) == [1.0] * len(rows)
    assert format_match(None, answers, None) == [1.0] * len(rows)
    train = {json.loads(line)["question"] for line in (folder / "train.jsonl").open()}
    assert not train & {r["question"] for r in rows}
