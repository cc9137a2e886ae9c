"""``to_global_batch`` on 8 devices: rows split over data x fsdp, values unchanged."""

from __future__ import annotations

import numpy as np
import pytest

from jaxtune.config import MeshConfig
from jaxtune.data import load_tokenizer, make_batch_iterator, to_global_batch
from jaxtune.mesh import make_mesh
from jaxtune.sharding import batch_sharding
from tests.fixtures_data import chat_rows, make_data_config, write_jsonl


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2), (1, 4, 2)])
def test_global_batch_is_sharded_over_batch_axes(tmp_path, data_tokenizers, shape):
    path = write_jsonl(tmp_path / "chat.jsonl", chat_rows(20))
    cfg = make_data_config(tmp_path, data_tokenizers["chatml"], [path], batch=8)
    host = next(make_batch_iterator(cfg, load_tokenizer(cfg)))
    mesh = make_mesh(MeshConfig(data=shape[0], fsdp=shape[1], tensor=shape[2]))
    batch = to_global_batch(host, mesh)
    assert set(batch) == set(host)
    for k, v in batch.items():
        assert v.sharding.is_equivalent_to(batch_sharding(mesh), v.ndim)
        assert v.dtype == host[k].dtype
        np.testing.assert_array_equal(np.asarray(v), host[k])
        rows_per_shard = 8 // (shape[0] * shape[1])
        assert {s.data.shape[0] for s in v.addressable_shards} == {rows_per_shard}
