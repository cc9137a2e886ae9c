"""A checkpoint written from 8 devices as (data, fsdp, tensor) = (2, 2, 2) exports, read back
chunk by chunk on one host, to exactly the original HF tensors (scanned layers or not)."""

from __future__ import annotations

import numpy as np
import pytest

from jaxtune.config import MeshConfig
from jaxtune.export import export_run
from jaxtune.mesh import make_mesh
from jaxtune.run_dir import open_run
from tests.test_export import assert_same_tensors, checkpoint_run


@pytest.mark.parametrize("scan", [False, True])
def test_sharded_checkpoint_exports_exactly(scan, tiny_hf_model, data_tokenizers, tmp_path):
    model_dir = tiny_hf_model("qwen2")
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    run = checkpoint_run(tmp_path, model_dir, data_tokenizers["chatml"], scan=scan, mesh=mesh)
    saved = open_run(run).arrays
    # the arrays really were written in pieces (one chunk per shard)
    split = [a for a in saved.values() if np.prod(a.chunk_shape) < np.prod(a.shape)]
    assert len(split) > len(saved) // 2
    out = export_run(run, tmp_path / "hf", echo=lambda _: None)
    assert_same_tensors(model_dir, out)
