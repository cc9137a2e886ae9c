"""The toy family's config and model, built from jaxtune's shared blocks and layer stack.

Axis letters: B batch, T seq, D embed, E experts, F mlp, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtune.models.family import write_back_hf_config
from jaxtune.models.layers import (
    Attention,
    AttentionMask,
    Embed,
    Linear,
    RMSNorm,
    RopeParameters,
    rope_cos_sin,
)
from jaxtune.models.stack import apply_layers, check_remat, make_layers


@dataclasses.dataclass(frozen=True)
class ToyMoeConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_experts: int
    head_dim: int
    tie_word_embeddings: bool = False
    hf_source: str = "{}"

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> ToyMoeConfig:
        return cls(hf["model_type"], hf["vocab_size"], hf["hidden_size"],
                   hf["intermediate_size"], hf["num_hidden_layers"], hf["num_attention_heads"],
                   hf["num_experts"], hf["hidden_size"] // hf["num_attention_heads"],
                   hf_source=json.dumps(hf, sort_keys=True))

    def _fields(self) -> dict[str, Any]:
        names = ("model_type", "vocab_size", "hidden_size", "intermediate_size",
                 "num_hidden_layers", "num_attention_heads", "num_experts")
        return {k: getattr(self, k) for k in names}

    def to_hf_config(self) -> dict[str, Any]:
        return write_back_hf_config(self, ToyMoeConfig, ToyMoeConfig._fields)


class ExpertMLP(nnx.Module):
    """The mean of ``E`` gated MLPs, their kernels stacked ``[E, D, F]`` / ``[E, F, D]``."""

    def __init__(self, cfg: ToyMoeConfig, *, param_dtype: Any, rngs: nnx.Rngs):
        e, d, f = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
        init = jax.nn.initializers.normal(0.02)
        self.gate_proj = nnx.Param(init(rngs.params(), (e, d, f), param_dtype),
                                   logical_axes=("experts", "embed", "mlp"))
        self.up_proj = nnx.Param(init(rngs.params(), (e, d, f), param_dtype),
                                 logical_axes=("experts", "embed", "mlp"))
        self.down_proj = nnx.Param(init(rngs.params(), (e, f, d), param_dtype),
                                   logical_axes=("experts", "mlp", "embed"))

    def __call__(self, x_BTD):
        gate = jnp.einsum("BTD,EDF->BTEF", x_BTD, self.gate_proj[...].astype(x_BTD.dtype))
        up = jnp.einsum("BTD,EDF->BTEF", x_BTD, self.up_proj[...].astype(x_BTD.dtype))
        out = jnp.einsum("BTEF,EFD->BTD", jax.nn.silu(gate) * up,
                         self.down_proj[...].astype(x_BTD.dtype))
        return out / self.gate_proj.shape[0]


class Layer(nnx.Module):
    def __init__(self, cfg: ToyMoeConfig, *, param_dtype: Any, attention: str, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.input_layernorm = RMSNorm(d, eps=1e-6, param_dtype=param_dtype)
        self.self_attn = Attention(d, cfg.num_attention_heads, cfg.num_attention_heads,
                                   cfg.head_dim, implementation=attention,
                                   param_dtype=param_dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(d, eps=1e-6, param_dtype=param_dtype)
        self.mlp = ExpertMLP(cfg, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, cos, sin, mask, cache=None):
        attn = self.self_attn(self.input_layernorm(x), cos, sin, mask, None, cache=cache)
        if cache is not None:  # generation: the KV cache contract (jaxtune/models/family.py)
            attn, cache = attn
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x if cache is None else (x, cache)


class Inner(nnx.Module):
    def __init__(self, cfg, *, param_dtype, compute_dtype, scan_layers, remat, attention, rngs):
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=param_dtype,
                                  rngs=rngs)
        make = functools.partial(Layer, cfg, param_dtype=param_dtype, attention=attention)
        self.layers = make_layers(lambda r: make(rngs=r), cfg.num_hidden_layers,
                                  scan_layers=scan_layers, rngs=rngs)
        self.norm = RMSNorm(cfg.hidden_size, eps=1e-6, param_dtype=param_dtype)


class ToyMoe(nnx.Module):
    def __init__(self, config: ToyMoeConfig, *, param_dtype: Any = jnp.float32,
                 compute_dtype: Any = None, scan_layers: bool = False, remat: str = "none",
                 attention: str = "auto", rngs: nnx.Rngs):
        check_remat(remat)
        self.config = config
        self.scan_layers, self.remat = scan_layers, remat
        self.compute_dtype = jnp.dtype(compute_dtype or param_dtype)
        self.model = Inner(config, param_dtype=param_dtype, compute_dtype=self.compute_dtype,
                           scan_layers=scan_layers, remat=remat, attention="xla", rngs=rngs)
        self.lm_head = Linear((config.hidden_size,), (config.vocab_size,), in_axes=("embed",),
                              out_axes=("vocab",), param_dtype=param_dtype, rngs=rngs)

    def hidden_states(self, input_ids_BT, positions_BT=None, segment_ids_BT=None, cache=None):
        b, t = input_ids_BT.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        x = self.model.embed_tokens(input_ids_BT, self.compute_dtype)
        cos, sin = rope_cos_sin(positions_BT, RopeParameters(), self.config.head_dim, x.dtype)
        if cache is None:
            mask = AttentionMask.causal(positions_BT, segment_ids_BT)
        else:
            mask, cache = cache.attend(positions_BT, segment_ids_BT)
        x = apply_layers(self.model.layers, x, cos, sin, mask,
                         num_layers=self.config.num_hidden_layers, scan_layers=self.scan_layers,
                         remat=self.remat, cache=None if cache is None else cache.layers)
        if cache is None:
            return self.model.norm(x)
        x, layers_kv = x
        return self.model.norm(x), cache.update(layers_kv)

    def unembed(self, hidden_D):
        return self.lm_head(hidden_D, out_dtype=jnp.float32).astype(jnp.float32)

    def __call__(self, input_ids_BT, positions_BT=None, segment_ids_BT=None):
        return self.unembed(self.hidden_states(input_ids_BT, positions_BT, segment_ids_BT))
