"""GRPO and its variants against TRL's own ``GRPOTrainer`` on fixed rollouts.

TRL scores the rollouts itself: its ``_generate`` is replaced by one returning our fixed prompt
and completion ids, so its masks, rewards (the same reward functions, with a ``None``), group
advantages, old log-probs (``num_iterations`` 2, before the weights move) and reference
log-probs (``beta`` > 0) all come from TRL's code. Its ``_compute_loss`` then gives the loss,
gradients and metrics after the policy moved to other weights; jaxtune's loss on the same rows,
weights and advantages must match within 1e-5 (float32), for every ``loss_type`` x
``importance_sampling_level`` x ``beta`` x ``scale_rewards``, with ``num_iterations`` 1 and 2.
The model's forward is compiled once: each case differentiates the loss formula on the
completion log-probs and pulls the gradient back through one compiled VJP (as the preference
tests do); one case runs the whole ``grpo_loss`` to tie the two together.
"""

from __future__ import annotations

import copy
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtune.objectives.grpo import (
    GRPOSettings,
    _denominator,
    completion_logps,
    grpo_loss,
    grpo_objective,
)
from jaxtune.rl.advantages import advantages
from jaxtune.rl.rollout import Completion, rollout_arrays
from jaxtune.weights import from_pretrained
from tests.fixtures_models import TINY_VARIANTS, make_tiny_hf_model
from tests.test_preference import _close, _hf_model, _jax_grads, _torch_grads

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")

G, C, TEMPERATURE = 4, 10, 0.7  # generations per prompt, max completion length


def reward_sum(prompts, completions, completion_ids, **kwargs):
    return [(sum(ids) % 7) / 3.0 for ids in completion_ids]


def reward_sometimes(prompts, completions, completion_ids, **kwargs):
    """None (does not apply) for some completions, as TRL allows."""
    return [None if len(ids) % 3 == 0 else 0.1 * len(ids) for ids in completion_ids]


WEIGHTS = np.asarray([1.0, 0.5], np.float32)


def _rollouts(eos: int, vocab: int):
    """3 prompts x 4 completions of fixed random ids: stopped ones end with EOS, some are cut
    at C; one group has equal rewards in its first function (zero std only with scale)."""
    rng = np.random.default_rng(3)
    prompts, completions = [], []
    for _ in range(3):
        prompt = rng.integers(3, vocab, rng.integers(3, 10)).tolist()
        for g in range(G):
            n = int(rng.integers(1, C + 1))
            ids = rng.integers(3, vocab, n).tolist()
            stopped = g % 2 == 0 or n < 4
            if stopped:
                ids[-1] = eos
            prompts.append(prompt)
            completions.append(Completion(ids, [0.0] * n, stopped))
    return prompts, completions


@pytest.fixture(scope="module")
def setup(tmp_path_factory, data_tokenizers):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("grpo")
    _, overrides = TINY_VARIANTS["llama"]
    old_dir = make_tiny_hf_model("llama", root / "old", seed=0, **overrides)  # generated with
    new_dir = make_tiny_hf_model("llama", root / "new", seed=1, **overrides)  # after a step
    tok = AutoTokenizer.from_pretrained(data_tokenizers["chatml"])
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    prompts, completions = _rollouts(eos, 389)
    return dict(old=old_dir, new=new_dir, tok=tok, eos=eos, prompts=prompts,
                completions=completions, pad=tok.pad_token_id)


@pytest.fixture(scope="module")
def trl_trainer(setup, tmp_path_factory):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), report_to=[],
                      use_cpu=True, bf16=False, per_device_train_batch_size=3 * G,
                      num_generations=G, max_completion_length=C, temperature=TEMPERATURE,
                      beta=0.04)  # builds the reference model; beta is set per case below
    ds = Dataset.from_list([{"prompt": "x"}] * (3 * G))
    trainer = GRPOTrainer(model=_hf_model(setup["old"]), args=args, train_dataset=ds,
                          reward_funcs=[reward_sum, reward_sometimes],
                          processing_class=setup["tok"])
    trainer.reward_weights = torch.tensor(WEIGHTS)
    trainer.current_gradient_accumulation_steps = 1
    completions = setup["completions"]

    def fixed_generate(prompts):
        ids = [c.ids for c in completions]
        texts = setup["tok"].batch_decode(ids, skip_special_tokens=True)
        return ([list(p) for p in setup["prompts"]], ids, None, texts, None, {}, None, [])

    trainer._generate = fixed_generate
    trainer.old_state = copy.deepcopy(trainer.model.state_dict())
    trainer.new_state = _hf_model(setup["new"]).state_dict()
    return trainer


def trl_case(trainer, *, loss_type, level, beta, scale, mu, mask_truncated=False):
    """TRL's rollout outputs, loss, gradients and metrics for one setting."""
    t = trainer
    t.loss_type, t.importance_sampling_level, t.beta = loss_type, level, beta
    t.scale_rewards, t.num_iterations, t.mask_truncated_completions = scale, mu, mask_truncated
    t.model.load_state_dict(t.old_state)
    t.model.train()
    t._metrics["train"].clear()
    out = t._generate_and_score_completions([{"prompt": "x"}] * (3 * G))
    t.model.load_state_dict(t.new_state)  # the policy moved: ratios differ from 1 (mu 2)
    t.model.zero_grad()
    loss = t._compute_loss(t.model, out)
    loss.backward()
    metrics = {k: v[-1] for k, v in t._metrics["train"].items() if v}
    return out, float(loss), _torch_grads(t.model), metrics


@pytest.fixture(scope="module")
def ours(setup):
    """jaxtune's side: the rows, the old / reference log-probs at the old weights, and the new
    weights' completion log-probs with one compiled VJP."""
    old_model, new_model = from_pretrained(setup["old"]), from_pretrained(setup["new"])
    host = rollout_arrays(setup["prompts"], setup["completions"], prompt_width=12,
                          completion_width=C, pad_id=setup["pad"])
    masks = {flag: rollout_arrays(setup["prompts"], setup["completions"], prompt_width=12,
                                  completion_width=C, pad_id=setup["pad"],
                                  mask_truncated=flag)["completion_mask"]
             for flag in (False, True)}
    rows = {k: jnp.asarray(host[k]) for k in ("input_ids", "positions", "segment_ids")}
    rows["completion_mask"] = jnp.asarray(host["completion_mask"])
    kw = dict(temperature=TEMPERATURE, chunk_size=16)
    old_logps = jax.jit(lambda r: completion_logps(old_model, r, **kw)[0])(rows)
    graphdef, params, rest = nnx.split(new_model, nnx.Param, ...)

    @jax.jit
    def forward(p, ct):
        def f(p):
            logps, entropy, _ = completion_logps(nnx.merge(graphdef, p, rest), rows, **kw)
            return logps, entropy

        logps, pull, entropy = jax.vjp(f, p, has_aux=True)
        return logps, entropy, pull(ct)[0]

    logps, entropy, _ = forward(params, jnp.zeros((len(host["input_ids"]), C), jnp.float32))
    ids = [c.ids for c in setup["completions"]]
    rewards = np.stack([np.asarray([np.nan if r is None else r for r in fn(None, None, ids)],
                                   np.float32) for fn in (reward_sum, reward_sometimes)], 1)
    return dict(rows=rows, masks=masks, old=old_logps, logps=logps, entropy=entropy,
                forward=forward, params=params, rewards=rewards, model=new_model)


def our_case(ours, *, loss_type, level, beta, scale, mu, mask_truncated=False,
             bias_correction=True):
    adv, _ = advantages(ours["rewards"], WEIGHTS, G, scale)
    s = GRPOSettings(loss_type, level, 0.2, None, None, beta, TEMPERATURE, C, bias_correction)
    mask = jnp.asarray(ours["masks"][mask_truncated])
    batch = {**ours["rows"], "completion_mask": mask, "advantages": jnp.asarray(adv),
             "num_completion_tokens": mask.sum(), "num_sequences": jnp.float32(len(adv))}
    if mu > 1:
        batch["old_logps"] = ours["old"]
    if beta:
        batch["ref_logps"] = ours["old"]  # the reference is the model before training
    batch["loss_denominator"] = _denominator(batch, s)

    def f(logps):
        return grpo_objective(logps, ours["entropy"], batch, s)

    (loss, aux), ct = jax.value_and_grad(f, has_aux=True)(ours["logps"])
    grads = _jax_grads(ours["forward"](ours["params"], ct)[2])
    return adv, float(loss), grads, jax.device_get(aux), batch, s


CASES = list(itertools.product(["grpo", "bnpo", "dr_grpo", "dapo"], ["token", "sequence"],
                               [0.0, 0.04], ["group", "batch", "none"], [1, 2]))


@pytest.mark.parametrize("loss_type,level,beta,scale,mu", CASES)
def test_loss_gradients_and_advantages_match_trl(trl_trainer, ours, loss_type, level, beta,
                                                 scale, mu):
    case = dict(loss_type=loss_type, level=level, beta=beta, scale=scale, mu=mu)
    out, trl_loss, trl_grads, trl_metrics = trl_case(trl_trainer, **case)
    adv, loss, grads, aux, _, _ = our_case(ours, **case)
    np.testing.assert_allclose(adv, out["advantages"].numpy(), rtol=1e-6, atol=1e-6)
    assert loss == pytest.approx(trl_loss, rel=1e-5, abs=1e-6)
    _close(grads, trl_grads, f"{case}")
    if beta:
        assert float(aux["kl"]) == pytest.approx(trl_metrics["kl"], rel=1e-4, abs=1e-7)
    for k in ("entropy", "clip_ratio/low_mean", "clip_ratio/high_mean",
              "clip_ratio/region_mean"):
        assert float(aux[k]) == pytest.approx(trl_metrics[k], rel=1e-4, abs=1e-6), k


def test_old_and_reference_logps_are_trls(trl_trainer, ours):
    out, *_ = trl_case(trl_trainer, loss_type="dapo", level="token", beta=0.04, scale="group",
                       mu=2)
    mask = out["completion_mask"].numpy().astype(bool)
    width = mask.shape[1]
    for key in ("old_per_token_logps", "ref_per_token_logps"):
        np.testing.assert_allclose(np.asarray(ours["old"])[:, :width][mask],
                                   out[key].numpy()[mask], atol=1e-5, err_msg=key)
    assert (ours["masks"][False][:, :width] == mask).all()


def test_truncated_completions_masked_as_trl(trl_trainer, ours):
    case = dict(loss_type="dapo", level="token", beta=0.0, scale="group", mu=1,
                mask_truncated=True)
    out, trl_loss, trl_grads, _ = trl_case(trl_trainer, **case)
    _, loss, grads, _, _, _ = our_case(ours, **case)
    width = out["completion_mask"].shape[1]
    assert (ours["masks"][True][:, :width] == out["completion_mask"].numpy()).all()
    assert ours["masks"][True].sum() < ours["masks"][False].sum()
    assert loss == pytest.approx(trl_loss, rel=1e-5, abs=1e-6)
    _close(grads, trl_grads, "mask_truncated_completions")


def test_clip_higher_and_two_sided_clip(trl_trainer, ours):
    """epsilon_high and delta, with num_iterations 2 so the ratios move."""
    t = trl_trainer
    t.epsilon_high, t.args.delta = 0.28, 1.5
    try:
        out, trl_loss, trl_grads, trl_metrics = trl_case(
            t, loss_type="dapo", level="token", beta=0.0, scale="group", mu=2)
    finally:
        t.epsilon_high, t.args.delta = 0.2, None
    adv, _ = advantages(ours["rewards"], WEIGHTS, G, "group")
    s = GRPOSettings("dapo", "token", 0.2, 0.28, 1.5, 0.0, TEMPERATURE, C)
    _, _, _, _, batch, _ = our_case(ours, loss_type="dapo", level="token", beta=0.0,
                                    scale="group", mu=2)

    def f(logps):
        return grpo_objective(logps, ours["entropy"], batch, s)

    (loss, aux), ct = jax.value_and_grad(f, has_aux=True)(ours["logps"])
    assert float(loss) == pytest.approx(trl_loss, rel=1e-5, abs=1e-6)
    _close(_jax_grads(ours["forward"](ours["params"], ct)[2]), trl_grads, "clip-higher")
    assert float(aux["clip_ratio/high_mean"]) == pytest.approx(
        trl_metrics["clip_ratio/high_mean"], abs=1e-6)


def test_the_whole_loss_equals_its_formula_on_the_model(ours):
    """grpo_loss (the model's forward inside) equals the formula on the compiled log-probs."""
    _, loss, _, aux, batch, s = our_case(ours, loss_type="grpo", level="sequence", beta=0.04,
                                         scale="group", mu=2)
    whole, whole_aux = jax.jit(lambda b: grpo_loss(ours["model"], b, settings=s,
                                                   chunk_size=7))(batch)
    assert float(whole) == pytest.approx(loss, rel=1e-6, abs=1e-7)
    assert float(whole_aux["kl"]) == pytest.approx(float(aux["kl"]), rel=1e-5)


def test_the_ratio_is_exactly_one_on_policy(ours):
    """num_iterations 1: old log-probs are the current ones, so every ratio is 1 exactly."""
    *_, aux, _, _ = our_case(ours, loss_type="dapo", level="token", beta=0.0, scale="group",
                             mu=1)
    assert float(aux["ratio/deviation_max"]) == 0.0
    assert float(aux["clip_ratio/region_mean"]) == 0.0


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_kl_without_bias_correction(trl_trainer, ours, level):
    """use_bias_correction_kl (TRL's default True) off: the plain k3 gradient."""
    t = trl_trainer
    t.args.use_bias_correction_kl = False
    try:
        case = dict(loss_type="dapo", level=level, beta=0.04, scale="group", mu=2)
        _, trl_loss, trl_grads, trl_metrics = trl_case(t, **case)
    finally:
        t.args.use_bias_correction_kl = True
    _, loss, grads, aux, _, _ = our_case(ours, **case, bias_correction=False)
    assert loss == pytest.approx(trl_loss, rel=1e-5, abs=1e-6)
    _close(grads, trl_grads, "no bias correction")
    assert float(aux["kl"]) == pytest.approx(trl_metrics["kl"], rel=1e-4, abs=1e-7)
