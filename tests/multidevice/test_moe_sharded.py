"""Expert parallelism: three MoE train steps on 8 devices with the expert axis at 1, 2 and 4
(with data / fsdp, tokens replicated over the expert axis by default or split over it) equal
the one-device run, losses and parameters."""

import jax
import numpy as np
import pytest
from flax import nnx

from jaxtune.config import MeshConfig, OptimizerConfig, TrainerConfig
from jaxtune.mesh import make_mesh
from jaxtune.objectives import make_loss_fn
from jaxtune.optim import make_optimizer
from jaxtune.sharding import make_rules
from jaxtune.train_state import create_train_state
from jaxtune.train_step import jit_train_step, train_step
from jaxtune.weights import from_pretrained
from tests.fixtures_moe import make_moe_hf_model
from tests.train_helpers import params_numpy, put, synthetic_batch

#: (data, fsdp, expert, tensor), and whether tokens split over the expert axis too.
MESHES = [((2, 4, 1, 1), False), ((2, 2, 2, 1), False), ((1, 2, 4, 1), True)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # 4 experts (top 2) so the expert axis divides them; a shared expert; scanned layers.
    return make_moe_hf_model("qwen2_moe", tmp_path_factory.mktemp("moe4"), vocab_size=67,
                             intermediate_size=22, moe_intermediate_size=14,
                             shared_expert_intermediate_size=18, num_experts=4,
                             norm_topk_prob=True)


def _three_steps(model_dir, sizes, split_tokens, accum=1):
    data, fsdp, expert, tensor = sizes
    mesh = make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor, expert=expert),
                     jax.devices()[:data * fsdp * expert * tensor])
    rules = make_rules({"batch": ["data", "fsdp", "expert"]} if split_tokens else None)
    model = from_pretrained(model_dir, mesh=mesh, rules=rules, scan_layers=True)
    opt = make_optimizer(OptimizerConfig(name="sgd", learning_rate=0.5, schedule="constant"),
                         10, nnx.state(model, nnx.Param))
    state = create_train_state(model, opt, mesh=mesh, rules=rules)
    fn = jit_train_step(train_step, state, mesh, rules, optimizer=opt, grad_accum_steps=accum,
                        loss_fn=make_loss_fn(TrainerConfig(loss_chunk_size=64)))
    losses, aux = [], []
    for i in range(3):
        state, m = fn(state, put(synthetic_batch(8, 12, 67, seed=i), mesh))
        losses.append(float(m["loss"]))
        aux.append(float(m["router_aux_loss"]))
    return losses, aux, params_numpy(state), state


@pytest.fixture(scope="module")
def reference(model_dir):
    return _three_steps(model_dir, (1, 1, 1, 1), False)


@pytest.mark.parametrize("sizes,split", MESHES, ids=[f"{m}{'-split' if s else ''}"
                                                    for m, s in MESHES])
def test_expert_parallel_equals_single_device(model_dir, reference, sizes, split):
    ref_losses, ref_aux, ref_params, _ = reference
    losses, aux, params, state = _three_steps(model_dir, sizes, split)
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    np.testing.assert_allclose(aux, ref_aux, rtol=2e-5)
    for k in ref_params:
        np.testing.assert_allclose(params[k], ref_params[k], rtol=1e-4, atol=1e-5, err_msg=k)
    if sizes[2] > 1:  # the experts really are split over the expert axis
        kernel = state.params["model"]["layers"]["mlp"]["experts"]["gate_proj"]["kernel"]
        assert "expert" in str(kernel.get_value().sharding.spec)


def test_expert_parallel_lora_logits_equal_single_device(model_dir):
    """LoRA adapters on the experts travel into the expert-parallel shard_map."""
    import jax.numpy as jnp

    from jaxtune.config import LoraConfig
    from jaxtune.lora import LoraParam, apply_lora
    from jaxtune.sharding import activation_rules

    ids = jnp.asarray(synthetic_batch(8, 12, 67)["input_ids"])
    out = []
    for sizes, split in (((1, 1, 1, 1), False), ((1, 2, 4, 1), True)):
        data, fsdp, expert, tensor = sizes
        mesh = make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor, expert=expert),
                         jax.devices()[:data * fsdp * expert * tensor])
        rules = make_rules({"batch": ["data", "fsdp", "expert"]} if split else None)
        model, _ = apply_lora(from_pretrained(model_dir, mesh=mesh, rules=rules),
                              LoraConfig(rank=2, targets=["gate_proj", "down_proj"]),
                              mesh=mesh, rules=rules)
        leaves, treedef = jax.tree.flatten(nnx.state(model, LoraParam))
        nnx.update(model, jax.tree.unflatten(treedef, [
            jnp.full(v.shape, 0.1 * (i + 1)) for i, v in enumerate(leaves)]))

        @nnx.jit
        def forward(m, mesh=mesh, rules=rules):
            with activation_rules(mesh, rules):
                return m(ids)

        out.append(np.asarray(forward(model)))
    np.testing.assert_allclose(out[1], out[0], atol=1e-5, rtol=1e-5)
