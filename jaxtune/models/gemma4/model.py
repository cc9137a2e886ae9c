"""Gemma 4 language models (HF ``gemma4_text``; ``gemma4``'s text part) in Flax NNX.

Axis letters: B batch, T query length, S key length, D embed, N query heads, K key/value heads,
H head dim, F mlp, V vocab, L layers, P per-layer input width, E experts.

As transformers' ``modeling_gemma4.py`` computes it (not Gemma 3 plus flags):

- RMSNorm is ``x * w`` in float32, rounded after the multiply (``RMSNorm(f32_weight=True)``),
  with weight-free forms for the values and the router.
- Attention: RMSNorm on each query and key head (weights) and on each value head (none), RoPE
  on queries and keys, logits scale 1.0, no soft-cap. Sliding layers use ``head_dim`` /
  ``num_key_value_heads`` and default RoPE, full layers ``global_head_dim`` /
  ``num_global_key_value_heads`` and proportional RoPE; with ``attention_k_eq_v`` full layers
  have no ``v_proj`` and take their values from ``k_proj`` (before the key norm).
- KV sharing: the last ``num_kv_shared_layers`` layers have no key/value projections and
  attend with the keys and values of the last earlier layer of their type. Those travel in
  the stack's carry (``kv``, one pair per shared layer type), written by every layer of the
  type that has its own, so the stack stays one scan per run of blocks; while generating,
  they are the store layer's whole cache.
- The layer: sandwich norms around attention and the MLP; the optional MoE block (router +
  experts on the layer input, in parallel with the dense MLP, each with its own post-norm);
  the per-layer input (PLE) gate; the loaded ``layer_scalar`` (a :class:`Buffer`, frozen).
- Per-layer embeddings: ``embed_tokens_per_layer`` (scaled by ``sqrt(P)``) plus the
  normalised projection of the input embeddings, times ``2 ** -0.5``, one ``[P]`` slice per
  layer.
- The final logits are soft-capped by ``final_logit_softcapping`` when it is set.

Layers of different kinds (sliding / full, own keys or shared) have different parameters, so
under ``scan_layers`` each kind is one stacked module (``model.layers.<kind>``) and the stack
is scanned over blocks of its repeating pattern (``stack.apply_slots``): every layer keeps its
window and geometry static, so fused attention applies on every layer.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtune.models.decoder import attention_mask, fill_positions, make_lm_head, project_logits
from jaxtune.models.gemma4.config import FULL, SLIDING, Gemma4Config
from jaxtune.models.layers import (
    ACTIVATIONS,
    AttentionMask,
    Buffer,
    Embed,
    GatedMLP,
    LayerKV,
    Linear,
    RMSNorm,
    apply_rope,
    dot_product_attention,
    resolve_attention_impl,
    rope_cos_sin,
)
from jaxtune.models.moe.dispatch import get_dispatch
from jaxtune.models.moe.model import Experts, add_router_stats, router_aux, zero_stats
from jaxtune.models.stack import Slot, apply_slots, check_remat, make_layers
from jaxtune.sharding import constrain

_BTD = ("batch", "seq", "embed")
_KV = ("batch", "seq", "kv_heads", "head_dim")


def _scaled(x: jax.Array, factor: float) -> jax.Array:
    """``x * factor`` with the product taken in float32 and rounded once, as PyTorch
    multiplies a low-precision tensor by a Python number."""
    return (x.astype(jnp.float32) * factor).astype(x.dtype)


class Gemma4Attention(nnx.Module):
    """One layer's attention; a shared layer (``shared``) has only ``q_proj``, ``q_norm`` and
    ``o_proj`` and attends with the keys and values it is given."""

    def __init__(self, cfg: Gemma4Config, layer_type: str, shared: bool, *, param_dtype: Any,
                 implementation: str, rngs: nnx.Rngs):
        d, n = cfg.hidden_size, cfg.num_attention_heads
        kv, h = cfg.geometry(layer_type)
        norm = functools.partial(RMSNorm, h, eps=cfg.rms_norm_eps, axis_name="head_dim",
                                 param_dtype=param_dtype, f32_weight=True)

        def proj(heads: int, axis: str) -> Linear:
            return Linear((d,), (heads, h), in_axes=("embed",), out_axes=(axis, "head_dim"),
                          use_bias=cfg.attention_bias, param_dtype=param_dtype, rngs=rngs)

        self.q_proj = proj(n, "heads")
        self.q_norm = norm()
        if shared:
            self.k_proj = self.v_proj = self.k_norm = self.v_norm = None
        else:
            self.k_proj = proj(kv, "kv_heads")
            # attention_k_eq_v: full layers take their values from the key projection.
            self.v_proj = (None if cfg.attention_k_eq_v and layer_type == FULL
                           else proj(kv, "kv_heads"))
            self.k_norm = norm()
            self.v_norm = norm(with_scale=False)
        self.o_proj = Linear((n, h), (d,), in_axes=("heads", "head_dim"), out_axes=("embed",),
                             use_bias=cfg.attention_bias, param_dtype=param_dtype, rngs=rngs)
        self.implementation = implementation

    def __call__(self, x_BTD, cos_BTh, sin_BTh, mask: AttentionMask, window, *,
                 kv=None, cache: LayerKV | None = None):
        """``(output [B, T, D], (keys, values) it attended with, cache)``: a shared layer
        attends with ``kv``; with a generation ``cache`` the new keys and values are written
        at ``cache.index`` and the queries attend over the cache's slots. A sliding layer's
        cache may be a ring of its window (``LayerKV.write_and_read``): the keys it attended
        with then come with their positions and segment ids, ``(keys, values, positions,
        segment ids)``, which a layer that shares them masks by."""
        q_BTNH = apply_rope(self.q_norm(self.q_proj(x_BTD)), cos_BTh, sin_BTh)
        q_BTNH = constrain(q_BTNH, ("batch", "seq", "heads", "head_dim"))
        ring = False
        if self.k_proj is None:
            k_BSKH, v_BSKH = kv[:2]
            if len(kv) == 4:  # the store layer's ring: its keys' own positions and segments
                mask = AttentionMask(mask.q_positions_BT, kv[2], mask.q_segment_ids_BT, kv[3])
        else:
            k_BTKH = self.k_proj(x_BTD)
            v_BTKH = k_BTKH if self.v_proj is None else self.v_proj(x_BTD)
            k_BSKH = constrain(apply_rope(self.k_norm(k_BTKH), cos_BTh, sin_BTh), _KV)
            v_BSKH = constrain(self.v_norm(v_BTKH), _KV)
            if cache is not None:
                cache, k_BSKH, v_BSKH, mask = cache.write_and_read(k_BSKH, v_BSKH, mask)
                ring = cache.positions_BS is not None
        k_BSKH, v_BSKH = k_BSKH.astype(q_BTNH.dtype), v_BSKH.astype(q_BTNH.dtype)
        impl = self.implementation if mask.aligned else "xla"
        out_BTNH = dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask, window=window,
                                         implementation=impl, scale=1.0)
        used = (k_BSKH, v_BSKH)
        if ring:
            used += (mask.k_positions_BS, mask.k_segment_ids_BS)
        return self.o_proj(out_BTNH), used, cache


class Router(nnx.Module):
    """Gemma 4's router: a weight-free RMSNorm, a learned scale times ``D ** -0.5``, the
    projection, a float32 softmax, top-k renormalised, times each chosen expert's scale."""

    def __init__(self, cfg: Gemma4Config, *, param_dtype: Any, rngs: nnx.Rngs):
        d, e = cfg.hidden_size, cfg.num_experts
        self.norm = RMSNorm(d, eps=cfg.rms_norm_eps, with_scale=False)
        # The expert dim is its own logical name ("router"), replicated: softmax and top-k
        # need every expert's logit.
        self.proj = Linear((d,), (e,), in_axes=("embed",), out_axes=("router",),
                           param_dtype=param_dtype, rngs=rngs)
        self.scale = nnx.Param(jnp.ones((d,), param_dtype), logical_axes=("embed",))
        self.per_expert_scale = nnx.Param(jnp.ones((e,), param_dtype), logical_axes=("router",))
        self.top_k = cfg.top_k_experts

    def __call__(self, x_ND: jax.Array):
        """``(logits [N, E], probabilities, top-k weights [N, K] (float32), expert ids)``."""
        h_ND = self.norm(x_ND) * self.scale[...].astype(x_ND.dtype)
        h_ND = _scaled(h_ND, x_ND.shape[-1] ** -0.5)
        logits_NE = self.proj(h_ND)
        probs_NE = jax.nn.softmax(logits_NE.astype(jnp.float32), axis=-1)
        top_NK, idx_NK = jax.lax.top_k(probs_NE, self.top_k)
        top_NK = top_NK / jnp.sum(top_NK, axis=-1, keepdims=True)
        top_NK = top_NK * self.per_expert_scale[...].astype(jnp.float32)[idx_NK]
        return logits_NE, probs_NE, top_NK, idx_NK


class DecoderLayer(nnx.Module):
    """One Gemma 4 layer of one kind (``layer_type``, ``shared``); see the module docstring.

    Called with the carry ``(x [B, T, D], router stats or None, kv or None)``: ``kv`` maps each
    layer type whose keys and values shared layers read to that pair (a layer with its own
    writes it, a shared layer reads it)."""

    def __init__(self, cfg: Gemma4Config, layer_type: str, shared: bool, mlp_width: int, *,
                 param_dtype: Any, implementation: str, dispatch: str, rngs: nnx.Rngs):
        d = cfg.hidden_size
        norm = functools.partial(RMSNorm, d, eps=cfg.rms_norm_eps, param_dtype=param_dtype,
                                 f32_weight=True)
        self.layer_type = layer_type
        self.input_layernorm = norm()
        self.self_attn = Gemma4Attention(cfg, layer_type, shared, param_dtype=param_dtype,
                                         implementation=implementation, rngs=rngs)
        self.post_attention_layernorm = norm()
        self.pre_feedforward_layernorm = norm()
        self.mlp = GatedMLP(d, mlp_width, activation=cfg.hidden_act, param_dtype=param_dtype,
                            rngs=rngs)
        self.post_feedforward_layernorm = norm()
        self.activation = cfg.hidden_act
        if cfg.enable_moe_block:
            self.router = Router(cfg, param_dtype=param_dtype, rngs=rngs)
            self.experts = Experts(cfg.num_experts, d, cfg.moe_intermediate_size,
                                   param_dtype=param_dtype, rngs=rngs)
            self.post_feedforward_layernorm_1 = norm()
            self.post_feedforward_layernorm_2 = norm()
            self.pre_feedforward_layernorm_2 = norm()
        else:
            self.router = self.experts = None
        self.dispatch = dispatch
        p = cfg.hidden_size_per_layer_input
        if p:
            self.per_layer_input_gate = Linear((d,), (p,), in_axes=("embed",),
                                               out_axes=("per_layer",), param_dtype=param_dtype,
                                               rngs=rngs)
            self.per_layer_projection = Linear((p,), (d,), in_axes=("per_layer",),
                                               out_axes=("embed",), param_dtype=param_dtype,
                                               rngs=rngs)
            self.post_per_layer_input_norm = norm()
        else:
            self.per_layer_input_gate = self.per_layer_projection = None
        self.layer_scalar = Buffer(jnp.ones((1,), param_dtype), logical_axes=("scalar",))

    def __call__(self, carry, ropes, mask: AttentionMask, token_mask_BT, ple_BTLP, *, window,
                 layer, cache=None):
        """The new carry; with a generation ``cache`` (this layer's LayerKV), ``(carry,
        cache)``."""
        x_BTD, stats, kv = carry
        cos_BTh, sin_BTh = ropes[self.layer_type]
        shared_kv = None if kv is None else kv.get(self.layer_type)
        attn, own_kv, cache = self.self_attn(self.input_layernorm(x_BTD), cos_BTh, sin_BTh, mask,
                                             window, kv=shared_kv, cache=cache)
        if kv is not None and self.layer_type in kv and self.self_attn.k_proj is not None:
            kv = {**kv, self.layer_type: tuple(a.astype(b.dtype) for a, b in
                                               zip(own_kv, kv[self.layer_type], strict=True))}
        x_BTD = constrain(x_BTD + self.post_attention_layernorm(attn), _BTD)

        h_BTD = self.mlp(self.pre_feedforward_layernorm(x_BTD))
        if self.router is not None:
            moe_BTD, stats = self._moe(x_BTD, token_mask_BT, stats)
            h_BTD = self.post_feedforward_layernorm_1(h_BTD) + moe_BTD
        x_BTD = constrain(x_BTD + self.post_feedforward_layernorm(h_BTD), _BTD)

        if self.per_layer_input_gate is not None:
            ple_BTP = (ple_BTLP[:, :, layer] if isinstance(layer, int) else
                       jax.lax.dynamic_index_in_dim(ple_BTLP, layer, axis=2, keepdims=False))
            gate_BTP = ACTIVATIONS[self.activation](self.per_layer_input_gate(x_BTD))
            h_BTD = self.per_layer_projection(gate_BTP * ple_BTP)
            x_BTD = x_BTD + self.post_per_layer_input_norm(h_BTD)
        x_BTD = constrain(x_BTD * self.layer_scalar[...].astype(x_BTD.dtype), _BTD)
        carry = (x_BTD, stats, kv)
        return carry if cache is None else (carry, cache)

    def _moe(self, x_BTD, token_mask_BT, stats):
        """The routed experts on the layer input ``x`` (post-norm 2 applied) and the stats."""
        b, t, d = x_BTD.shape
        x_ND = x_BTD.reshape(b * t, d)
        logits_NE, probs_NE, top_NK, idx_NK = self.router(x_ND)
        h_ND = self.pre_feedforward_layernorm_2(x_ND)
        out_ND = get_dispatch(self.dispatch)(self.experts, h_ND, idx_NK, top_NK,
                                             ACTIVATIONS[self.activation], weights_f32=True)
        out_BTD = self.post_feedforward_layernorm_2(out_ND.reshape(b, t, d))
        if stats is not None:
            stats = add_router_stats(stats, logits_NE, probs_NE, idx_NK,
                                     token_mask_BT.reshape(-1))
        return out_BTD, stats


class Gemma4Model(nnx.Module):
    """HF's ``model``: embeddings (and per-layer embeddings), ``layers``, ``norm``."""

    def __init__(self, cfg: Gemma4Config, *, param_dtype: Any, compute_dtype: Any,
                 scan_layers: bool, remat: str, attention: str, dispatch: str, rngs: nnx.Rngs):
        self.config = cfg
        self.compute_dtype = compute_dtype
        self.scan_layers = scan_layers
        self.remat = remat
        d = cfg.hidden_size
        self.embed_tokens = Embed(cfg.vocab_size, d, param_dtype=param_dtype, rngs=rngs)
        p, n = cfg.hidden_size_per_layer_input, cfg.num_hidden_layers
        if p:
            self.embed_tokens_per_layer = Embed(cfg.vocab_size_per_layer_input, n * p,
                                                param_dtype=param_dtype, rngs=rngs)
            self.per_layer_model_projection = Linear(
                (d,), (n * p,), in_axes=("embed",), out_axes=("per_layer",),
                param_dtype=param_dtype, rngs=rngs)
            self.per_layer_projection_norm = RMSNorm(p, eps=cfg.rms_norm_eps,
                                                     axis_name="per_layer",
                                                     param_dtype=param_dtype, f32_weight=True)
        else:
            self.embed_tokens_per_layer = self.per_layer_model_projection = None
            self.per_layer_projection_norm = None
        impls = {t: resolve_attention_impl(attention, compute_dtype, cfg.geometry(t)[1])
                 for t in (SLIDING, FULL)}

        def make(i: int, r: nnx.Rngs) -> DecoderLayer:
            t = cfg.layer_types[i]
            return DecoderLayer(cfg, t, cfg.is_shared(i), cfg.mlp_width(i),
                                param_dtype=param_dtype, implementation=impls[t],
                                dispatch=dispatch, rngs=r)

        if scan_layers:
            first = {}
            for i in range(n):
                first.setdefault(cfg.layer_kind(i), i)
            self.layers = nnx.Dict({
                kind: make_layers(functools.partial(make, first[kind]), count,
                                  scan_layers=True, rngs=rngs)
                for kind, count in cfg.layer_kinds().items()})
        else:
            self.layers = nnx.List([make(i, rngs) for i in range(n)])
        self.norm = RMSNorm(d, eps=cfg.rms_norm_eps, param_dtype=param_dtype, f32_weight=True)

    def per_layer_inputs(self, input_ids_BT: jax.Array, x_BTD: jax.Array) -> jax.Array | None:
        """The per-layer inputs ``[B, T, L, P]`` (None without per-layer embeddings)."""
        if self.embed_tokens_per_layer is None:
            return None
        cfg = self.config
        n, p = cfg.num_hidden_layers, cfg.hidden_size_per_layer_input
        tok = self.embed_tokens_per_layer(input_ids_BT, x_BTD.dtype)
        tok_BTLP = (tok * jnp.asarray(math.sqrt(p), tok.dtype)).reshape(*tok.shape[:2], n, p)
        proj = _scaled(self.per_layer_model_projection(x_BTD), cfg.hidden_size ** -0.5)
        proj_BTLP = self.per_layer_projection_norm(proj.reshape(*proj.shape[:2], n, p))
        return _scaled(proj_BTLP + tok_BTLP, 2.0 ** -0.5)

    def __call__(self, input_ids_BT, positions_BT, segment_ids_BT, cache=None):
        """``(hidden, router stats or None)``; with a generation ``cache``, ``(hidden, stats,
        cache)``."""
        cfg = self.config
        x_BTD = self.embed_tokens(input_ids_BT, self.compute_dtype)
        # transformers rounds sqrt(hidden) to the activations' dtype before multiplying.
        x_BTD = constrain(x_BTD * jnp.asarray(math.sqrt(cfg.hidden_size), x_BTD.dtype), _BTD)
        ple_BTLP = self.per_layer_inputs(input_ids_BT, x_BTD)
        ropes = {SLIDING: rope_cos_sin(positions_BT, cfg.rope_local, cfg.head_dim, x_BTD.dtype),
                 FULL: rope_cos_sin(positions_BT, cfg.rope, cfg.global_head_dim, x_BTD.dtype)}
        mask, cache = attention_mask(positions_BT, segment_ids_BT, cache)
        token_mask_BT = (jnp.ones(input_ids_BT.shape, jnp.float32) if segment_ids_BT is None
                         else (segment_ids_BT != 0).astype(jnp.float32))
        stats = zero_stats(cfg.num_experts) if cfg.enable_moe_block else None
        kv = self._empty_kv(x_BTD, cache)
        slots = [Slot(kind, index, (("window", w),)) for (kind, index), w in
                 zip(cfg.layer_groups(), cfg.layer_windows(), strict=True)]
        out = apply_slots(self.layers, (x_BTD, stats, kv), ropes, mask, token_mask_BT,
                          ple_BTLP, slots=slots, remat=self.remat, scan_layers=self.scan_layers,
                          cache=None if cache is None else cache.layers, layer_index=True)
        if cache is None:
            x_BTD, stats, _ = out
            return self.norm(x_BTD), stats
        (x_BTD, stats, _), layers_kv = out
        return self.norm(x_BTD), stats, cache.update(layers_kv)

    def _empty_kv(self, x_BTD, cache) -> dict[str, tuple[jax.Array, ...]] | None:
        """Zeros for the keys and values the shared layers read, one pair per layer type
        (training: the sequence's; generating: the whole cache's, or what a ring's layer
        attends with, its window then the new tokens when there are several, with their
        positions and segment ids)."""
        cfg = self.config
        if not cfg.num_kv_shared_layers:
            return None
        out = {}
        for i in cfg.kv_stores():
            t = cfg.layer_types[i]
            kv_heads, h = cfg.geometry(t)
            b, s = x_BTD.shape[:2]
            dtype = x_BTD.dtype
            ring = None
            if cache is not None:
                store = cache.layers[cfg.layer_kind(i)]
                ring, dtype = store.positions_BS, store.k_BSKH.dtype
                s = (cache.positions_BS.shape[1] if ring is None else
                     store.k_BSKH.shape[2] + (s if s > 1 else 0))
            zeros = constrain(jnp.zeros((b, s, kv_heads, h), dtype), _KV)
            out[t] = (zeros, zeros)
            if ring is not None:
                slots = jnp.zeros((b, s), jnp.int32)
                out[t] += (slots, slots)
        return out


class Gemma4ForCausalLM(nnx.Module):
    """Causal LM: ``model`` plus tied embeddings (or ``lm_head``); see the module docstring.

    ``model(input_ids_BT, positions_BT=None, segment_ids_BT=None)`` returns float32 logits
    ``[B, T, V]``, ``unembed(hidden_states(...))``; ``unembed`` applies the final soft-cap, so
    the chunked loss caps each chunk. With the MoE block, :meth:`hidden_states_and_aux` also
    gives the router metrics (and a router loss when ``router_aux_loss_coef`` is set; none
    by default, as transformers trains Gemma 4 with none).
    """

    def __init__(self, config: Gemma4Config, *, param_dtype: Any = jnp.float32,
                 compute_dtype: Any = None, scan_layers: bool = False, remat: str = "none",
                 attention: str = "auto", dispatch: str = "grouped", rngs: nnx.Rngs):
        check_remat(remat)
        get_dispatch(dispatch)
        param_dtype = jnp.dtype(param_dtype)
        compute_dtype = jnp.dtype(compute_dtype or param_dtype)
        self.config = config
        self.model = Gemma4Model(config, param_dtype=param_dtype, compute_dtype=compute_dtype,
                                 scan_layers=scan_layers, remat=remat, attention=attention,
                                 dispatch=dispatch, rngs=rngs)
        self.lm_head = make_lm_head(config, param_dtype=param_dtype, rngs=rngs)

    def kv_cache_layout(self, ring: bool = True) -> dict[str, tuple[int, ...]]:
        """The generation cache by layer kind: ``{kind: (layers, kv heads, head dim)}`` for
        the kinds that have their own keys and values (shared layers read theirs); the
        sliding kind's also gives its window, so it keeps only the window (a ring,
        ``jaxtune.generation.cache``), unless ``ring=False``."""
        cfg = self.config
        out = {}
        for kind, count in cfg.layer_kinds().items():
            if kind.endswith("_shared"):
                continue
            sliding = kind == "sliding"
            out[kind] = (count, *cfg.geometry(SLIDING if sliding else FULL))
            if sliding and ring:
                out[kind] += (cfg.sliding_window,)
        return out

    def hidden_states_and_aux(self, input_ids_BT, positions_BT=None, segment_ids_BT=None):
        """``(hidden [B, T, D], aux)``: with the MoE block, ``aux`` holds the router loss (zero
        unless ``router_aux_loss_coef`` / ``router_z_loss_coef`` are set) and metrics."""
        positions_BT, segment_ids_BT = fill_positions(input_ids_BT, positions_BT,
                                                      segment_ids_BT)
        hidden_BTD, stats = self.model(input_ids_BT, positions_BT, segment_ids_BT)
        if stats is None:
            return hidden_BTD, None
        return hidden_BTD, router_aux(self.config, stats)

    def hidden_states(self, input_ids_BT, positions_BT=None, segment_ids_BT=None, cache=None):
        """Final-norm hidden states ``[B, T, D]`` in the compute dtype; with a generation
        ``cache`` (``jaxtune.generation.cache.KVCache``), ``(hidden states, updated cache)``."""
        positions_BT, segment_ids_BT = fill_positions(input_ids_BT, positions_BT,
                                                      segment_ids_BT)
        if cache is None:
            return self.model(input_ids_BT, positions_BT, segment_ids_BT)[0]
        hidden_BTD, _, cache = self.model(input_ids_BT, positions_BT, segment_ids_BT, cache)
        return hidden_BTD, cache

    def unembed(self, hidden_D: jax.Array) -> jax.Array:
        """Float32 logits ``[..., V]``, soft-capped as ``cap * tanh(logits / cap)``."""
        logits = project_logits(self.model.embed_tokens, self.lm_head, hidden_D)
        cap = self.config.final_logit_softcapping
        if cap:
            logits = cap * jnp.tanh(logits / cap)
        return logits

    def __call__(self, input_ids_BT, positions_BT=None, segment_ids_BT=None) -> jax.Array:
        return self.unembed(self.hidden_states(input_ids_BT, positions_BT, segment_ids_BT))
