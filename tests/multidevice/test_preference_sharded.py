"""DPO on a (2,2,2) mesh: pairs split by rows over devices and micro-batches together, the
same loss, metrics and gradients as on one device without accumulation, one pair per row or
packed."""

import jax
import numpy as np
import pytest

from jaxtune.config import TrainerConfig
from jaxtune.objectives import make_objective
from tests.train_helpers import make_stepper, params_numpy, put


def _two_steps(setup, sizes, accum, batch="batch"):
    objective = make_objective(TrainerConfig(objective="dpo", loss_chunk_size=48))
    state, fn, mesh = make_stepper(setup["policy"], sizes, grad_accum_steps=accum,
                                   optimizer="sgd", lr=1.0, loss_fn=objective,
                                   keep_reference=True)
    for _ in range(2):  # the first step moves the policy off its reference
        before = params_numpy(state)
        state, metrics = fn(state, put(setup[batch], mesh))
    after = params_numpy(state)
    return jax.device_get(metrics), {k: before[k] - after[k] for k in before}


@pytest.fixture(scope="module")
def one_device(preference_setup):
    """The 8 pairs, one per row, in one batch on one device."""
    return _two_steps(preference_setup, (1, 1, 1), 1)


def _same(got, want):
    (m, g), (ref_m, ref_g) = got, want
    assert abs(float(ref_m["loss"]) - np.log(2)) > 1e-4  # the policy left its reference
    for k in ("loss", "rewards/margin", "rewards/accuracy", "logps/chosen", "pairs"):
        np.testing.assert_allclose(m[k], ref_m[k], rtol=1e-5, atol=1e-6, err_msg=k)
    for k in ref_g:
        np.testing.assert_allclose(g[k], ref_g[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_dpo_accumulates_exactly_on_a_mesh(preference_setup, one_device):
    """4 micro-batches of 2 pairs over a (2,2,2) mesh == the 8 pairs at once on one device."""
    _same(_two_steps(preference_setup, (2, 2, 2), 4), one_device)


def test_packed_dpo_accumulates_exactly_on_a_mesh(preference_setup, one_device):
    """The same 8 pairs packed 2-3 to a row (then empty rows), as 4 micro-batches of 2 rows
    over a (2,2,2) mesh: micro-batches hold 3, 3, 2 and 0 pairs, and the normaliser is still
    the 8 pairs of the global batch, so the step equals the one above."""
    rows = preference_setup["packed_rows"]
    assert [sum(len(rows[r]) for r in range(i, 8, 4)) for i in range(4)].count(0) >= 1
    _same(_two_steps(preference_setup, (2, 2, 2), 4, batch="packed"), one_device)
