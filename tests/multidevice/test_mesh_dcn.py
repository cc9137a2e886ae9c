"""The ``dcn_data`` part of the mesh: data parallelism across slices or hosts.

On 8 fake CPU devices (one process) ``dcn_data`` splits the devices into consecutive blocks;
device objects that carry ``slice_index`` (as multislice TPUs do) or several process indices
check how granules are formed. The two-process run in tests/test_multihost_e2e.py trains on a
``dcn_data=2`` mesh for real.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from jaxtune.config import MeshConfig
from jaxtune.mesh import MeshError, _hybrid_grid, make_mesh


def ids(grid) -> np.ndarray:
    return np.vectorize(lambda d: d.id)(grid)


def test_dcn_mesh_equals_the_plain_mesh_with_data_outermost():
    hybrid = make_mesh(MeshConfig(data=1, fsdp=2, tensor=2, dcn_data=2))
    plain = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    assert dict(hybrid.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    np.testing.assert_array_equal(ids(hybrid.devices), ids(plain.devices))
    assert sorted(ids(hybrid.devices)[0].ravel()) == [0, 1, 2, 3]  # granule 0 = first block


def test_dcn_with_data_minus_one_takes_the_rest():
    mesh = make_mesh(MeshConfig(data=-1, fsdp=2, tensor=1, dcn_data=2))
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}


def test_dcn_that_does_not_fit_says_so():
    with pytest.raises(MeshError, match="dcn_data=3"):
        make_mesh(MeshConfig(data=1, fsdp=2, tensor=1, dcn_data=3))
    with pytest.raises(MeshError, match="multiple of 3"):
        make_mesh(MeshConfig(data=-1, fsdp=1, tensor=8, dcn_data=3))


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    id: int
    process_index: int
    slice_index: int | None = None
    platform: str = "cpu"
    device_kind: str = "cpu"


def test_multislice_devices_are_grouped_by_slice_index():
    # Interleaved on purpose: slice membership, not device order, must decide the blocks.
    devs = [FakeDevice(i, process_index=i // 2, slice_index=i % 2) for i in range(8)]
    grid = _hybrid_grid((1, 2, 2), 2, devs)
    assert grid.shape == (2, 2, 2)
    for s in range(2):
        assert {d.slice_index for d in grid[s].ravel()} == {s}


def test_hosts_are_grouped_into_consecutive_processes():
    # 4 processes (e.g. one per GPU pair) of 2 devices on 2 nodes: dcn_data=2 groups 0-1, 2-3.
    devs = [FakeDevice(i, process_index=i // 2) for i in reversed(range(8))]
    grid = _hybrid_grid((1, 4, 1), 2, devs)
    assert [sorted({d.process_index for d in grid[s].ravel()}) for s in range(2)] == [
        [0, 1], [2, 3]]
    with pytest.raises(MeshError, match="3 equal groups"):
        _hybrid_grid((1, 2, 1), 3, devs)
