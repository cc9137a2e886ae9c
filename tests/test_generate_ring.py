"""Sliding-window layers keep only their window while generating (a ring buffer per sliding
layer, as transformers' sliding-window cache): greedy tokens equal transformers' far past the
window on Mistral, Gemma 2 / 3 and a sliding Mixtral, with prompts longer than the window; the
ring's shapes stay the window's however long the generation; cached logits equal one pass over
the whole text; one compile per shape bucket; Gemma 4's sliding stack is a ring too."""

from __future__ import annotations

import numpy as np
import pytest

import jaxtune
from jaxtune.generation.cache import cache_bytes, cache_layout, empty_cache
from jaxtune.generation.loop import Generator
from tests.test_generate import assert_cached_logits_equal_full, hf_greedy

NEW = 40  # past every tiny model's window (4 or 5) many times over
LENGTHS = (13, 23, 3)  # longer and shorter than the window; two prompt buckets' worth


def long_prompts(vocab: int, seed: int = 3) -> list[list[int]]:
    rs = np.random.RandomState(seed)
    return [rs.randint(3, vocab, n).tolist() for n in LENGTHS]


@pytest.mark.parametrize("fixture,name,scan", [
    ("tiny_hf_model", "mistral", False),  # every layer slides: one ring stack
    ("tiny_hf_model", "mistral", True),
    ("tiny_gemma_model", "gemma2", True),  # sliding / full alternate: a ring and a full stack
    ("tiny_gemma_model", "gemma3_scaled", False),  # s s f s: local / global RoPE
    ("tiny_gemma_model", "gemma3", True),
    ("moe_hf_model", "mixtral_sliding", True),  # MoE layers, every one sliding
])
def test_greedy_past_the_window_matches_transformers(request, fixture, name, scan):
    path = request.getfixturevalue(fixture)(name)
    model = jaxtune.from_pretrained(path, scan_layers=scan)
    window = model.config.sliding_window
    prompts = long_prompts(model.config.vocab_size)
    assert max(LENGTHS) > window and min(LENGTHS) < window
    # MoE: transformers' eager expert loop (its grouped_mm needs 16-byte aligned strides).
    load = {"experts_implementation": "eager"} if fixture == "moe_hf_model" else {}
    ref, eos = hf_greedy(path, prompts, new=NEW, **load)
    assert max(len(p) + len(r) for p, r in zip(prompts, ref, strict=True)) > 4 * window
    gen = Generator(model)
    out = gen.generate(prompts, max_new_tokens=NEW, stop_ids=eos)
    assert out.tokens == ref, f"{name} scan_layers={scan}"
    # The same through the host-driven loop (decode one step at a time).
    streamed = gen.generate(prompts, max_new_tokens=NEW, stop_ids=eos,
                            stream=lambda step, tokens: None)
    assert streamed.tokens == ref


def _sliding_stacks(cache):
    layers = cache.layers if isinstance(cache.layers, dict) else {"": cache.layers}
    return {k: v for k, v in layers.items() if v.positions_BS is not None}, {
        k: v for k, v in layers.items() if v.positions_BS is None}


@pytest.mark.parametrize("fixture,name", [("tiny_hf_model", "mistral"),
                                          ("tiny_gemma_model", "gemma2"),
                                          ("tiny_gemma_model", "gemma3"),
                                          ("moe_hf_model", "mixtral_sliding")])
def test_sliding_layers_hold_the_window_only(request, fixture, name):
    """The windowed layers' keys and values are ``[L, B, W, K, H]`` for any length; the full
    layers' hold every slot; the cache is smaller than one of every slot by the windows."""
    model = jaxtune.from_pretrained(request.getfixturevalue(fixture)(name), scan_layers=True)
    cfg, gen = model.config, Generator(model)
    window, slots, batch = cfg.sliding_window, 16 * cfg.sliding_window, 2
    cache = gen.new_cache(batch, slots)
    rings, full = _sliding_stacks(cache)
    n_sliding = sum(w is not None for w in cfg.layer_windows())
    n_full = cfg.num_hidden_layers - n_sliding
    assert sum(r.k_BSKH.shape[0] for r in rings.values()) == n_sliding > 0
    for ring in rings.values():
        assert ring.k_BSKH.shape[1:3] == ring.v_BSKH.shape[1:3] == (batch, window)
        assert ring.positions_BS.shape == ring.segment_ids_BS.shape == (
            ring.k_BSKH.shape[0], batch, window)
    assert sum(f.k_BSKH.shape[0] for f in full.values()) == n_full
    for stack in full.values():
        assert stack.k_BSKH.shape[1:3] == (batch, slots)
    # Against the cache of every slot on every layer (what it was before the ring).
    layers, kv, h = cache_layout(model, ring=False)
    every = empty_cache(layers, batch, slots, kv, h, gen.dtype)
    kv_bytes = 2 * batch * kv * h * gen.dtype.itemsize
    expected = kv_bytes * (n_sliding * window + n_full * slots)
    got = sum(x.k_BSKH.nbytes + x.v_BSKH.nbytes for x in (*rings.values(), *full.values()))
    assert got == expected
    assert cache_bytes(cache) < cache_bytes(every)


def test_cached_logits_equal_the_full_sequence_past_the_window(tiny_gemma_model):
    """Prefill (longer than the window) + decode logits at every step equal one no-cache pass
    over the whole text, on Gemma 3's ring and full stacks together."""
    model = jaxtune.from_pretrained(tiny_gemma_model("gemma3"), scan_layers=True)
    # float32 sums in another order: the cache of every slot differs from the no-cache pass
    # by up to 1e-5 here too (logits of size ~4)
    assert_cached_logits_equal_full(model, long_prompts(model.config.vocab_size, seed=5), 21,
                                    atol=3e-5)


def test_one_compile_per_shape_bucket(tiny_hf_model):
    """Other prompts of the same buckets reuse the ring's executables."""
    gen = Generator(jaxtune.from_pretrained(tiny_hf_model("mistral")))
    gen.generate([[5, 6, 7, 8, 9, 10, 11]], max_new_tokens=20)
    compiled = gen.compile_s
    gen.generate([[12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23]], max_new_tokens=30)
    assert gen.compile_s == compiled


def test_gemma4_sliding_stack_is_a_ring(gemma4_model):
    """Gemma 4's sliding layers with their own keys keep the window; its KV-shared layers read
    the store layer's ring (greedy tokens past the window: tests/test_gemma4.py)."""
    model = jaxtune.from_pretrained(gemma4_model("shared"), scan_layers=True)
    cfg = model.config
    cache = Generator(model).new_cache(2, 64)
    kinds = cfg.layer_kinds()
    sliding, full = cache.layers["sliding"], cache.layers["full"]
    assert sliding.k_BSKH.shape[:3] == (kinds["sliding"], 2, cfg.sliding_window)
    assert sliding.positions_BS.shape == (kinds["sliding"], 2, cfg.sliding_window)
    assert full.k_BSKH.shape[:3] == (kinds["full"], 2, 64) and full.positions_BS is None
    assert cache_layout(model, ring=False)["sliding"] == (kinds["sliding"],
                                                           *cfg.geometry("sliding_attention"))
