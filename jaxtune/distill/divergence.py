"""The generalised Jensen-Shannon divergence of TRL's GKDTrainer, a vocabulary chunk at a time.

Per token, with ``s = log_softmax(student_logits / temperature)`` and ``t`` the teacher's the
same way (TRL 1.16, ``trl.experimental.gkd.GKDTrainer.generalized_jsd_loss``)::

    beta = 0:   KL(teacher || student) = sum_v exp(t_v) (t_v - s_v)          forward KL
    beta = 1:   KL(student || teacher) = sum_v exp(s_v) (s_v - t_v)          reverse KL
    otherwise:  m = log((1 - beta) exp(s) + beta exp(t))
                beta KL(teacher || m) + (1 - beta) KL(student || m)

(TRL special-cases beta 0 and 1: the mixture formula tends to 0 at both ends.) The loss is the
sum over trained tokens divided by the trained tokens of the whole global batch, TRL's
``num_items_in_batch`` reduction, so accumulation and sharding do not change it.

With ``top_k`` > 0 the teacher's distribution is its ``k`` most likely tokens plus one bucket
for the rest of the vocabulary, and the student's is taken over the same ``k + 1`` buckets
(its probabilities of those ``k`` tokens and the rest), so every ``beta`` stays a divergence
between two distributions; ``k`` = vocabulary size would give the full one back. This is what
precomputed teacher log-probs hold (:mod:`jaxtune.distill.topk`), and the same formula runs
when the top k are taken on the fly, so both give one trajectory.

Neither model's ``[tokens, vocab]`` logits are ever whole: :func:`chunked_divergence` projects
both models' hidden states a chunk of tokens at a time (each device its own rows; trained
tokens sorted first and chunks without one skipped, as ``jaxtune.loss.chunked_token_terms``),
and computes the chunk's gradient with respect to the student's logits in the same pass
(``jax.vjp`` through the student's head, ``jax.grad`` of the per-chunk terms), so nothing is
projected twice and the teacher's head never enters the backward pass. An optional
``ce_weight`` adds the student's token cross-entropy on the targets (the data's answer) from
the same chunk's logits. Axis letters: B batch, T seq, D / E student / teacher embed, V vocab,
K chunks, G devices along the batch, C tokens per device per chunk, N = G * C, k top-k.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero

from jaxtune import sharding
from jaxtune.loss import LOSS_SCOPE, batch_shards

#: The rest of the vocabulary's probability is floored here (top-k buckets), so its log stays
#: finite when the k tokens hold (to float32 precision) all of it.
_TINY = 1e-30


@dataclass(frozen=True)
class DivergenceSettings:
    """What the divergence computes (``distill`` section of the config)."""

    beta: float = 0.5
    temperature: float = 1.0
    top_k: int = 0
    ce_weight: float = 0.0


def generalized_jsd(student_logps: jax.Array, teacher_logps: jax.Array,
                    beta: float) -> jax.Array:
    """TRL's generalised JSD between two normalised log-distributions over the last axis,
    summed over it (see the module docstring)."""
    s, t = student_logps.astype(jnp.float32), teacher_logps.astype(jnp.float32)
    if beta == 0.0:
        return jnp.sum(jnp.exp(t) * (t - s), axis=-1)
    if beta == 1.0:
        return jnp.sum(jnp.exp(s) * (s - t), axis=-1)
    m = jnp.logaddexp(s + jnp.log1p(-beta), t + jnp.log(beta))
    return (beta * jnp.sum(jnp.exp(t) * (t - m), axis=-1)
            + (1.0 - beta) * jnp.sum(jnp.exp(s) * (s - m), axis=-1))


def with_rest(logps_Nk: jax.Array) -> jax.Array:
    """``[..., k + 1]``: k log-probs and the log of the probability left for the rest."""
    lse = jax.nn.logsumexp(logps_Nk, axis=-1, keepdims=True)
    rest = jnp.log(jnp.maximum(-jnp.expm1(jnp.minimum(lse, 0.0)), _TINY))
    return jnp.concatenate([logps_Nk, rest], axis=-1)


def teacher_topk(teacher_logps_NV: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """``(ids [..., k] int32, log-probs [..., k])`` of the teacher's k likeliest tokens."""
    logps, ids = jax.lax.top_k(teacher_logps_NV, k)
    return ids.astype(jnp.int32), logps


def token_divergence(student_logits_NV: jax.Array, teacher: tuple[jax.Array | None, jax.Array],
                     s: DivergenceSettings) -> tuple[jax.Array, jax.Array]:
    """Per-token ``(divergence [N], student entropy [N])`` at the temperature.

    ``teacher`` is ``(None, log-probs [N, V])`` for the whole vocabulary, or ``(ids [N, k],
    log-probs [N, k])`` of its top k tokens (log-probs at the temperature)."""
    student_NV = jax.nn.log_softmax(student_logits_NV.astype(jnp.float32) / s.temperature,
                                    axis=-1)
    ids, t_logps = teacher
    if ids is None:
        div = generalized_jsd(student_NV, t_logps, s.beta)
    else:
        picked = jnp.take_along_axis(student_NV, ids, axis=-1)
        div = generalized_jsd(with_rest(picked), with_rest(t_logps), s.beta)
    entropy = -jnp.sum(jnp.exp(student_NV) * student_NV, axis=-1)
    return div, jax.lax.stop_gradient(entropy)


def chunk_terms(student_logits_NV: jax.Array, teacher: tuple[jax.Array | None, jax.Array],
                targets_N: jax.Array, mask_N: jax.Array, ce_scale: jax.Array,
                s: DivergenceSettings):
    """``(total, (divergence, nll, entropy))`` masked sums over one chunk's tokens: ``total``
    = divergence + ``ce_weight * ce_scale`` x the student's NLL of the targets (at
    temperature 1), the value whose gradient trains."""
    logits_NV = student_logits_NV.astype(jnp.float32)
    mask_N = mask_N.astype(jnp.float32)
    div_N, entropy_N = token_divergence(logits_NV, teacher, s)
    safe_N = jnp.where(mask_N != 0, targets_N, 0)
    lse_N = jax.nn.logsumexp(logits_NV, axis=-1)
    nll_N = lse_N - jnp.take_along_axis(logits_NV, safe_N[:, None], axis=-1)[:, 0]
    div_sum = jnp.sum(div_N * mask_N)
    nll_sum = jnp.sum(nll_N * mask_N)
    total = div_sum + s.ce_weight * ce_scale * nll_sum if s.ce_weight else div_sum
    return total, (div_sum, jax.lax.stop_gradient(nll_sum), jnp.sum(entropy_N * mask_N))


# --------------------------------------------------------------------------- the teacher side


@dataclass(frozen=True)
class TeacherLogits:
    """The teacher as its hidden states and head: its log-probs are projected per chunk."""

    unembed: Callable[[jax.Array], jax.Array]
    hidden_BTE: jax.Array


@dataclass(frozen=True)
class TeacherTopK:
    """The teacher as precomputed top-k ids and log-probs per token (at the temperature)."""

    ids_BTk: jax.Array
    logps_BTk: jax.Array


def full_divergence(student_logits_BTV: jax.Array, teacher_logits_BTV: jax.Array | None,
                    targets_BT: jax.Array, mask_BT: jax.Array, s: DivergenceSettings, *,
                    teacher_topk: TeacherTopK | None = None, ce_scale: float = 1.0):
    """The same sums from whole ``[B, T, V]`` logits at once: the reference for tests."""
    b, t, v = student_logits_BTV.shape
    if teacher_topk is not None:
        k = teacher_topk.ids_BTk.shape[-1]
        teacher = (teacher_topk.ids_BTk.reshape(b * t, k),
                   teacher_topk.logps_BTk.reshape(b * t, k))
    else:
        logps = jax.nn.log_softmax(teacher_logits_BTV.reshape(b * t, v).astype(jnp.float32)
                                   / s.temperature, axis=-1)
        teacher = teacher_topk_or_full(jax.lax.stop_gradient(logps), s.top_k)
    return chunk_terms(student_logits_BTV.reshape(b * t, v), teacher, targets_BT.reshape(-1),
                       mask_BT.reshape(-1), jnp.float32(ce_scale), s)


def teacher_topk_or_full(logps_NV: jax.Array, k: int) -> tuple[jax.Array | None, jax.Array]:
    """The teacher's side of :func:`token_divergence` from its whole log-probs."""
    return teacher_topk(logps_NV, k) if k else (None, logps_NV)


# --------------------------------------------------------------------------- chunked


def chunked_divergence(
    student_unembed: Callable[[jax.Array], jax.Array],
    hidden_BTD: jax.Array,
    teacher: TeacherLogits | TeacherTopK,
    targets_BT: jax.Array,
    mask_BT: jax.Array,
    s: DivergenceSettings,
    *,
    ce_scale: jax.Array | float = 1.0,
    chunk_size: int = 256,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``(total, divergence, nll, entropy)`` masked sums over all tokens, a chunk at a time
    (see the module docstring). Only ``total`` may be differentiated (with respect to the
    student's hidden states and head); the others are metrics."""
    b, t, d = hidden_BTD.shape
    groups = batch_shards(b)
    groups = groups if b % groups == 0 else 1
    n = b // groups * t
    c = max(1, min(n, chunk_size))
    num_chunks = -(-n // c)
    pad = num_chunks * c - n
    mask_GN = mask_BT.astype(jnp.float32).reshape(groups, n)
    order_GN = jnp.argsort((mask_GN == 0).astype(jnp.int32), axis=1, stable=True)

    def chunks(x_BT: jax.Array) -> jax.Array:
        """``[B, T, ...] -> [K, G, C, ...]``: trained tokens first, then cut into chunks."""
        rest = x_BT.shape[2:]
        x = x_BT.reshape(groups, n, *rest)
        x = jnp.take_along_axis(x, order_GN.reshape(groups, n, *([1] * len(rest))), axis=1)
        if pad:  # padded tokens have mask 0
            x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * len(rest))
        return jnp.moveaxis(x.reshape(groups, num_chunks, c, *rest), 1, 0)

    hidden_KGCD = chunks(hidden_BTD)
    probe = hidden_KGCD[0].reshape(groups * c, d)
    student_flat, s_consts = jax.closure_convert(student_unembed, probe)
    if isinstance(teacher, TeacherLogits):
        hidden_t = jax.lax.stop_gradient(teacher.hidden_BTE)
        teacher_xs = (chunks(hidden_t),)
        t_probe = teacher_xs[0][0].reshape(groups * c, hidden_t.shape[-1])
        teacher_flat, t_consts = jax.closure_convert(teacher.unembed, t_probe)
        t_consts = [jax.lax.stop_gradient(x) for x in t_consts]
    else:
        teacher_xs = (chunks(teacher.ids_BTk), chunks(teacher.logps_BTk))
        teacher_flat, t_consts = None, []
    fused = _fused(student_flat, teacher_flat, s)
    return fused(hidden_KGCD, teacher_xs, chunks(targets_BT), chunks(mask_BT.astype(
        jnp.float32)), jnp.asarray(ce_scale, jnp.float32), tuple(s_consts), tuple(t_consts))


def _unwrap(tree: Any) -> Any:
    return jax.tree.map(lambda p: p.value, tree,
                        is_leaf=lambda x: isinstance(x, CustomVJPPrimal))


def _fused(student_flat: Callable[..., jax.Array], teacher_flat: Callable[..., jax.Array] | None,
           s: DivergenceSettings):
    """The chunk scan as a custom-VJP function of ``(hidden_KGCD, teacher_xs, targets_KGC,
    mask_KGC, ce_scale, student_consts, teacher_consts)`` (see ``jaxtune.loss._fused_terms``
    for why the gradient is made in the forward pass)."""

    def project(flat, hidden_GCD, consts):
        g, c, d = hidden_GCD.shape
        hidden_GCD = sharding.constrain(hidden_GCD, ("batch", "seq", "embed"))
        hidden_ND = sharding.constrain(hidden_GCD.reshape(g * c, d), ("batch", "embed"))
        logits_NV = flat(hidden_ND, *consts).astype(jnp.float32)
        return sharding.constrain(logits_NV, ("batch", "vocab"))

    def teacher_side(teacher_x, t_consts):
        if teacher_flat is None:  # precomputed top k
            ids, logps = teacher_x
            return ids.reshape(-1, ids.shape[-1]), logps.reshape(-1, logps.shape[-1])
        logits = project(teacher_flat, teacher_x[0], t_consts) / s.temperature
        logps = jax.lax.stop_gradient(jax.nn.log_softmax(logits, axis=-1))
        return teacher_topk_or_full(logps, s.top_k)

    def terms_of(logits_NV, teacher_x, targets_GC, mask_GC, ce_scale, t_consts):
        return chunk_terms(logits_NV, teacher_side(teacher_x, t_consts), targets_GC.reshape(-1),
                           mask_GC.reshape(-1), ce_scale, s)

    zero = jnp.zeros((), jnp.float32)

    @jax.custom_vjp
    def fused(hidden_KGCD, teacher_xs, targets_KGC, mask_KGC, ce_scale, s_consts, t_consts):
        @jax.named_scope(LOSS_SCOPE)
        def chunk(carry, xs):
            hidden_GCD, teacher_x, targets_GC, mask_GC = xs
            logits_NV = project(student_flat, hidden_GCD, s_consts)
            total, (div, nll, ent) = terms_of(logits_NV, teacher_x, targets_GC, mask_GC,
                                              ce_scale, t_consts)
            return tuple(a + b for a, b in zip(carry, (total, div, nll, ent), strict=True))

        def body(carry, xs):
            return jax.lax.cond(jnp.any(xs[3] != 0), chunk, lambda c, _: c, carry, xs), None

        sums, _ = jax.lax.scan(body, (zero,) * 4, (hidden_KGCD, teacher_xs, targets_KGC,
                                                   mask_KGC))
        return sums

    def fwd(hidden_KGCD, teacher_xs, targets_KGC, mask_KGC, ce_scale, s_consts, t_consts):
        want = [p.perturbed for p in s_consts]  # skip the head's gradient when it is frozen
        hidden_KGCD, teacher_xs, targets_KGC, mask_KGC, ce_scale, s_consts, t_consts = _unwrap(
            (hidden_KGCD, teacher_xs, targets_KGC, mask_KGC, ce_scale, s_consts, t_consts))
        diff = [x for w, x in zip(want, s_consts, strict=True) if w]

        def logits_fn(hidden_GCD, diff):
            it = iter(diff)
            return project(student_flat, hidden_GCD,
                           [next(it) if w else x for w, x in zip(want, s_consts, strict=True)])

        @jax.named_scope(LOSS_SCOPE)
        def chunk(carry, xs):
            acc, sums = carry
            hidden_GCD, teacher_x, targets_GC, mask_GC = xs
            logits_NV, pullback = jax.vjp(logits_fn, hidden_GCD, diff)
            (total, (div, nll, ent)), dlogits_NV = jax.value_and_grad(terms_of, has_aux=True)(
                logits_NV, teacher_x, targets_GC, mask_GC, ce_scale, t_consts)
            dhidden_GCD, dconsts = pullback(dlogits_NV)
            acc = [a + g.astype(jnp.float32) for a, g in zip(acc, dconsts, strict=True)]
            sums = tuple(a + b for a, b in zip(sums, (total, div, nll, ent), strict=True))
            return (acc, sums), dhidden_GCD

        def skip(carry, xs):
            return carry, jnp.zeros_like(xs[0])

        def body(carry, xs):
            return jax.lax.cond(jnp.any(xs[3] != 0), chunk, skip, carry, xs)

        acc0 = [jnp.zeros(x.shape, jnp.float32) for x in diff]
        (acc, sums), dhidden_KGCD = jax.lax.scan(
            body, (acc0, (zero,) * 4), (hidden_KGCD, teacher_xs, targets_KGC, mask_KGC))
        it = iter(acc)
        dconsts = [next(it).astype(x.dtype) if w else None
                   for w, x in zip(want, s_consts, strict=True)]
        return sums, (dhidden_KGCD, dconsts)

    def bwd(residuals, cotangents):
        dhidden_KGCD, dconsts = residuals
        g_total, *others = cotangents
        for name, g in zip(("divergence", "nll", "entropy"), others, strict=True):
            if not isinstance(g, SymbolicZero):
                raise ValueError(f"chunked_divergence: only the first output (the loss) can be "
                                 f"differentiated; '{name}' is a metric.")
        dconsts = tuple(None if x is None else (g_total * x).astype(x.dtype) for x in dconsts)
        return ((g_total * dhidden_KGCD).astype(dhidden_KGCD.dtype), None, None, None, None,
                dconsts, None)

    fused.defvjp(fwd, bwd, symbolic_zeros=True)
    return fused


def chunked_topk(unembed: Callable[[jax.Array], jax.Array], hidden_BTD: jax.Array, k: int, *,
                 temperature: float = 1.0, chunk_size: int = 256
                 ) -> tuple[jax.Array, jax.Array]:
    """``(ids [B, T, k] int32, log-probs [B, T, k])`` of each position's k likeliest tokens
    under ``log_softmax(unembed(hidden) / temperature)``, in slabs of positions of every row
    (only one slab's ``[B, s, V]`` logits live): what precomputed teacher log-probs hold."""
    b, t, d = hidden_BTD.shape
    rows_per_device = max(1, b // batch_shards(b))
    s = max(1, min(t, -(-chunk_size // rows_per_device)))
    num_chunks = -(-t // s)
    pad = num_chunks * s - t
    if pad:
        hidden_BTD = jnp.pad(hidden_BTD, ((0, 0), (0, pad), (0, 0)))
    hidden_KBsD = jnp.moveaxis(hidden_BTD.reshape(b, num_chunks, s, d), 1, 0)

    def chunk(hidden_BsD):
        hidden_BsD = sharding.constrain(hidden_BsD, ("batch", "seq", "embed"))
        logits = unembed(hidden_BsD).astype(jnp.float32) / temperature
        return teacher_topk(jax.nn.log_softmax(logits, axis=-1), k)

    with jax.named_scope(LOSS_SCOPE):
        ids_KBsk, logps_KBsk = jax.lax.map(chunk, hidden_KBsD)

    def unchunk(x):
        return jnp.moveaxis(x, 0, 1).reshape(b, num_chunks * s, k)[:, :t]

    return unchunk(ids_KBsk), unchunk(logps_KBsk)
