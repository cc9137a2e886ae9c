"""A LoRA (and an int8-base QLoRA) run on a (2, 2, 2) mesh of 8 devices equals the one-device
run, with adapters sharded like their base weights; on a pure-FSDP mesh every adapter (and its
Adam moments) is split over the chips, rank or another dim, with the same losses."""

import jax
import numpy as np
import pytest
from flax import nnx

from jaxtune.config import LoraConfig
from jaxtune.quant import QuantizedParam
from tests.test_lora import flat_numpy, lora_stepper
from tests.train_helpers import put, synthetic_batch

CASES = {
    "lora": (LoraConfig(rank=4, alpha=8.0, targets=["all-linear"], modules_to_save=["lm_head"],
                        dropout=0.1), False),
    "int8_scan": (LoraConfig(rank=4, alpha=8.0, targets=["q_proj", "o_proj", "down_proj"],
                             quantize_base="int8", base_dtype="bfloat16"), True),
}


def _three_steps(model_dir, case, sizes):
    cfg, scan = CASES[case]
    _, state, fn, mesh = lora_stepper(model_dir, cfg, sizes, scan_layers=scan,
                                      optimizer="sgd", lr=0.05)
    losses = []
    for i in range(3):
        state, m = fn(state, put(synthetic_batch(8, 24, 389, seed=i), mesh))
        losses.append(float(m["loss"]))
    return losses, flat_numpy(state.params), state


@pytest.mark.parametrize("case", list(CASES))
def test_lora_on_2x2x2_equals_one_device(tiny_hf_model, case):
    model_dir = tiny_hf_model("llama")
    ref_losses, ref_params, _ = _three_steps(model_dir, case, (1, 1, 1))
    losses, params, state = _three_steps(model_dir, case, (2, 2, 2))
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    assert params.keys() == ref_params.keys()
    for k in ref_params:
        np.testing.assert_allclose(params[k], ref_params[k], rtol=1e-4, atol=1e-5, err_msg=k)
    # Adapters shard like the base weight: A's input dim, B's output dims; and the rank over
    # fsdp where the input dim has not taken it.
    specs = {".".join(map(str, p)): v.get_value().sharding.spec
             for p, v in nnx.to_flat_state(state.params)}
    lead = (None,) if CASES[case][1] else ()
    q = "model.layers" + ("" if lead else ".0") + ".self_attn.q_proj.lora"
    assert tuple(specs[q + ".lora_a"]) == (*lead, "fsdp")  # [*, D, r]: embed -> fsdp
    assert tuple(specs[q + ".lora_b"]) == (*lead, "fsdp", "tensor")  # [*, r, N, H]
    if case == "int8_scan":
        codes = [v.get_value() for _, v in nnx.to_flat_state(nnx.state(state.frozen,
                                                                        QuantizedParam))]
        assert any(c.sharding.spec != jax.sharding.PartitionSpec() for c in codes)


def _fsdp_axes(spec) -> list:
    return [a for part in spec for a in ((part,) if isinstance(part, str) else (part or ()))]


@pytest.mark.parametrize("rank", [8, 4])
def test_adapters_are_split_over_a_pure_fsdp_mesh(tiny_hf_model, rank):
    """mesh (1, 8, 1): fsdp=8 divides the rank 8, so every adapter is split on its rank (or
    embed) dim; rank 4 it does not, so the other half of each pair goes on a dim it divides
    (mlp 200), and only q/k/v's B [4, 6 or 3, 12] and o's A [6, 12, 4], none of whose dims 8
    divides, stay whole.
    Adam's moments follow their adapters; losses and adapters equal one device's (AdamW)."""
    cfg = LoraConfig(rank=rank, alpha=8.0, targets=["all-linear"])
    model_dir = tiny_hf_model("llama")

    def run(sizes):
        _, state, fn, mesh = lora_stepper(model_dir, cfg, sizes, scan_layers=True,
                                          optimizer="adamw", lr=1e-2)
        losses = []
        for i in range(3):
            state, m = fn(state, put(synthetic_batch(8, 24, 389, seed=i), mesh))
            losses.append(float(m["loss"]))
        return losses, state

    ref_losses, ref_state = run((1, 1, 1))
    losses, state = run((1, 8, 1))
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    # Adam divides by sqrt(v): where a gradient is near zero, the 1e-7 differences of another
    # summation order move an update by up to ~1e-2 of the learning rate (8.8e-5 here, the
    # same with the adapters' halves replicated as before: the layout is not the cause).
    ref = flat_numpy(ref_state.params)
    for k, v in flat_numpy(state.params).items():
        np.testing.assert_allclose(v, ref[k], rtol=0, atol=2e-4, err_msg=k)

    whole = []
    for path, var in nnx.to_flat_state(state.params):
        name, x = ".".join(map(str, path)), var.get_value()
        axes = var.get_metadata()["logical_axes"]
        split = "fsdp" in _fsdp_axes(x.sharding.spec)
        divisible = any(d % 8 == 0 for d, a in zip(x.shape, axes, strict=True)
                        if a not in ("layers", "experts"))
        assert split == divisible, (name, x.shape, axes, x.sharding.spec)
        if not split:
            whole.append(name)
    attn = "model.layers.self_attn"
    expected = [] if rank == 8 else sorted([f"{attn}.{p}_proj.lora.lora_b" for p in "qkv"]
                                           + [f"{attn}.o_proj.lora.lora_a"])
    assert sorted(whole) == expected
    # AdamW's two moments are placed as their adapters: twice the adapters' bytes per device.
    def per_device(tree) -> int:
        return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree)
                   if getattr(x, "ndim", 0) >= 1)

    assert per_device(state.opt_state) == 2 * per_device(state.params)
    total = sum(x.nbytes for x in jax.tree.leaves(state.params))
    if rank == 8:  # every adapter split 8 ways
        assert per_device(state.params) * 8 == total
