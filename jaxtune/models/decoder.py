"""What every decoder-only family does around its layer stack, written once.

A family's causal LM fills in default positions (:func:`fill_positions`), builds the attention
mask, or takes the generation cache's (:func:`attention_mask`), gives each layer its sliding
window (:func:`scan_windows`), runs ``jaxtune.models.stack.apply_layers``, says what its
generation cache holds (:func:`cache_layout_of`), and projects the
final hidden states on the tied embedding or an ``lm_head`` (:func:`make_lm_head`,
:func:`project_logits`). The family keeps only what is its own: the embedding's scaling, its
RoPE tables, what its layers carry besides the hidden states.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxtune.models.layers import AttentionMask, Embed, Linear

#: A "window" longer than any sequence: the window of a full-attention layer in a scan over
#: layers some of which slide (a scanned argument needs one type on every layer).
NO_WINDOW = 2**30


def fill_positions(input_ids_BT: jax.Array, positions_BT: jax.Array | None,
                   segment_ids_BT: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
    """``positions`` (``0..T-1`` on every row when not given) and int32 ``segment_ids``."""
    b, t = input_ids_BT.shape
    if positions_BT is None:
        positions_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if segment_ids_BT is not None:
        segment_ids_BT = segment_ids_BT.astype(jnp.int32)
    return positions_BT, segment_ids_BT


def attention_mask(positions_BT: jax.Array, segment_ids_BT: jax.Array | None,
                   cache: Any = None) -> tuple[AttentionMask, Any]:
    """``(mask, cache)``: causal within each segment in training; in generation (a
    ``jaxtune.generation.cache.KVCache``) the new tokens' queries over the cache's slots."""
    if cache is None:
        return AttentionMask.causal(positions_BT, segment_ids_BT), None
    return cache.attend(positions_BT, segment_ids_BT)


def scan_windows(windows: Sequence[int | None], scan_layers: bool) -> tuple[int | None, ...]:
    """Per-layer sliding windows as the stack takes them. Under scan, mixed full and sliding
    layers in a repeating pattern (Gemma's) are scanned over blocks of the pattern, each
    layer's window static (``stack.block_runs``); without such a pattern they scan one window
    per layer as an array, so a full layer's is :data:`NO_WINDOW`."""
    from jaxtune.models.stack import block_runs

    windows = tuple(windows)
    if scan_layers and len(set(windows)) > 1 and \
            block_runs([{"window": w} for w in windows]) is None:
        return tuple(w or NO_WINDOW for w in windows)
    return windows


def cache_layout_of(config: Any, ring: bool = True) -> tuple[int, ...]:
    """A one-stack generation cache's layout (``jaxtune.generation.cache``): ``(layers, kv
    heads, head dim)``, plus the window when every layer slides by the same one (Mistral,
    Mixtral), so that stack keeps only the window (a ring). Mixed full and sliding layers
    keep every slot and apply their windows in the mask."""
    layout = (config.num_hidden_layers, config.num_key_value_heads, config.head_dim)
    windows = set(config.layer_windows())
    if ring and len(windows) == 1 and None not in windows:
        return (*layout, windows.pop())
    return layout


def make_lm_head(config: Any, *, param_dtype: Any, rngs: Any) -> Linear | None:
    """The output projection, or ``None`` when ``config.tie_word_embeddings``."""
    if config.tie_word_embeddings:
        return None
    return Linear((config.hidden_size,), (config.vocab_size,), in_axes=("embed",),
                  out_axes=("vocab",), param_dtype=param_dtype, rngs=rngs)


def project_logits(embed_tokens: Embed, lm_head: Linear | None, hidden_D: jax.Array) -> jax.Array:
    """Float32 logits ``[..., V]``: on the tied embedding, or through ``lm_head``."""
    if lm_head is None:
        return embed_tokens.attend(hidden_D)
    return lm_head(hidden_D, out_dtype=jnp.float32).astype(jnp.float32)
