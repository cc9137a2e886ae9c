"""Optimizer chain: every optimizer descends, schedule values, decay mask, freezing, clipping."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxtune.config import ConfigError, OptimizerConfig
from jaxtune.optim import make_optimizer, make_schedule, param_paths


def cfg(**kw) -> OptimizerConfig:
    base = dict(schedule="constant", max_grad_norm=0.0, weight_decay=0.0)
    return dataclasses.replace(OptimizerConfig(), **{**base, **kw})


def quadratic_params():
    rng = np.random.default_rng(0)
    return {
        "w": jnp.asarray(rng.normal(size=(7, 5)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(5,)), jnp.float32),
    }


def quadratic_loss(p):
    # an ill-conditioned bowl with its minimum at w = 1, b = -1
    scales = jnp.linspace(0.5, 2.0, 5)
    return jnp.sum(scales * (p["w"] - 1.0) ** 2) + jnp.sum(scales * (p["b"] + 1.0) ** 2)


def run(tx, params, steps):
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(quadratic_loss)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = step(params, state)
    return params, state


@pytest.mark.parametrize("name,lr", [("adamw", 0.1), ("adafactor", 0.1), ("lion", 0.05),
                                     ("sgd", 0.05), ("muon", 0.1)])
def test_each_optimizer_descends(name, lr):
    params = quadratic_params()
    c = cfg(name=name, learning_rate=lr, weight_decay=1e-4, max_grad_norm=10.0)
    final, _ = run(make_optimizer(c, 30, params), params, 30)
    assert float(quadratic_loss(final)) < 0.3 * float(quadratic_loss(params))


def test_schedules_at_key_steps():
    peak, floor = 1e-3, 1e-4
    c = cfg(learning_rate=peak, warmup_steps=10, min_lr_ratio=0.1)

    def lr(schedule, step, total=110, **kw):
        return float(make_schedule(dataclasses.replace(c, schedule=schedule, **kw), total)(step))

    for s in ("constant", "linear", "cosine", "wsd"):
        assert lr(s, 0) == 0.0
        np.testing.assert_allclose(lr(s, 5), peak / 2, rtol=1e-6)  # halfway through warmup
        np.testing.assert_allclose(lr(s, 10), peak, rtol=1e-6)  # warmup end
    np.testing.assert_allclose(lr("constant", 110), peak, rtol=1e-6)
    for s in ("linear", "cosine"):
        np.testing.assert_allclose(lr(s, 60), (peak + floor) / 2, rtol=1e-5)  # decay midpoint
        np.testing.assert_allclose(lr(s, 110), floor, rtol=1e-5)
    np.testing.assert_allclose(lr("linear", 35), peak - (peak - floor) / 4, rtol=1e-5)
    np.testing.assert_allclose(lr("cosine", 35), floor + (peak - floor) * 0.5 * (1 + np.cos(
        np.pi / 4)), rtol=1e-5)
    # wsd, last 20% decaying: plateau until step 88, then linear to the floor at 110
    for step in (10, 50, 88):
        np.testing.assert_allclose(lr("wsd", step, decay_fraction=0.2), peak, rtol=1e-6)
    np.testing.assert_allclose(lr("wsd", 99, decay_fraction=0.2), (peak + floor) / 2, rtol=1e-5)
    np.testing.assert_allclose(lr("wsd", 110, decay_fraction=0.2), floor, rtol=1e-5)
    # the schedule inside the optimizer is the same one: an SGD step moves by lr * grad
    params = {"w": jnp.zeros((3,))}
    tx = make_optimizer(cfg(name="sgd", momentum=0.0, learning_rate=peak, warmup_steps=10,
                            schedule="cosine"), 110, params)
    state = tx.init(params)
    for _ in range(6):
        updates, state = tx.update({"w": jnp.ones((3,))}, state, params)
    np.testing.assert_allclose(updates["w"], -peak / 2, rtol=1e-6)


def decay_params():
    ones = jnp.ones
    return {"model": {
        "embed_tokens": {"embedding": ones((11, 4))},
        "layers": {"0": {
            "input_layernorm": {"scale": ones((4,))},
            "self_attn": {"q_proj": {"kernel": ones((4, 6)), "bias": ones((6,))}},
        }},
        "norm": {"scale": ones((4,))},
    }}


@pytest.mark.parametrize("name", ["sgd", "adamw", "lion"])
def test_weight_decay_mask(name):
    """Zero gradients: the update is -lr * wd * param where decayed, exactly 0 on norms/biases."""
    params = decay_params()
    assert "model.layers.0.self_attn.q_proj.kernel" in param_paths(params)
    tx = make_optimizer(cfg(name=name, momentum=0.0, learning_rate=0.5, weight_decay=0.2),
                        10, params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    for path, u in zip(param_paths(updates), jax.tree.leaves(updates), strict=True):
        expected = 0.0 if ("norm" in path or "bias" in path) else -0.1
        np.testing.assert_allclose(u, expected, err_msg=path, atol=1e-7)


class Tiny(nnx.Module):
    def __init__(self):
        self.embed_tokens = nnx.Param(jnp.ones((11, 4)) * 0.3, logical_axes=("vocab", "embed"))
        self.q_proj = nnx.Param(jnp.ones((4, 6)) * 0.2, logical_axes=("embed", "heads"))
        self.norm = nnx.Param(jnp.ones((4,)), logical_axes=("embed",))


def test_freezing_leaves_params_bitwise_and_holds_no_state():
    _, params, _ = nnx.split(Tiny(), nnx.Param, ...)
    for name in ("adamw", "adafactor", "lion", "sgd", "muon"):
        tx = make_optimizer(cfg(name=name, weight_decay=0.1, max_grad_norm=1.0,
                                freeze=[r"^embed_tokens$"]), 10, params)
        state = tx.init(params)
        shapes = {tuple(x.shape) for x in jax.tree.leaves(state)}
        assert (11, 4) not in shapes and (11,) not in shapes, (name, shapes)
        new = params
        for _ in range(3):
            grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), new)
            updates, state = tx.update(grads, state, new)
            new = optax.apply_updates(new, updates)
        np.testing.assert_array_equal(new["embed_tokens"][...], params["embed_tokens"][...])
        assert not np.allclose(new["q_proj"][...], params["q_proj"][...]), name


def test_freeze_errors():
    params = decay_params()
    with pytest.raises(ConfigError, match="'q_projj' matches no trainable parameter"):
        make_optimizer(cfg(freeze=["q_projj"]), 10, params)
    with pytest.raises(ConfigError, match="freezes every trainable parameter"):
        make_optimizer(cfg(freeze=["model"]), 10, params)
    with pytest.raises(ConfigError, match="not a valid regex"):
        make_optimizer(cfg(freeze=["(unclosed"]), 10, params)
    with pytest.raises(ConfigError, match="min_lr_ratio"):
        make_optimizer(cfg(min_lr_ratio=2.0), 10, params)


def test_clipping_uses_trainable_grads_only():
    params = {"frozen": jnp.zeros((3,)), "w": jnp.zeros((4,))}
    c = cfg(name="sgd", momentum=0.0, learning_rate=1.0, max_grad_norm=1.0, freeze=["frozen"])
    tx = make_optimizer(c, 10, params)
    state = tx.init(params)
    small = {"frozen": jnp.full((3,), 1000.0), "w": jnp.full((4,), 0.2)}  # trainable norm 0.4
    updates, _ = tx.update(small, state, params)
    np.testing.assert_allclose(updates["w"], -0.2, rtol=1e-6)
    np.testing.assert_array_equal(updates["frozen"], 0.0)
    big = {"frozen": jnp.zeros((3,)), "w": jnp.full((4,), 5.0)}  # norm 10 -> clipped to 1
    updates, _ = tx.update(big, state, params)
    np.testing.assert_allclose(jnp.linalg.norm(updates["w"]), 1.0, rtol=1e-5)


def test_state_dtype_first_moment_only():
    params = {"w": jnp.zeros((4, 3))}
    state = make_optimizer(cfg(state_dtype="bfloat16"), 10, params).init(params)
    adam = next(s for s in jax.tree.leaves(state, is_leaf=lambda s: hasattr(s, "nu"))
                if hasattr(s, "nu"))
    assert adam.mu["w"].dtype == jnp.bfloat16 and adam.nu["w"].dtype == jnp.float32
    for name in ("lion", "sgd", "muon"):
        state = make_optimizer(cfg(name=name, state_dtype="bfloat16"), 10, params).init(params)
        assert jnp.dtype(jnp.bfloat16) in {x.dtype for x in jax.tree.leaves(state)}, name


def test_muon_orthogonalises_along_logical_axes():
    """q_proj [embed, heads, head_dim] is a 6x(3*4) matrix for Muon; o_proj reduces over
    heads x head_dim; the embedding (vocab axis) and norms fall back to Adam."""

    class Attn(nnx.Module):
        def __init__(self):
            self.embed_tokens = nnx.Param(jnp.ones((11, 6)), logical_axes=("vocab", "embed"))
            self.q_proj = nnx.Param(jnp.zeros((6, 3, 4)), logical_axes=("embed", "heads",
                                                                         "head_dim"))
            self.o_proj = nnx.Param(jnp.zeros((2, 3, 4, 6)), logical_axes=("layers", "heads",
                                                                            "head_dim", "embed"))
            self.norm = nnx.Param(jnp.ones((6,)), logical_axes=("embed",))

    _, params, _ = nnx.split(Attn(), nnx.Param, ...)
    tx = make_optimizer(cfg(name="muon", learning_rate=1.0), 10, params)
    rng = np.random.default_rng(0)
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
    updates, _ = tx.update(grads, tx.init(params), params)

    def singular_values(x, rows):
        return np.linalg.svd(np.asarray(x).reshape(rows, -1), compute_uv=False)

    q = singular_values(updates["q_proj"][...], 6)
    o0 = singular_values(updates["o_proj"][...][0], 12)
    for s in (q / q.max(), o0 / o0.max()):
        assert s.min() > 0.5, s  # Newton-Schulz flattens the spectrum
    raw = singular_values(grads["q_proj"][...], 6)
    assert (raw / raw.max()).min() < 0.5  # (a random matrix's spectrum is not flat)
    # Adam's first step moves every coordinate by ~lr: the fallback for embedding and norm
    np.testing.assert_allclose(np.abs(updates["embed_tokens"][...]), 1.0, rtol=1e-3)
    np.testing.assert_allclose(np.abs(updates["norm"][...]), 1.0, rtol=1e-3)
