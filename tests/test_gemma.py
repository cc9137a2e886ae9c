"""The Gemma family against transformers: logits per model type and switch (soft-caps, sliding
windows, local / global RoPE, RoPE scaling), scanned and unrolled layers, packing, every XLA
attention path, the bf16 embedding scale, config and export round trips, a trained export,
LoRA / PEFT, and a gemma3 (multimodal) checkpoint's language model.

References: transformers' Gemma, Gemma2, Gemma3 (PyTorch CPU) on the same folders; peft's
PeftModel for adapters; the original files for round trips.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxtune
from jaxtune.errors import JaxtuneError
from jaxtune.export import export_run, save_pretrained
from jaxtune.export.hf_folder import end_of_turn_token
from jaxtune.models import layers
from jaxtune.models.gemma import GemmaConfig
from jaxtune.weights import from_pretrained, load_hf_config
from tests.fixtures_data import chat_rows, write_jsonl
from tests.fixtures_gemma import GEMMA_VARIANTS, VOCAB
from tests.fixtures_models import hf_logits, make_tiny_hf_model
from tests.test_export import assert_same_tensors, checkpoint_run, hf_tensors
from tests.test_export_lora import lora_checkpoint_run, peft_logits
from tests.test_models import logits

TOL = 1e-4
IDS = np.random.RandomState(0).randint(0, VOCAB, (2, 24))


@pytest.mark.parametrize("name", list(GEMMA_VARIANTS))
def test_logits_match_transformers(tiny_gemma_model, name):
    path = tiny_gemma_model(name)
    ref = hf_logits(path, IDS)
    assert np.abs(ref).max() > 1.0  # the weights are large enough for the test to bite
    for scan in (False, True):
        out = logits(from_pretrained(path, scan_layers=scan), IDS)
        assert out.shape == (2, 24, VOCAB) and out.dtype == np.float32
        np.testing.assert_allclose(out, ref, atol=TOL, rtol=0, err_msg=f"scan_layers={scan}")


@pytest.mark.parametrize("name,override", [
    ("gemma2", {"attn_logit_softcapping": None}),
    ("gemma2", {"final_logit_softcapping": None}),
    ("gemma2", {"query_pre_attn_scalar": 16}),
    ("gemma3", {"sliding_window": 64}),
])
def test_each_switch_changes_the_logits(tiny_gemma_model, name, override):
    """Without the switch the logits move far past TOL, so the parity above tests it."""
    path = tiny_gemma_model(name)
    out = logits(from_pretrained(path, **override), IDS)
    assert np.abs(out - hf_logits(path, IDS)).max() > 1e-2


def test_gemma3_local_rope_base_is_used(tiny_gemma_model):
    path = tiny_gemma_model("gemma3")
    cfg = load_hf_config(path)
    rope = {**cfg["rope_parameters"], "sliding_attention": cfg["rope_parameters"][
        "full_attention"]}
    out = logits(from_pretrained(path, rope_parameters=rope), IDS)
    assert np.abs(out - hf_logits(path, IDS)).max() > 1e-2


def test_gemma1_legacy_gelu_means_tanh_and_is_written_back(tiny_gemma_model, tmp_path):
    """Gemma 1 checkpoints say hidden_act: gelu; transformers runs gelu_pytorch_tanh."""
    path = shutil.copytree(tiny_gemma_model("gemma"), tmp_path / "gelu")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "hidden_act": "gelu"}))
    model = from_pretrained(path)
    assert model.config.activation == "gelu_pytorch_tanh"
    np.testing.assert_allclose(logits(model, IDS), hf_logits(path, IDS), atol=TOL, rtol=0)
    out = save_pretrained(model, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["hidden_act"] == "gelu"


@pytest.mark.parametrize("name,scan,lengths", [
    ("gemma3", True, (7, 9)),
    # 300 tokens: the blocked causal XLA path, soft-capped, with segment ids
    ("gemma2", False, (140, 150)),
])
def test_packed_document_equals_alone(tiny_gemma_model, name, scan, lengths):
    model = from_pretrained(tiny_gemma_model(name), scan_layers=scan)
    rng = np.random.RandomState(1)
    a, b = (rng.randint(0, VOCAB, n) for n in lengths)
    pad = 4 if sum(lengths) < 256 else 10
    row = np.concatenate([a, b, np.zeros(pad, int)])[None]
    segments = np.array([[1] * len(a) + [2] * len(b) + [0] * pad])
    positions = np.concatenate([np.arange(len(a)), np.arange(len(b)), np.arange(pad)])[None]
    packed = logits(model, row, positions, segments)
    np.testing.assert_allclose(packed[0, :len(a)], logits(model, a[None])[0], atol=3e-5, rtol=0)
    np.testing.assert_allclose(packed[0, len(a):len(a) + len(b)], logits(model, b[None])[0],
                               atol=3e-5, rtol=0)
    assert np.isfinite(packed).all()


@pytest.mark.parametrize("scan", [True])
def test_long_sequence_blocked_attention_matches_transformers(tiny_gemma_model, scan):
    """272 tokens take the blocked causal path: soft-cap and scanned per-layer windows (the
    unrolled, static-window blocked path is the packed test's)."""
    path = tiny_gemma_model("gemma2")
    ids = np.random.RandomState(3).randint(0, VOCAB, (1, 272))
    out = logits(from_pretrained(path, scan_layers=scan), ids)
    np.testing.assert_allclose(out, hf_logits(path, ids), atol=TOL, rtol=0)


def test_scanned_blocks_with_remat_give_the_unrolled_gradients(tmp_path):
    """Gemma 3 with two blocks of (sliding, sliding, full) then two sliding layers: the
    blocks' scan does not cover the whole stack, so each layer's parameters are indexed in
    it, the two sliding layers of a block are a scan of their own, and the last two are a
    run of their own. Logits and every gradient under full remat equal the unrolled stack's."""
    from jaxtune.models.stack import _slots, find_runs
    from tests.test_models import _grads_by_hf_key

    s, f = "sliding_attention", "full_attention"
    types = [s, s, f] * 2 + [s, s]
    path = make_tiny_hf_model("gemma3_text", tmp_path / "g3", vocab_size=VOCAB,
                              **{**GEMMA_VARIANTS["gemma3"][1], "num_hidden_layers": 8,
                                 "layer_types": types})
    runs = find_runs(_slots([{"window": t == s} for t in types]))
    assert [(r.period, r.repeats) for r in runs] == [(3, 2), (1, 2)]
    ids = jnp.asarray(np.random.RandomState(1).randint(0, VOCAB, (2, 13)))  # window 4
    ref_model = from_pretrained(path)
    ref, _ = _grads_by_hf_key(ref_model, ids)
    model = from_pretrained(path, scan_layers=True, remat="full")
    np.testing.assert_allclose(logits(model, ids), logits(ref_model, ids), atol=1e-4, rtol=0)
    grads, jaxpr = _grads_by_hf_key(model, ids)
    assert "checkpoint" in jaxpr or "remat" in jaxpr
    assert grads.keys() == ref.keys()
    for key in ref:
        np.testing.assert_allclose(grads[key], ref[key], atol=1e-5, rtol=1e-4, err_msg=key)


def test_softcap_through_the_splash_fallback():
    """Where splash cannot run (a length not a multiple of 128) it falls back to XLA with the
    same soft-cap and scale (the kernel's own soft-cap is tests/test_kernels_splash.py's)."""
    key = jax.random.split(jax.random.key(0), 3)
    for t in (24,):
        q = jax.random.normal(key[0], (1, t, 2, 8)) * 2
        k = jax.random.normal(key[1], (1, t, 1, 8)) * 2
        v = jax.random.normal(key[2], (1, t, 1, 8))
        mask = layers.AttentionMask.causal(jnp.arange(t)[None])
        kw = dict(mask=mask, window=5, softcap=2.0, scale=0.3)
        ref = layers.dot_product_attention(q, k, v, implementation="xla", **kw)
        plain = layers.dot_product_attention(q, k, v, implementation="xla", mask=mask, window=5)
        assert np.abs(np.asarray(ref - plain)).max() > 1e-2
        splash = functools.partial(layers.dot_product_attention, implementation="splash", **kw)
        out = jax.jit(splash)(q, k, v)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=0)


def test_cudnn_cannot_softcap(monkeypatch, caplog):
    monkeypatch.setattr(layers, "target_platform", lambda: "gpu")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert layers.resolve_attention_impl("auto", jnp.bfloat16, 16) == "cudnn"
    with caplog.at_level("WARNING"):
        assert layers.resolve_attention_impl("auto", jnp.bfloat16, 16, softcap=True) == "xla"
    assert "cannot soft-cap" in caplog.text
    with pytest.raises(JaxtuneError, match="soft-caps its attention logits"):
        layers.resolve_attention_impl("cudnn", jnp.bfloat16, 16, softcap=True)


def test_bfloat16_embedding_scale_is_rounded_like_transformers(tmp_path):
    """transformers multiplies bf16 embeddings by sqrt(hidden) rounded to bf16 (8.5, not
    8.485...): jaxtune's scaled embeddings equal transformers' bit for bit. The bf16 logits
    (accumulated in another order) are held to transformers' own bf16 error: jaxtune's
    distance to the float32 forward pass on the same weights is at most twice transformers'."""
    import torch
    import transformers

    model_type, overrides = GEMMA_VARIANTS["gemma3"]
    path = make_tiny_hf_model(model_type, tmp_path / "bf16", dtype="bfloat16",
                              vocab_size=VOCAB, **overrides)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        ref_emb = hf.model.embed_tokens(torch.as_tensor(IDS)).float().numpy()
    model = from_pretrained(path, dtype="bfloat16")
    emb = np.asarray(model.model.embed(jnp.asarray(IDS)).astype(jnp.float32))
    assert np.array_equal(emb, ref_emb)
    table = model.model.embed_tokens.embedding[...][IDS].astype(jnp.float32)
    unrounded = np.asarray((table * np.sqrt(72.0)).astype(jnp.bfloat16).astype(jnp.float32))
    assert not np.array_equal(emb, unrounded)  # the rounding is visible at this size
    out, ref = logits(model, IDS), hf_logits(path, IDS, dtype="bfloat16")
    exact = hf_logits(path, IDS, dtype="float32")  # the same bf16 weights, computed in f32
    assert np.abs(out - exact).max() <= 2 * np.abs(ref - exact).max()
    assert (out.argmax(-1) == ref.argmax(-1)).mean() > 0.9


def test_chunked_loss_soft_caps_inside_the_chunks(tiny_gemma_model):
    from jaxtune.loss import cross_entropy_loss, full_logits_cross_entropy_loss

    model = from_pretrained(tiny_gemma_model("gemma2"))
    ids = jnp.asarray(IDS)
    batch = {"input_ids": ids, "positions": None, "segment_ids": None,
             "targets": jnp.roll(ids, -1, axis=1), "loss_mask": jnp.ones(ids.shape)}
    chunked, _ = cross_entropy_loss(model, batch, chunk_size=16)  # 3 chunks of [2, 8]
    full, _ = full_logits_cross_entropy_loss(model, batch)
    np.testing.assert_allclose(float(chunked), float(full), rtol=1e-6)
    import torch

    ref = torch.nn.functional.cross_entropy(
        torch.as_tensor(hf_logits(tiny_gemma_model("gemma2"), IDS)).reshape(-1, VOCAB),
        torch.as_tensor(np.roll(IDS, -1, axis=1)).reshape(-1))
    np.testing.assert_allclose(float(chunked), float(ref), rtol=1e-5)


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name", list(GEMMA_VARIANTS))
def test_config_round_trips_through_transformers(tiny_gemma_model, name):
    import transformers

    original = load_hf_config(tiny_gemma_model(name))
    cfg = GemmaConfig.from_hf_config(original)
    assert cfg.to_hf_config() == original  # written back exactly
    assert GemmaConfig.from_hf_config(cfg.to_hf_config()) == cfg
    hf = transformers.AutoConfig.for_model(**original).to_dict()
    again = GemmaConfig.from_hf_config(hf)
    assert dataclasses.replace(again, hf_source="{}") == dataclasses.replace(cfg, hf_source="{}")
    hash(cfg)


def test_gemma3_old_rope_spelling_and_defaults_as_transformers_reads_them():
    """rope_theta + rope_local_base_freq + rope_scaling (global layers only) and the
    sliding_window_pattern default, against transformers' own reading of the same dict."""
    import transformers

    old = dict(model_type="gemma3_text", vocab_size=11, hidden_size=8, intermediate_size=16,
               num_hidden_layers=7, num_attention_heads=2, num_key_value_heads=1, head_dim=4,
               rope_theta=1e6, rope_local_base_freq=1e4, sliding_window_pattern=3,
               rope_scaling={"rope_type": "linear", "factor": 8.0})
    cfg = GemmaConfig.from_hf_config(old)
    hf = GemmaConfig.from_hf_config(transformers.Gemma3TextConfig(**old).to_dict())
    assert (cfg.rope, cfg.rope_local, cfg.layer_types) == (hf.rope, hf.rope_local,
                                                           hf.layer_types)
    assert cfg.rope.rope_type == "linear" and cfg.rope_local.rope_type == "default"
    assert cfg.rope_local.rope_theta == 1e4 and cfg.layer_types[2] == "full_attention"
    g2 = GemmaConfig.from_hf_config({"model_type": "gemma2", "num_hidden_layers": 3})
    assert (g2.attn_logit_softcapping, g2.final_logit_softcapping, g2.head_dim) == (50, 30, 256)
    with pytest.raises(JaxtuneError, match="bidirectional"):
        GemmaConfig.from_hf_config({**old, "use_bidirectional_attention": True})


def test_gemma3_multimodal_checkpoint_loads_its_language_model(tmp_path):
    """A Gemma3ForConditionalGeneration folder (saved by transformers): the language model's
    logits on text match transformers'; the export is the text-only Gemma3ForCausalLM."""
    import torch
    import transformers

    _, text = GEMMA_VARIANTS["gemma3"]
    config = transformers.Gemma3Config(
        text_config=dict(vocab_size=VOCAB, hidden_size=72, intermediate_size=200,
                         num_attention_heads=6, num_key_value_heads=3, rms_norm_eps=1e-5,
                         **text),
        vision_config=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                           num_attention_heads=2, image_size=28, patch_size=14),
        mm_tokens_per_image=4)
    torch.manual_seed(0)
    hf = transformers.Gemma3ForConditionalGeneration(config).eval()
    from tests.fixtures_models import _redraw

    _redraw(hf, 0)
    hf.save_pretrained(tmp_path / "mm")
    with torch.no_grad():
        ref = hf(input_ids=torch.as_tensor(IDS)).logits.float().numpy()
    model = from_pretrained(tmp_path / "mm", scan_layers=True)
    assert model.config.model_type == "gemma3_text"
    np.testing.assert_allclose(logits(model, IDS), ref, atol=TOL, rtol=0)
    out = save_pretrained(model, tmp_path / "text")
    written = json.loads((out / "config.json").read_text())
    assert written["model_type"] == "gemma3_text"
    assert written["architectures"] == ["Gemma3ForCausalLM"]
    assert all(k.startswith("model.layers.") or k in ("model.embed_tokens.weight",
                                                      "model.norm.weight")
               for k in hf_tensors(out))
    np.testing.assert_allclose(hf_logits(out, IDS), ref, atol=TOL, rtol=0)


# --------------------------------------------------------------------------- export


@pytest.mark.parametrize("name,scan", [("gemma", False), ("gemma2", True),
                                       ("gemma2_nocap", False), ("gemma3", True)])
def test_checkpoint_export_round_trip_is_exact(name, scan, tiny_gemma_model, gemma_tokenizer,
                                               tmp_path):
    """HF folder -> jaxtune -> Orbax checkpoint -> export: tensors, config.json, the
    tokenizer and its chat template come back bit for bit. tokenizer_config.json gains only
    the two keys transformers' own save_pretrained adds to a tokenizer read from a folder."""
    model_dir = tiny_gemma_model(name)
    run = checkpoint_run(tmp_path, model_dir, gemma_tokenizer, scan=scan)
    out = export_run(run, tmp_path / "out", echo=lambda _: None)
    assert_same_tensors(model_dir, out)
    assert json.loads((out / "config.json").read_text()) == load_hf_config(model_dir)
    tokenizer_files = sorted(Path(gemma_tokenizer).iterdir())
    assert {"tokenizer.json", "tokenizer_config.json"} <= {f.name for f in tokenizer_files}
    for f in tokenizer_files:
        if f.name == "tokenizer_config.json":
            written = json.loads((out / f.name).read_text())
            assert {k: v for k, v in written.items()
                    if k not in ("is_local", "local_files_only")} == json.loads(f.read_text())
        else:
            assert (out / f.name).read_bytes() == f.read_bytes(), f.name


@pytest.fixture(scope="module")
def trained_gemma(tmp_path_factory, tiny_gemma_model, gemma_tokenizer):
    """A few full fine-tuning steps of Gemma 3 on chats with system prompts (Gemma's template
    folds them into the first user turn), with the trainer's export and --verify."""
    from jaxtune.config import config_from_dict
    from jaxtune.trainer import train

    root = tmp_path_factory.mktemp("gemma_trained")
    data = write_jsonl(root / "chats.jsonl", chat_rows(24, seed=1))
    cfg = config_from_dict({
        "run": {"output_dir": str(root / "run"), "seed": 1},
        "model": {"path": str(tiny_gemma_model("gemma3")), "tokenizer": gemma_tokenizer,
                  "scan_layers": True},
        "data": {"sources": [{"path": data}], "format": "chat", "seq_len": 48,
                 "cache_dir": str(root / "cache")},
        "optimizer": {"learning_rate": 1e-2, "schedule": "constant"},
        "trainer": {"steps": 3, "global_batch_size": 4, "progress": False},
        "logging": {"tensorboard": False, "stdout": False},
        "export": {"enabled": True, "dtype": "float32", "verify": True},
    })
    result = train(cfg)
    return cfg, result, root


def test_trained_export_matches_in_transformers(trained_gemma, tiny_gemma_model):
    _, result, root = trained_gemma
    out = root / "run" / "hf"
    ref = np.asarray(result.state.model()(jnp.asarray(IDS)))
    assert np.max(np.abs(hf_logits(out, IDS) - ref)) <= TOL
    assert np.max(np.abs(hf_logits(tiny_gemma_model("gemma3"), IDS) - ref)) > 1e-2
    assert json.loads((out / "config.json").read_text()) == \
        load_hf_config(tiny_gemma_model("gemma3"))


def test_trained_export_stops_at_end_of_turn(trained_gemma):
    from transformers import AutoTokenizer, GenerationConfig

    _, _, root = trained_gemma
    out = root / "run" / "hf"
    tok = AutoTokenizer.from_pretrained(out)
    chat = chat_rows(1, seed=5)[0]["messages"]
    text = tok.apply_chat_template(chat, tokenize=False)
    assert "system" not in text and text.count("<start_of_turn>user\n" + chat[0]["content"]) == 1
    assert end_of_turn_token(tok) == "<end_of_turn>"
    eos = GenerationConfig.from_pretrained(out).eos_token_id
    assert tok.convert_tokens_to_ids("<end_of_turn>") in eos and tok.eos_token_id in eos


def test_lora_by_hf_names_merged_and_peft(tiny_gemma_model, gemma_tokenizer, tmp_path):
    model_dir = tiny_gemma_model("gemma2")
    lora_cfg = {"rank": 4, "alpha": 8.0, "targets": ["q_proj", "o_proj", "gate_proj"]}
    run, reference = lora_checkpoint_run(tmp_path, model_dir, gemma_tokenizer, lora_cfg,
                                         scan=True)
    ref = np.asarray(reference(IDS))
    out = export_run(run, tmp_path / "hf", lora="both", echo=lambda _: None)
    assert np.max(np.abs(hf_logits(out, IDS) - ref)) <= TOL
    assert np.max(np.abs(peft_logits(model_dir, tmp_path / "hf-adapter", IDS) - ref)) <= TOL
    assert np.max(np.abs(hf_logits(model_dir, IDS) - ref)) > 1e-2
    targets = json.loads((tmp_path / "hf-adapter" / "adapter_config.json").read_text())[
        "target_modules"]
    assert set(targets) == {"q_proj", "o_proj", "gate_proj"}


def test_family_is_registered():
    from jaxtune.models import get_family, supported_model_types

    assert {"gemma", "gemma2", "gemma3_text", "gemma3"} <= set(supported_model_types())
    assert get_family("gemma2").model_cls is jaxtune.models.gemma.Gemma


# --------------------------------------------------------------------------- Gemma 3 270M


@pytest.mark.slow
def test_gemma3_270m_matches_transformers(gemma3_dir):
    """The real (dequantised Q4) Gemma 3 270M on a chat prompt: logits and greedy tokens."""
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(gemma3_dir)
    chat = [{"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "What is the capital of France?"}]
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<bos><start_of_turn>user\nAnswer in one word.\n\nWhat")
    ids = tok(text, add_special_tokens=False, return_tensors="np")["input_ids"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(gemma3_dir).eval()
    steps = 6
    with torch.no_grad():
        ref = hf(torch.as_tensor(ids)).logits.numpy()
        greedy = hf.generate(torch.as_tensor(ids), max_new_tokens=steps,
                             do_sample=False)[0, ids.shape[1]:].numpy()  # stops at EOS
    model = from_pretrained(gemma3_dir, scan_layers=True)
    out = logits(model, ids)
    assert np.abs(out - ref).max() <= 1e-3
    assert (out.argmax(-1) == ref.argmax(-1)).all()
    # Greedy decoding without a cache: a fixed-length buffer keeps one compiled shape.
    n = ids.shape[1]
    buf = np.zeros((1, n + steps), int)
    buf[0, :n] = ids[0]
    for i in range(steps):
        buf[0, n + i] = logits(model, buf)[0, n + i - 1].argmax()
    assert len(greedy) >= 1
    np.testing.assert_array_equal(buf[0, n:n + len(greedy)], greedy)
