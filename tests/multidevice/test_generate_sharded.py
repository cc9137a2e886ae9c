"""Generation on a (data=2, fsdp=2, tensor=2) mesh of 8 fake CPU devices: the KV cache is
sharded by the logical rules (batch over data/fsdp, kv_heads over tensor; Mistral's ring of
its window too) and greedy tokens still equal transformers', scanned and unrolled."""

from __future__ import annotations

import pytest
from jax.sharding import PartitionSpec as P

import jaxtune
from jaxtune.config import MeshConfig
from jaxtune.generation.loop import Generator
from jaxtune.mesh import make_mesh
from tests.test_generate import NEW, hf_greedy, prompts_for


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))


@pytest.mark.parametrize("name,scan", [("mistral", True), ("qwen3", False)])
def test_sharded_greedy_matches_transformers(tiny_hf_model, mesh, name, scan):
    path = tiny_hf_model(name)
    gen = Generator(jaxtune.from_pretrained(path, mesh=mesh, scan_layers=scan))
    assert gen.mesh is mesh
    cache = gen.new_cache(4, 48)
    # both tiny models have 2 kv heads, so tensor=2 splits them
    assert cache.layers.k_BSKH.sharding.spec == P(None, ("data", "fsdp"), None, "tensor")
    assert cache.positions_BS.sharding.spec == P(("data", "fsdp"))
    if name == "mistral":  # every layer slides: keys and values are a ring of the window
        assert cache.layers.k_BSKH.shape[2] == 5
        assert cache.layers.positions_BS.sharding.spec == P(None, ("data", "fsdp"))
    prompts = prompts_for()
    ref, eos = hf_greedy(path, prompts)
    assert gen.generate(prompts, max_new_tokens=NEW, stop_ids=eos).tokens == ref
