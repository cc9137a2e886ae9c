"""A researcher's custom objective and step, used by docs/custom-train-step.md (and tested).

Use them from a recipe or the command line:

    jaxtune train configs/quickstart.yaml \
        --trainer.loss_fn=examples.custom_step:label_smoothed_loss \
        --trainer.train_step=examples.custom_step:step_with_update_ratio
"""

import jax
import jax.numpy as jnp
import optax

from jaxtune.train_step import train_step

SMOOTHING = 0.1


def label_smoothed_loss(model, batch):
    """Token cross-entropy with label smoothing, over the trained tokens only.

    Returns this micro-batch's contribution: token sums divided by the step's global
    ``loss_denominator``, so gradient accumulation stays exact.
    """
    logits_BTV = model(batch["input_ids"], batch["positions"], batch["segment_ids"])
    logp_BTV = jax.nn.log_softmax(logits_BTV)
    nll_BT = -jnp.take_along_axis(logp_BTV, batch["targets"][..., None], axis=-1)[..., 0]
    per_token_BT = (1 - SMOOTHING) * nll_BT - SMOOTHING * logp_BTV.mean(axis=-1)
    mask_BT = batch["loss_mask"]
    loss = (per_token_BT * mask_BT).sum() / batch["loss_denominator"]
    return loss, {"nll_sum": (nll_BT * mask_BT).sum(), "num_tokens": mask_BT.sum()}


def step_with_update_ratio(state, batch, **kwargs):
    """jaxtune's own step, plus one extra metric: the size of the update relative to params."""
    new_state, metrics = train_step(state, batch, **kwargs)
    delta = jax.tree.map(jnp.subtract, new_state.params, state.params)
    metrics["update_ratio"] = optax.tree.norm(delta) / optax.tree.norm(state.params)
    return new_state, metrics
