"""``distill``: a student trained on a frozen teacher's token distributions (TRL's GKD).

Per trained token, the generalised Jensen-Shannon divergence between the student's and the
teacher's next-token distributions at ``distill.temperature``, as TRL's
``GKDTrainer.generalized_jsd_loss`` defines it (``beta`` 0: forward KL, 1: reverse KL, between:
the JSD; :mod:`jaxtune.distill.divergence`), summed and divided by the trained tokens of the
whole global batch (TRL's ``num_items_in_batch``), plus ``ce_weight`` times the student's token
cross-entropy on the data's answers. Both models' ``[tokens, vocab]`` logits are projected a
chunk at a time and never held whole.

The batch is the token batch every text format produces. Which answers a step trains on is its
producer's choice (:mod:`jaxtune.distill.batches`): the data's (off-policy), the student's own
generations for the same prompts with probability ``lmbda`` (on-policy GKD), or the teacher's
(``seq_kd``). The teacher (:mod:`jaxtune.distill.teacher`) is a frozen model beside the train
state whose arrays are an argument of the jitted step, read here through
:func:`jaxtune.objectives.teacher_model`; with ``precompute_teacher`` its top-k log-probs come
cached in the batch instead (:mod:`jaxtune.distill.topk`) and training holds only the student.

Metrics: ``divergence`` (mean per trained token), ``ce`` (with ``ce_weight``: the
cross-entropy's contribution), ``entropy`` (the student's, at the temperature), ``nll_sum``;
held out: ``eval_loss``, ``eval_divergence`` and the student's ``eval_perplexity`` on the data's
answers.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxtune.distill.divergence import (
    DivergenceSettings,
    TeacherLogits,
    TeacherTopK,
    chunked_divergence,
)
from jaxtune.loss import add_model_aux
from jaxtune.models.family import hidden_states_and_aux
from jaxtune.objectives import (
    TOKEN_AXES,
    Objective,
    register_objective,
    teacher_model,
    token_batch_shapes,
    trained_tokens,
)

Batch = dict[str, jax.Array]

#: Precomputed teacher top-k (``distill.precompute_teacher``): ``[B, T, k]`` per token.
TOPK_AXES = {"teacher_topk_ids": ("batch", "seq", None),
             "teacher_topk_logps": ("batch", "seq", None)}
#: A scalar a generating producer adds: 1 when the step's answers are the data's (the token
#: cross-entropy trains only on those), 0 when they were generated.
DATA_ANSWERS = "answers_from_data"


def distill_loss(model: Any, batch: Batch, *, settings: DivergenceSettings,
                 chunk_size: int = 256) -> tuple[jax.Array, dict[str, jax.Array]]:
    """This micro-batch's contribution to the step's distillation loss."""
    ids, positions, segments = batch["input_ids"], batch["positions"], batch["segment_ids"]
    hidden_BTD, model_aux = hidden_states_and_aux(model, ids, positions, segments)
    if "teacher_topk_ids" in batch:
        teacher = TeacherTopK(batch["teacher_topk_ids"], batch["teacher_topk_logps"])
    else:
        t = teacher_model()
        hidden_BTE, _ = hidden_states_and_aux(t, ids, positions, segments)
        teacher = TeacherLogits(t.unembed, hidden_BTE)
    mask_BT = batch["loss_mask"].astype(jnp.float32)
    ce_scale = jnp.asarray(batch.get(DATA_ANSWERS, 1.0), jnp.float32)
    total, div, nll, entropy = chunked_divergence(
        model.unembed, hidden_BTD, teacher, batch["targets"].astype(jnp.int32), mask_BT,
        settings, ce_scale=ce_scale, chunk_size=chunk_size)
    denom = (jnp.asarray(batch["loss_denominator"], jnp.float32)
             if "loss_denominator" in batch else trained_tokens(batch))
    aux = {"num_tokens": mask_BT.sum(), "nll_sum": nll, "divergence": div / denom,
           "entropy": entropy / denom}
    if settings.ce_weight:
        aux["ce"] = settings.ce_weight * ce_scale * nll / denom
    return add_model_aux(total / denom, aux, model_aux, batch)


def distill_eval_metrics(sums: Mapping[str, float]) -> dict[str, float]:
    """Held-out means per trained token: the loss, the divergence, and the student's NLL of
    the data's answers (as perplexity too)."""
    tokens = max(float(sums["count"]), 1.0)
    nll = float(sums.get("nll_sum", 0.0)) / tokens
    return {"eval_loss": float(sums["loss_sum"]) / tokens,
            "eval_divergence": float(sums.get("divergence", 0.0)) / tokens,
            "eval_nll": nll, "eval_perplexity": math.exp(min(nll, 50.0)),
            "eval_tokens": float(sums["count"])}


def settings_of(cfg: Any) -> DivergenceSettings:
    d = cfg.distill
    return DivergenceSettings(beta=float(d.beta), temperature=float(d.temperature),
                              top_k=int(d.top_k), ce_weight=float(d.ce_weight))


def generates(cfg: Any) -> bool:
    """Whether the run's producer generates answers (on-policy GKD or sequence-level KD)."""
    return cfg.distill.lmbda > 0 or cfg.distill.seq_kd


def distill_batch_shapes(cfg: Any) -> dict[str, jax.ShapeDtypeStruct]:
    """The batch's shapes (``jaxtune plan``): the token batch, with precomputed top-k."""
    out = token_batch_shapes(cfg)
    rows, seq, k = cfg.trainer.global_batch_size, cfg.data.seq_len, cfg.distill.top_k
    if cfg.distill.precompute_teacher:
        out["teacher_topk_ids"] = jax.ShapeDtypeStruct((rows, seq, k), jnp.int32)
        out["teacher_topk_logps"] = jax.ShapeDtypeStruct((rows, seq, k), jnp.float32)
    if generates(cfg):
        out[DATA_ANSWERS] = jax.ShapeDtypeStruct((), jnp.float32)
    return out


def generation_shape(cfg: Any) -> tuple[int, int, int]:
    """``(rows, prompt tokens, new tokens)`` generated each step at most (``jaxtune plan``)."""
    d = cfg.distill
    new = min(d.max_new_tokens, cfg.data.seq_len - 1)
    return cfg.trainer.global_batch_size, cfg.data.seq_len - new, new


def _distill(cfg: Any) -> Objective:
    from jaxtune.distill import batches, teacher, topk

    teacher.check_teacher(cfg)  # path, family and vocabulary, before any weight is read
    d = cfg.distill
    loss = functools.partial(distill_loss, settings=settings_of(cfg),
                             chunk_size=cfg.trainer.loss_chunk_size)
    axes = {**TOKEN_AXES, **(TOPK_AXES if d.precompute_teacher else {})}
    return Objective(
        "distill", loss, axes, trained_tokens, distill_eval_metrics,
        data_formats=("chat", "completion", "alpaca", "text"),
        prepare=topk.precompute_teacher_topk if d.precompute_teacher else None,
        batch_source=batches.make_distill_batches
        if generates(cfg) or d.precompute_teacher else None,
        evaluate=topk.evaluate_with_topk if d.precompute_teacher else None,
        batch_shapes=distill_batch_shapes,
        generates=generation_shape if generates(cfg) else None,
        teacher=None if d.precompute_teacher else teacher.teacher_for)


register_objective("distill", _distill)
