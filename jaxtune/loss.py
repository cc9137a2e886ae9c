"""Masked token cross-entropy, computed in chunks, and the ``loss_fn(model, batch)`` contract.

A loss function is ``loss_fn(model, batch) -> (loss, aux)``. It returns this micro-batch's
*contribution* to the step loss: the train step sums contributions (and their gradients) over
micro-batches, and sets ``batch["loss_denominator"]`` to the number of trained tokens in the
whole global batch (all micro-batches, all devices). Dividing token sums by that one number
makes an accumulated step equal the full-batch step exactly, instead of averaging per-micro-batch
means (the 2024 gradient-accumulation bug, transformers #35438). ``aux`` holds sums only, so it
can be added up over micro-batches the same way: ``num_tokens``, ``nll_sum`` and ``z_loss``.

Batch keys (from the data pipeline): ``input_ids``, ``targets`` (next token, already shifted),
``positions`` and ``segment_ids`` (0 = padding) are int32 ``[B, T]``; ``loss_mask`` is float32
``[B, T]``. The model provides ``hidden_states(input_ids, positions, segment_ids) -> [B, T, D]``
and ``unembed(hidden) -> [..., V]`` float32 logits.

The vocabulary projection is the memory peak of fine-tuning (150k+ vocabularies make
``[B, T, V]`` float32 logits larger than the model's activations), so :func:`cross_entropy_loss`
never builds it: each device's trained tokens are gathered first and projected in chunks of C
tokens (all devices at once, so the batch stays sharded; chunks with no trained token are
skipped, so masked prompt tokens cost no vocabulary work), and a custom VJP computes each
chunk's logit gradient in the same pass, so neither the forward nor the backward keeps more
than one chunk's ``[G, C, V]`` logits and no chunk is projected twice. Axis letters: B batch,
T seq, D embed, V vocab, K chunks, G devices along the batch, C tokens per device per chunk
(S positions per row in the per-sequence sums).
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxtune import sharding
from jaxtune.errors import JaxtuneError
from jaxtune.models.family import hidden_states_and_aux

Batch = dict[str, jax.Array]
LossFn = Callable[[Any, Batch], tuple[jax.Array, dict[str, jax.Array]]]

#: Tokens each device projects to the vocabulary at a time (``trainer.loss_chunk_size``). Chunks
#: without a trained token are skipped, so smaller chunks skip more of chat data's masked
#: tokens: on 2 CPU cores the quickstart's LoRA job (vocab 49k, 55% of tokens trained) ran
#: 212 -> 236 -> 242 tok/s at 1024 / 512 / 256, and fully trained batches (vocab 8192) were as
#: fast at 256 as at 1024. A chunk's float32 logits take ``4 * C * V / tensor`` bytes per
#: device (150 MB at C=256, V=150k, no tensor parallelism).
DEFAULT_CHUNK_SIZE = 256


class ImportPathError(JaxtuneError):
    """A ``pkg.module:attr`` import path in the config that cannot be loaded."""


def _token_denominator(batch: Batch) -> jax.Array:
    """The global trained-token count if the train step set it, else this batch's own."""
    if "loss_denominator" in batch:
        return jnp.asarray(batch["loss_denominator"], jnp.float32)
    return jnp.maximum(batch["loss_mask"].astype(jnp.float32).sum(), 1.0)


def _token_terms(logits_V: jax.Array, targets: jax.Array, mask: jax.Array):
    """Masked sums of NLL and squared log-partition over tokens (any leading shape), in f32."""
    logits_V = logits_V.astype(jnp.float32)
    # Masked positions may hold any id (-100, pad, out of range); point them at 0 so the gather
    # stays in bounds and nothing NaN can leak through the mask into the gradient.
    safe_targets = jnp.where(mask != 0, targets, 0)
    lse = jax.nn.logsumexp(logits_V, axis=-1)
    target_logit = jnp.take_along_axis(logits_V, safe_targets[..., None], axis=-1)[..., 0]
    nll_sum = jnp.sum((lse - target_logit) * mask)
    z_sum = jnp.sum(jnp.square(lse) * mask)
    return nll_sum, z_sum


def _finish(total: jax.Array, nll_sum: jax.Array, z_sum: jax.Array, batch: Batch,
            z_loss: float):
    """``(loss, aux)`` from the token sums; ``total`` (= nll + z_loss * z) carries the gradient."""
    denominator = _token_denominator(batch)
    loss = total / denominator
    z_term = z_loss * z_sum / denominator
    aux = {
        "num_tokens": batch["loss_mask"].astype(jnp.float32).sum(),
        "nll_sum": nll_sum,
        "z_loss": z_term,
    }
    return loss, aux


def _inputs(model: Any, batch: Batch):
    hidden_BTD, model_aux = hidden_states_and_aux(model, batch["input_ids"], batch["positions"],
                                                  batch["segment_ids"])
    targets_BT = batch["targets"].astype(jnp.int32)
    mask_BT = batch["loss_mask"].astype(jnp.float32)
    return hidden_BTD, targets_BT, mask_BT, model_aux


def add_model_aux(loss: jax.Array, aux: dict[str, jax.Array], model_aux: dict[str, Any] | None,
                  batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Add a model's own auxiliary loss (``jaxtune.models.family.hidden_states_and_aux``) to an
    objective's ``(loss, aux)``, with its metrics in ``aux``; every objective calls this.

    The auxiliary loss is a mean over this micro-batch's tokens (a load-balancing loss is not a
    sum over tokens, so it cannot share the token denominator): each micro-batch contributes
    ``1 / batch["micro_batches"]`` of it, so the step's value is the mean over micro-batches
    (with one micro-batch: the loss on the whole global batch).
    """
    if model_aux is None:
        return loss, aux
    share = 1.0 / jnp.asarray(batch.get("micro_batches", 1), jnp.float32)
    aux = {**aux, **{k: v * share for k, v in model_aux.get("metrics", {}).items()}}
    return loss + model_aux["loss"] * share, aux


def batch_shards(batch_size: int) -> int:
    """How many ways the batch axis is split under the active activation rules (1 outside)."""
    # The mesh and rules the train step traces under (set by sharding.activation_rules).
    current = sharding.current_mesh_rules()
    if current is None:
        return 1
    mesh, rules = current
    spec = sharding.logical_to_spec(("batch",), rules, mesh, (batch_size,))
    axes = spec[0] if len(spec) else None
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape.get(a, 1) for a in axes)


def chunked_token_terms(
    unembed: Callable[[jax.Array], jax.Array],
    hidden_BTD: jax.Array,
    targets_BT: jax.Array,
    mask_BT: jax.Array,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    z_loss: float = 0.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(nll_sum + z_loss * z_sum, nll_sum, z_sum)`` over all tokens, a chunk at a time.

    Only trained tokens reach the vocabulary. Each device's tokens (its rows of the batch,
    ``G`` groups when the batch is split over ``G`` devices) are reordered so its trained
    tokens come first, in order, and cut into chunks of ``chunk_size`` tokens; a chunk with no
    trained token on any device is skipped, its logits never computed (chat data trains on
    about half its tokens: the prompts, the padding and the template's markup are masked). The
    batch axis stays sharded: a device projects only its own tokens. Only one chunk's
    ``[G, C, V]`` logits are ever live: under differentiation the backward work is fused into
    the forward scan (see :func:`_fused_terms`). Only the first output may be differentiated;
    the sums are metrics.
    """
    b, t, d = hidden_BTD.shape
    groups = batch_shards(b)
    groups = groups if b % groups == 0 else 1
    n = b // groups * t  # tokens per device
    c = max(1, min(n, chunk_size))
    num_chunks = -(-n // c)
    hidden_GND = hidden_BTD.reshape(groups, n, d)
    targets_GN = targets_BT.reshape(groups, n)
    mask_GN = mask_BT.reshape(groups, n)
    # Trained tokens first (a stable sort keeps their order); the gather's transpose puts each
    # token's gradient back in its place.
    order_GN = jnp.argsort((mask_GN == 0).astype(jnp.int32), axis=1, stable=True)
    hidden_GND = jnp.take_along_axis(hidden_GND, order_GN[:, :, None], axis=1)
    targets_GN = jnp.take_along_axis(targets_GN, order_GN, axis=1)
    mask_GN = jnp.take_along_axis(mask_GN, order_GN, axis=1)
    pad = num_chunks * c - n
    if pad:  # padded tokens have mask 0, so they add nothing to the sums or the gradients
        hidden_GND = jnp.pad(hidden_GND, ((0, 0), (0, pad), (0, 0)))
        targets_GN = jnp.pad(targets_GN, ((0, 0), (0, pad)))
        mask_GN = jnp.pad(mask_GN, ((0, 0), (0, pad)))
    # [G, K*C, ...] -> [K, G, C, ...]: the scan runs over K; G keeps the batch's sharding.
    hidden_KGCD = jnp.moveaxis(hidden_GND.reshape(groups, num_chunks, c, d), 1, 0)
    targets_KGC = jnp.moveaxis(targets_GN.reshape(groups, num_chunks, c), 1, 0)
    mask_KGC = jnp.moveaxis(mask_GN.reshape(groups, num_chunks, c), 1, 0)
    # Make the arrays unembed closes over (the head weights, traced for the gradient) explicit
    # arguments, so the custom VJP can return their gradients.
    unembed_flat, consts = jax.closure_convert(unembed, hidden_KGCD[0].reshape(groups * c, d))
    return _fused_terms(unembed_flat, float(z_loss))(hidden_KGCD, targets_KGC, mask_KGC,
                                                      tuple(consts))


#: Name scope of the loss's vocabulary work (the LM head's matmuls included), so profiles of
#: any backend can attribute it (``scripts/profile_step.py``).
LOSS_SCOPE = "vocab_loss"


def _fused_terms(unembed_flat: Callable[..., jax.Array], z_loss: float):
    """The chunk scan as a custom-VJP function of ``(hidden_KGCD, targets_KGC, mask_KGC,
    consts)``.

    Why not ``jax.checkpoint`` per chunk and autodiff: that recomputes every chunk's logits in
    the backward pass (4 vocabulary matmuls per chunk instead of 3). Computing the gradient in
    the forward pass needs 3 (2 when the head is frozen) and measured ~20% faster on CPU.
    """

    def project(hidden_GCD, consts):
        # Devices x tokens flattened to one token axis N = G*C (still split over the devices):
        # XLA fuses the 2-D softmax / gather / one-hot better, keeping fewer [N, V] buffers live
        # than with [G, C, V].
        g, c, d = hidden_GCD.shape
        hidden_GCD = sharding.constrain(hidden_GCD, ("batch", "seq", "embed"))
        hidden_ND = sharding.constrain(hidden_GCD.reshape(g * c, d), ("batch", "embed"))
        logits_NV = unembed_flat(hidden_ND, *consts).astype(jnp.float32)
        return sharding.constrain(logits_NV, ("batch", "vocab"))

    @jax.custom_vjp
    def terms(hidden_KGCD, targets_KGC, mask_KGC, consts):
        @jax.named_scope(LOSS_SCOPE)
        def body(carry, xs):
            hidden_GCD, targets_GC, mask_GC = xs

            def chunk(carry):
                nll, z = _token_terms(project(hidden_GCD, consts), targets_GC.reshape(-1),
                                      mask_GC.reshape(-1))
                return carry[0] + nll, carry[1] + z

            return jax.lax.cond(jnp.any(mask_GC != 0), chunk, lambda carry: carry, carry), None

        zero = jnp.zeros((), jnp.float32)
        (nll_sum, z_sum), _ = jax.lax.scan(body, (zero, zero),
                                           (hidden_KGCD, targets_KGC, mask_KGC))
        return nll_sum + z_loss * z_sum, nll_sum, z_sum

    def fwd(hidden_KGCD, targets_KGC, mask_KGC, consts):
        hidden_KGCD, targets_KGC, mask_KGC = hidden_KGCD.value, targets_KGC.value, mask_KGC.value
        want = [c.perturbed for c in consts]  # skip the head's gradient when it is frozen
        consts = [c.value for c in consts]
        diff_consts = [c for w, c in zip(want, consts, strict=True) if w]

        def logits_fn(hidden_GCD, diff_consts):
            it = iter(diff_consts)
            return project(hidden_GCD, [next(it) if w else c
                                        for w, c in zip(want, consts, strict=True)])

        def body(carry, xs):
            # A chunk without trained tokens (they are sorted first) adds nothing: skip it.
            return jax.lax.cond(jnp.any(xs[2] != 0), chunk, skip, carry, xs)

        def skip(carry, xs):
            return carry, jnp.zeros_like(xs[0])

        @jax.named_scope(LOSS_SCOPE)
        def chunk(carry, xs):
            acc, nll_sum, z_sum = carry
            hidden_GCD, targets_GC, mask_GC = xs
            logits_NV, pullback = jax.vjp(logits_fn, hidden_GCD, diff_consts)
            targets_N, mask_N = targets_GC.reshape(-1), mask_GC.reshape(-1)
            lse_N = jax.nn.logsumexp(logits_NV, axis=-1)
            safe_N = jnp.where(mask_N != 0, targets_N, 0)
            target_N = jnp.take_along_axis(logits_NV, safe_N[:, None], axis=-1)[:, 0]
            probs_NV = jnp.exp(logits_NV - lse_N[:, None])
            # d/dlogits of mask * (lse - target + z_loss * lse**2)
            scale_N = mask_N * (1.0 + 2.0 * z_loss * lse_N)
            onehot_NV = jax.nn.one_hot(safe_N, logits_NV.shape[-1], dtype=jnp.float32)
            dlogits_NV = probs_NV * scale_N[:, None] - onehot_NV * mask_N[:, None]
            dhidden_GCD, dconsts = pullback(dlogits_NV)
            # Sum the head gradient over chunks in float32 even when the weights are bf16.
            acc = [a + g.astype(jnp.float32) for a, g in zip(acc, dconsts, strict=True)]
            nll_sum = nll_sum + jnp.sum((lse_N - target_N) * mask_N)
            z_sum = z_sum + jnp.sum(jnp.square(lse_N) * mask_N)
            return (acc, nll_sum, z_sum), dhidden_GCD

        zero = jnp.zeros((), jnp.float32)
        acc0 = [jnp.zeros(c.shape, jnp.float32) for c in diff_consts]
        (acc, nll_sum, z_sum), dhidden_KGCD = jax.lax.scan(
            body, (acc0, zero, zero), (hidden_KGCD, targets_KGC, mask_KGC))
        it = iter(acc)
        # None marks a frozen array (no gradient); residuals may hold only arrays and None.
        dconsts = [next(it).astype(c.dtype) if w else None
                   for w, c in zip(want, consts, strict=True)]
        return (nll_sum + z_loss * z_sum, nll_sum, z_sum), (dhidden_KGCD, dconsts)

    def bwd(residuals, cotangents):
        dhidden_KGCD, dconsts = residuals
        g_total, g_nll, g_z = cotangents
        for name, g in (("nll_sum", g_nll), ("z_sum", g_z)):
            if not isinstance(g, jax.custom_derivatives.SymbolicZero):
                raise ValueError(
                    f"chunked_token_terms: only the first output (the loss) can be "
                    f"differentiated; '{name}' is for metrics."
                )
        dconsts = tuple(None if d is None else (g_total * d).astype(d.dtype) for d in dconsts)
        dhidden = (g_total * dhidden_KGCD).astype(dhidden_KGCD.dtype)
        return dhidden, None, None, dconsts

    terms.defvjp(fwd, bwd, symbolic_zeros=True)
    return terms


def cross_entropy_loss(
    model: Any,
    batch: Batch,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    z_loss: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The default loss: masked token cross-entropy (+ optional z-loss), chunked over tokens.

    Returns ``(sum(nll * mask) + z_loss * sum(lse**2 * mask)) / loss_denominator`` and the aux
    sums ``num_tokens``, ``nll_sum`` and ``z_loss`` (the z-loss term's contribution). Without
    ``loss_denominator`` in the batch it divides by this batch's own trained-token count.
    ``chunk_size`` is the number of tokens each device projects to the vocabulary at a time.
    """
    hidden_BTD, targets_BT, mask_BT, model_aux = _inputs(model, batch)
    total, nll_sum, z_sum = chunked_token_terms(
        model.unembed, hidden_BTD, targets_BT, mask_BT, chunk_size=chunk_size, z_loss=z_loss
    )
    return add_model_aux(*_finish(total, nll_sum, z_sum, batch, z_loss), model_aux, batch)


def full_logits_cross_entropy_loss(
    model: Any, batch: Batch, *, z_loss: float = 0.0
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The same loss from the whole ``[B, T, V]`` logits at once: the reference for tests."""
    hidden_BTD, targets_BT, mask_BT, model_aux = _inputs(model, batch)
    nll_sum, z_sum = _token_terms(model.unembed(hidden_BTD), targets_BT, mask_BT)
    return add_model_aux(*_finish(nll_sum + z_loss * z_sum, nll_sum, z_sum, batch, z_loss),
                         model_aux, batch)


def load_callable(path: str) -> Any:
    """The object named by ``"pkg.module:attr"`` (``attr`` may be dotted: ``Class.method``).

    The working directory is tried as a last resort, so a user's ``my_losses.py`` next to the
    config is found even when the ``jaxtune`` console script does not put it on ``sys.path``.
    """
    if not isinstance(path, str) or path.count(":") != 1 or not all(path.split(":")):
        raise ImportPathError(
            f"Import path '{path}' must look like 'pkg.module:function' (one colon between the "
            "module and the name in it)."
        )
    module_name, attr = path.split(":")
    module = _import_module(module_name, path)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n in dir(module) if not n.startswith("_"))
            raise ImportPathError(
                f"Import path '{path}': module '{module_name}' ({module.__file__}) has no "
                f"attribute '{attr}'. Public names there: {', '.join(names[:30]) or 'none'}."
            )
        obj = getattr(obj, part)
    return obj


def _import_module(module_name: str, path: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        missing = e.name or module_name
        # Only fall back to the working directory when the module itself is missing, not when
        # it exists and one of its own imports fails (that error is the user's to see).
        if not module_name.startswith(missing) or os.getcwd() in sys.path:
            raise ImportPathError(
                f"Import path '{path}': importing '{module_name}' failed: {e}. Install the "
                "package or run from the folder that holds it."
            ) from e
        sys.path.append(os.getcwd())
        try:
            return importlib.import_module(module_name)
        except ModuleNotFoundError as e2:
            raise ImportPathError(
                f"Import path '{path}': no module '{module_name}' on the Python path or in the "
                f"working directory ({e2}). Install the package or run from its folder."
            ) from e2
    except Exception as e:  # the module exists but raised while importing
        raise ImportPathError(
            f"Import path '{path}': module '{module_name}' raised while importing: "
            f"{type(e).__name__}: {e}"
        ) from e


def load_loss_fn(path: str) -> LossFn:
    """A replacement loss ``loss_fn(model, batch) -> (loss, aux)`` from an import path."""
    fn = load_callable(path)
    if not callable(fn):
        raise ImportPathError(
            f"'trainer.loss_fn' ({path}) names a {type(fn).__name__}, not a "
            "function loss_fn(model, batch) -> (loss, aux)."
        )
    return fn


def chunked_sequence_logps(
    unembed: Callable[[jax.Array], jax.Array],
    hidden_BTD: jax.Array,
    targets_BT: jax.Array,
    mask_BT: jax.Array,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> jax.Array:
    """Per-row sums of the masked target log-probs, ``[B]`` float32, a chunk at a time.

    What preference objectives (DPO, ORPO, SimPO) need: ``log p(completion | prompt)`` for each
    row. Chunked in slabs of ``S`` positions of every row (rows keep their identity, and the
    batch stays sharded), and each chunk is rematerialised in the backward pass, so only
    one chunk's ``[B, S, V]`` logits are ever live. Differentiable.
    """
    b, t, d = hidden_BTD.shape
    rows_per_device = max(1, b // batch_shards(b))
    s = max(1, min(t, -(-chunk_size // rows_per_device)))
    num_chunks = -(-t // s)
    pad = num_chunks * s - t
    if pad:  # padded positions have mask 0
        hidden_BTD = jnp.pad(hidden_BTD, ((0, 0), (0, pad), (0, 0)))
        targets_BT = jnp.pad(targets_BT, ((0, 0), (0, pad)))
        mask_BT = jnp.pad(mask_BT, ((0, 0), (0, pad)))
    hidden_KBSD = jnp.moveaxis(hidden_BTD.reshape(b, num_chunks, s, d), 1, 0)
    targets_KBS = jnp.moveaxis(targets_BT.reshape(b, num_chunks, s), 1, 0)
    mask_KBS = jnp.moveaxis(mask_BT.astype(jnp.float32).reshape(b, num_chunks, s), 1, 0)

    @jax.checkpoint
    def chunk_logps(hidden_BSD, targets_BS, mask_BS):
        hidden_BSD = sharding.constrain(hidden_BSD, ("batch", "seq", "embed"))
        logits_BSV = unembed(hidden_BSD).astype(jnp.float32)
        safe_BS = jnp.where(mask_BS != 0, targets_BS, 0)
        lse_BS = jax.nn.logsumexp(logits_BSV, axis=-1)
        target_BS = jnp.take_along_axis(logits_BSV, safe_BS[..., None], axis=-1)[..., 0]
        return jnp.sum((target_BS - lse_BS) * mask_BS, axis=-1)

    def body(acc_B, xs):
        return acc_B + chunk_logps(*xs), None

    logps_B, _ = jax.lax.scan(body, jnp.zeros((b,), jnp.float32),
                              (hidden_KBSD, targets_KBS, mask_KBS))
    return logps_B


def chunked_segment_logps(
    unembed: Callable[[jax.Array], jax.Array],
    hidden_BTD: jax.Array,
    targets_BT: jax.Array,
    mask_BT: jax.Array,
    segment_ids_BT: jax.Array,
    num_segments: int,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> jax.Array:
    """Sums of the masked target log-probs per row and segment, ``[B, num_segments]`` float32.

    What preference objectives need: ``log p(completion | prompt)`` of every document of a row
    (one per row when unpacked; both sides of several pairs when packed), each summed over its
    own segment's positions only, never across documents. ``segment_ids`` must be in
    ``[0, num_segments)``. Like :func:`chunked_token_terms`, only trained tokens reach the
    vocabulary: each device's tokens are reordered so its trained ones come first and projected
    ``chunk_size`` at a time, chunks without a trained token are skipped (a preference row's
    prompt tokens and padding cost no vocabulary work), and each chunk is rematerialised in the
    backward pass, so only one chunk's ``[G, C, V]`` logits are ever live. Differentiable.
    """
    b, t, d = hidden_BTD.shape
    groups = batch_shards(b)
    groups = groups if b % groups == 0 else 1
    rows = b // groups  # rows per device
    n = rows * t  # tokens per device
    c = max(1, min(n, chunk_size))
    num_chunks = -(-n // c)
    # Each token's (row, segment) as an index into its device's [rows * num_segments] sums.
    row_B = jnp.arange(b, dtype=jnp.int32) % rows
    slot_BT = row_B[:, None] * num_segments + segment_ids_BT.astype(jnp.int32)
    hidden_GND = hidden_BTD.reshape(groups, n, d)
    targets_GN = targets_BT.astype(jnp.int32).reshape(groups, n)
    mask_GN = mask_BT.astype(jnp.float32).reshape(groups, n)
    slot_GN = slot_BT.reshape(groups, n)
    order_GN = jnp.argsort((mask_GN == 0).astype(jnp.int32), axis=1, stable=True)
    hidden_GND = jnp.take_along_axis(hidden_GND, order_GN[:, :, None], axis=1)
    targets_GN, mask_GN, slot_GN = (jnp.take_along_axis(x, order_GN, axis=1)
                                    for x in (targets_GN, mask_GN, slot_GN))
    pad = num_chunks * c - n
    if pad:  # padded tokens have mask 0: they add nothing to any sum or gradient
        hidden_GND = jnp.pad(hidden_GND, ((0, 0), (0, pad), (0, 0)))
        targets_GN, mask_GN, slot_GN = (jnp.pad(x, ((0, 0), (0, pad)))
                                        for x in (targets_GN, mask_GN, slot_GN))
    hidden_KGCD = jnp.moveaxis(hidden_GND.reshape(groups, num_chunks, c, d), 1, 0)
    targets_KGC = jnp.moveaxis(targets_GN.reshape(groups, num_chunks, c), 1, 0)
    mask_KGC = jnp.moveaxis(mask_GN.reshape(groups, num_chunks, c), 1, 0)

    @jax.checkpoint
    def chunk(hidden_GCD, targets_GC, mask_GC):
        g = hidden_GCD.shape[0]
        hidden_GCD = sharding.constrain(hidden_GCD, ("batch", "seq", "embed"))
        hidden_ND = sharding.constrain(hidden_GCD.reshape(g * c, d), ("batch", "embed"))
        logits_NV = sharding.constrain(unembed(hidden_ND).astype(jnp.float32),
                                       ("batch", "vocab"))
        mask_N = mask_GC.reshape(-1)
        safe_N = jnp.where(mask_N != 0, targets_GC.reshape(-1), 0)
        lse_N = jax.nn.logsumexp(logits_NV, axis=-1)
        target_N = jnp.take_along_axis(logits_NV, safe_N[:, None], axis=-1)[:, 0]
        return ((target_N - lse_N) * mask_N).reshape(g, c)

    def body(_, xs):
        # A chunk without trained tokens (they are sorted first) adds nothing: skip it.
        logps_GC = jax.lax.cond(jnp.any(xs[2] != 0), lambda xs: chunk(*xs),
                                lambda xs: jnp.zeros(xs[2].shape, jnp.float32), xs)
        return None, logps_GC

    with jax.named_scope(LOSS_SCOPE):
        _, logps_KGC = jax.lax.scan(body, None, (hidden_KGCD, targets_KGC, mask_KGC))
    logps_GN = jnp.moveaxis(logps_KGC, 0, 1).reshape(groups, num_chunks * c)
    sums_GX = jax.vmap(lambda v, i: jax.ops.segment_sum(v, i, rows * num_segments))(
        logps_GN, slot_GN)
    return sums_GX.reshape(b, num_segments)


def chunked_token_logps(
    unembed: Callable[[jax.Array], jax.Array],
    hidden_BSD: jax.Array,
    targets_BS: jax.Array,
    *,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[jax.Array, jax.Array]:
    """Per-token ``(log p(target), entropy)``, each ``[B, S]`` float32, of the softmax of
    ``unembed(hidden) / temperature`` over the whole vocabulary, a chunk at a time.

    What RL objectives need for each completion token. Chunked like
    :func:`chunked_sequence_logps` (slabs of positions of every row, each rematerialised in the
    backward pass), so only one chunk's ``[B, s, V]`` logits are ever live. The log-probs are
    differentiable; the entropy is a metric (no gradient).
    """
    b, t, d = hidden_BSD.shape
    rows_per_device = max(1, b // batch_shards(b))
    s = max(1, min(t, -(-chunk_size // rows_per_device)))
    num_chunks = -(-t // s)
    pad = num_chunks * s - t
    if pad:
        hidden_BSD = jnp.pad(hidden_BSD, ((0, 0), (0, pad), (0, 0)))
        targets_BS = jnp.pad(targets_BS, ((0, 0), (0, pad)))
    hidden_KBsD = jnp.moveaxis(hidden_BSD.reshape(b, num_chunks, s, d), 1, 0)
    targets_KBs = jnp.moveaxis(targets_BS.reshape(b, num_chunks, s), 1, 0)

    @jax.checkpoint
    def chunk(hidden_BsD, targets_Bs):
        hidden_BsD = sharding.constrain(hidden_BsD, ("batch", "seq", "embed"))
        logits_BsV = unembed(hidden_BsD).astype(jnp.float32) / temperature
        lse_Bs = jax.nn.logsumexp(logits_BsV, axis=-1)
        target_Bs = jnp.take_along_axis(logits_BsV, targets_Bs[..., None], axis=-1)[..., 0]
        probs_BsV = jax.lax.stop_gradient(jnp.exp(logits_BsV - lse_Bs[..., None]))
        entropy_Bs = jax.lax.stop_gradient(
            lse_Bs - jnp.sum(probs_BsV * logits_BsV, axis=-1))
        return target_Bs - lse_Bs, entropy_Bs

    with jax.named_scope(LOSS_SCOPE):
        logps_KBs, entropy_KBs = jax.lax.map(lambda xs: chunk(*xs), (hidden_KBsD, targets_KBs))
    logps_BS = jnp.moveaxis(logps_KBs, 0, 1).reshape(b, num_chunks * s)[:, :t]
    entropy_BS = jnp.moveaxis(entropy_KBs, 0, 1).reshape(b, num_chunks * s)[:, :t]
    return logps_BS, entropy_BS
