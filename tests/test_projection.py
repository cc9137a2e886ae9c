"""layers.project: its own VJP gives JAX autodiff's gradients, in the operands' dtypes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.models.layers import project


def reference(x, kernel, num_in, out_dtype=None):
    """The same contraction, differentiated by JAX's own dot_general transpose rules."""
    dims = ((tuple(range(x.ndim - num_in, x.ndim)), tuple(range(num_in))), ((), ()))
    return jax.lax.dot_general(x, kernel, dims, preferred_element_type=out_dtype)


@pytest.mark.parametrize("x_shape,kernel_shape,num_in", [
    ((3, 7, 13), (13, 5, 6), 1),  # q_proj: [B, T, D] . [D, N, H]
    ((3, 7, 5, 6), (5, 6, 13), 2),  # o_proj: [B, T, N, H] . [N, H, D]
    ((2, 9), (9, 11), 1),  # one row axis (the loss's chunks, LoRA's)
])
def test_gradients_match_autodiff(x_shape, kernel_shape, num_in):
    kx, kk, kc = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, x_shape)
    kernel = jax.random.normal(kk, kernel_shape)
    cot = jax.random.normal(kc, x_shape[:len(x_shape) - num_in] + kernel_shape[num_in:])

    def loss(f):
        return lambda x, k: jnp.sum(jnp.sin(f(x, k, num_in)) * cot)

    ours = jax.jit(jax.value_and_grad(loss(project), argnums=(0, 1)))(x, kernel)
    theirs = jax.jit(jax.value_and_grad(loss(reference), argnums=(0, 1)))(x, kernel)
    np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-6)
    for a, b in zip(ours[1], theirs[1], strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)


def test_bfloat16_operands_with_float32_accumulation():
    """The LM head's case: bf16 compute, float32 logits; gradients come back in bf16."""
    x = jax.random.normal(jax.random.key(1), (4, 24)).astype(jnp.bfloat16)
    kernel = jax.random.normal(jax.random.key(2), (24, 40)).astype(jnp.bfloat16)

    def loss(f):
        return lambda x, k: jnp.sum(jax.nn.log_softmax(f(x, k, 1, jnp.float32)))

    ours = jax.grad(loss(project), argnums=(0, 1))(x, kernel)
    theirs = jax.grad(loss(reference), argnums=(0, 1))(x, kernel)
    assert project(x, kernel, 1, jnp.float32).dtype == jnp.float32
    for a, b in zip(ours, theirs, strict=True):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=2e-2, atol=2e-2)


def test_a_frozen_kernel_needs_no_weight_gradient():
    """LoRA's frozen base: only dx is asked for, and the weight gradient's matmul is dropped."""
    x = jax.random.normal(jax.random.key(3), (2, 5, 16))
    kernel = jax.random.normal(jax.random.key(4), (16, 12))
    grad_x = jax.jit(jax.grad(lambda x: jnp.sum(project(x, kernel, 1) ** 2)))
    expected = jax.grad(lambda x: jnp.sum(reference(x, kernel, 1) ** 2))(x)
    np.testing.assert_allclose(grad_x(x), expected, rtol=2e-5, atol=2e-5)
    # the forward's matmul and dx's: no third one for the kernel's gradient
    assert grad_x.lower(x).as_text().count("dot_general") == 2


@pytest.mark.parametrize("remat,dots", [("none", 5), ("minimal", 5), ("dots_saveable", 5),
                                        ("full", 7)])
def test_remat_policies_keep_projection_outputs(remat, dots):
    """Two forward matmuls, then dW2, dx2 and dW1 (x needs no gradient). The policies that
    keep matmul outputs keep the projections' outputs, computed in a custom VJP: the
    backward runs no projection again; ``full`` runs both again."""
    from jaxtune.models.stack import REMAT_POLICIES

    x = jax.random.normal(jax.random.key(5), (2, 3, 8))
    w1 = jax.random.normal(jax.random.key(6), (8, 8))
    w2 = jax.random.normal(jax.random.key(7), (8, 4))

    def layer(x, w1, w2):
        return jnp.sum(jnp.sin(project(jnp.cos(project(x, w1, 1)), w2, 1)))

    fn = layer if remat == "none" else jax.checkpoint(layer, policy=REMAT_POLICIES[remat])
    grads = jax.jit(jax.value_and_grad(fn, argnums=(1, 2)))  # the forward is kept
    assert grads.lower(x, w1, w2).as_text().count("dot_general") == dots
    np.testing.assert_allclose(grads(x, w1, w2)[1][0], jax.grad(layer, argnums=1)(x, w1, w2),
                               rtol=1e-5, atol=1e-6)
