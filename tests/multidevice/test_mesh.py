"""Mesh construction on 8 fake CPU devices, and errors that say what fits."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxtune.config import MeshConfig
from jaxtune.mesh import MeshError, check_batch, make_mesh


@pytest.mark.parametrize(
    "sizes, expected",
    [((8, 1, 1), (8, 1, 1)), ((2, 2, 2), (2, 2, 2)), ((1, 1, 8), (1, 1, 8)),
     ((-1, 2, 1), (4, 2, 1)), ((1, -1, 2), (1, 4, 2))],
)
def test_mesh_shapes(sizes, expected):
    mesh = make_mesh(MeshConfig(data=sizes[0], fsdp=sizes[1], tensor=sizes[2]))
    assert tuple(mesh.shape.values()) == expected
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_mesh_that_does_not_fit_says_why_and_what_fits():
    with pytest.raises(MeshError) as e:
        make_mesh(MeshConfig(data=3, fsdp=1, tensor=1))
    msg = str(e.value)
    assert "needs 3 devices" in msg and "8 are available" in msg
    assert "(8,1,1)" in msg and "(2,2,2)" in msg


def test_minus_one_that_cannot_divide():
    with pytest.raises(MeshError, match="does not divide"):
        make_mesh(MeshConfig(data=-1, fsdp=3, tensor=1))


def test_tensor_axis_is_innermost():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    # Neighbouring devices share the tensor axis.
    assert all(abs(int(a) - int(b)) == 1 for a, b in ids.reshape(-1, 2))


def test_batch_divisibility_error_suggests_sizes():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    check_batch(8, mesh)
    with pytest.raises(MeshError, match=r"global_batch_size in \[4, 8, 12, 16\]"):
        check_batch(6, mesh)
    with pytest.raises(MeshError, match="micro-batch of 2"):
        check_batch(8, mesh, grad_accum_steps=4)


def test_sharded_array_placement():
    from jaxtune.sharding import logical_to_spec, named_sharding

    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    s = named_sharding(mesh, ("embed", "mlp"), shape=(72, 200))
    x = jax.device_put(np.ones((72, 200), np.float32), s)
    assert x.sharding.spec == logical_to_spec(("embed", "mlp"))
    # 389 is odd: the vocab dim replicates instead of failing.
    assert named_sharding(mesh, ("vocab", "embed"), shape=(389, 72)).spec == P(None, "fsdp")
