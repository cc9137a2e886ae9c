"""Preference objectives: DPO (sigmoid, IPO, hinge, robust), ORPO and SimPO.

Each is one loss over a batch of pairs (``data.format: preference``, see
:mod:`jaxtune.data.preference`), registered by name for ``trainer.objective``, with the
settings of ``trainer.preference``. All start from the summed completion log-probs of each
side, computed chunked over the vocabulary for the trained tokens only
(:func:`jaxtune.loss.chunked_segment_logps`, never the ``[B, T, V]`` logits) and summed per
document by segment ids, never across documents. A batch comes in one of two layouts, and
both give each pair exactly the log-probs it gets alone:

* one pair per row (``chosen_*`` and ``rejected_*`` arrays): both sides run through the model
  as one ``[2B, T]`` batch, interleaved row by row so each device keeps its own pairs;
* packed (``data.packing: true``; the token batch's keys): rows holding whole pairs, pair
  ``k`` of a row as segments ``2k + 1`` (chosen) and ``2k + 2`` (rejected), run as they are.

Per-pair values are ``[N, 2]`` arrays over pair slots (``N = B`` unpacked, ``B *
pair_slots(seq_len)`` packed); a slot without a pair has no trained token and counts nowhere.

Formulas follow TRL (1.16) and are checked against it in ``tests/test_preference.py``, with
``delta = (logp_c - ref_c) - (logp_r - ref_r)``:

* DPO ``sigmoid``: ``-log sigmoid(beta * delta)``; ``hinge``: ``relu(1 - beta * delta)``;
  ``ipo``: ``(delta_c / n_c - delta_r / n_r - 1 / (2 beta))**2`` (log-ratios per completion
  token, as TRL); ``robust``: ``(-(1 - e) log s(beta delta) + e log s(-beta delta)) / (1 - 2e)``;
* ORPO: ``-mean_logp_c - beta * log sigmoid(log_odds)`` with length-averaged log-probs and
  ``log_odds = (a_c - a_r) - (log(1 - e^a_c) - log(1 - e^a_r))``. The NLL is the mean over
  each chosen completion's tokens (the paper's SFT term; TRL's also counts prompt tokens);
* SimPO: ``-log sigmoid(beta * (a_c - a_r) - gamma)`` on length-averaged log-probs, no
  reference (label smoothing as TRL's CPO).

Normalisation: every loss is a mean over pairs of the global batch: per-pair terms are summed
and divided by ``batch["loss_denominator"]`` (the train step sets it to the number of pairs
over all micro-batches and devices, however they are packed), so accumulation, sharding and
packing do not change the step.
Metrics (``rewards/chosen``, ``rewards/rejected``, ``rewards/margin``, ``rewards/accuracy``,
``logps/chosen``, ``logps/rejected``) are such contributions too, so they add up to the
global means; eval sums them over the held-out pairs (denominator 1) and divides by the count.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.data.preference import PACKED_PAIR_AXES, PAIR_AXES, REFERENCE_AXES, pair_slots
from jaxtune.loss import add_model_aux, chunked_segment_logps
from jaxtune.models.family import hidden_states_and_aux
from jaxtune.objectives import Objective, reference_model, register_objective

log = logging.getLogger(__name__)

Batch = dict[str, jax.Array]
_KEYS = ("input_ids", "positions", "segment_ids", "targets", "loss_mask")


def pair_inputs(batch: Batch) -> dict[str, jax.Array]:
    """Both sides of an unpacked batch as one ``[2B, T]`` batch, row ``2i`` chosen and
    ``2i + 1`` rejected of pair ``i`` (interleaved, so the rows a device holds stay on it)."""
    out = {}
    for k in _KEYS:
        c, r = batch[f"chosen_{k}"], batch[f"rejected_{k}"]
        out[k] = jnp.stack([c, r], axis=1).reshape(2 * c.shape[0], *c.shape[1:])
    return out


def is_packed(batch: Mapping[str, Any]) -> bool:
    """Whether ``batch`` holds packed pairs (rows of whole pairs) rather than a pair per row."""
    return "input_ids" in batch


def pair_documents(batch: Batch) -> tuple[dict[str, jax.Array], int]:
    """``(rows, num_segments)``: the rows the model runs on and how many segment ids a row
    can hold. A packed batch runs as it is (pair ``k`` of a row in segments ``2k + 1`` and
    ``2k + 2``); an unpacked one as :func:`pair_inputs` (each row one document, segment 1)."""
    if is_packed(batch):
        return {k: batch[k] for k in _KEYS}, 2 * (batch["input_ids"].shape[1] // 2) + 1
    return pair_inputs(batch), 2


def pair_columns(sums_RS: jax.Array, batch: Batch) -> jax.Array:
    """``[N, 2]`` (chosen, rejected) per pair slot from per-(row, segment) sums ``[R, S]`` of
    :func:`pair_documents`' rows: ``N = B`` unpacked, ``B * pair_slots`` packed (a slot
    without a pair sums to 0 on both sides)."""
    if is_packed(batch):
        return jnp.stack([sums_RS[:, 1::2], sums_RS[:, 2::2]], axis=-1).reshape(-1, 2)
    return sums_RS[:, 1].reshape(-1, 2)


def pair_tokens(batch: Batch) -> jax.Array:
    """``[N, 2]`` trained tokens of each side of each pair slot (see :func:`pair_columns`)."""
    inputs, num_segments = pair_documents(batch)
    sums_RS = jax.vmap(lambda m, s: jax.ops.segment_sum(m, s, num_segments))(
        inputs["loss_mask"].astype(jnp.float32), inputs["segment_ids"].astype(jnp.int32))
    return pair_columns(sums_RS, batch)


def model_hidden(model: Any, inputs: Mapping[str, jax.Array]):
    """``(hidden states, the model's auxiliary output)``: the one place every preference
    objective runs the model, so a model's own loss (an MoE router's) reaches the objective
    (see ``jaxtune.models.family.hidden_states_and_aux``)."""
    return hidden_states_and_aux(model, inputs["input_ids"], inputs["positions"],
                                 inputs["segment_ids"])


def policy_logps(model: Any, batch: Batch, chunk_size: int):
    """``(logps_N2, tokens_N2, model_aux)``: summed completion log-probs and trained tokens per
    side of each pair slot (column 0 chosen, 1 rejected; see :func:`pair_columns`), float32,
    and the model's auxiliary output (or None). Each side's sum covers its own segment only, so a
    packed pair gets exactly the log-probs it gets alone."""
    inputs, num_segments = pair_documents(batch)
    hidden, model_aux = model_hidden(model, inputs)
    sums_RS = chunked_segment_logps(
        model.unembed, hidden, inputs["targets"], inputs["loss_mask"], inputs["segment_ids"],
        num_segments, chunk_size=chunk_size)
    return pair_columns(sums_RS, batch), pair_tokens(batch), model_aux


def sequence_logps(model: Any, batch: Batch, chunk_size: int) -> tuple[jax.Array, jax.Array]:
    """``(logps_N2, tokens_N2)`` of :func:`policy_logps`, without the auxiliary output (the
    reference model's router loss trains nothing)."""
    logps, tokens, _ = policy_logps(model, batch, chunk_size)
    return logps, tokens


def reference_logps(model: Any, batch: Batch, chunk_size: int) -> jax.Array:
    """``[N, 2]`` reference log-probs: precomputed in the batch, else from the reference model
    (the frozen copy, or this model with adapters disabled)."""
    if "reference_chosen_logps" in batch:
        return jnp.stack([batch["reference_chosen_logps"].reshape(-1),
                          batch["reference_rejected_logps"].reshape(-1)],
                         axis=1).astype(jnp.float32)
    with reference_model(model) as ref:
        logps, _ = sequence_logps(ref, batch, chunk_size)
    return jax.lax.stop_gradient(logps)


def pair_count(batch: Batch) -> jax.Array:
    """The normaliser: pairs with trained tokens on both sides (padding rows and empty pair
    slots of packed rows have none)."""
    return jnp.maximum(_valid(pair_tokens(batch)).sum(), 1.0)


def _valid(tokens_N2: jax.Array) -> jax.Array:
    return (tokens_N2.min(axis=-1) > 0).astype(jnp.float32)


def _denominator(batch: Batch) -> jax.Array:
    if "loss_denominator" in batch:
        return jnp.asarray(batch["loss_denominator"], jnp.float32)
    return pair_count(batch)


def _log1mexp(x: jax.Array) -> jax.Array:
    """``log(1 - exp(x))`` for ``x < 0``, stable on both sides of ``-ln 2``."""
    x = jnp.minimum(x, -1e-7)  # a log-prob of exactly 0 would give -inf
    return jnp.where(x < -0.6931471805599453, jnp.log1p(-jnp.exp(x)), jnp.log(-jnp.expm1(x)))


def _finish(batch: Batch, logps: jax.Array, tokens: jax.Array, losses: jax.Array,
            chosen_reward: jax.Array, rejected_reward: jax.Array, extra: dict | None = None):
    """``(loss, aux)`` as contributions to the global means over pairs."""
    valid = _valid(tokens)
    denom = _denominator(batch)

    def mean(x):  # empty pair slots (padding) count for nothing, whatever their value
        return jnp.sum(jnp.where(valid > 0, jax.lax.stop_gradient(x), 0.0)) / denom

    aux = {
        "rewards/chosen": mean(chosen_reward),
        "rewards/rejected": mean(rejected_reward),
        "rewards/margin": mean(chosen_reward - rejected_reward),
        "rewards/accuracy": mean((chosen_reward > rejected_reward).astype(jnp.float32)),
        "logps/chosen": mean(logps[:, 0]),
        "logps/rejected": mean(logps[:, 1]),
        "pairs": valid.sum(),
        **{k: mean(v) for k, v in (extra or {}).items()},
    }
    return jnp.sum(jnp.where(valid > 0, losses, 0.0)) / denom, aux


def dpo_terms(logps: jax.Array, ref: jax.Array, tokens: jax.Array, *, beta: float,
              loss_type: str = "sigmoid", label_smoothing: float = 0.0):
    """``(per_pair_loss, chosen_reward, rejected_reward, extra)`` from ``[B, 2]`` summed
    log-probs of the policy and the reference and trained tokens per side."""
    ratios = logps - ref  # [B, 2] log-ratios against the reference
    delta = ratios[:, 0] - ratios[:, 1]
    if loss_type == "sigmoid":
        per_pair = -jax.nn.log_sigmoid(beta * delta)
    elif loss_type == "hinge":
        per_pair = jax.nn.relu(1.0 - beta * delta)
    elif loss_type == "ipo":
        avg = ratios / jnp.maximum(tokens, 1.0)
        per_pair = jnp.square(avg[:, 0] - avg[:, 1] - 1.0 / (2.0 * beta))
    elif loss_type == "robust":
        e = label_smoothing
        per_pair = (-(1 - e) * jax.nn.log_sigmoid(beta * delta)
                    + e * jax.nn.log_sigmoid(-beta * delta)) / (1 - 2 * e)
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}")
    rewards = beta * jax.lax.stop_gradient(ratios)
    return per_pair, rewards[:, 0], rewards[:, 1], {}


def orpo_terms(logps: jax.Array, tokens: jax.Array, *, beta: float):
    """ORPO's per-pair loss, rewards and extra metrics (see :func:`dpo_terms`)."""
    avg = logps / jnp.maximum(tokens, 1.0)
    log_odds = (avg[:, 0] - avg[:, 1]) - (_log1mexp(avg[:, 0]) - _log1mexp(avg[:, 1]))
    ratio = jax.nn.log_sigmoid(log_odds)
    nll = -avg[:, 0]
    rewards = beta * jax.lax.stop_gradient(avg)
    return nll - beta * ratio, rewards[:, 0], rewards[:, 1], {
        "orpo/nll": nll, "orpo/log_odds": log_odds, "orpo/log_odds_ratio": ratio}


def simpo_terms(logps: jax.Array, tokens: jax.Array, *, beta: float, gamma: float,
                label_smoothing: float = 0.0):
    """SimPO's per-pair loss and rewards (see :func:`dpo_terms`)."""
    avg = logps / jnp.maximum(tokens, 1.0)
    logits = (avg[:, 0] - avg[:, 1]) - gamma / beta
    per_pair = (-(1 - label_smoothing) * jax.nn.log_sigmoid(beta * logits)
                - label_smoothing * jax.nn.log_sigmoid(-beta * logits))
    rewards = beta * jax.lax.stop_gradient(avg)
    return per_pair, rewards[:, 0], rewards[:, 1], {}


def dpo_loss(model: Any, batch: Batch, *, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, chunk_size: int = 1024):
    """DPO and its variants (see the module docstring)."""
    logps, tokens, model_aux = policy_logps(model, batch, chunk_size)
    ref = reference_logps(model, batch, chunk_size)
    terms = dpo_terms(logps, ref, tokens, beta=beta, loss_type=loss_type,
                      label_smoothing=label_smoothing)
    return add_model_aux(*_finish(batch, logps, tokens, *terms), model_aux, batch)


def orpo_loss(model: Any, batch: Batch, *, beta: float = 0.1, chunk_size: int = 1024):
    """ORPO: NLL of the chosen completion plus ``beta`` times the odds-ratio term."""
    logps, tokens, model_aux = policy_logps(model, batch, chunk_size)
    return add_model_aux(*_finish(batch, logps, tokens, *orpo_terms(logps, tokens, beta=beta)),
                         model_aux, batch)


def simpo_loss(model: Any, batch: Batch, *, beta: float = 2.0, gamma: float = 0.5,
               label_smoothing: float = 0.0, chunk_size: int = 1024):
    """SimPO: length-averaged log-prob margin against the target ``gamma``; no reference."""
    logps, tokens, model_aux = policy_logps(model, batch, chunk_size)
    terms = simpo_terms(logps, tokens, beta=beta, gamma=gamma, label_smoothing=label_smoothing)
    return add_model_aux(*_finish(batch, logps, tokens, *terms), model_aux, batch)


_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy",
            "logps/chosen", "logps/rejected")


def pair_eval_metrics(sums: Mapping[str, float]) -> dict[str, float]:
    """Held-out means over pairs: ``eval_loss`` and ``eval_rewards/...``, ``eval_logps/...``."""
    pairs = float(sums.get("pairs", sums.get("count", 0.0)))
    n = max(pairs, 1.0)
    out = {"eval_loss": float(sums["loss_sum"]) / n, "eval_pairs": pairs}
    for k, v in sums.items():
        if k.startswith(("rewards/", "logps/", "orpo/")):
            out[f"eval_{k}"] = float(v) / n
    return out


def pair_batch_shapes(cfg) -> dict[str, jax.ShapeDtypeStruct]:
    """A batch of pairs' shapes (``jaxtune plan``): a chosen and a rejected row per pair, or
    with ``data.packing`` rows of ``2 * seq_len`` positions holding whole pairs."""
    rows, seq = cfg.trainer.global_batch_size, cfg.data.seq_len
    packed = cfg.data.packing
    keys, width = (PACKED_PAIR_AXES, 2 * seq) if packed else (PAIR_AXES, seq)
    out = {k: jax.ShapeDtypeStruct((rows, width), jnp.float32 if k.endswith("loss_mask")
                                   else jnp.int32) for k in keys}
    if cfg.trainer.objective == "dpo" and cfg.trainer.preference.precompute_reference:
        shape = (rows, pair_slots(seq)) if packed else (rows,)
        out.update({k: jax.ShapeDtypeStruct(shape, jnp.float32) for k in REFERENCE_AXES})
    return out


def _axes(with_reference: bool):
    # Both layouts: the loss takes whichever the data pipeline gives (``is_packed``).
    return {**PAIR_AXES, **PACKED_PAIR_AXES, **(REFERENCE_AXES if with_reference else {})}


def _pref(cfg):
    return cfg.trainer.preference


def _dpo(cfg) -> Objective:
    p = _pref(cfg)
    loss = functools.partial(dpo_loss, beta=p.beta, loss_type=p.loss_type,
                             label_smoothing=p.label_smoothing,
                             chunk_size=cfg.trainer.loss_chunk_size)
    return Objective("dpo", loss, _axes(True), pair_count, pair_eval_metrics, ("preference",),
                     needs_reference=not p.precompute_reference,
                     prepare=precompute_reference_logps if p.precompute_reference else None,
                     batch_shapes=pair_batch_shapes)


def _orpo(cfg) -> Objective:
    p = _pref(cfg)
    loss = functools.partial(orpo_loss, beta=p.beta, chunk_size=cfg.trainer.loss_chunk_size)
    return Objective("orpo", loss, _axes(False), pair_count, pair_eval_metrics, ("preference",),
                     batch_shapes=pair_batch_shapes)


def _simpo(cfg) -> Objective:
    p = _pref(cfg)
    loss = functools.partial(simpo_loss, beta=p.beta, gamma=p.gamma,
                             label_smoothing=p.label_smoothing,
                             chunk_size=cfg.trainer.loss_chunk_size)
    return Objective("simpo", loss, _axes(False), pair_count, pair_eval_metrics,
                     ("preference",), batch_shapes=pair_batch_shapes)


register_objective("dpo", _dpo)
register_objective("orpo", _orpo)
register_objective("simpo", _simpo)


# --------------------------------------------------------------------------- precomputing


def reference_logps_fn(state, mesh, rules, chunk_size: int):
    """A jitted ``(state, batch) -> [N, 2]`` of the reference log-probs of the state's model per
    pair slot (:func:`pair_columns`): its base with adapters disabled under LoRA, else the model
    as it is (call it before training, when the weights still are the reference)."""
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxtune import lora
    from jaxtune.sharding import activation_rules
    from jaxtune.train_state import train_state_shardings

    def fn(state, batch):
        with activation_rules(mesh, rules):
            model = state.model()
            ctx = lora.adapters_disabled() if lora.has_adapters(model) \
                else contextlib.nullcontext()
            with ctx:
                logps, _ = sequence_logps(model, batch, chunk_size)
            return logps

    return jax.jit(fn, in_shardings=(train_state_shardings(state, mesh, rules), None),
                   out_shardings=NamedSharding(mesh, PartitionSpec()))


def precompute_reference_logps(trainer) -> None:
    """Compute the reference log-probs of every train and eval pair once and cache them beside
    the tokenised data (keyed by the data and the reference model), so training needs no
    reference model. Run by the trainer before training (and before any resume)."""
    from jaxtune import data as data_mod
    from jaxtune.data.preference import (
        PreferenceBatchIterator,
        prepare_pairs,
        reference_cache_path,
    )

    cfg = trainer.cfg
    fn = None
    for split in ("train", "eval"):
        if split == "eval" and not cfg.data.eval_sources:
            continue
        prepared = prepare_pairs(cfg, trainer.tokenizer, split)
        path = reference_cache_path(cfg, prepared)
        if os.path.exists(path):
            continue
        fn = fn or reference_logps_fn(trainer.state, trainer.mesh, trainer.rules,
                                      cfg.trainer.loss_chunk_size)
        batch = cfg.trainer.global_batch_size
        it = PreferenceBatchIterator(
            prepared, seq_len=cfg.data.seq_len, global_batch_size=batch,
            process_index=jax.process_index(), process_count=jax.process_count(),
            shuffle=False, train=False, packing=cfg.data.packing, pad_id=prepared.pad_id)
        # An eval iterator's batch j is rows [j * batch, (j + 1) * batch) of its plan; the
        # step's output is every process's rows, pair slot by pair slot.
        plan, slots = it.plan(0), pair_slots(cfg.data.seq_len) if cfg.data.packing else 1
        logps = np.full((len(prepared.docs), 2), np.nan, np.float32)
        for j, host_batch in enumerate(it):
            got = np.asarray(jax.device_get(
                fn(trainer.state, data_mod.to_global_batch(host_batch, trainer.mesh))))
            got = got.reshape(batch, slots, 2)
            for r, docs in enumerate(plan[j * batch:(j + 1) * batch]):
                logps[docs] = got[r, :len(docs)]
        assert not np.isnan(logps).any(), "a pair was left out of the reference pass"
        # Every process writes the same array under a private name and renames it into
        # place, so on a shared or a local disk each finds the file once it is done here.
        tmp = f"{path}.tmp-{jax.process_index()}-{os.getpid()}.npy"
        os.makedirs(os.path.dirname(path), exist_ok=True)
        np.save(tmp, logps)
        os.replace(tmp, path)
        log.info("precomputed reference log-probs of %d %s pairs -> %s", len(logps), split,
                 path)
