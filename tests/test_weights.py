"""The strict safetensors loader and its reverse: layouts, dtypes, errors, hub resolution."""

from __future__ import annotations

import itertools
import json
import re
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import jaxtune
from jaxtune.errors import JaxtuneError
from jaxtune.export.tensors import iter_hf_tensors as to_hf_tensors
from jaxtune.models.table import Transform
from jaxtune.weights import ModelFolderError, resolve_model_dir
from tests.fixtures_models import hf_logits, make_tiny_hf_model

TOL = 1e-4


@nnx.jit
def _logits(model, ids):
    return model(ids)


def _ids() -> np.ndarray:
    return np.random.RandomState(1).randint(0, 389, (2, 16))


def _tensors(folder) -> dict[str, np.ndarray]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def _rewrite(src, dst, edit) -> None:
    """Copy a single-file checkpoint folder, editing its tensors dict in place."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})


# --------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("transform,shape", [
    (Transform.COPY, (7, 5)), (Transform.LINEAR, (6, 9)),
    (Transform.LINEAR_SPLIT_OUT, (6, 3, 4)), (Transform.LINEAR_SPLIT_IN, (3, 4, 6)),
    (Transform.SPLIT_HEADS, (5, 4)),
])
def test_transform_reads_any_block(transform, shape):
    """Any rectangular block of a parameter equals that block of the fully converted tensor."""
    rng = np.random.default_rng(0)
    param = rng.standard_normal(shape).astype(np.float32)
    hf = transform.to_hf(param)
    assert hf.shape == transform.hf_shape(shape)
    reads = []

    def read(slices):
        reads.append(slices)
        return hf[slices]

    cuts = [[slice(0, n), slice(1, n), slice(0, max(1, n // 2))] for n in shape]
    for block in itertools.product(*cuts):
        got = transform.read_block(read, block, shape)
        np.testing.assert_array_equal(got, param[block])
    assert all(s.stop - s.start <= n for r in reads for s, n in zip(r, hf.shape, strict=True))


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3", "llama_tied_bias"])
@pytest.mark.parametrize("scan", [False, True])
def test_load_then_export_is_bitwise_identity(tiny_hf_model, name, scan):
    folder = tiny_hf_model(name)
    original = _tensors(folder)
    model = jaxtune.from_pretrained(folder, scan_layers=scan)
    exported = dict(to_hf_tensors(model))
    natural = [[int(t) if t.isdigit() else t for t in re.split(r"(\d+)", k)] for k in exported]
    assert natural == sorted(natural)  # HF order: layer 2 before layer 10
    assert exported.keys() == original.keys()  # tied: no lm_head.weight, like HF
    for key, array in original.items():
        assert exported[key].dtype == array.dtype and exported[key].shape == array.shape, key
        assert np.array_equal(exported[key], array), key
    bf16 = dict(to_hf_tensors(model, dtype="bfloat16"))
    assert all(v.dtype == ml_dtypes.bfloat16 for v in bf16.values())


# --------------------------------------------------------------------------- files and dtypes


def test_indexed_multi_file_checkpoint(tmp_path):
    folder = make_tiny_hf_model("llama", tmp_path / "sharded", max_shard_size="150KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    ids = _ids()
    out = np.asarray(_logits(jaxtune.from_pretrained(folder), jnp.asarray(ids)))
    np.testing.assert_allclose(out, hf_logits(folder, ids), atol=TOL, rtol=0)


@pytest.mark.parametrize("stored", ["bfloat16", "float16"])
def test_half_precision_checkpoint(tmp_path, stored):
    folder = make_tiny_hf_model("qwen2", tmp_path / stored, dtype=stored)
    original = _tensors(folder)
    assert original["model.norm.weight"].dtype == np.dtype(getattr(ml_dtypes, stored, stored))
    model = jaxtune.from_pretrained(folder, dtype="float32")
    for key, array in to_hf_tensors(model):
        assert array.dtype == np.float32
        np.testing.assert_array_equal(array, original[key].astype(np.float32))
    ids = _ids()
    out = np.asarray(_logits(model, jnp.asarray(ids)))
    np.testing.assert_allclose(out, hf_logits(folder, ids, "float32"), atol=TOL, rtol=0)


def test_float32_checkpoint_read_as_bfloat16(tiny_hf_model):
    folder = tiny_hf_model("llama")
    model = jaxtune.from_pretrained(folder, dtype="bfloat16", scan_layers=True)
    original = _tensors(folder)
    for key, array in to_hf_tensors(model):
        assert array.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(array, original[key].astype(ml_dtypes.bfloat16))


# --------------------------------------------------------------------------- strictness


def test_missing_keys_are_all_listed(tiny_hf_model, tmp_path):
    def edit(t):
        del t["model.layers.1.self_attn.k_proj.weight"]
        del t["model.norm.weight"]

    _rewrite(tiny_hf_model("llama"), tmp_path / "m", edit)
    with pytest.raises(ModelFolderError) as err:
        jaxtune.from_pretrained(tmp_path / "m", scan_layers=True)
    msg = str(err.value)
    assert "missing keys (2)" in msg
    assert "model.layers.1.self_attn.k_proj.weight" in msg and "model.norm.weight" in msg


def test_unexpected_keys_are_all_listed(tiny_hf_model, tmp_path):
    def edit(t):
        t["model.layers.0.self_attn.o_proj.bias"] = np.zeros(72, np.float32)
        t["model.extra.weight"] = np.zeros(3, np.float32)

    _rewrite(tiny_hf_model("llama"), tmp_path / "u", edit)
    with pytest.raises(ModelFolderError) as err:
        jaxtune.from_pretrained(tmp_path / "u")
    msg = str(err.value)
    assert "unexpected keys (2)" in msg
    assert "model.layers.0.self_attn.o_proj.bias" in msg and "model.extra.weight" in msg


def test_wrong_shapes_are_all_listed(tiny_hf_model, tmp_path):
    def edit(t):
        t["model.layers.2.mlp.up_proj.weight"] = np.zeros((199, 72), np.float32)
        t["model.embed_tokens.weight"] = np.zeros((390, 72), np.float32)

    _rewrite(tiny_hf_model("llama"), tmp_path / "s", edit)
    with pytest.raises(ModelFolderError) as err:
        jaxtune.from_pretrained(tmp_path / "s")
    msg = str(err.value)
    assert "wrong shapes (2)" in msg
    assert "model.layers.2.mlp.up_proj.weight: file has [199, 72], the model needs [200, 72]" \
        in msg
    assert "model.embed_tokens.weight" in msg


def test_every_kind_of_problem_in_one_error(tiny_hf_model, tmp_path):
    def edit(t):
        del t["lm_head.weight"]
        t["model.layers.0.mlp.gate_proj.bias"] = np.zeros(200, np.float32)
        t["model.norm.weight"] = np.zeros(71, np.float32)
        t["model.layers.0.input_layernorm.weight"] = np.zeros(72, np.int32)

    _rewrite(tiny_hf_model("llama"), tmp_path / "all", edit)
    with pytest.raises(ModelFolderError) as err:
        jaxtune.from_pretrained(tmp_path / "all")
    msg = str(err.value)
    for part in ("4 problems", "missing keys (1)", "lm_head.weight", "unexpected keys (1)",
                 "gate_proj.bias", "wrong shapes (1)", "unsupported dtypes (1)", "I32"):
        assert part in msg, part


def test_overrides_apply_and_stay_strict(tiny_hf_model):
    with pytest.raises(ModelFolderError, match=r"unexpected keys \(9\)"):
        jaxtune.from_pretrained(tiny_hf_model("llama"), num_hidden_layers=2)


def test_unknown_model_type(tiny_hf_model, tmp_path):
    folder = shutil.copytree(tiny_hf_model("llama"), tmp_path / "g")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    supported = "'gpt2'.*gemma, .*llama, mistral, mixtral, qwen2, .*qwen3"
    with pytest.raises(JaxtuneError, match=supported):
        jaxtune.from_pretrained(folder)


def test_pickle_only_folder_is_refused(tiny_hf_model, tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(tiny_hf_model("llama") / "config.json", folder)
    # Never opened: a pickle would run code on load. Its bytes do not matter.
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelFolderError) as err:
        jaxtune.from_pretrained(folder)
    msg = str(err.value)
    assert "pytorch_model.bin" in msg and "never unpickles" in msg and "safetensors" in msg


def test_missing_config_and_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFolderError, match="no config.json"):
        jaxtune.from_pretrained(tmp_path / "empty")
    with pytest.raises(ModelFolderError, match="does not exist"):
        jaxtune.from_pretrained(str(tmp_path / "nope" / "deeper"))


# --------------------------------------------------------------------------- hub ids


def test_hub_id_resolves_from_cache_offline(tiny_hf_model, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    repo = cache / "models--jaxtune-test--tiny-llama"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_hf_model("llama"), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model_dir("jaxtune-test/tiny-llama") == repo / "snapshots" / commit
    model = jaxtune.from_pretrained("jaxtune-test/tiny-llama")
    assert model.config.hidden_size == 72


def test_hub_id_offline_without_cache_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelFolderError) as err:
        jaxtune.from_pretrained("jaxtune-test/not-cached")
    msg = str(err.value)
    assert "HF_HUB_OFFLINE" in msg and "not in the Hugging Face cache" in msg
    assert str(tmp_path / "empty-cache") in msg
