"""A LoRA (and an int8-base QLoRA) run on a (2, 2, 2) mesh of 8 devices equals the one-device
run, with adapters sharded like their base weights."""

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
    # Adapters shard like the base weight: A's input dim, B's output dims; rank replicated.
    specs = {".".join(map(str, p)): v.get_value().sharding.spec
             for p, v in nnx.to_flat_state(state.params)}
    lead = (None,) if CASES[case][1] else ()
    q = "model.layers" + ("" if lead else ".0") + ".self_attn.q_proj.lora"
    assert tuple(specs[q + ".lora_a"]) == (*lead, "fsdp")  # [*, D, r]: embed -> fsdp
    assert tuple(specs[q + ".lora_b"]) == (*lead, None, "tensor")  # [*, r, N, H]: heads
    if case == "int8_scan":
        codes = [v.get_value() for _, v in nnx.to_flat_state(nnx.state(state.frozen,
                                                                        QuantizedParam))]
        assert any(c.sharding.spec != jax.sharding.PartitionSpec() for c in codes)
