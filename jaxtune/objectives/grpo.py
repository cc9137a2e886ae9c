"""``grpo``: reinforcement learning from rewards, GRPO and its variants, as TRL defines them.

One loss over a batch of completions (``rl.num_generations`` per prompt, consecutive), made by
the rollout producer (:mod:`jaxtune.rl.producer`: prompts, completions generated with the
current parameters, rewards, advantages). Per completion token ``t`` of row ``i``, with
``log_ratio = logp - logp_old`` (``logp_old`` stored at generation when ``num_iterations``
> 1, else ``stop_gradient(logp)``, so the ratio is exactly 1) and ``A_i`` the advantage::

    w      = exp(log_ratio)                                  importance_sampling_level: token
           = exp(masked mean of log_ratio over row i)        sequence (GSPO)
    loss_t = -min(w' A_i, clip(w, 1 - epsilon, 1 + epsilon_high) A_i) + beta * KL_t
    w'     = min(w, delta) with two-sided clipping (delta), else w
    KL_t   = exp(ref - logp) - (ref - logp) - 1              TRL's k3 estimator, times w with
                                                             use_bias_correction_kl (TRL's default)

Log-probs are ``log_softmax(logits / temperature)`` over the whole vocabulary, chunked
(:func:`jaxtune.loss.chunked_token_logps`): the sampler logs its own over the same
distribution, so truncated sampling (top-k / top-p / min-p) does not bias the ratio.

Normalisation (``rl.loss_type``), by the one normaliser the train step sets over the global
batch (``batch["loss_denominator"]``), so accumulation and sharding do not change the step:

- ``grpo``: each completion's token mean, averaged over completions;
- ``dr_grpo``: the token sum over ``completions * max_completion_length``;
- ``dapo`` (TRL's default): the token sum over all completion tokens of the step;
- ``bnpo``: each micro-batch's token mean, averaged over micro-batches. TRL normalises per
  device and micro-batch ("the local batch"); here the local batch is a micro-batch over all
  devices, so bnpo depends on ``grad_accum_steps`` (as in TRL) but not on the mesh.

Metrics (TRL's names): ``kl``, ``entropy``, ``clip_ratio/low_mean``, ``/high_mean``,
``/region_mean``, ``ratio/deviation_max`` (largest ``|w - 1|``), and, when the batch holds the
sampler's log-probs, ``sampling/logp_diff_mean`` and ``sampling/logp_diff_max``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from jaxtune.loss import add_model_aux
from jaxtune.objectives import Objective, register_objective
from jaxtune.rl.logps import completion_logps

Batch = dict[str, jax.Array]

#: The rollout batch (``jaxtune.rl.rollout``): rows of ``[left-padded prompt | completion]``,
#: ``T = P + C`` tokens, and per-completion-token arrays of width ``C``.
ROLLOUT_AXES = {
    "input_ids": ("batch", "seq"),
    "positions": ("batch", "seq"),
    "segment_ids": ("batch", "seq"),
    "completion_mask": ("batch", "seq"),
    "advantages": ("batch",),
    "old_logps": ("batch", "seq"),  # num_iterations > 1: log-probs at generation
    "ref_logps": ("batch", "seq"),  # beta > 0: the reference model's log-probs
    "sampler_logps": ("batch", "seq"),  # num_iterations 1: the sampler's, for the check
}
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


@dataclass(frozen=True)
class GRPOSettings:
    """The loss's part of ``rl`` (see ``jaxtune.config.RLConfig``)."""

    loss_type: str = "dapo"
    importance_sampling_level: str = "token"
    epsilon: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    beta: float = 0.0
    temperature: float = 1.0
    max_completion_length: int = 256
    use_bias_correction_kl: bool = True

    @classmethod
    def from_config(cls, rl) -> GRPOSettings:
        return cls(rl.loss_type, rl.importance_sampling_level, rl.epsilon, rl.epsilon_high,
                   rl.delta, rl.beta, rl.temperature, rl.max_completion_length,
                   rl.use_bias_correction_kl)


def grpo_terms(logps_BC: jax.Array, batch: Batch, s: GRPOSettings):
    """``(per_token_loss [B, C] or [B, 1] broadcast, ratio w, aux terms)`` of TRL's loss."""
    mask_BC = batch["completion_mask"].astype(jnp.float32)
    adv_B1 = batch["advantages"].astype(jnp.float32)[:, None]
    old_BC = batch["old_logps"] if "old_logps" in batch else jax.lax.stop_gradient(logps_BC)
    log_ratio_BC = logps_BC - old_BC
    if s.importance_sampling_level == "token":
        log_w = log_ratio_BC
    else:  # GSPO: one ratio per sequence, from its mean log-ratio
        log_w = (jnp.sum(log_ratio_BC * mask_BC, -1)
                 / jnp.maximum(mask_BC.sum(-1), 1.0))[:, None]
    coef_1 = jnp.exp(log_w)
    eps_high = s.epsilon if s.epsilon_high is None else s.epsilon_high
    coef_2 = jnp.clip(coef_1, 1 - s.epsilon, 1 + eps_high)
    if s.delta is not None:
        coef_1 = jnp.minimum(coef_1, s.delta)
    per_token = -jnp.minimum(coef_1 * adv_B1, coef_2 * adv_B1)
    kl_BC = None
    if s.beta != 0.0:
        diff_BC = batch["ref_logps"] - logps_BC
        kl_BC = jnp.exp(diff_BC) - diff_BC - 1
        if s.use_bias_correction_kl:  # times the (differentiable) ratio: unbiased reverse KL
            kl_BC = kl_BC * jnp.exp(log_w)
        per_token = per_token + s.beta * kl_BC
    return per_token, coef_1, kl_BC, eps_high


def grpo_loss(model: Any, batch: Batch, *, settings: GRPOSettings, chunk_size: int = 256):
    """This micro-batch's contribution to the step's GRPO loss (see the module docstring)."""
    logps_BC, entropy_BC, model_aux = completion_logps(
        model, batch, temperature=settings.temperature, chunk_size=chunk_size)
    loss, aux = grpo_objective(logps_BC, entropy_BC, batch, settings)
    return add_model_aux(loss, aux, model_aux, batch)


def grpo_objective(logps_BC: jax.Array, entropy_BC: jax.Array, batch: Batch,
                   s: GRPOSettings) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``(loss, aux)`` from the completion tokens' log-probs: the formula of
    :func:`grpo_loss`, apart from the model."""
    mask_BC = batch["completion_mask"].astype(jnp.float32)
    per_token, coef_1, kl_BC, eps_high = grpo_terms(logps_BC, batch, s)
    masked = per_token * mask_BC
    denom = jnp.asarray(batch.get("loss_denominator", _denominator(batch, s)), jnp.float32)
    if s.loss_type == "grpo":
        loss = jnp.sum(masked.sum(-1) / jnp.maximum(mask_BC.sum(-1), 1.0)) / denom
    elif s.loss_type == "bnpo":  # TRL's local token mean, averaged over micro-batches
        micro = jnp.asarray(batch.get("micro_batches", 1), jnp.float32)
        loss = masked.sum() / jnp.maximum(mask_BC.sum(), 1.0) / micro
    else:  # dr_grpo, dapo: global token sums over the normaliser
        loss = masked.sum() / denom
    return loss, _metrics(batch, logps_BC, entropy_BC, coef_1, kl_BC, mask_BC, eps_high, s)


def _metrics(batch, logps_BC, entropy_BC, coef_1, kl_BC, mask_BC, eps_high, s):
    """Contributions to global means (token-level over all completion tokens of the step,
    sequence-level over its completions), and maxima."""
    tokens = jnp.maximum(jnp.asarray(batch["num_completion_tokens"], jnp.float32), 1.0)
    rows = jnp.maximum(jnp.asarray(batch["num_sequences"], jnp.float32), 1.0)
    sg = jax.lax.stop_gradient

    def mean(x):  # TRL's global_masked_mean
        x = sg(x)
        if x.shape[1] == 1:
            return x.sum() / rows
        return jnp.sum(x * mask_BC) / tokens

    adv_B1 = batch["advantages"][:, None]
    low = ((coef_1 < 1 - s.epsilon) & (adv_B1 < 0)).astype(jnp.float32)
    high = ((coef_1 > 1 + eps_high) & (adv_B1 > 0)).astype(jnp.float32)
    aux = {
        "entropy": mean(entropy_BC),
        "clip_ratio/low_mean": mean(low),
        "clip_ratio/high_mean": mean(high),
        "clip_ratio/region_mean": mean(jnp.maximum(low, high)),
        "ratio/deviation_max": jnp.max(jnp.abs(sg(coef_1) - 1.0)
                                       * (mask_BC if coef_1.shape[1] > 1
                                          else (mask_BC.sum(-1, keepdims=True) > 0))),
    }
    if kl_BC is not None:
        aux["kl"] = mean(kl_BC)
    if "sampler_logps" in batch:
        diff_BC = jnp.abs(sg(logps_BC) - batch["sampler_logps"]) * mask_BC
        aux["sampling/logp_diff_mean"] = diff_BC.sum() / tokens
        aux["sampling/logp_diff_max"] = diff_BC.max()
    return aux


def _denominator(batch: Batch, s: GRPOSettings) -> jax.Array:
    """The step's normaliser over the global batch (see the module docstring)."""
    rows = batch["advantages"].shape[0]
    if s.loss_type == "grpo":
        return jnp.float32(rows)
    if s.loss_type == "dr_grpo":
        return jnp.float32(rows * s.max_completion_length)
    if s.loss_type == "dapo":
        return jnp.maximum(batch["completion_mask"].astype(jnp.float32).sum(), 1.0)
    return jnp.float32(1.0)  # bnpo normalises each micro-batch itself


def rollout_batch_shapes(cfg) -> dict[str, jax.ShapeDtypeStruct]:
    """A rollout batch's shapes for a config (``jaxtune plan``): rows of ``data.seq_len``
    tokens (the widest prompt budget), ``max_completion_length`` completion columns."""
    rl, rows = cfg.rl, cfg.trainer.global_batch_size
    t, c = cfg.data.seq_len, rl.max_completion_length
    ints, floats = jax.ShapeDtypeStruct((rows, t), jnp.int32), jax.ShapeDtypeStruct((rows, c),
                                                                                     jnp.float32)
    out = {"input_ids": ints, "positions": ints, "segment_ids": ints, "completion_mask": floats,
           "advantages": jax.ShapeDtypeStruct((rows,), jnp.float32),
           "num_completion_tokens": jax.ShapeDtypeStruct((), jnp.float32),
           "num_sequences": jax.ShapeDtypeStruct((), jnp.float32)}
    out["old_logps" if rl.num_iterations > 1 else "sampler_logps"] = floats
    if rl.beta != 0.0:
        out["ref_logps"] = floats
    return out


def _grpo(cfg) -> Objective:
    from jaxtune.plan.rollouts import rollout_shape
    from jaxtune.rl.producer import evaluate_rewards, make_rollout_producer
    from jaxtune.rl.rewards import load_rewards

    rl = cfg.rl
    load_rewards(rl)  # a reward that cannot be imported stops the run before any weights load
    settings = GRPOSettings.from_config(rl)
    loss = functools.partial(grpo_loss, settings=settings, chunk_size=cfg.trainer.loss_chunk_size)
    return Objective("grpo", loss, dict(ROLLOUT_AXES),
                     functools.partial(_denominator, s=settings), data_formats=("prompt",),
                     needs_reference=rl.beta != 0.0, batch_source=make_rollout_producer,
                     evaluate=evaluate_rewards, batch_shapes=rollout_batch_shapes,
                     generates=rollout_shape)


register_objective("grpo", _grpo)
