"""Preference tuning: DPO / ORPO / SimPO against TRL on the same weights and tokens, the pair
data format, accumulation, the LoRA reference, precomputed reference log-probs, bad rows."""

from __future__ import annotations

import copy
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtune.config import PreferenceConfig, TrainerConfig
from jaxtune.data.errors import BadRowError
from jaxtune.objectives import make_objective, reference_available
from jaxtune.objectives.preference import (
    dpo_loss,
    dpo_terms,
    orpo_loss,
    orpo_terms,
    sequence_logps,
    simpo_loss,
    simpo_terms,
)
from jaxtune.weights import from_pretrained

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")


# --------------------------------------------------------------------------- helpers


def _torch_inputs(setup):
    """TRL's padded batch ([chosen rows; rejected rows]) holding exactly our tokens."""
    from jaxtune.data.preference import pair_tokens

    data = setup["data"]
    seqs = [pair_tokens(data, d, side) for side in ("chosen", "rejected")
            for d in range(len(data.docs))]
    n = max(len(t) for t, _ in seqs)
    ids = np.zeros((len(seqs), n), np.int64)
    attn = np.zeros((len(seqs), n), np.int64)
    comp = np.zeros((len(seqs), n), np.int64)
    for i, (t, tr) in enumerate(seqs):
        ids[i, :len(t)], attn[i, :len(t)], comp[i, :len(t)] = t, 1, tr
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(attn),
            "completion_mask": torch.tensor(comp)}


def _hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _torch_grads(model) -> dict[str, np.ndarray]:
    """A few gradients in jaxtune's layout (lm_head, embedding, a q and a down projection)."""
    p = dict(model.named_parameters())
    g = {k: v.grad.detach().numpy() for k, v in p.items() if v.grad is not None}
    return {
        "lm_head": g["lm_head.weight"].T,
        "embed": g["model.embed_tokens.weight"],
        "q_proj": g["model.layers.0.self_attn.q_proj.weight"].T.reshape(72, 6, 12),
        "down_proj": g["model.layers.1.mlp.down_proj.weight"].T,
    }


def _jax_grads(grads) -> dict[str, np.ndarray]:
    flat = {tuple(k): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(grads)}
    return {
        "lm_head": flat[("lm_head", "kernel")],
        "embed": flat[("model", "embed_tokens", "embedding")],
        "q_proj": flat[("model", "layers", 0, "self_attn", "q_proj", "kernel")],
        "down_proj": flat[("model", "layers", 1, "mlp", "down_proj", "kernel")],
    }


def _value_and_grad(model, loss_fn, batch, reference=None):
    """Jitted loss, aux and gradients of ``loss_fn`` at ``model``'s weights."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def run(p, batch):
        def f(p):
            return loss_fn(nnx.merge(graphdef, p, rest), batch)

        with reference_available(reference):
            return jax.value_and_grad(f, has_aux=True)(p)

    (loss, aux), grads = run(params, batch)
    return float(loss), jax.device_get(aux), _jax_grads(grads)


def _close(ours, theirs, what):
    for k in theirs:  # float32: 1e-5 of the gradient's scale (summation orders differ)
        scale = max(1.0, float(np.abs(theirs[k]).max()))
        np.testing.assert_allclose(ours[k], theirs[k], rtol=1e-5, atol=1e-5 * scale,
                                   err_msg=f"{what}: {k}")


@pytest.fixture(scope="module")
def models(preference_setup):
    return (from_pretrained(preference_setup["policy"]),
            from_pretrained(preference_setup["reference"]))


@pytest.fixture(scope="module")
def jbatch(preference_setup):
    return {k: jnp.asarray(v) for k, v in preference_setup["batch"].items()}


@pytest.fixture(scope="module")
def logps_vjp(models, jbatch):
    """``ours(terms) -> (loss, grads)``: the policy's summed log-probs and their pullback,
    jitted once, so every loss formula (``jaxtune.objectives.preference.*_terms``) is checked
    with its gradient through the model without compiling the model again."""
    policy, reference = models
    graphdef, params, rest = nnx.split(policy, nnx.Param, ...)

    @jax.jit
    def run(p, ct):
        def f(p):
            logps, tokens = sequence_logps(nnx.merge(graphdef, p, rest), jbatch, 48)
            return logps, tokens

        logps, pull, tokens = jax.vjp(f, p, has_aux=True)
        return logps, tokens, pull(ct)[0]

    zeros = jnp.zeros((8, 2), jnp.float32)
    logps, tokens, _ = run(params, zeros)
    ref, _, _ = run(nnx.state(reference, nnx.Param), zeros)

    def ours(terms):
        loss, ct = jax.value_and_grad(lambda lp: terms(lp, ref, tokens)[0].mean())(logps)
        return float(loss), _jax_grads(run(params, ct)[2])

    ours.logps = logps
    return ours


@pytest.fixture(scope="module")
def dpo_trainer(preference_setup, tmp_path_factory):
    """TRL's DPOTrainer on the same weights (policy and a distinct reference)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    ds = Dataset.from_list([{"prompt": "a", "chosen": " b", "rejected": " c"}] * 2)
    args = DPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), report_to=[],
                     use_cpu=True, bf16=False, beta=0.1, per_device_train_batch_size=2)
    return DPOTrainer(model=_hf_model(preference_setup["policy"]),
                      ref_model=_hf_model(preference_setup["reference"]), args=args,
                      train_dataset=ds, processing_class=preference_setup["tokenizer"])


# --------------------------------------------------------------------------- vs TRL


@pytest.mark.parametrize("loss_type,smoothing", [("sigmoid", 0.0), ("ipo", 0.0),
                                                 ("hinge", 0.0), ("robust", 0.2)])
def test_dpo_matches_trl(preference_setup, models, jbatch, logps_vjp, dpo_trainer, loss_type,
                         smoothing):
    tr = dpo_trainer
    tr.loss_types, tr.loss_weights, tr.label_smoothing = [loss_type], [1.0], smoothing
    tr.model.zero_grad()
    mode = "train" if tr.model.training else "eval"
    tr._metrics[mode].clear()
    theirs = tr._compute_loss(tr.model, _torch_inputs(preference_setup), False)
    theirs.backward()
    assert abs(float(theirs.detach()) - 0.6931) > 1e-3  # the reference differs from the policy
    if loss_type == "sigmoid":  # the whole objective, reference model included
        loss, aux, grads = _value_and_grad(
            models[0], lambda m, b: dpo_loss(m, b, beta=0.1, chunk_size=48), jbatch,
            reference=models[1])
        m = tr._metrics[mode]
        for ours, key in [("rewards/chosen", "rewards/chosen"),
                          ("rewards/margin", "rewards/margins"),
                          ("rewards/accuracy", "rewards/accuracies"),
                          ("logps/chosen", "logps/chosen"), ("logps/rejected", "logps/rejected")]:
            np.testing.assert_allclose(aux[ours], m[key][-1], rtol=1e-5, atol=1e-5, err_msg=ours)
    else:
        loss, grads = logps_vjp(lambda lp, ref, n: dpo_terms(
            lp, ref, n, beta=0.1, loss_type=loss_type, label_smoothing=smoothing))
    np.testing.assert_allclose(loss, float(theirs.detach()), rtol=1e-5, atol=1e-5)
    _close(grads, _torch_grads(tr.model), f"dpo {loss_type}")


def _trl_logps(model, inputs, average: bool):
    """TRL ORPO/CPO ``get_batch_logps`` of chosen and rejected from the HF logits."""
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    logps = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=average)
    return logps.chunk(2)


def test_orpo_matches_trl(preference_setup, logps_vjp):
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    model = _hf_model(preference_setup["policy"])
    inputs = _torch_inputs(preference_setup)
    chosen, rejected = _trl_logps(model, inputs, average=True)
    fake = types.SimpleNamespace(beta=0.25, accelerator=types.SimpleNamespace(device="cpu"))
    losses, *_ = ORPOTrainer.odds_ratio_loss(fake, chosen, rejected)
    theirs = (-chosen).mean() - losses.mean()  # NLL on the chosen completion, as the paper
    theirs.backward()
    loss, grads = logps_vjp(lambda lp, ref, n: orpo_terms(lp, n, beta=0.25))
    np.testing.assert_allclose(loss, float(theirs.detach()), rtol=1e-5, atol=1e-5)
    _close(grads, _torch_grads(model), "orpo")
    # the summed log-probs, as TRL computes them from the full logits
    sums_c, sums_r = _trl_logps(model, inputs, average=False)
    ours = np.asarray(logps_vjp.logps)
    np.testing.assert_allclose(ours[:, 0], sums_c.detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours[:, 1], sums_r.detach().numpy(), rtol=1e-5, atol=1e-5)


def test_simpo_matches_trl_cpo(preference_setup, logps_vjp):
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    model = _hf_model(preference_setup["policy"])
    chosen, rejected = _trl_logps(model, _torch_inputs(preference_setup), average=True)
    fake = types.SimpleNamespace(beta=2.0, simpo_gamma=0.7, label_smoothing=0.1,
                                 loss_type="simpo", alpha=0.0,
                                 accelerator=types.SimpleNamespace(device="cpu"))
    losses, *_ = CPOTrainer.cpo_loss(fake, chosen, rejected)
    losses.mean().backward()
    loss, grads = logps_vjp(lambda lp, ref, n: simpo_terms(lp, n, beta=2.0, gamma=0.7,
                                                           label_smoothing=0.1))
    np.testing.assert_allclose(loss, float(losses.mean().detach()), rtol=1e-5, atol=1e-5)
    _close(grads, _torch_grads(model), "simpo")


def test_objectives_bind_their_settings():
    """trainer.preference reaches the registered losses; ORPO and SimPO need no reference."""
    pref = PreferenceConfig(beta=0.3, loss_type="ipo", gamma=0.9, label_smoothing=0.0)
    for name, fn, want in (("dpo", dpo_loss, {"beta": 0.3, "loss_type": "ipo"}),
                           ("orpo", orpo_loss, {"beta": 0.3}),
                           ("simpo", simpo_loss, {"beta": 0.3, "gamma": 0.9})):
        objective = make_objective(TrainerConfig(objective=name, loss_chunk_size=48,
                                                 preference=pref))
        assert objective.loss.func is fn and objective.data_formats == ("preference",)
        assert {k: objective.loss.keywords[k] for k in want} == want
        assert objective.needs_reference == (name == "dpo")
    pre = _dpo_objective(precompute_reference=True)
    assert not pre.needs_reference and pre.prepare is not None
    assert "reference_chosen_logps" in pre.batch_axes


# --------------------------------------------------------------------------- seams


def _dpo_objective(**pref):
    return make_objective(TrainerConfig(objective="dpo", loss_chunk_size=48,
                                        preference=PreferenceConfig(**pref)))


# Accumulation invariance (grad_accum_steps 4 on a (2,2,2) mesh vs 1 on one device) is
# tests/multidevice/test_preference_sharded.py.


def test_lora_reference_is_the_base_exactly(preference_setup, jbatch):
    from jaxtune.config import LoraConfig
    from jaxtune.lora import apply_lora
    from jaxtune.objectives import reference_model

    base = from_pretrained(preference_setup["policy"])
    want, _ = sequence_logps(base, jbatch, 48)
    model, trainable = apply_lora(from_pretrained(preference_setup["policy"]),
                                  LoraConfig(rank=4, alpha=8.0), seed=0)
    adapters = nnx.state(model, trainable)
    nnx.update(model, jax.tree.map(lambda x: x + 0.05, adapters))  # B != 0: adapters act
    with_adapters, _ = sequence_logps(model, jbatch, 48)
    assert np.abs(np.asarray(with_adapters - want)).max() > 1e-3
    with reference_model(model) as ref:
        got, _ = sequence_logps(ref, jbatch, 48)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("packing", [False, True], ids=["pair_rows", "packed"])
def test_precomputed_reference_gives_the_same_trajectory(preference_setup, tmp_path, packing):
    """Reference log-probs precomputed once (per pair, from the packed rows' slots when
    packing) train exactly like the reference model run in every step."""
    from jaxtune.config import config_from_dict, config_to_dict
    from jaxtune.trainer import Trainer

    raw = config_to_dict(preference_setup["cfg"])
    raw["model"]["path"] = str(preference_setup["policy"])
    if packing:  # rows of 2 x 100 positions hold 2-3 pairs
        raw["data"].update(packing=True, seq_len=100, cache_dir=str(tmp_path / "cache"))
    raw["trainer"].update(objective="dpo", steps=2, global_batch_size=4, progress=False,
                          loss_chunk_size=48)
    raw["optimizer"].update(learning_rate=1e-2, schedule="constant")
    raw["checkpoint"]["enabled"] = False
    raw["logging"].update(tensorboard=False, stdout=False)
    histories = {}
    for pre in (False, True):
        raw["trainer"]["preference"] = {"precompute_reference": pre}
        raw["run"]["output_dir"] = str(tmp_path / f"run{pre}")
        trainer = Trainer(config_from_dict(raw))
        assert (trainer.state.reference is None) == pre  # no reference copy when precomputed
        result = trainer.run()
        histories[pre] = result
    for a, b in zip(histories[False].history, histories[True].history, strict=True):
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(b["rewards/margin"], a["rewards/margin"], rtol=1e-4,
                                   atol=1e-6)
    assert histories[True].evals[-1]["eval_rewards/accuracy"] == pytest.approx(
        histories[False].evals[-1]["eval_rewards/accuracy"])
    assert "eval_rewards/margin" in histories[True].evals[0]
    assert histories[True].evals[0]["eval_pairs"] == 8
    if packing:  # 4 rows of packed pairs are more than 4 pairs
        assert all(h["pairs"] > 4 for h in histories[True].history)


# --------------------------------------------------------------------------- packing


def _all_value_and_grads(model, losses, batch, reference):
    """``{name: (loss, aux, grads)}`` of several losses at once (one compile)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def run(p, batch):
        out = {}
        with reference_available(reference):
            for name, fn in losses.items():
                out[name] = jax.value_and_grad(
                    lambda p, fn=fn: fn(nnx.merge(graphdef, p, rest), batch), has_aux=True)(p)
        return out

    return {name: (float(loss), jax.device_get(aux), _jax_grads(grads))
            for name, ((loss, aux), grads) in run(params, batch).items()}


def test_packed_pairs_equal_unpacked(preference_setup, models, jbatch):
    """Pairs packed 2-3 to a row (each side its own segment) get exactly the per-pair log-probs,
    losses, metrics and gradients of DPO (reference model or precomputed), ORPO and SimPO that
    they get one pair per row: no sum crosses a document, empty slots count nowhere, and the
    normaliser is the number of pairs."""
    from jaxtune.data.preference import pair_batch
    from jaxtune.objectives.preference import pair_count

    policy, reference = models
    setup = preference_setup
    slot = setup["packed_slot"]
    packed = {k: jnp.asarray(v) for k, v in setup["packed"].items()}
    assert packed["input_ids"].shape == (8, 200) and int(packed["segment_ids"].max()) >= 6
    logps, tokens = jax.jit(lambda b: sequence_logps(policy, b, 48))(jbatch)
    ref, _ = jax.jit(lambda b: sequence_logps(reference, b, 48))(jbatch)
    p_logps, p_tokens = jax.jit(lambda b: sequence_logps(policy, b, 48))(packed)
    assert p_logps.shape == p_tokens.shape == (8 * 100, 2)
    np.testing.assert_allclose(np.asarray(p_logps)[slot], logps, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(p_tokens)[slot], tokens)
    empty = np.setdiff1d(np.arange(800), slot)
    assert not np.asarray(p_tokens)[empty].any() and not np.asarray(p_logps)[empty].any()
    assert float(pair_count(packed)) == float(pair_count(jbatch)) == 8.0
    # DPO with the reference log-probs precomputed, laid out per slot of the packed rows
    data = setup["data"]
    with_ref = {k: jnp.asarray(v) for k, v in pair_batch(
        data, setup["packed_rows"], 100, data.pad_id, np.asarray(ref), packed=True).items()}
    assert with_ref["reference_chosen_logps"].shape == (8, 100)

    losses = {
        "dpo": lambda m, b: dpo_loss(m, b, beta=0.1, chunk_size=48),
        "dpo ipo": lambda m, b: dpo_loss(m, b, beta=0.1, loss_type="ipo", chunk_size=48),
        "orpo": lambda m, b: orpo_loss(m, b, beta=0.25, chunk_size=48),
        "simpo": lambda m, b: simpo_loss(m, b, beta=2.0, gamma=0.7, chunk_size=48),
    }
    want = _all_value_and_grads(policy, losses, jbatch, reference)
    got = {"packed": _all_value_and_grads(policy, losses, packed, reference),
           "packed, precomputed reference": _all_value_and_grads(
               policy, {"dpo": losses["dpo"]}, with_ref, None)}
    for how, results in got.items():
        for name, (p_loss, p_aux, p_grads) in results.items():
            loss, aux, grads = want[name]
            what = f"{name}, {how}"
            np.testing.assert_allclose(p_loss, loss, rtol=1e-5, atol=1e-6, err_msg=what)
            assert set(p_aux) == set(aux), what
            for k in aux:
                np.testing.assert_allclose(p_aux[k], aux[k], rtol=1e-5, atol=1e-5,
                                           err_msg=f"{what}: {k}")
            _close(p_grads, grads, what)
    loss = want["dpo"][0]
    assert abs(loss - np.log(2)) > 1e-3  # the reference differs from the policy


# --------------------------------------------------------------------------- data


def test_bad_rows_name_file_row_and_field_or_are_skipped(preference_setup, tmp_path):
    from jaxtune.data.preference import prepare_pairs
    from tests.fixtures_data import make_data_config, write_jsonl

    good = preference_setup["rows"][:2]
    cases = [({"prompt": "q", "chosen": " a"}, "rejected", "missing"),
             ({"prompt": "q", "chosen": "  ", "rejected": " b"}, "chosen", "empty"),
             ({"prompt": "q", "chosen": " same", "rejected": " same"}, "rejected", "identical"),
             ({"prompt": [{"role": "user", "content": "q"}], "chosen": [],
               "rejected": "x"}, "chosen", "non-empty")]
    tok = preference_setup["cfg"].model.tokenizer
    for i, (row, field, word) in enumerate(cases):
        path = write_jsonl(tmp_path / f"bad{i}.jsonl", good + [row])
        cfg = make_data_config(tmp_path, tok, [path], format="preference", packing=False)
        with pytest.raises(BadRowError) as e:
            prepare_pairs(cfg, preference_setup["tokenizer"])
        msg = str(e.value)
        assert f"bad{i}.jsonl, row 2" in msg and f"field '{field}'" in msg and word in msg, msg
        cfg.data.on_bad_row = "skip"
        data = prepare_pairs(cfg, preference_setup["tokenizer"])
        assert len(data.docs) == 2 and data.stats["skipped_bad_rows"] == 1


def test_pairs_keep_sides_together_and_train_only_completions(preference_setup):
    from jaxtune.data.inspect import render_marked
    from jaxtune.data.preference import pair_tokens

    data, tok, rows = preference_setup["data"], preference_setup["tokenizer"], \
        preference_setup["rows"]
    for d in range(4):  # one pair of each shape
        for side in ("chosen", "rejected"):
            tokens, trained = pair_tokens(data, d, side)
            text = render_marked(tok, tokens, trained, False)
            completion = rows[d][side]
            completion = completion if isinstance(completion, str) else completion[-1]["content"]
            completion = completion.split("Assistant:")[-1].strip()
            marked = text[text.index("[["):]
            assert text.count("[[") == 1, text  # one trained span: the completion
            if len(tokens) == preference_setup["cfg"].data.seq_len + 1:  # truncated
                body = marked.rstrip("\n")[2:-2].replace("<|im_end|>", "").strip()
                assert completion.startswith(body), text
                continue
            assert completion in marked and marked.rstrip("\n").endswith("<|im_end|>]]"), text
    b = preference_setup["batch"]
    assert b["chosen_input_ids"].shape == b["rejected_input_ids"].shape == (8, 40)
    assert (b["chosen_loss_mask"].sum(1) > 0).all() and (b["rejected_loss_mask"].sum(1) > 0).all()


def test_inspect_data_shows_both_sides(preference_setup, capsys):
    from jaxtune.data.inspect import inspect_data

    stats = inspect_data(preference_setup["cfg"], n=2, color=False)
    out = capsys.readouterr().out
    assert "pair 1 chosen" in out and "pair 1 rejected" in out and "[[" in out
    assert stats["pairs"] == 8 and stats["rows_per_epoch"] == 8
    assert "packing             off, one pair per row" in out
    cfg = copy.deepcopy(preference_setup["cfg"])
    cfg.data.packing, cfg.data.seq_len = True, 100  # rows of 200 positions hold 2-3 pairs
    stats = inspect_data(cfg, n=1, color=False)
    out = capsys.readouterr().out
    assert "pair 1 chosen" in out and "packing             on, 2.67 pairs per row" in out
    assert stats["pairs"] == 8 and stats["rows_per_epoch"] == 3
    assert 0.5 < stats["packing_efficiency"] <= 1.0
    assert "first row           " in out and "as segments 1-" in out


def test_support_preference_pairs_are_fresh_and_held_out():
    """examples/support/preferences*.jsonl are generate_preferences.py's output, eval pairs ask
    only the SFT set's held-out questions, and every chosen answer is on brand."""
    import json
    import sys
    from pathlib import Path

    support = Path(__file__).resolve().parents[1] / "examples" / "support"
    sys.path.insert(0, str(support))
    try:
        import generate_preferences
    finally:
        sys.path.remove(str(support))
    train, evals = generate_preferences.build()
    for name, rows in (("preferences.jsonl", train), ("preferences_eval.jsonl", evals)):
        lines = (support / name).read_text().splitlines()
        assert [json.loads(line) for line in lines] == rows, (
            f"examples/support/{name} is stale: run python examples/support/"
            "generate_preferences.py")
    held = {m["content"] for line in (support / "eval.jsonl").read_text().splitlines()
            for m in json.loads(line)["messages"] if m["role"] == "user"}
    asked = {r["prompt"][-1]["content"] for r in evals}
    assert all(any(q.endswith(a) for q in held) for a in asked)
    assert not asked & {r["prompt"][-1]["content"] for r in train}
    for r in train + evals:
        assert r["chosen"][0]["content"].endswith("- Nimbrel Support")
        assert r["chosen"] != r["rejected"]


def test_model_router_loss_reaches_every_preference_objective(preference_setup, jbatch,
                                                              tmp_path):
    """An MoE policy's router loss is added to DPO / ORPO / SimPO (the reference's is not)."""
    from flax import nnx

    from jaxtune.objectives.preference import dpo_loss, orpo_loss, simpo_loss
    from tests.fixtures_moe import MOE_TINY, MOE_VARIANTS, make_moe_hf_model

    model_type, overrides = MOE_VARIANTS["qwen3_moe"]
    vocab = from_pretrained(preference_setup["policy"]).config.vocab_size  # the pairs' ids
    path = make_moe_hf_model(model_type, tmp_path / "moe", **{
        **MOE_TINY, **overrides, "vocab_size": vocab, "router_aux_loss_coef": 0.5})
    model = from_pretrained(path)
    b = jbatch["chosen_input_ids"].shape[0]  # DPO's reference log-probs, as if precomputed
    jbatch = {**jbatch, "reference_chosen_logps": -jnp.ones(b),
              "reference_rejected_logps": -jnp.ones(b)}
    run = nnx.jit(lambda m, batch, fn: fn(m, batch), static_argnums=2)
    with_router = model.config
    for loss_fn in (dpo_loss, orpo_loss, simpo_loss):
        model.config = with_router
        loss, aux = run(model, jbatch, loss_fn)
        router = 0.5 * float(aux["router_aux_loss"])  # the weighted router loss (no z-loss)
        assert router > 0, loss_fn.__name__
        model.config = with_router.replace(router_aux_loss_coef=0.0)
        plain, _ = run(model, jbatch, loss_fn)
        np.testing.assert_allclose(float(loss) - float(plain), router, rtol=1e-5,
                                   err_msg=loss_fn.__name__)
