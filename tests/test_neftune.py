"""NEFTune (``trainer.neftune_noise_alpha``): transformers' noise magnitude, training only,
keyed by the micro-batch's rng, and a config error for a negative alpha."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxtune.config import ConfigError, TrainerConfig, load_config
from jaxtune.neftune import add_noise, embedding_noise, with_neftune
from jaxtune.objectives import batch_axes_of, make_loss_fn
from jaxtune.weights import from_pretrained
from tests.train_helpers import make_stepper, put, synthetic_batch

VOCAB = 389
ALPHA = 5.0


def test_noise_magnitude_matches_transformers_hook():
    """Both draw Uniform(-m, m), m = alpha / sqrt(T * D): compare the range and the spread."""
    from transformers.integrations.neftune import neftune_post_forward_hook

    shape = (4, 37, 72)
    module = torch.nn.Embedding(3, 72).train()
    module.neftune_noise_alpha = ALPHA
    torch.manual_seed(0)
    hf = neftune_post_forward_hook(module, None, torch.zeros(shape)).numpy()
    with embedding_noise(jax.random.key(0), ALPHA):
        ours = np.asarray(add_noise(jnp.zeros(shape)))
    bound = ALPHA / np.sqrt(37 * 72)
    for noise in (hf, ours):
        assert np.abs(noise).max() <= bound + 1e-7
        assert np.abs(noise).max() > 0.99 * bound
        np.testing.assert_allclose(noise.std(), bound / np.sqrt(3), rtol=0.03)  # uniform's
        assert abs(noise.mean()) < 0.02 * bound


def test_noise_only_inside_the_context_and_keyed(tiny_hf_model):
    model = from_pretrained(tiny_hf_model("llama"))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (2, 11)), jnp.int32)
    plain = np.asarray(model(ids))
    with embedding_noise(jax.random.key(1), ALPHA):
        noisy = np.asarray(model(ids))
        noisy_again = np.asarray(model(ids))
    with embedding_noise(jax.random.key(2), ALPHA):
        other = np.asarray(model(ids))
    assert np.abs(noisy - plain).max() > 1e-4 and np.abs(noisy - other).max() > 1e-4
    np.testing.assert_array_equal(noisy, noisy_again)
    np.testing.assert_array_equal(np.asarray(model(ids)), plain)  # none outside the context
    with embedding_noise(jax.random.key(1), 0.0):
        np.testing.assert_array_equal(np.asarray(model(ids)), plain)


def test_train_step_with_neftune(tiny_hf_model):
    """The noisy loss differs from the plain one, the same rng gives the same step, and the
    wrapped objective keeps its batch axes."""
    plain_loss = make_loss_fn(TrainerConfig(loss_chunk_size=64))
    noisy_loss = with_neftune(plain_loss, ALPHA)
    assert batch_axes_of(noisy_loss) == batch_axes_of(plain_loss)
    batch = synthetic_batch(4, 16, VOCAB)
    losses = []
    for loss_fn in (plain_loss, noisy_loss, noisy_loss):
        state, step, mesh = make_stepper(tiny_hf_model("llama"), loss_fn=loss_fn)
        _, metrics = step(state, put(batch, mesh))
        losses.append(float(metrics["loss"]))
    assert losses[0] != losses[1]
    assert losses[1] == losses[2]
    assert abs(losses[1] - losses[0]) < 0.05 * losses[0]  # noise, not a different model


def test_negative_alpha_is_a_config_error():
    with pytest.raises(ConfigError, match="neftune_noise_alpha"):
        load_config(None, ["--trainer.neftune_noise_alpha=-1"])
