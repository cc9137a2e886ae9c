"""A family that lives only in tests/ (tests/toy_family) loads, trains a step and exports.

Nothing in jaxtune/ names it: importing its package registers it. Its MLP experts are stored
per expert in the HF checkpoint and stacked ``[L, E, ...]`` (under scan) in the model through
the table's ``{j}`` placeholder, so these tests also cover stacked-axis loading and export.
"""

import json

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

import jaxtune
import tests.toy_family  # noqa: F401  (registers the toy_moe family)
from jaxtune.export.tensors import iter_hf_tensors
from jaxtune.models import get_family
from tests.toy_family.fixture import CONFIG, write_toy_checkpoint
from tests.train_helpers import make_stepper, params_numpy, put, synthetic_batch


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy_moe")
    write_toy_checkpoint(folder)
    return folder


def test_the_family_registers_itself():
    assert get_family("toy_moe").name == "toy_moe"


@pytest.mark.parametrize("scan", [False, True])
def test_experts_stack_on_load_and_unstack_on_export_bitwise(toy_dir, scan):
    original = load_file(toy_dir / "model.safetensors")
    model = jaxtune.from_pretrained(toy_dir, scan_layers=scan)
    gate = np.asarray(model.model.layers.mlp.gate_proj[...] if scan
                      else model.model.layers[1].mlp.gate_proj[...])
    want = np.stack([original[f"model.layers.{i}.mlp.experts.{j}.gate_proj.weight"].T
                     for i in range(3) for j in range(4)]).reshape(3, 4, 12, 10)
    np.testing.assert_array_equal(gate, want if scan else want[1])
    exported = dict(iter_hf_tensors(model))
    assert exported.keys() == original.keys()
    for key, array in original.items():
        assert exported[key].dtype == array.dtype
        np.testing.assert_array_equal(exported[key], array, err_msg=key)


def test_trains_a_step_and_exports_a_loadable_folder(toy_dir, tmp_path):
    state, step, mesh = make_stepper(toy_dir, lr=1e-2)
    before = params_numpy(state)
    batch = put(synthetic_batch(2, 16, CONFIG["vocab_size"]), mesh)
    state, metrics = step(state, batch)
    assert np.isfinite(float(jax.device_get(metrics["loss"])))
    after = params_numpy(state)
    changed = [k for k in before if not np.array_equal(before[k], after[k])]
    assert any("mlp.gate_proj" in k for k in changed)
    out = tmp_path / "hf"
    jaxtune.save_pretrained(state.model(), out)
    written = json.loads((out / "config.json").read_text())
    assert {k: v for k, v in written.items() if k != "dtype"} == \
        {k: v for k, v in CONFIG.items() if k != "dtype"}  # the original config, as it was
    reloaded = jaxtune.from_pretrained(out)
    ids = np.arange(10, dtype=np.int32)[None] % CONFIG["vocab_size"]
    np.testing.assert_array_equal(np.asarray(reloaded(ids)), np.asarray(state.model()(ids)))


def test_a_second_family_generates_through_the_cache_contract(toy_dir):
    """The toy family's few cache lines (tests/toy_family/model.py) are all it takes: cached
    greedy decoding equals re-running the whole text without a cache at every step."""
    from jaxtune.generation.loop import Generator

    model = jaxtune.from_pretrained(toy_dir, scan_layers=True)
    prompts = [[3, 5, 7], [11, 2, 9, 30, 4, 1, 8]]
    got = Generator(model).generate(prompts, max_new_tokens=8).tokens
    full = jax.jit(lambda m, x: m(x))
    for prompt, tokens in zip(prompts, got, strict=True):
        text = list(prompt)
        for _ in range(8):
            text.append(int(np.argmax(np.asarray(full(model, np.array([text])))[0, -1])))
        assert tokens == text[len(prompt):]
