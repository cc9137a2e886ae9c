"""Llama-family models on a (data=2, fsdp=2, tensor=2) mesh of 8 fake CPU devices: sharded
loading reads only each device's block, logits still match transformers, export is exact."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file

import jaxtune
import jaxtune.weights as weights
from jaxtune.config import MeshConfig
from jaxtune.export.tensors import iter_hf_tensors
from jaxtune.mesh import make_mesh
from jaxtune.models import init_model
from jaxtune.models.llama import LlamaConfig
from jaxtune.sharding import activation_rules, batch_sharding, state_shardings
from tests.fixtures_models import hf_logits


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))


def _ids() -> np.ndarray:
    return np.random.RandomState(2).randint(0, 389, (4, 16))


def _sharded_logits(model, mesh, ids, segment_ids=None):
    @nnx.jit
    def run(model, ids, segment_ids):
        return model(ids, None, segment_ids)

    put = lambda x: None if x is None else jax.device_put(jnp.asarray(x), batch_sharding(mesh))
    with activation_rules(mesh):
        return np.asarray(run(model, put(ids), put(segment_ids)))


@pytest.mark.parametrize("name,scan", [("llama", False), ("qwen3", True), ("mistral", True),
                                       ("llama_tied_bias", False), ("qwen2_sliding", True)])
def test_sharded_logits_match_transformers(tiny_hf_model, mesh, name, scan):
    path = tiny_hf_model(name)
    model = jaxtune.from_pretrained(path, mesh=mesh, scan_layers=scan)
    up = model.model.layers if scan else model.model.layers[0]
    spec = up.mlp.up_proj.kernel[...].sharding.spec
    assert spec == (P(None, "fsdp", "tensor") if scan else P("fsdp", "tensor"))
    ids = _ids()
    np.testing.assert_allclose(_sharded_logits(model, mesh, ids), hf_logits(path, ids),
                               atol=1e-4, rtol=0)


def test_sharded_packed_rows_match_unsharded(tiny_hf_model, mesh):
    path = tiny_hf_model("qwen2_sliding")
    ids = _ids()
    segments = np.repeat(np.array([[1] * 5 + [2] * 8 + [0] * 3]), 4, axis=0)
    sharded = _sharded_logits(jaxtune.from_pretrained(path, mesh=mesh, scan_layers=True), mesh,
                              ids, segments)
    single = jaxtune.from_pretrained(path)(jnp.asarray(ids), None, jnp.asarray(segments))
    np.testing.assert_allclose(sharded, np.asarray(single), atol=1e-5, rtol=0)


def test_loading_reads_only_each_devices_block(tiny_hf_model, mesh, monkeypatch):
    reads: dict[str, list[tuple[slice, ...]]] = {}
    real = weights._read_slices

    def spy(info, slices):
        reads.setdefault(info.key, []).append(slices)
        return real(info, slices)

    monkeypatch.setattr(weights, "_read_slices", spy)
    jaxtune.from_pretrained(tiny_hf_model("llama"), mesh=mesh)
    # up_proj [200, 72] -> kernel [72 embed/fsdp, 200 mlp/tensor]: four distinct quarters,
    # each read once although two devices (the data axis) hold each.
    up = reads["model.layers.0.mlp.up_proj.weight"]
    assert sorted((s[0].start, s[0].stop, s[1].start, s[1].stop) for s in up) == [
        (0, 100, 0, 36), (0, 100, 36, 72), (100, 200, 0, 36), (100, 200, 36, 72)]
    # q_proj [6*12, 72] -> [72 fsdp, 6 heads/tensor, 12]: rows of 3 whole heads each.
    q = reads["model.layers.0.self_attn.q_proj.weight"]
    assert {(s[0].start, s[0].stop) for s in q} == {(0, 36), (36, 72)}
    # vocab 389 does not split: the embedding is read by fsdp halves of embed only.
    emb = reads["model.embed_tokens.weight"]
    assert {(s[1].start, s[1].stop) for s in emb} == {(0, 36), (36, 72)}


def test_export_from_sharded_model_is_bitwise(tiny_hf_model, mesh):
    path = tiny_hf_model("qwen3")
    original = load_file(path / "model.safetensors")
    for scan in (False, True):
        exported = dict(iter_hf_tensors(
            jaxtune.from_pretrained(path, mesh=mesh, scan_layers=scan)))
        assert exported.keys() == original.keys()
        for key, array in original.items():
            assert np.array_equal(exported[key], array), key


def test_init_model_is_created_sharded(mesh):
    cfg = LlamaConfig.from_hf_config(dict(
        model_type="llama", vocab_size=389, hidden_size=72, intermediate_size=200,
        num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2))
    model = init_model(cfg, mesh=mesh, seed=3, scan_layers=True)
    state = nnx.state(model, nnx.Param)
    want = state_shardings(state, mesh)
    got = jax.tree.map(lambda v: v.get_value().sharding, state,
                       is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert jax.tree.leaves(got) == jax.tree.leaves(want)
    assert np.isfinite(_sharded_logits(model, mesh, _ids())).all()
