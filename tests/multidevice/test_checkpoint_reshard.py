"""A checkpoint saved on 8 devices as (data, fsdp, tensor) = (2, 2, 2) resumes on 4 of them as
(4, 1, 1): the arrays are read straight into the new shardings, and the next step's loss
matches the step the original mesh would have taken.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxtune.checkpoint import Checkpointer
from jaxtune.config import MeshConfig
from jaxtune.mesh import make_mesh
from tests.test_checkpoint import ToyData, host, make_cfg, run_steps, toy_state, toy_step


def test_resume_on_a_smaller_differently_shaped_mesh(tmp_path):
    mesh8 = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    cfg = make_cfg(tmp_path, save_every=3)
    state, data = toy_state(mesh8), ToyData()
    assert state.params["w"].get_value().sharding.spec == P("fsdp", "tensor")
    step8 = toy_step(mesh8, state)
    ck = Checkpointer(cfg, mesh8)
    state, _ = run_steps(step8, state, data, mesh8, 1, 3, ck)
    ck.close()
    saved = host(state.params)
    # The reference: the next step on the original 8-device mesh.
    state, ref = run_steps(step8, state, data, mesh8, 4, 4)

    mesh4 = make_mesh(MeshConfig(data=4, fsdp=1, tensor=1), devices=jax.devices()[:4])
    data4 = ToyData()
    ck = Checkpointer(cfg, mesh4)
    restored = ck.restore(toy_state(mesh4, seed=7), data4)
    ck.close()
    assert int(restored.step) == 3 and data4.pos == 3
    for x in jax.tree.leaves(restored):
        assert x.sharding.mesh.devices.size == 4, x.sharding
        assert set(x.sharding.device_set) <= set(jax.devices()[:4])
    for got, want in zip(host(restored.params), saved, strict=True):
        np.testing.assert_array_equal(got, want)  # reading onto another layout is exact

    restored, got = run_steps(toy_step(mesh4, restored), restored, data4, mesh4, 4, 4)
    np.testing.assert_allclose(got[4], ref[4], rtol=1e-6)
    for a, b in zip(host(restored.params), host(state.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
