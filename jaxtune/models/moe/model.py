"""The MoE decoder (HF model types mixtral, qwen2_moe, qwen3_moe) as a Flax NNX model.

Axis letters: B batch, T query length, D embed, N tokens (B*T), E experts, K experts per token,
F mlp, V vocab, L layers.

A layer is llama's pre-norm block (shared ``Attention``, ``RMSNorm``, RoPE) with the MLP
replaced, on sparse layers, by :class:`SparseMoeBlock`: a router (``gate``), ``E`` routed
experts stacked ``[E, ...]`` (:class:`Experts`, dispatched by grouped matmuls, see
``dispatch.py``) and, for Qwen2-MoE, a shared expert gated by ``sigmoid(shared_expert_gate(x))``.

Router statistics travel with the hidden states through the shared layer stack
(``stack.apply_layers`` carries ``(x_BTD, stats)``): per expert the masked top-k assignment
counts and routing-probability sums, the masked row count and the router z sum, summed over
sparse layers. :meth:`MoeForCausalLM.hidden_states_and_aux` turns them into the
load-balancing loss exactly as transformers' ``load_balancing_loss_func`` does (pooled over
layers, padding masked) and the optional router z-loss; that is the family protocol's
auxiliary-loss method (``jaxtune.models.family.hidden_states_and_aux``).

Layers mixing dense and sparse MLPs (``mlp_only_layers``, ``decoder_sparse_step > 1``) are a
list even under ``scan_layers``: one stacked module needs every layer to have the same
parameters (the released Qwen MoE checkpoints are all-sparse, so they scan).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtune.models.decoder import (
    attention_mask,
    cache_layout_of,
    fill_positions,
    make_lm_head,
    project_logits,
    scan_windows,
)
from jaxtune.models.layers import (
    ACTIVATIONS,
    Attention,
    AttentionMask,
    Embed,
    GatedMLP,
    Linear,
    RMSNorm,
    resolve_attention_impl,
    rope_cos_sin,
)
from jaxtune.models.moe.config import MoeConfig
from jaxtune.models.moe.dispatch import get_dispatch
from jaxtune.models.stack import apply_layers, check_remat, make_layers
from jaxtune.sharding import constrain


def zero_stats(num_experts: int) -> dict[str, jax.Array]:
    """Router statistics summed over sparse layers (see the module docstring)."""
    return {"counts": jnp.zeros((num_experts,), jnp.float32),
            "probs": jnp.zeros((num_experts,), jnp.float32),
            "rows": jnp.zeros((), jnp.float32), "z": jnp.zeros((), jnp.float32)}


class Experts(nnx.Module):
    """``E`` gated MLPs; each projection is a :class:`Linear` whose kernel has a leading
    ``experts`` axis (``gate_proj``/``up_proj`` ``[E, D, F]``, ``down_proj`` ``[E, F, D]``),
    so LoRA and the HF table treat them like any Linear stacked by ``{j}``."""

    def __init__(self, num_experts: int, dim: int, hidden: int, *, param_dtype: Any,
                 rngs: nnx.Rngs):
        init = jax.nn.initializers.normal(0.02)

        def proj(n_in: int, n_out: int, a_in: str, a_out: str) -> Linear:
            lin = Linear((n_in,), (n_out,), in_axes=(a_in,), out_axes=(a_out,),
                         param_dtype=param_dtype, rngs=rngs)
            lin.kernel = nnx.Param(init(rngs.params(), (num_experts, n_in, n_out), param_dtype),
                                   logical_axes=("experts", a_in, a_out))
            return lin

        self.gate_proj = proj(dim, hidden, "embed", "mlp")
        self.up_proj = proj(dim, hidden, "embed", "mlp")
        self.down_proj = proj(hidden, dim, "mlp", "embed")
        self.num_experts = num_experts


class SparseMoeBlock(nnx.Module):
    """Router + routed experts (+ gated shared expert): HF's ``SparseMoeBlock``."""

    def __init__(self, cfg: MoeConfig, *, param_dtype: Any, dispatch: str, rngs: nnx.Rngs):
        d, e = cfg.hidden_size, cfg.num_experts
        # The router's expert dim is its own logical name ("router"), replicated: the routing
        # softmax and top-k need every expert's logit.
        self.gate = Linear((d,), (e,), in_axes=("embed",), out_axes=("router",),
                           param_dtype=param_dtype, rngs=rngs)
        self.experts = Experts(e, d, cfg.moe_intermediate_size, param_dtype=param_dtype,
                               rngs=rngs)
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = GatedMLP(d, cfg.shared_expert_intermediate_size,
                                          activation=cfg.hidden_act, param_dtype=param_dtype,
                                          rngs=rngs)
            self.shared_expert_gate = Linear((d,), (1,), in_axes=("embed",),
                                             out_axes=("router",), param_dtype=param_dtype,
                                             rngs=rngs)
        else:
            self.shared_expert = self.shared_expert_gate = None
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk_prob = cfg.norm_topk_prob
        # Mixtral keeps the routing weights in float32 (the product is rounded on the add);
        # the Qwen blocks cast them to the activation dtype first.
        self.weights_f32 = cfg.model_type == "mixtral"
        self.activation = cfg.hidden_act
        self.dispatch = dispatch

    def __call__(self, x_BTD: jax.Array, mask_BT: jax.Array, stats: dict[str, jax.Array]):
        b, t, d = x_BTD.shape
        x_ND = x_BTD.reshape(b * t, d)
        logits_NE = self.gate(x_ND)
        probs_NE = jax.nn.softmax(logits_NE.astype(jnp.float32), axis=-1)
        top_NK, idx_NK = jax.lax.top_k(probs_NE, self.top_k)
        if self.norm_topk_prob:
            top_NK = top_NK / jnp.sum(top_NK, axis=-1, keepdims=True)
        if not self.weights_f32:
            top_NK = top_NK.astype(logits_NE.dtype)
        act = ACTIVATIONS[self.activation]
        out_ND = get_dispatch(self.dispatch)(self.experts, x_ND, idx_NK, top_NK, act,
                                             weights_f32=self.weights_f32)
        out_BTD = out_ND.reshape(b, t, d)
        if self.shared_expert is not None:
            shared_BTD = self.shared_expert(x_BTD)
            out_BTD = out_BTD + jax.nn.sigmoid(self.shared_expert_gate(x_BTD)) * shared_BTD
        return out_BTD, add_router_stats(stats, logits_NE, probs_NE, idx_NK,
                                         mask_BT.reshape(-1))


def add_router_stats(stats, logits_NE, probs_NE, idx_NK, mask_N):
    """This layer's router statistics added to ``stats`` (counts carry no gradient)."""
    e, k = probs_NE.shape[1], idx_NK.shape[1]
    counts = jnp.zeros((e,), jnp.float32).at[idx_NK.reshape(-1)].add(jnp.repeat(mask_N, k))
    lse_N = jax.nn.logsumexp(logits_NE.astype(jnp.float32), axis=-1)
    return {"counts": stats["counts"] + jax.lax.stop_gradient(counts),
            "probs": stats["probs"] + jnp.sum(probs_NE * mask_N[:, None], axis=0),
            "rows": stats["rows"] + jnp.sum(mask_N),
            "z": stats["z"] + jnp.sum(jnp.square(lse_N) * mask_N)}


class DecoderLayer(nnx.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``, the MLP sparse or
    dense. Called with the carry ``(x_BTD, stats)`` and returns the new carry."""

    def __init__(self, cfg: MoeConfig, sparse: bool, *, param_dtype: Any, attention: str,
                 dispatch: str, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.input_layernorm = RMSNorm(d, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.self_attn = Attention(
            d, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
            qkv_bias=cfg.attention_bias, out_bias=cfg.attention_out_bias,
            qk_norm_eps=cfg.rms_norm_eps if cfg.qk_norm else None,
            implementation=attention, param_dtype=param_dtype, rngs=rngs,
        )
        self.post_attention_layernorm = RMSNorm(d, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.sparse = sparse
        self.moe_block_name = cfg.moe_block_name
        if sparse:
            block = SparseMoeBlock(cfg, param_dtype=param_dtype, dispatch=dispatch, rngs=rngs)
        else:
            block = GatedMLP(d, cfg.intermediate_size, activation=cfg.hidden_act,
                             param_dtype=param_dtype, rngs=rngs)
        setattr(self, cfg.moe_block_name if sparse else "mlp", block)

    def __call__(self, carry, cos_BTh, sin_BTh, mask: AttentionMask, token_mask_BT, *, window,
                 cache=None):
        """``(x, router stats)`` out; with a generation ``cache`` (this layer's LayerKV),
        ``((x, router stats), cache)``."""
        x_BTD, stats = carry
        attn = self.self_attn(self.input_layernorm(x_BTD), cos_BTh, sin_BTh, mask, window,
                              cache=cache)
        if cache is not None:
            attn, cache = attn
        x_BTD = constrain(x_BTD + attn, ("batch", "seq", "embed"))
        h_BTD = self.post_attention_layernorm(x_BTD)
        if self.sparse:
            out_BTD, stats = getattr(self, self.moe_block_name)(h_BTD, token_mask_BT, stats)
        else:
            out_BTD = self.mlp(h_BTD)
        carry = (constrain(x_BTD + out_BTD, ("batch", "seq", "embed")), stats)
        return carry if cache is None else (carry, cache)


class MoeModel(nnx.Module):
    """HF's ``model``: ``embed_tokens``, ``layers``, final ``norm``."""

    def __init__(self, cfg: MoeConfig, *, param_dtype: Any, compute_dtype: Any,
                 scan_layers: bool, remat: str, attention: str, dispatch: str, rngs: nnx.Rngs):
        self.config = cfg
        self.compute_dtype = compute_dtype
        # Mixed dense / sparse layers cannot share one stacked module (module docstring).
        self.scan_layers = scan_layers and not cfg.mixed_layers
        self.remat = remat
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=param_dtype,
                                  rngs=rngs)
        make = functools.partial(DecoderLayer, cfg, param_dtype=param_dtype,
                                 attention=attention, dispatch=dispatch)
        if self.scan_layers:
            self.layers = make_layers(lambda r: make(cfg.sparse_layers[0], rngs=r),
                                      cfg.num_hidden_layers, scan_layers=True, rngs=rngs)
        else:
            self.layers = nnx.List([make(s, rngs=rngs) for s in cfg.sparse_layers])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)

    def __call__(self, input_ids_BT, positions_BT, segment_ids_BT, cache=None):
        """``(hidden, router stats)``; with a generation ``cache``, ``(hidden, stats, cache)``."""
        cfg = self.config
        x_BTD = constrain(self.embed_tokens(input_ids_BT, self.compute_dtype),
                          ("batch", "seq", "embed"))
        cos_BTh, sin_BTh = rope_cos_sin(positions_BT, cfg.rope, cfg.head_dim, x_BTD.dtype)
        mask, cache = attention_mask(positions_BT, segment_ids_BT, cache)
        # Padding (segment 0) is left out of the router statistics, as transformers masks it
        # with the attention mask.
        token_mask_BT = (jnp.ones(input_ids_BT.shape, jnp.float32) if segment_ids_BT is None
                         else (segment_ids_BT != 0).astype(jnp.float32))
        windows = scan_windows(cfg.layer_windows(), self.scan_layers)
        carry = (x_BTD, zero_stats(cfg.num_experts))
        out = apply_layers(self.layers, carry, cos_BTh, sin_BTh, mask, token_mask_BT,
                           num_layers=cfg.num_hidden_layers, scan_layers=self.scan_layers,
                           remat=self.remat, layer_args=[{"window": w} for w in windows],
                           cache=None if cache is None else cache.layers)
        if cache is None:
            x_BTD, stats = out
            return self.norm(x_BTD), stats
        (x_BTD, stats), layers_kv = out
        return self.norm(x_BTD), stats, cache.update(layers_kv)


def router_losses(cfg: MoeConfig, stats: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Load-balancing loss (transformers' ``load_balancing_loss_func``: ``E * sum_e f_e P_e``
    with ``f`` the top-k assignment counts and ``P`` the summed routing probabilities, both over
    unpadded tokens of all sparse layers, divided by their row count), router z-loss (mean
    squared log-partition of the router logits) and per-expert token fractions."""
    rows = jnp.maximum(stats["rows"], 1.0)
    f_E, p_E = stats["counts"] / rows, stats["probs"] / rows
    return {"aux_loss": cfg.num_experts * jnp.sum(f_E * p_E), "z_loss": stats["z"] / rows,
            "expert_fraction": stats["counts"] / jnp.maximum(
                jnp.sum(stats["counts"]), 1.0)}


def router_aux(cfg: Any, stats: dict[str, jax.Array]) -> dict[str, Any]:
    """The auxiliary output of the family protocol from router statistics: ``loss`` (the
    weighted router losses, ``cfg.router_aux_loss_coef`` and ``cfg.router_z_loss_coef``) and
    ``metrics`` (the unweighted losses, the busiest expert's load and each expert's share)."""
    losses = router_losses(cfg, stats)
    loss = cfg.router_aux_loss_coef * losses["aux_loss"]
    if cfg.router_z_loss_coef:
        loss = loss + cfg.router_z_loss_coef * losses["z_loss"]
    metrics = {"router_aux_loss": losses["aux_loss"], "router_z_loss": losses["z_loss"]}
    fractions = losses["expert_fraction"]
    width = len(str(cfg.num_experts - 1))
    # The busiest expert's share times E: 1 when balanced, E when one expert takes all.
    metrics["expert_load_max"] = jnp.max(fractions) * cfg.num_experts
    metrics.update({f"expert_fraction/{j:0{width}d}": fractions[j]
                    for j in range(cfg.num_experts)})
    return {"loss": loss, "metrics": metrics}


class MoeForCausalLM(nnx.Module):
    """Causal LM: ``model`` plus ``lm_head`` (or tied embeddings); see the module docstring.

    ``dispatch`` picks the expert computation: ``grouped`` (sorted grouped matmuls, the
    default) or ``naive`` (a per-expert loop, a benchmark baseline).
    """

    def __init__(self, config: MoeConfig, *, param_dtype: Any = jnp.float32,
                 compute_dtype: Any = None, scan_layers: bool = False, remat: str = "none",
                 attention: str = "auto", dispatch: str = "grouped", rngs: nnx.Rngs):
        check_remat(remat)
        get_dispatch(dispatch)
        param_dtype = jnp.dtype(param_dtype)
        compute_dtype = jnp.dtype(compute_dtype or param_dtype)
        impl = resolve_attention_impl(attention, compute_dtype, config.head_dim)
        self.config = config
        self.model = MoeModel(config, param_dtype=param_dtype, compute_dtype=compute_dtype,
                              scan_layers=scan_layers, remat=remat, attention=impl,
                              dispatch=dispatch, rngs=rngs)
        self.lm_head = make_lm_head(config, param_dtype=param_dtype, rngs=rngs)

    def hidden_states_and_aux(self, input_ids_BT, positions_BT=None, segment_ids_BT=None):
        """``(hidden [B, T, D], aux)``: ``aux["loss"]`` is the weighted router loss
        (``router_aux_loss_coef * aux_loss + router_z_loss_coef * z_loss``) to add to the
        objective, ``aux["metrics"]`` the unweighted losses and per-expert token fractions."""
        positions_BT, segment_ids_BT = fill_positions(input_ids_BT, positions_BT,
                                                      segment_ids_BT)
        hidden_BTD, stats = self.model(input_ids_BT, positions_BT, segment_ids_BT)
        cfg = self.config
        if not any(cfg.sparse_layers):
            return hidden_BTD, {"loss": jnp.zeros((), jnp.float32), "metrics": {}}
        return hidden_BTD, router_aux(cfg, stats)

    def kv_cache_layout(self, ring: bool = True) -> tuple[int, ...]:
        """The generation cache: a ring of the window when every layer slides by one
        (Mixtral with ``sliding_window``; :func:`~jaxtune.models.decoder.cache_layout_of`)."""
        return cache_layout_of(self.config, ring)

    def hidden_states(self, input_ids_BT, positions_BT=None, segment_ids_BT=None, cache=None):
        """Final-norm hidden states ``[B, T, D]`` in the compute dtype; with a generation
        ``cache`` (``jaxtune.generation.cache.KVCache``), ``(hidden states, updated cache)``
        (the router losses train nothing there)."""
        if cache is None:
            return self.hidden_states_and_aux(input_ids_BT, positions_BT, segment_ids_BT)[0]
        if segment_ids_BT is not None:
            segment_ids_BT = segment_ids_BT.astype(jnp.int32)
        hidden_BTD, _, cache = self.model(input_ids_BT, positions_BT, segment_ids_BT, cache)
        return hidden_BTD, cache

    def unembed(self, hidden_D: jax.Array) -> jax.Array:
        return project_logits(self.model.embed_tokens, self.lm_head, hidden_D)

    def __call__(self, input_ids_BT, positions_BT=None, segment_ids_BT=None):
        return self.unembed(self.hidden_states(input_ids_BT, positions_BT, segment_ids_BT))
