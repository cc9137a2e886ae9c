"""Gemma 4 against transformers: logits per switch (scanned and unrolled), each switch shown to
bite, bitwise export, greedy generation, config reading, a multimodal checkpoint's language
model, LoRA / PEFT, and the scanned stack's blocks.

References: transformers' ``Gemma4ForCausalLM`` / ``Gemma4ForConditionalGeneration`` (PyTorch
CPU, eager experts) on folders it saved (``tests/fixtures_gemma4.py``); peft's PeftModel.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.errors import JaxtuneError
from jaxtune.export import export_run, save_pretrained
from jaxtune.models.gemma4 import Gemma4Config
from jaxtune.weights import from_pretrained, load_hf_config
from tests.fixtures_gemma import VOCAB
from tests.fixtures_gemma4 import GEMMA4_TINY, GEMMA4_VARIANTS, gemma4_hf, gemma4_logits
from tests.test_export import assert_same_tensors, checkpoint_run, hf_tensors
from tests.test_models import logits

TOL = 1e-4
IDS = np.random.RandomState(0).randint(0, VOCAB, (2, 23))  # longer than the window (5)
_REF: dict[str, np.ndarray] = {}


def ref_logits(gemma4_model, name: str) -> np.ndarray:
    if name not in _REF:
        _REF[name] = gemma4_logits(gemma4_model(name), IDS)
    return _REF[name]


@pytest.mark.parametrize("name", list(GEMMA4_VARIANTS))
def test_logits_match_transformers(gemma4_model, name):
    ref = ref_logits(gemma4_model, name)
    assert np.abs(ref).max() > 1.0  # the weights are large enough for the test to bite
    for scan in (False, True):
        out = logits(from_pretrained(gemma4_model(name), scan_layers=scan), IDS)
        assert out.shape == (2, 23, VOCAB) and out.dtype == np.float32
        np.testing.assert_allclose(out, ref, atol=TOL, rtol=0, err_msg=f"scan_layers={scan}")


@pytest.mark.parametrize("name", ["shared", "moe"])
def test_scanned_blocks_with_remat_give_the_unrolled_gradients(gemma4_model, name):
    """Scanned blocks of (sliding, sliding, full) with full remat: the two sliding layers are
    a scan of their own inside the block and each layer's parameters are taken inside its
    checkpoint. Logits and every gradient equal the unrolled stack's without remat (KV sharing:
    the shared layers are groups of their own; MoE: experts and router)."""
    from tests.test_models import _grads_by_hf_key

    ids = jnp.asarray(IDS)
    path = gemma4_model(name)
    ref, _ = _grads_by_hf_key(from_pretrained(path), ids)
    model = from_pretrained(path, scan_layers=True, remat="full")
    np.testing.assert_allclose(logits(model, IDS), ref_logits(gemma4_model, name), atol=TOL,
                               rtol=0)
    grads, jaxpr = _grads_by_hf_key(model, ids)
    assert "checkpoint" in jaxpr or "remat" in jaxpr
    assert grads.keys() == ref.keys()
    for key in ref:
        np.testing.assert_allclose(grads[key], ref[key], atol=1e-5, rtol=1e-4, err_msg=key)


# --------------------------------------------------------------------------- each switch bites


@pytest.mark.parametrize("name,override", [
    ("ple", {"final_logit_softcapping": None}),  # soft-cap on: turning it off moves logits
    ("shared", {"final_logit_softcapping": 5.0}),  # soft-cap off: turning it on moves them
    ("k_eq_v", {"sliding_window": 64}),  # the sequence (23) is longer than the window (5)
])
def test_config_switches_change_the_logits(gemma4_model, name, override):
    out = logits(from_pretrained(gemma4_model(name), **override), IDS)
    assert np.abs(out - ref_logits(gemma4_model, name)).max() > 1e-2


def _state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_per_layer_embeddings_moe_and_layer_scalar_change_the_logits(gemma4_model):
    """The same weights in transformers with the per-layer embeddings, the MoE block or the
    layer scalars left out give other logits, so the parity above tests each of them."""
    import torch

    ref = ref_logits(gemma4_model, "ple")
    no_ple = gemma4_logits(gemma4_hf(gemma4_model("ple"), hidden_size_per_layer_input=0), IDS)
    assert np.abs(no_ple - ref).max() > 1e-2
    ref = ref_logits(gemma4_model, "moe")
    no_moe = gemma4_logits(gemma4_hf(gemma4_model("moe"), enable_moe_block=False), IDS)
    assert np.abs(no_moe - ref).max() > 1e-2
    hf = gemma4_hf(gemma4_model("moe"))
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.layer_scalar.fill_(1.0)
    assert np.abs(gemma4_logits(hf, IDS) - ref).max() > 1e-2


def test_kv_sharing_and_double_wide_mlp_change_the_logits(gemma4_model):
    """KV sharing: the shared layers attending with their store layers' keys and values differ
    from the same layers computing their own with the store layers' projections. The double
    wide MLP: its second half matters."""
    import torch
    import transformers

    path = gemma4_model("shared")
    shared = gemma4_hf(path)
    cfg = shared.config
    store = {i: max(j for j in range(4) if cfg.layer_types[j] == cfg.layer_types[i])
             for i in (4, 5)}
    f = cfg.intermediate_size
    with torch.no_grad():  # the second half of the shared layers' MLP to zero
        for i in store:
            mlp = shared.model.layers[i].mlp
            mlp.gate_proj.weight[f:] = 0
            mlp.up_proj.weight[f:] = 0
            mlp.down_proj.weight[:, f:] = 0
    halved = gemma4_logits(shared, IDS)
    assert np.abs(halved - ref_logits(gemma4_model, "shared")).max() > 1e-2  # double wide

    own = transformers.AutoConfig.from_pretrained(path, num_kv_shared_layers=0,
                                                  use_double_wide_mlp=False)
    own_model = transformers.Gemma4ForCausalLM(own).eval()
    weights = _state(shared)
    for i, j in store.items():
        for name in ("k_proj.weight", "v_proj.weight", "k_norm.weight"):
            weights[f"model.layers.{i}.self_attn.{name}"] = weights[
                f"model.layers.{j}.self_attn.{name}"]
        for name in ("gate_proj.weight", "up_proj.weight"):
            key = f"model.layers.{i}.mlp.{name}"
            weights[key] = weights[key][:f]
        key = f"model.layers.{i}.mlp.down_proj.weight"
        weights[key] = weights[key][:, :f]
    own_model.load_state_dict(weights, strict=True)
    assert np.abs(gemma4_logits(own_model, IDS) - halved).max() > 1e-2  # KV sharing


def test_keys_as_values_is_the_key_projection_as_value_projection(gemma4_model):
    """attention_k_eq_v: full layers' values are the key projection's output, value-normed;
    transformers without the switch and with v_proj = k_proj gives the same logits."""
    import transformers

    path = gemma4_model("k_eq_v")
    model = gemma4_hf(path)
    # The file's per_layer_config keeps full layers at 1 kv head of 20.
    cfg = transformers.AutoConfig.from_pretrained(path, attention_k_eq_v=False)
    plain = transformers.Gemma4ForCausalLM(cfg).eval()
    weights = _state(model)
    for i, t in enumerate(model.config.layer_types):
        if t == "full_attention":
            weights[f"model.layers.{i}.self_attn.v_proj.weight"] = weights[
                f"model.layers.{i}.self_attn.k_proj.weight"]
    plain.load_state_dict(weights, strict=True)
    np.testing.assert_allclose(gemma4_logits(plain, IDS), ref_logits(gemma4_model, "k_eq_v"),
                               atol=1e-5, rtol=0)
    c = from_pretrained(path).config
    assert (c.num_key_value_heads, c.head_dim, c.num_global_key_value_heads,
            c.global_head_dim) == (2, 12, 1, 20)


# --------------------------------------------------------------------------- config


def test_config_spellings_and_defaults_as_transformers_reads_them(gemma4_model):
    """transformers 5 writes per_layer_config; hub files say global_head_dim and
    num_global_key_value_heads; both read the same, and the file comes back key for key."""
    saved = load_hf_config(gemma4_model("k_eq_v"))
    assert "per_layer_config" in saved
    hub = {k: v for k, v in saved.items() if k != "per_layer_config"}
    hub.update(global_head_dim=20, num_global_key_value_heads=1)
    a, b = Gemma4Config.from_hf_config(saved), Gemma4Config.from_hf_config(hub)
    assert (a.global_head_dim, a.num_global_key_value_heads) == (20, 1)
    assert {**a.__dict__, "hf_source": ""} == {**b.__dict__, "hf_source": ""}
    assert a.to_hf_config() == saved and b.to_hf_config() == hub
    # Without attention_k_eq_v, full layers keep num_key_value_heads (transformers' rule).
    plain = Gemma4Config.from_hf_config({**hub, "attention_k_eq_v": False})
    assert plain.num_global_key_value_heads == 2
    # Defaults: 5 sliding then 1 full, the last forced full, PLE of 256, global head dim 512.
    d = Gemma4Config.from_hf_config({"model_type": "gemma4_text", "num_hidden_layers": 8})
    assert d.layer_types == ("sliding_attention",) * 5 + ("full_attention",) + (
        "sliding_attention", "full_attention")
    assert (d.hidden_size_per_layer_input, d.global_head_dim, d.rope.rope_type) == (
        256, 512, "proportional")
    changed = a.replace(sliding_window=9).to_hf_config()
    assert changed == {**saved, "sliding_window": 9}


@pytest.mark.parametrize("bad,match", [
    ({"num_kv_shared_layers": 6}, "num_kv_shared_layers"),
    ({"layer_types": ["full_attention"] * 4 + ["sliding_attention", "full_attention"],
      "num_kv_shared_layers": 2}, "earlier layer of that type"),
    ({"use_bidirectional_attention": "all"}, "bidirectional"),
    ({"final_logit_softcapping": 0.0}, "final_logit_softcapping"),
    ({"per_layer_config": {"2": {"intermediate_size": 7}}}, "per_layer_config"),
])
def test_bad_configs_are_refused_clearly(gemma4_model, bad, match):
    hf = {k: v for k, v in load_hf_config(gemma4_model("k_eq_v")).items()
          if k != "per_layer_config"}
    hf = {**hf, "global_head_dim": 20, "num_global_key_value_heads": 1, **bad}
    with pytest.raises(JaxtuneError, match=match):
        Gemma4Config.from_hf_config(hf)


# --------------------------------------------------------------------------- export


@pytest.mark.parametrize("name", list(GEMMA4_VARIANTS))
def test_save_pretrained_is_bitwise(gemma4_model, name, tmp_path):
    """Every tensor (layer_scalar, the fused experts, per-layer embeddings) comes back bit for
    bit, with no keys for the shared layers' absent k/v; config.json key for key."""
    path = gemma4_model(name)
    out = save_pretrained(from_pretrained(path, scan_layers=name != "ple"), tmp_path / "out")
    assert_same_tensors(path, out)
    assert json.loads((out / "config.json").read_text()) == load_hf_config(path)
    keys = hf_tensors(out)
    assert sum(k.endswith("layer_scalar") for k in keys) == 6
    if name == "shared":
        assert not any(f"layers.{i}.self_attn.{p}" in k for i in (4, 5)
                       for p in ("k_proj", "v_proj", "k_norm") for k in keys)


def test_checkpoint_export_round_trip_is_exact(gemma4_model, gemma_tokenizer, tmp_path):
    """HF folder -> scanned jaxtune (stacks per kind of layer) -> Orbax -> export."""
    path = gemma4_model("shared")
    run = checkpoint_run(tmp_path, path, gemma_tokenizer, scan=True)
    out = export_run(run, tmp_path / "out", echo=lambda _: None)
    assert_same_tensors(path, out)
    assert json.loads((out / "config.json").read_text()) == load_hf_config(path)


# --------------------------------------------------------------------------- generation


@pytest.mark.parametrize("name,scan", [("shared", True), ("shared", False), ("moe", True)])
def test_greedy_generation_matches_transformers(gemma4_model, name, scan):
    """Token for token with generate(do_sample=False), past the sliding window and through
    the KV-shared layers, two left-padded prompts in one batch."""
    import torch

    from jaxtune.generation.loop import Generator

    path = gemma4_model(name)
    prompts = [list(np.random.RandomState(s).randint(3, VOCAB, n)) for s, n in ((1, 9), (2, 4))]
    hf = gemma4_hf(path)
    ref = []
    for p in prompts:
        with torch.no_grad():
            out = hf.generate(torch.as_tensor([p]), max_new_tokens=14, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
        ref.append(out[0, len(p):].tolist())
    gen = Generator(from_pretrained(path, scan_layers=scan))
    assert gen.generate(prompts, max_new_tokens=14).tokens == ref


# --------------------------------------------------------------------------- multimodal


@pytest.fixture(scope="module")
def multimodal(tmp_path_factory):
    """A Gemma4ForConditionalGeneration folder with vision and audio towers, and its logits."""
    import torch
    import transformers

    from tests.fixtures_gemma4 import redraw_gemma4

    text = {**GEMMA4_TINY, **GEMMA4_VARIANTS["ple"]}
    config = transformers.Gemma4Config(
        text_config=text,
        vision_config=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=2, head_dim=8),
        audio_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                          output_proj_dims=16))
    torch.manual_seed(0)
    hf = transformers.Gemma4ForConditionalGeneration(config).eval()
    redraw_gemma4(hf, 0)
    root = tmp_path_factory.mktemp("gemma4_mm")
    hf.save_pretrained(root / "mm")
    with torch.no_grad():
        ref = hf(input_ids=torch.as_tensor(IDS)).logits.float().numpy()
    return root / "mm", ref


def test_multimodal_checkpoint_loads_its_language_model(multimodal, tmp_path):
    """Its language model's logits on text are transformers'; the export is the text-only
    Gemma4ForCausalLM and says what it leaves out."""
    path, ref = multimodal
    model = from_pretrained(path, scan_layers=True)
    assert model.config.model_type == "gemma4_text"
    assert set(model.config.skipped_modules) == {"vision_tower", "embed_vision",
                                                 "audio_tower", "embed_audio"}
    np.testing.assert_allclose(logits(model, IDS), ref, atol=TOL, rtol=0)
    notes: list[str] = []
    out = save_pretrained(model, tmp_path / "text", echo=notes.append)
    written = json.loads((out / "config.json").read_text())
    assert (written["model_type"], written["architectures"]) == ("gemma4_text",
                                                                 ["Gemma4ForCausalLM"])
    assert not any("tower" in k or "embed_vision" in k or "embed_audio" in k
                   for k in hf_tensors(out))
    assert any("vision_tower" in n and "audio_tower" in n and "text-only" in n for n in notes)
    np.testing.assert_allclose(gemma4_logits(out, IDS), ref, atol=TOL, rtol=0)


def test_asking_for_a_tower_is_a_clear_error(multimodal):
    from jaxtune import lora
    from jaxtune.config import LoraConfig

    model = from_pretrained(multimodal[0])
    for key, value in (("targets", ["vision_tower.encoder.layers.0.self_attn.q_proj"]),
                       ("modules_to_save", ["embed_audio"])):
        cfg = LoraConfig(rank=2, **{key: value, **({} if key == "targets" else
                                                   {"targets": ["q_proj"]})})
        with pytest.raises(JaxtuneError, match="language model of a gemma4 checkpoint"):
            lora.apply_lora(model, cfg)


# --------------------------------------------------------------------------- LoRA, PEFT


def test_lora_by_hf_names_merged_and_peft(gemma4_model, gemma_tokenizer, tmp_path):
    """LoRA on attention (shared layers have only q/o), the dense MLP and the per-layer input
    gate, scanned: the merged export and the PEFT adapter both give the adapted logits."""
    from tests.test_export_lora import lora_checkpoint_run, peft_logits

    path = gemma4_model("shared")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "per_layer_input_gate"]
    run, reference = lora_checkpoint_run(tmp_path, path, gemma_tokenizer,
                                         {"rank": 4, "alpha": 8.0, "targets": targets},
                                         scan=True)
    ref = np.asarray(reference(IDS))
    out = export_run(run, tmp_path / "hf", lora="both", echo=lambda _: None)
    assert np.max(np.abs(gemma4_logits(out, IDS) - ref)) <= TOL
    assert np.max(np.abs(peft_logits(path, tmp_path / "hf-adapter", IDS) - ref)) <= TOL
    assert np.max(np.abs(ref_logits(gemma4_model, "shared") - ref)) > 1e-2
    adapter = json.loads((tmp_path / "hf-adapter" / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == set(targets)


def test_family_is_registered_and_the_blocks_are_static():
    from jaxtune.models import get_family, supported_model_types
    from jaxtune.models.stack import Slot, find_runs

    assert {"gemma4", "gemma4_text"} <= set(supported_model_types())
    assert get_family("gemma4").name == "gemma4"
    cfg = Gemma4Config.from_hf_config({**GEMMA4_TINY, **GEMMA4_VARIANTS["shared"],
                                       "model_type": "gemma4_text"})
    slots = [Slot(k, i, (("window", w),)) for (k, i), w in
             zip(cfg.layer_groups(), cfg.layer_windows(), strict=True)]
    # Layers 0-3 have their own keys (s s f s), 4-5 share (s f): no block repeats across
    # the change of kind, and every layer's window stays static.
    runs = find_runs(slots)
    assert sum(r.period * r.repeats for r in runs) == 6
    assert cfg.kv_stores() == (2, 3) and cfg.layer_kinds() == {
        "sliding": 3, "full": 1, "sliding_shared": 1, "full_shared": 1}


def test_lora_skips_the_fused_experts_as_peft_does(gemma4_model):
    """transformers keeps Gemma 4's experts as fused parameters, not Linear modules: PEFT's
    target_modules never select them, nor does all-linear here; naming only them is an error."""
    from flax import nnx

    from jaxtune import lora
    from jaxtune.config import LoraConfig

    model = from_pretrained(gemma4_model("moe"))
    for targets in (["all-linear"], ["down_proj"]):
        adapted, _ = lora.apply_lora(model, LoraConfig(rank=2, targets=targets))
        names = list(lora.lora_state(adapted))
        assert names and not any("experts" in n for n in names), targets
        assert any("mlp.down_proj" in n for n in names)
    # the FLOPs count (trainer, plan) reads the experts a token meets by the MoE family's name
    adapted, trainable = lora.apply_lora(model, LoraConfig(rank=2, targets=["all-linear"]))
    counted = lora.lora_matmuls(nnx.state(adapted, trainable), model.config)
    assert model.config.num_experts_per_tok == model.config.top_k_experts > 0
    assert counted.adapters == sum(w.a.size + w.b.size
                                   for w in lora.lora_state(adapted).values())
    with pytest.raises(JaxtuneError, match="fused parameter of all experts"):
        lora.apply_lora(model, LoraConfig(rank=2, targets=["gate_up_proj"]))
