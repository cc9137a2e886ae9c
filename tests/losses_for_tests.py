"""Loss functions referenced by import path from test recipes (``trainer.loss_fn``)."""

import jax.numpy as jnp

from jaxtune.loss import cross_entropy_loss

NAN_STEP = 3


def nan_at_step_3(model, batch):
    """The default loss, except NaN on step 3 (``batch['step']`` counts steps already taken)."""
    loss, aux = cross_entropy_loss(model, batch)
    return jnp.where(batch["step"] + 1 == NAN_STEP, jnp.nan, loss), aux


def nan_grads_at_step_3(model, batch):
    """The default loss times NaN on step 3: the loss, the gradients and so the updated
    parameters all become NaN (a real divergence, unlike :func:`nan_at_step_3`)."""
    loss, aux = cross_entropy_loss(model, batch)
    # A NaN factor, not jnp.where(.., loss * nan, loss): that one's gradient is NaN at every step.
    return loss * jnp.where(batch["step"] + 1 == NAN_STEP, jnp.nan, 1.0), aux
