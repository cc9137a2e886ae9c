"""Chunked cross-entropy against the full-logits reference, accumulation, and import paths."""

from __future__ import annotations

import functools
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtune.errors import JaxtuneError
from jaxtune.loss import (
    ImportPathError,
    chunked_segment_logps,
    chunked_token_terms,
    cross_entropy_loss,
    full_logits_cross_entropy_loss,
    load_callable,
)

V, D, B, T = 389, 72, 3, 37  # odd sizes: 111 tokens never divide a chunk evenly


class TinyLM(nnx.Module):
    """Stand-in with the two methods the loss uses: an embedding and a linear head."""

    def __init__(self, rngs: nnx.Rngs, head_dtype=jnp.float32):
        self.embed_tokens = nnx.Param(jax.random.normal(rngs.params(), (V, D)) * 0.5)
        head = jax.random.normal(rngs.params(), (D, V)) * 0.3
        self.lm_head = nnx.Param(head.astype(head_dtype))

    def hidden_states(self, input_ids, positions, segment_ids):
        x = self.embed_tokens[...][input_ids]
        return jnp.tanh(x + 0.01 * positions[..., None]) * (segment_ids[..., None] > 0)

    def unembed(self, hidden):
        return jnp.einsum("...D,DV->...V", hidden.astype(self.lm_head.dtype),
                          self.lm_head[...]).astype(jnp.float32)


def make_batch(seed: int = 0, rows: int = B) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, (rows, T + 1))
    mask = (rng.random((rows, T)) < 0.7).astype(np.float32)
    mask[0, :] = 0.0  # a row with no trained tokens
    mask[0, 3] = 1.0
    return {
        "input_ids": jnp.asarray(ids[:, :-1], jnp.int32),
        "targets": jnp.asarray(ids[:, 1:], jnp.int32),
        "loss_mask": jnp.asarray(mask),
        "segment_ids": jnp.ones((rows, T), jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (rows, T)),
    }


@pytest.fixture(scope="module")
def model():
    return TinyLM(nnx.Rngs(0))


def value_and_grad(loss_fn, model, batch):
    graphdef, state = nnx.split(model)

    def f(state, batch):
        return loss_fn(nnx.merge(graphdef, state), batch)

    return jax.jit(jax.value_and_grad(f, has_aux=True))(state, batch)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32),
                                   rtol=rtol, atol=atol)


@pytest.mark.parametrize("chunk_size,z_loss", [(16, 0.0), (7, 1e-2), (4096, 1e-2)])
def test_chunked_equals_full_logits(model, chunk_size, z_loss):
    batch = make_batch()
    chunked = functools.partial(cross_entropy_loss, chunk_size=chunk_size, z_loss=z_loss)
    reference = functools.partial(full_logits_cross_entropy_loss, z_loss=z_loss)
    (loss, aux), grads = value_and_grad(chunked, model, batch)
    (ref_loss, ref_aux), ref_grads = value_and_grad(reference, model, batch)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    assert_trees_close(aux, ref_aux)
    assert_trees_close(grads, ref_grads)
    assert float(aux["num_tokens"]) == float(batch["loss_mask"].sum())
    assert (float(aux["z_loss"]) > 0) == (z_loss > 0)
    # the loss is the mean token NLL (+ z-loss) over trained tokens
    np.testing.assert_allclose(loss, (aux["nll_sum"] / aux["num_tokens"]) + aux["z_loss"],
                               rtol=1e-6)


def test_untrained_chunks_are_skipped_and_gradients_land_in_place():
    """Trained tokens are gathered first and all-masked chunks never reach the vocabulary: the
    loss and the gradients equal the full logits', every gradient lands on its own token, and
    NaN hidden states at masked tokens stay out (their chunks are never projected)."""
    b, t, d, v = 2, 9, 8, 11
    rng = np.random.default_rng(0)
    mask = np.zeros((b, t), np.float32)
    mask[0, t - 3:] = 1.0  # 6 trained tokens: at the end of one row, scattered in the other
    mask[1, [1, 4, 6]] = 1.0
    mask = jnp.asarray(mask)
    h = jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((d, v)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)

    def chunked(h, w):  # chunks of 3: the 6 trained tokens fill 2 chunks, 4 are skipped
        return chunked_token_terms(lambda x: x @ w, h, targets, mask, chunk_size=3)[0]

    def full(h, w):
        logits = h @ w
        lse = jax.nn.logsumexp(logits, -1)
        tgt = jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
        return jnp.sum((lse - tgt) * mask)

    (got, (dh, dw)), (want, (rdh, rdw)) = [jax.jit(jax.value_and_grad(f, (0, 1)))(h, w)
                                           for f in (chunked, full)]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(dh, rdh, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dw, rdw, rtol=1e-5, atol=1e-6)
    assert not np.any(np.asarray(dh)[np.asarray(mask) == 0])
    poisoned = jnp.where(mask[..., None] != 0, h, jnp.nan)
    loss, (dh_p, dw_p) = jax.jit(jax.value_and_grad(chunked, (0, 1)))(poisoned, w)
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    assert np.isfinite(np.asarray(dw_p)).all() and np.isfinite(np.asarray(dh_p)).all()


def test_segment_logps_equal_full_logits_per_document():
    """Per-(row, segment) log-prob sums (packed preference pairs): each document's sum holds
    its own trained tokens only, whatever chunk the trained-first order puts them in; the sums
    and their gradients (any cotangent per document) equal the full logits'."""
    b, t, d, v, s = 3, 11, 8, 13, 5
    rng = np.random.default_rng(1)
    seg = np.array([[1, 1, 1, 2, 2, 2, 2, 3, 3, 0, 0],  # three documents, then padding
                    [1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2],
                    [1, 1, 2, 2, 3, 3, 4, 4, 4, 4, 0]], np.int32)
    mask = (rng.random((b, t)) < 0.6).astype(np.float32) * (seg > 0)
    mask[1, :6] = 0.0  # a document without trained tokens
    seg, mask = jnp.asarray(seg), jnp.asarray(mask)
    h = jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((d, v)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
    ct = jnp.asarray(rng.standard_normal((b, s)), jnp.float32)  # a weight per document

    def chunked(h, w):
        return chunked_segment_logps(lambda x: x @ w, h, targets, mask, seg, s, chunk_size=4)

    def full(h, w):
        logp = jax.nn.log_softmax(h @ w, -1)
        tok = jnp.take_along_axis(logp, targets[..., None], -1)[..., 0] * mask
        return jnp.einsum("bt,bts->bs", tok, jax.nn.one_hot(seg, s))

    for f in (chunked, full):
        f.sums = jax.jit(f)(h, w)
        f.grads = jax.jit(jax.grad(lambda h, w, f=f: jnp.sum(f(h, w) * ct), (0, 1)))(h, w)
    np.testing.assert_allclose(chunked.sums, full.sums, rtol=1e-5, atol=1e-5)
    for got, want in zip(chunked.grads, full.grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    sums = np.asarray(chunked.sums)
    assert (sums[:, 0] == 0).all() and sums[1, 1] == 0 and (sums[[0, 1], 4] == 0).all()
    assert (sums[0, 1:4] < 0).all()


def test_accumulated_equals_full_batch(model):
    """Micro-batch contributions over a shared denominator sum to the full-batch loss/grads."""
    batch = make_batch(1, rows=4)
    batch["loss_mask"] = batch["loss_mask"].at[2:, 5:].set(0.0)  # uneven token counts
    denom = batch["loss_mask"].sum()
    (full, _), full_grads = value_and_grad(cross_entropy_loss, model, batch)
    halves = [{k: v[s] for k, v in batch.items()} for s in (slice(0, 2), slice(2, 4))]
    results = [value_and_grad(cross_entropy_loss, model, {**h, "loss_denominator": denom})
               for h in halves]
    total = sum(r[0][0] for r in results)
    grads = jax.tree.map(lambda a, b: a + b, results[0][1], results[1][1])
    np.testing.assert_allclose(total, full, rtol=1e-6)
    assert_trees_close(grads, full_grads)
    # ...whereas averaging per-micro-batch means (the HF 2024 bug) gives a different loss.
    means = [value_and_grad(cross_entropy_loss, model, h)[0][0] for h in halves]
    assert abs(float(sum(means) / 2 - full)) > 1e-3


def test_masked_garbage_targets_change_nothing(model):
    batch = make_batch(2)
    bad = dict(batch)
    bad["targets"] = jnp.where(batch["loss_mask"] > 0, batch["targets"], -100)
    bad["targets"] = bad["targets"].at[1, 0].set(jnp.where(batch["loss_mask"][1, 0] > 0,
                                                           bad["targets"][1, 0], V + 7))
    (loss, _), grads = value_and_grad(cross_entropy_loss, model, batch)
    (bad_loss, _), bad_grads = value_and_grad(
        functools.partial(cross_entropy_loss, chunk_size=16), model, bad)
    assert np.isfinite(bad_loss)
    np.testing.assert_allclose(bad_loss, loss, rtol=1e-6)
    assert_trees_close(bad_grads, grads)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)])
def test_frozen_head_and_bf16_head(dtype, tol):
    """Only the embedding differentiated (LoRA-like frozen head); a bf16 head keeps its dtype."""
    batch = make_batch(3)
    model = TinyLM(nnx.Rngs(1), head_dtype=dtype)
    graphdef, emb, rest = nnx.split(model, lambda path, _: "embed_tokens" in path, ...)

    def f(emb, loss_fn):
        return loss_fn(nnx.merge(graphdef, emb, rest), batch)[0]

    g = jax.jit(jax.grad(f), static_argnums=1)
    got = g(emb, functools.partial(cross_entropy_loss, chunk_size=16))
    ref = g(emb, full_logits_cross_entropy_loss)
    assert_trees_close(got, ref, rtol=tol, atol=tol * 1e-2)
    _, head_grads = value_and_grad(functools.partial(cross_entropy_loss, chunk_size=16),
                                   model, batch)
    assert head_grads["lm_head"][...].dtype == dtype


def test_full_logits_never_materialised(model):
    """No intermediate in the traced gradient is as large as the [N, V] logits."""
    batch = make_batch()
    graphdef, state = nnx.split(model)

    def biggest(loss_fn):
        def f(state):
            return loss_fn(nnx.merge(graphdef, state), batch)[0]

        return max(_sizes(jax.make_jaxpr(jax.grad(f))(state).jaxpr))

    assert biggest(full_logits_cross_entropy_loss) >= B * T * V  # the check can see it
    chunked = biggest(functools.partial(cross_entropy_loss, chunk_size=16))
    assert 16 * V <= chunked < B * T * V, chunked


def _sizes(jaxpr):
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            yield int(np.prod(getattr(var.aval, "shape", ()), dtype=np.int64))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", None)
                if isinstance(inner, jax.extend.core.Jaxpr):
                    yield from _sizes(inner)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _sizes(sub)


def test_denominator_defaults_to_own_tokens(model):
    batch = make_batch(4)
    loss, aux = cross_entropy_loss(model, batch, chunk_size=32)
    np.testing.assert_allclose(loss, aux["nll_sum"] / batch["loss_mask"].sum(), rtol=1e-6)
    loss2, _ = cross_entropy_loss(model, {**batch, "loss_denominator": jnp.float32(10.0)},
                                  chunk_size=32)
    np.testing.assert_allclose(loss2, aux["nll_sum"] / 10.0, rtol=1e-6)


def test_only_the_loss_output_is_differentiable():
    w = jnp.ones((4, 5))
    h = jnp.ones((2, 6, 4))
    t = jnp.zeros((2, 6), jnp.int32)
    m = jnp.ones((2, 6))

    def nll_sum(w):
        return chunked_token_terms(lambda x: x @ w, h, t, m, chunk_size=4)[1]

    with pytest.raises(ValueError, match="only the first output"):
        jax.grad(nll_sum)(w)


# --------------------------------------------------------------------------- import paths


def test_load_callable_ok_and_errors(tmp_path, monkeypatch):
    assert load_callable("jaxtune.loss:cross_entropy_loss") is cross_entropy_loss
    assert load_callable("jaxtune.loss:ImportPathError.__name__") == "ImportPathError"
    for bad in ("jaxtune.loss", "a:b:c", ":f", "jaxtune.loss:"):
        with pytest.raises(ImportPathError, match="pkg.module:function"):
            load_callable(bad)
    with pytest.raises(ImportPathError, match="no attribute 'nope'.*cross_entropy_loss"):
        load_callable("jaxtune.loss:nope")
    with pytest.raises(JaxtuneError, match="no_such_pkg_xyz"):
        load_callable("no_such_pkg_xyz.mod:f")
    (tmp_path / "broken_mod_xyz.py").write_text("import not_installed_dep_xyz\n")
    (tmp_path / "raising_mod_xyz.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportPathError, match="not_installed_dep_xyz"):
        load_callable("broken_mod_xyz:f")
    with pytest.raises(ImportPathError, match="RuntimeError: boom"):
        load_callable("raising_mod_xyz:f")


def test_load_callable_finds_working_directory(tmp_path, monkeypatch):
    (tmp_path / "my_losses_xyz.py").write_text("def my_loss(model, batch):\n    return 1, {}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert load_callable("my_losses_xyz:my_loss")(None, None) == (1, {})


def test_make_loss_fn(model):
    from jaxtune.objectives import make_loss_fn

    cfg = types.SimpleNamespace(loss_fn="", loss_chunk_size=16, z_loss=1e-2, objective="sft")
    batch = make_batch(5)
    loss, _ = make_loss_fn(cfg)(model, batch)
    ref, _ = full_logits_cross_entropy_loss(model, batch, z_loss=1e-2)
    np.testing.assert_allclose(loss, ref, rtol=1e-6)
    cfg.loss_fn = "jaxtune.loss:full_logits_cross_entropy_loss"
    assert make_loss_fn(cfg).loss is full_logits_cross_entropy_loss
    cfg.objective = "no-such-objective"
    with pytest.raises(JaxtuneError, match="trainer.objective 'no-such-objective'"):
        make_loss_fn(cfg)
    cfg.objective = "sft"
    cfg.loss_fn = "jaxtune.loss:DEFAULT_CHUNK_SIZE"
    with pytest.raises(ImportPathError, match="not a function"):
        make_loss_fn(cfg)
