"""Distillation on a (2,2,2) mesh: the teacher laid out by the same rules as the student and
given to the jitted step as an argument; 4 micro-batches over 8 devices give the loss, the
divergence and the gradients of the whole batch on one device (the trained-token normaliser
is global)."""

import jax
import numpy as np
import pytest
from flax import nnx

from jaxtune.config import (
    DistillConfig,
    MeshConfig,
    OptimizerConfig,
    TrainConfig,
    TrainerConfig,
)
from jaxtune.mesh import make_mesh
from jaxtune.objectives import make_objective
from jaxtune.optim import make_optimizer
from jaxtune.sharding import make_rules
from jaxtune.train_state import FrozenModel, create_train_state
from jaxtune.train_step import jit_train_step, train_step
from jaxtune.weights import from_pretrained
from tests.train_helpers import params_numpy, put, synthetic_batch


def _two_steps(pair, sizes, accum, distill):
    mesh = make_mesh(MeshConfig(*sizes), jax.devices()[: int(np.prod(sizes))])
    rules = make_rules()
    student = from_pretrained(pair["student"], mesh=mesh, rules=rules)
    teacher = FrozenModel.of(from_pretrained(pair["teacher"], mesh=mesh, rules=rules))
    cfg = TrainConfig(trainer=TrainerConfig(objective="distill", loss_chunk_size=24),
                      distill=DistillConfig(teacher=str(pair["teacher"]), **distill))
    cfg.model.path = str(pair["student"])
    objective = make_objective(cfg)
    opt = make_optimizer(OptimizerConfig(name="sgd", learning_rate=1.0, schedule="constant"),
                         10, nnx.state(student, nnx.Param))
    state = create_train_state(student, opt, mesh=mesh, rules=rules)
    fn = jit_train_step(train_step, state, mesh, rules, loss_fn=objective, optimizer=opt,
                        grad_accum_steps=accum, teacher=teacher)
    batch = synthetic_batch(8, 20, 389, seed=5)
    for _ in range(2):
        before = params_numpy(state)
        state, metrics = fn(state, put(batch, mesh), teacher.state)
    after = params_numpy(state)
    return jax.device_get(metrics), {k: before[k] - after[k] for k in before}


@pytest.mark.parametrize("distill", [dict(beta=0.5, temperature=2.0, ce_weight=0.3),
                                     dict(beta=1.0, top_k=5)])
def test_distill_accumulates_exactly_on_a_mesh(distill_pair, distill):
    ref_m, ref_g = _two_steps(distill_pair, (1, 1, 1), 1, distill)
    m, g = _two_steps(distill_pair, (2, 2, 2), 4, distill)
    assert ref_m["divergence"] > 1e-3
    for k in ("loss", "divergence", "entropy", "nll_sum", "trained_tokens"):
        np.testing.assert_allclose(m[k], ref_m[k], rtol=1e-5, atol=1e-6, err_msg=k)
    for k in ref_g:
        np.testing.assert_allclose(g[k], ref_g[k], rtol=1e-4, atol=1e-6, err_msg=k)
