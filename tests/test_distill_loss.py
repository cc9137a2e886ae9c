"""The distillation loss against TRL's, and its chunking.

On a tiny teacher (Qwen2, hidden 72) and a smaller student of another family (Llama, hidden
40) sharing a vocabulary of 389, the divergence's value and its gradient with respect to the
student's logits equal TRL's ``GKDTrainer.generalized_jsd_loss`` within 1e-5 (float32) on the
same logits, for beta 0 (forward KL), 0.5 (JSD) and 1 (reverse KL) and two temperatures; the
whole loss through both models (teacher argument, chunked projections of both heads) gives the
gradient TRL's logit gradient gives through the student. Chunked equals the whole ``[B, T, V]``
computation for the full vocabulary and top-k, with the cross-entropy mixed in.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtune.distill.divergence import (
    DivergenceSettings,
    TeacherLogits,
    chunked_divergence,
    full_divergence,
)
from jaxtune.objectives import teacher_available
from jaxtune.objectives.distill import distill_loss
from jaxtune.train_state import FrozenModel
from jaxtune.weights import from_pretrained
from tests.train_helpers import synthetic_batch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
V = 389


def _identity(x):
    return x


@pytest.fixture(scope="module")
def pair(distill_pair):
    """Both models, a packed token batch, and each model's logits on it."""
    student = from_pretrained(distill_pair["student"])
    teacher = from_pretrained(distill_pair["teacher"])
    batch = {k: jnp.asarray(v) for k, v in synthetic_batch(4, 24, V, seed=3).items()}

    def logits(model):
        return model.unembed(model.hidden_states(batch["input_ids"], batch["positions"],
                                                 batch["segment_ids"]))

    return {"student": student, "teacher": teacher, "batch": batch,
            "s_logits": np.asarray(logits(student)), "t_logits": np.asarray(logits(teacher))}


def trl_loss_and_grad(s_logits, t_logits, batch, beta, temperature):
    """TRL's generalized JSD (its own code) and its gradient w.r.t. the student's logits."""
    import torch
    from trl.experimental.gkd import GKDTrainer

    s = torch.tensor(s_logits, requires_grad=True)
    labels = torch.tensor(np.where(np.asarray(batch["loss_mask"]) > 0,
                                   np.asarray(batch["targets"]), -100))
    loss = GKDTrainer.generalized_jsd_loss(s, torch.tensor(t_logits), labels=labels, beta=beta,
                                           temperature=temperature)
    loss.backward()
    return float(loss.detach()), s.grad.numpy()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_divergence_and_gradient_equal_trl(pair, beta, temperature):
    batch = pair["batch"]
    tokens = float(batch["loss_mask"].sum())
    settings = DivergenceSettings(beta=beta, temperature=temperature)

    def ours(s_logits):
        total, _, _, _ = chunked_divergence(
            _identity, s_logits, TeacherLogits(_identity, jnp.asarray(pair["t_logits"])),
            batch["targets"], batch["loss_mask"], settings, chunk_size=16)
        return total / tokens

    value, grad = jax.value_and_grad(ours)(jnp.asarray(pair["s_logits"]))
    want, want_grad = trl_loss_and_grad(pair["s_logits"], pair["t_logits"], batch, beta,
                                        temperature)
    assert want > 1e-3  # two different models: a real divergence
    np.testing.assert_allclose(float(value), want, rtol=1e-5, atol=1e-5)
    # per token (the mean divides by the token count): O(1) entries, compared within 1e-5
    np.testing.assert_allclose(np.asarray(grad) * tokens, want_grad * tokens, atol=1e-5)


def _loss_fn(pair, settings, chunk_size):
    """``params -> loss`` of the student through distill_loss, the teacher as an argument."""
    graphdef, params, rest = nnx.split(pair["student"], nnx.Param, ...)
    teacher = FrozenModel.of(pair["teacher"])
    batch = dict(pair["batch"])

    def fn(params, teacher_state):
        with teacher_available(teacher.model(teacher_state)):
            loss, aux = distill_loss(nnx.merge(graphdef, params, rest), batch,
                                     settings=settings, chunk_size=chunk_size)
        return loss, aux

    return fn, params, teacher.state


def test_the_whole_loss_trains_the_student_as_trl_does(pair):
    """Both models run, both heads projected in chunks: the student's parameter gradient is
    TRL's logit gradient pulled back through the student."""
    settings = DivergenceSettings(beta=0.5, temperature=2.0)
    fn, params, teacher_state = _loss_fn(pair, settings, chunk_size=16)
    (loss, aux), grads = jax.value_and_grad(fn, has_aux=True)(params, teacher_state)
    want, dlogits = trl_loss_and_grad(pair["s_logits"], pair["t_logits"], pair["batch"], 0.5,
                                      2.0)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(float(aux["divergence"]), want, rtol=1e-5)
    graphdef, _, rest = nnx.split(pair["student"], nnx.Param, ...)
    b = pair["batch"]

    def student_logits(params):
        model = nnx.merge(graphdef, params, rest)
        return model.unembed(model.hidden_states(b["input_ids"], b["positions"],
                                                 b["segment_ids"]))

    _, pullback = jax.vjp(student_logits, params)
    (expected,) = pullback(jnp.asarray(dlogits))
    got, exp = jax.tree.leaves(grads), jax.tree.leaves(expected)
    assert len(got) == len(exp) > 0
    for g, e in zip(got, exp, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("top_k, ce_weight, beta", [(0, 0.0, 0.5), (0, 0.3, 1.0),
                                                    (7, 0.0, 0.0), (7, 0.3, 0.5)])
def test_chunked_equals_unchunked(pair, top_k, ce_weight, beta):
    """Chunks of 10 tokens (trained tokens sorted first, empty chunks skipped) give the loss
    and gradients of the whole [B, T, V] logits at once."""
    settings = DivergenceSettings(beta=beta, temperature=1.5, top_k=top_k,
                                  ce_weight=ce_weight)
    fn, params, teacher_state = _loss_fn(pair, settings, chunk_size=10)
    (loss, aux), grads = jax.value_and_grad(fn, has_aux=True)(params, teacher_state)
    graphdef, _, rest = nnx.split(pair["student"], nnx.Param, ...)
    b = pair["batch"]
    t_logits = jnp.asarray(pair["t_logits"])

    def whole(params):
        model = nnx.merge(graphdef, params, rest)
        s_logits = model.unembed(model.hidden_states(b["input_ids"], b["positions"],
                                                     b["segment_ids"]))
        total, (div, nll, _) = full_divergence(s_logits, t_logits, b["targets"],
                                               b["loss_mask"], settings)
        return total / b["loss_mask"].sum(), (div, nll)

    (want, (div, nll)), want_grads = jax.value_and_grad(whole, has_aux=True)(params)
    tokens = float(b["loss_mask"].sum())
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)
    np.testing.assert_allclose(float(aux["divergence"]), float(div) / tokens, rtol=1e-5)
    np.testing.assert_allclose(float(aux["nll_sum"]), float(nll), rtol=1e-5)
    if ce_weight:
        np.testing.assert_allclose(float(aux["ce"]), ce_weight * float(nll) / tokens,
                                   rtol=1e-5)
    for g, e in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-4, atol=1e-6)


def test_top_k_keeps_the_rest_as_one_bucket(pair):
    """With k = V - 1 the top-k divergence is the full one (the last token is the rest), and
    with small k it is a distinct, smaller divergence (a coarser partition)."""
    b = pair["batch"]
    s_logits, t_logits = jnp.asarray(pair["s_logits"]), jnp.asarray(pair["t_logits"])

    def div(k):
        settings = DivergenceSettings(beta=0.0, top_k=k)
        return float(full_divergence(s_logits, t_logits, b["targets"], b["loss_mask"],
                                     settings)[1][0])

    full, almost, coarse = div(0), div(V - 1), div(5)
    np.testing.assert_allclose(almost, full, rtol=1e-4)
    assert 0 < coarse < full
