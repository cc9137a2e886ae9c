"""Gemma models on a (data=2, fsdp=2, tensor=2) mesh of 8 fake CPU devices: logits match
transformers (soft-caps, sliding windows, local / global RoPE), and packed rows match their
documents alone."""

from __future__ import annotations

import numpy as np
import pytest

import jaxtune
from jaxtune.config import MeshConfig
from jaxtune.mesh import make_mesh
from tests.fixtures_gemma import VOCAB
from tests.fixtures_models import hf_logits
from tests.multidevice.test_models_sharded import _sharded_logits


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))


def _ids() -> np.ndarray:
    return np.random.RandomState(2).randint(0, VOCAB, (4, 16))


@pytest.mark.parametrize("name,scan", [("gemma", False), ("gemma2", True), ("gemma3", True)])
def test_sharded_logits_match_transformers(tiny_gemma_model, mesh, name, scan):
    path = tiny_gemma_model(name)
    model = jaxtune.from_pretrained(path, mesh=mesh, scan_layers=scan)
    ids = _ids()
    np.testing.assert_allclose(_sharded_logits(model, mesh, ids), hf_logits(path, ids),
                               atol=1e-4, rtol=0)


def test_sharded_packed_rows_match_their_documents(tiny_gemma_model, mesh):
    path = tiny_gemma_model("gemma2")
    model = jaxtune.from_pretrained(path, mesh=mesh, scan_layers=True)
    ids = _ids()
    segments = np.repeat(np.array([[1] * 5 + [2] * 8 + [0] * 3]), 4, axis=0)
    packed = _sharded_logits(model, mesh, ids, segments)
    alone = hf_logits(path, ids[:, 5:13])
    np.testing.assert_allclose(packed[:, 5:13], alone, atol=1e-4, rtol=0)
    np.testing.assert_allclose(packed[:, :5], hf_logits(path, ids[:, :5]), atol=1e-4, rtol=0)
