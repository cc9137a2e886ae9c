"""Sharding invariance: three train steps on 8-device meshes equal the one-device run."""

import jax
import numpy as np
import pytest

from tests.train_helpers import make_stepper, params_numpy, put, synthetic_batch

MESHES = [(8, 1, 1), (2, 2, 2), (1, 2, 4), (1, 1, 8)]


def _three_steps(model_dir, sizes):
    state, fn, mesh = make_stepper(model_dir, sizes, optimizer="sgd", lr=0.05)
    losses = []
    for i in range(3):
        state, m = fn(state, put(synthetic_batch(8, 24, 389, seed=i), mesh))
        losses.append(float(m["loss"]))
    return losses, params_numpy(state), state


@pytest.fixture(scope="module")
def reference(tiny_hf_model):
    return _three_steps(tiny_hf_model("llama"), (1, 1, 1))


@pytest.mark.parametrize("sizes", MESHES, ids=[str(m) for m in MESHES])
def test_sharded_equals_single_device(tiny_hf_model, reference, sizes):
    ref_losses, ref_params, _ = reference
    losses, params, state = _three_steps(tiny_hf_model("llama"), sizes)
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    for k in ref_params:
        np.testing.assert_allclose(params[k], ref_params[k], rtol=1e-4, atol=1e-5, err_msg=k)
    # The parameters really are spread over the mesh (not silently replicated).
    specs = {str(leaf.sharding.spec) for leaf in jax.tree.leaves(state.params)}
    assert any(s != "PartitionSpec()" for s in specs), specs
