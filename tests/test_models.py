"""Llama-family models against transformers: logits parity per model type and RoPE type,
scanned vs unrolled layers, packing, remat, config round trips."""

from __future__ import annotations

import dataclasses
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxtune
from jaxtune.errors import JaxtuneError
from jaxtune.export.tensors import iter_hf_tensors as to_hf_tensors
from jaxtune.models import get_family, init_model
from jaxtune.models.llama import LlamaConfig
from jaxtune.sharding import variable_axes
from jaxtune.weights import load_hf_config
from tests.fixtures_models import TINY_VARIANTS, hf_logits, to_old_rope_spelling

TOL = 1e-4


@nnx.jit
def _logits(model, ids, positions=None, segment_ids=None):
    return model(ids, positions, segment_ids)


def logits(model, ids, positions=None, segment_ids=None) -> np.ndarray:
    args = [None if a is None else jnp.asarray(a) for a in (positions, segment_ids)]
    return np.asarray(_logits(model, jnp.asarray(ids), *args))


@pytest.fixture(scope="module")
def ids() -> np.ndarray:
    return np.random.RandomState(0).randint(0, 389, (2, 24))


@pytest.mark.parametrize("name", list(TINY_VARIANTS))
def test_logits_match_transformers(tiny_hf_model, ids, name):
    path = tiny_hf_model(name)
    ref = hf_logits(path, ids)
    assert np.abs(ref).max() > 1.0  # the weights are large enough for the test to bite
    for scan in (False, True):
        out = logits(jaxtune.from_pretrained(path, scan_layers=scan), ids)
        assert out.shape == (2, 24, 389) and out.dtype == np.float32
        np.testing.assert_allclose(out, ref, atol=TOL, rtol=0, err_msg=f"scan_layers={scan}")


@pytest.mark.parametrize("name", ["llama_llama3", "llama_yarn", "qwen3"])
def test_old_rope_scaling_spelling(tiny_hf_model, tmp_path, ids, name):
    """config.json with rope_scaling + top-level rope_theta (pre transformers 5)."""
    path = shutil.copytree(tiny_hf_model(name), tmp_path / name)
    to_old_rope_spelling(path)
    new = LlamaConfig.from_hf_config(load_hf_config(tiny_hf_model(name)))
    old = LlamaConfig.from_hf_config(load_hf_config(path))
    assert old.rope == new.rope
    np.testing.assert_allclose(logits(jaxtune.from_pretrained(path), ids), hf_logits(path, ids),
                               atol=TOL, rtol=0)


def test_positions_far_from_zero(tiny_hf_model, ids):
    """RoPE scaling matters most at large positions: offset positions match transformers."""
    import torch
    import transformers

    path = tiny_hf_model("llama_llama3")
    positions = np.broadcast_to(np.arange(24) + 200, ids.shape).copy()
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        ref = hf(torch.as_tensor(ids), position_ids=torch.as_tensor(positions)).logits.numpy()
    out = logits(jaxtune.from_pretrained(path), ids, positions)
    np.testing.assert_allclose(out, ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("name,scan", [("llama", False), ("mistral", True),
                                       ("qwen2_sliding", True)])
def test_packed_document_equals_alone(tiny_hf_model, ids, name, scan):
    model = jaxtune.from_pretrained(tiny_hf_model(name), scan_layers=scan)
    a, b = ids[0, :7], ids[1, 3:12]
    row = np.concatenate([a, b, np.zeros(4, int)])[None]
    segments = np.array([[1] * 7 + [2] * 9 + [0] * 4])
    positions = np.concatenate([np.arange(7), np.arange(9), np.arange(4)])[None]
    packed = logits(model, row, positions, segments)
    np.testing.assert_allclose(packed[0, :7], logits(model, a[None])[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(packed[0, 7:16], logits(model, b[None])[0], atol=1e-5, rtol=0)
    assert np.isfinite(packed).all()  # padding rows attend to padding, never to nothing


def test_hidden_states_then_unembed_is_call(tiny_hf_model, ids):
    for name in ("llama", "qwen2"):  # untied lm_head, tied embeddings
        model = jaxtune.from_pretrained(tiny_hf_model(name))
        hidden = model.hidden_states(jnp.asarray(ids))
        assert hidden.shape == (2, 24, 72)
        full = model.unembed(hidden)
        assert full.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(full), logits(model, ids), atol=1e-5, rtol=0)


def _grads_by_hf_key(model, ids):
    def loss(m):
        return jax.nn.logsumexp(m(ids), axis=-1).mean()

    grad_fn = nnx.jit(nnx.grad(loss))
    jaxpr = str(jax.make_jaxpr(lambda m: nnx.grad(loss)(m))(model))
    grads = grad_fn(model)
    return dict(to_hf_tensors(grads, model.config)), jaxpr


def test_scan_and_remat_give_the_same_gradients(tiny_hf_model, ids):
    path = tiny_hf_model("qwen2_sliding")  # mixed full / sliding layers: per-layer windows
    ids = jnp.asarray(ids[:, :12])
    ref, jaxpr = _grads_by_hf_key(jaxtune.from_pretrained(path), ids)
    assert "remat" not in jaxpr and "checkpoint" not in jaxpr
    for scan, remat in [(True, "none"), (True, "full"), (False, "dots_saveable"),
                        (True, "minimal")]:
        model = jaxtune.from_pretrained(path, scan_layers=scan, remat=remat)
        grads, jaxpr = _grads_by_hf_key(model, ids)
        assert ("remat" in jaxpr or "checkpoint" in jaxpr) == (remat != "none")
        assert grads.keys() == ref.keys()
        for key in ref:
            np.testing.assert_allclose(grads[key], ref[key], atol=1e-5, rtol=1e-4,
                                       err_msg=f"{key} scan={scan} remat={remat}")


def test_bfloat16_params_and_compute(tiny_hf_model, ids):
    path = tiny_hf_model("qwen3")
    ref = hf_logits(path, ids)
    model = jaxtune.from_pretrained(path, dtype="bfloat16")
    assert model.model.layers[0].mlp.up_proj.kernel[...].dtype == jnp.bfloat16
    out = logits(model, ids)
    assert out.dtype == np.float32
    assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max()
    assert (out.argmax(-1) == ref.argmax(-1)).mean() > 0.9


@pytest.mark.parametrize("name", list(TINY_VARIANTS))
def test_config_round_trips_through_transformers(tiny_hf_model, name):
    import transformers

    original = load_hf_config(tiny_hf_model(name))
    cfg = LlamaConfig.from_hf_config(original)
    assert cfg.to_hf_config() == original  # written back exactly: no key added or respelled
    assert LlamaConfig.from_hf_config(cfg.to_hf_config()) == cfg
    deeper = cfg.replace(num_hidden_layers=cfg.num_hidden_layers + 1,
                         layer_types=cfg.layer_types + cfg.layer_types[-1:])
    written = deeper.to_hf_config()
    assert LlamaConfig.from_hf_config(written).num_hidden_layers == cfg.num_hidden_layers + 1
    assert set(written) - set(original) <= {"layer_types"}  # only what changed is added
    hf = transformers.AutoConfig.for_model(**cfg.to_hf_config()).to_dict()
    again = LlamaConfig.from_hf_config(hf)
    assert dataclasses.replace(again, hf_source="{}") == dataclasses.replace(cfg, hf_source="{}")
    hash(cfg)  # static under jit


def test_config_defaults_and_errors():
    base = dict(model_type="qwen3", vocab_size=10, hidden_size=8, intermediate_size=16,
                num_hidden_layers=2, num_attention_heads=2)
    cfg = LlamaConfig.from_hf_config(base)
    assert cfg.head_dim == 128 and cfg.num_key_value_heads == 2  # transformers' Qwen3 defaults
    assert cfg.rope.rope_type == "default" and cfg.rope_theta == 10000.0
    old = LlamaConfig.from_hf_config({**base, "model_type": "llama", "rope_theta": 5e5,
                                      "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert (old.head_dim, old.rope.rope_type, old.rope.factor, old.rope_theta) == \
        (4, "linear", 2.0, 5e5)
    mistral = LlamaConfig.from_hf_config({**base, "model_type": "mistral"})
    assert mistral.layer_windows() == (4096, 4096)  # transformers' Mistral default window
    with pytest.raises(JaxtuneError, match="RoPE type 'dynamic' is not supported"):
        LlamaConfig.from_hf_config({**base, "rope_scaling": {"type": "dynamic", "factor": 2}})
    with pytest.raises(JaxtuneError, match="lacks"):
        LlamaConfig.from_hf_config({"model_type": "llama"})
    supported = "builds these model types: gemma, .*llama, mistral, mixtral, qwen2, .*qwen3"
    with pytest.raises(JaxtuneError, match=supported):
        get_family("gpt2")
    assert mistral.replace(num_hidden_layers=3).layer_windows() == (4096,) * 3
    with pytest.raises(JaxtuneError, match="multiple of num_key_value_heads"):
        cfg.replace(num_key_value_heads=3, num_attention_heads=4)


def test_init_model_every_param_has_logical_axes():
    cfg = LlamaConfig.from_hf_config(dict(
        model_type="qwen3", vocab_size=389, hidden_size=72, intermediate_size=200,
        num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=3, head_dim=16))
    for scan in (False, True):
        model = init_model(cfg, seed=1, scan_layers=scan)
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            axes = variable_axes(var)
            assert axes is not None and len(axes) == var.get_value().ndim, path
            assert (axes[0] == "layers") == (scan and "layers" in path), path
        out = logits(model, np.zeros((1, 5), int))
        assert out.shape == (1, 5, 389) and np.isfinite(out).all()


@pytest.mark.slow
def test_smollm2_matches_transformers(smollm2_dir):
    """The real SmolLM2-135M-Instruct on a chat prompt: logits and greedy tokens."""
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    chat = [{"role": "user", "content": "What is the capital of France? Answer briefly."}]
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="np")["input_ids"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    steps = 8
    with torch.no_grad():
        ref = hf(torch.as_tensor(ids)).logits.numpy()
        greedy = hf.generate(torch.as_tensor(ids), max_new_tokens=steps,
                             do_sample=False)[0, ids.shape[1]:].numpy()  # stops at EOS
    model = jaxtune.from_pretrained(smollm2_dir, scan_layers=True)
    out = logits(model, ids)
    assert np.abs(out - ref).max() <= 1e-3
    assert (out.argmax(-1) == ref.argmax(-1)).all()
    # Greedy decoding without a cache: a fixed-length buffer keeps one compiled shape.
    n = ids.shape[1]
    buf = np.zeros((1, n + steps), int)
    buf[0, :n] = ids[0]
    for i in range(steps):
        buf[0, n + i] = logits(model, buf)[0, n + i - 1].argmax()
    assert len(greedy) >= 4
    np.testing.assert_array_equal(buf[0, n:n + len(greedy)], greedy)
    assert "Paris" in tok.decode(greedy)


def test_cudnn_attention_off_gpu_is_a_clear_config_error():
    import jax.numpy as jnp

    from jaxtune.errors import JaxtuneError
    from jaxtune.models.layers import resolve_attention_impl

    with pytest.raises(JaxtuneError, match="needs an NVIDIA GPU.*attention: auto"):
        resolve_attention_impl("cudnn", jnp.bfloat16, 64)
    assert resolve_attention_impl("auto", jnp.bfloat16, 64) == "xla"


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2_sliding"])
def test_long_sequence_blocked_attention_matches_transformers(tiny_hf_model, name):
    """At T >= 256 the XLA path splits causal attention into query blocks; logits stay exact,
    sliding windows included."""
    long_ids = np.random.RandomState(1).randint(0, 389, (1, 256))
    path = tiny_hf_model(name)
    np.testing.assert_allclose(logits(jaxtune.from_pretrained(path), long_ids),
                               hf_logits(path, long_ids), atol=TOL, rtol=0)


@pytest.mark.parametrize("window", [None, 5, 140])
def test_blocked_attention_equals_full_attention(window):
    """Blocked (T=300, 3 blocks, packed segments, windows) equals one masked attention."""
    from jaxtune.models import layers

    rng = np.random.RandomState(2)
    q, k, v = (jnp.asarray(rng.randn(2, 300, *shape), jnp.float32)
               for shape in ((6, 16), (3, 16), (3, 16)))
    seg = jnp.asarray(np.repeat([[1, 2, 3, 0]], 75, axis=1).reshape(1, 300).repeat(2, 0))
    t = np.arange(300)
    mask = (t[:, None] >= t[None, :]) & (np.asarray(seg)[:, :, None] == np.asarray(seg)[:, None])
    if window:
        mask &= (t[:, None] - t[None, :]) < window
    want = jax.nn.dot_product_attention(q, k, v, mask=jnp.asarray(mask)[:, None])
    positions = jnp.broadcast_to(jnp.arange(300), (2, 300))
    got = layers.dot_product_attention(q, k, v, mask=layers.AttentionMask.causal(positions, seg),
                                       window=window, implementation="xla")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6, rtol=0)
