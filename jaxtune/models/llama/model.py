"""Llama-family decoder (HF model types llama, mistral, qwen2, qwen3) as a Flax NNX model.

Axis letters: B batch, T query length, S key length, D embed, N query heads, K key/value heads,
H head dim, F mlp, V vocab, L layers.

The four HF model types differ only in switches of one architecture, all read from
``config.json`` by :meth:`LlamaConfig.from_hf_config`:

- ``llama`` (Llama 2/3/3.1/3.2): optional ``attention_bias`` / ``mlp_bias``; RoPE scaling
  ``default``, ``linear``, ``llama3`` or ``yarn``.
- ``mistral``: a sliding window on every layer (``sliding_window``).
- ``qwen2`` (Qwen2, Qwen2.5): biases on q/k/v; optional sliding window on layers
  ``>= max_window_layers`` (``use_sliding_window``).
- ``qwen3``: RMSNorm on each query/key head (``q_norm`` / ``k_norm``); optional biases.

Module names follow HF (``model.layers[i].self_attn.q_proj`` ...), so the HF table in
``hf.py`` only encodes layout changes. With ``scan_layers=True`` the layers are one stacked
module (every parameter gets a leading ``layers`` axis) run by ``jax.lax.scan``, so compile
time does not grow with depth.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtune.errors import ModelConfigError
from jaxtune.models.decoder import (
    attention_mask,
    cache_layout_of,
    fill_positions,
    make_lm_head,
    project_logits,
    scan_windows,
)
from jaxtune.models.family import write_back_hf_config
from jaxtune.models.layers import (
    ACTIVATIONS,
    Attention,
    AttentionMask,
    Embed,
    GatedMLP,
    RMSNorm,
    RopeParameters,
    resolve_attention_impl,
    rope_cos_sin,
)
from jaxtune.models.stack import apply_layers, check_remat, make_layers
from jaxtune.sharding import constrain

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
# transformers' defaults for fields a config.json may leave out.
_MAX_POSITIONS = {"llama": 2048, "mistral": 131072, "qwen2": 32768, "qwen3": 32768}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads")
SLIDING, FULL = "sliding_attention", "full_attention"


@dataclass(frozen=True)
class LlamaConfig:
    """Architecture of one Llama-family model (hashable, so it can be static under jit)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeParameters = RopeParameters()
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    attention_bias: bool = False  # biases on q_proj, k_proj, v_proj
    attention_out_bias: bool = False  # bias on o_proj
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm on each query / key head (Qwen3)
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()  # per layer: full_attention | sliding_attention
    hf_source: str = "{}"  # the config.json this was read from (JSON), written back as it was

    def __post_init__(self):
        if not self.layer_types:
            object.__setattr__(self, "layer_types", (FULL,) * self.num_hidden_layers)
        if len(self.layer_types) != self.num_hidden_layers:
            raise ModelConfigError(f"layer_types has {len(self.layer_types)} entries for "
                              f"{self.num_hidden_layers} layers.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelConfigError(f"num_attention_heads={self.num_attention_heads} is not a "
                              f"multiple of num_key_value_heads={self.num_key_value_heads}.")

    @property
    def rope_theta(self) -> float:
        return self.rope.rope_theta

    def layer_windows(self) -> tuple[int | None, ...]:
        """The sliding window of each layer (None: full causal attention)."""
        return tuple(self.sliding_window if t == SLIDING else None for t in self.layer_types)

    def replace(self, **changes: Any) -> LlamaConfig:
        """A copy with ``changes``; a new layer count keeps uniform ``layer_types`` uniform."""
        n = changes.get("num_hidden_layers", self.num_hidden_layers)
        if n != self.num_hidden_layers and "layer_types" not in changes:
            if len(set(self.layer_types)) > 1:
                raise ModelConfigError("This config mixes full and sliding layers: give "
                                       "layer_types along with a new num_hidden_layers.")
            changes["layer_types"] = self.layer_types[:1] * n
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ HF config.json

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> LlamaConfig:
        """Read a transformers ``config.json`` dict (v5 ``rope_parameters`` or older
        ``rope_scaling`` + ``rope_theta``), with transformers' defaults for absent fields."""
        mt = hf.get("model_type")
        if mt not in MODEL_TYPES:
            raise ModelConfigError(f"model_type '{mt}' is not a Llama-family type {MODEL_TYPES}.")
        missing = [k for k in _REQUIRED if hf.get(k) is None]
        if missing:
            raise ModelConfigError(f"config.json lacks {missing}, which a {mt} model needs.")
        act = hf.get("hidden_act", "silu")
        if act not in ACTIVATIONS:
            raise ModelConfigError(f"hidden_act '{act}' is not supported; use one of "
                              f"{list(ACTIVATIONS)}.")
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or (
            128 if mt == "qwen3" and "head_dim" not in hf else hf["hidden_size"] // heads
        )
        max_pos = hf.get("max_position_embeddings") or _MAX_POSITIONS[mt]
        used = set(_REQUIRED) | {"model_type", "hidden_act", "head_dim", "num_key_value_heads",
                                 "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
                                 "architectures"}
        fields: dict[str, Any] = dict(
            model_type=mt,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope=_rope_from_hf(hf, max_pos, used),
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            hidden_act=act,
        )
        fields.update(_variant_from_hf(mt, hf, used))
        fields["hf_source"] = json.dumps(hf, sort_keys=True)
        return cls(**fields)

    def to_hf_config(self) -> dict[str, Any]:
        """The ``config.json`` dict that rebuilds this model: exactly the file it was read from
        (every key, value and spelling), with only the fields changed since then rewritten."""
        return write_back_hf_config(self, LlamaConfig, LlamaConfig._modelled_hf_fields)

    def _modelled_hf_fields(self) -> dict[str, Any]:
        """The fields this class models, in transformers' v5 spelling."""
        out: dict[str, Any] = {}
        out.update(
            model_type=self.model_type,
            architectures=[ARCHITECTURES[self.model_type]],
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            rope_parameters=self.rope.to_hf(),
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            hidden_act=self.hidden_act,
        )
        mt = self.model_type
        if mt == "llama":
            out.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias)
        elif mt == "mistral":
            out.update(sliding_window=self.sliding_window)
        else:
            out.update(use_sliding_window=self.sliding_window is not None,
                       sliding_window=self.sliding_window, layer_types=list(self.layer_types))
            if mt == "qwen3":
                out.update(attention_bias=self.attention_bias)
        return out


def _rope_from_hf(hf: dict[str, Any], max_pos: int, used: set[str]) -> RopeParameters:
    # transformers: rope_scaling (old spelling) wins over rope_parameters; a theta inside the
    # dict wins over the top-level rope_theta; a top-level original_max_position_embeddings
    # wins over the dict's (Phi3-style).
    used.update({"rope_scaling", "rope_parameters", "rope_theta"})
    params = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    params.pop("type", None)
    if "original_max_position_embeddings" in hf and params["rope_type"] in ("llama3", "yarn"):
        used.add("original_max_position_embeddings")
        params["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
    return RopeParameters.from_hf(params, max_pos)


def _variant_from_hf(mt: str, hf: dict[str, Any], used: set[str]) -> dict[str, Any]:
    """The per-model-type switches: biases, q/k norm, sliding windows."""
    n = hf["num_hidden_layers"]
    if mt == "llama":
        used.update({"attention_bias", "mlp_bias"})
        bias = bool(hf.get("attention_bias", False))
        return dict(attention_bias=bias, attention_out_bias=bias,
                    mlp_bias=bool(hf.get("mlp_bias", False)))
    if mt == "mistral":
        used.update({"sliding_window", "layer_types"})
        window = hf.get("sliding_window", 4096)
        return dict(sliding_window=window, layer_types=((SLIDING if window else FULL),) * n)
    # qwen2 / qwen3
    used.update({"use_sliding_window", "sliding_window", "max_window_layers", "layer_types",
                 "attention_bias"})
    window = hf.get("sliding_window", 4096) if hf.get("use_sliding_window", False) else None
    types = hf.get("layer_types") or [
        SLIDING if window is not None and i >= hf.get("max_window_layers", 28) else FULL
        for i in range(n)
    ]
    if len(types) != n or any(t not in (SLIDING, FULL) for t in types):
        raise ModelConfigError(f"layer_types {types} must list {n} of '{FULL}' / '{SLIDING}'.")
    out = dict(sliding_window=window, layer_types=tuple(types))
    if mt == "qwen2":
        out.update(attention_bias=True, attention_out_bias=False)
    else:
        bias = bool(hf.get("attention_bias", False))
        out.update(attention_bias=bias, attention_out_bias=bias, qk_norm=True)
    return out


# --------------------------------------------------------------------------- the model


class DecoderLayer(nnx.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: LlamaConfig, *, param_dtype: Any, attention: str, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.input_layernorm = RMSNorm(d, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.self_attn = Attention(
            d, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
            qkv_bias=cfg.attention_bias, out_bias=cfg.attention_out_bias,
            qk_norm_eps=cfg.rms_norm_eps if cfg.qk_norm else None,
            implementation=attention, param_dtype=param_dtype, rngs=rngs,
        )
        self.post_attention_layernorm = RMSNorm(d, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.mlp = GatedMLP(d, cfg.intermediate_size, activation=cfg.hidden_act,
                            use_bias=cfg.mlp_bias, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x_BTD, cos_BTh, sin_BTh, mask: AttentionMask, *, window, cache=None):
        """``x`` out; with a generation ``cache`` (this layer's LayerKV), ``(x, cache)``."""
        attn = self.self_attn(self.input_layernorm(x_BTD), cos_BTh, sin_BTh, mask, window,
                              cache=cache)
        if cache is not None:
            attn, cache = attn
        x_BTD = constrain(x_BTD + attn, ("batch", "seq", "embed"))
        x_BTD = x_BTD + self.mlp(self.post_attention_layernorm(x_BTD))
        x_BTD = constrain(x_BTD, ("batch", "seq", "embed"))
        return x_BTD if cache is None else (x_BTD, cache)


class LlamaModel(nnx.Module):
    """HF's ``model``: ``embed_tokens``, ``layers``, final ``norm``."""

    def __init__(self, cfg: LlamaConfig, *, param_dtype: Any, compute_dtype: Any,
                 scan_layers: bool, remat: str, attention: str, rngs: nnx.Rngs):
        self.config = cfg
        self.compute_dtype = compute_dtype
        self.scan_layers = scan_layers
        self.remat = remat
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=param_dtype,
                                  rngs=rngs)
        make = functools.partial(DecoderLayer, cfg, param_dtype=param_dtype, attention=attention)
        self.layers = make_layers(lambda r: make(rngs=r), cfg.num_hidden_layers,
                                  scan_layers=scan_layers, rngs=rngs)
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)

    def __call__(self, input_ids_BT, positions_BT, segment_ids_BT, cache=None):
        cfg = self.config
        x_BTD = constrain(self.embed_tokens(input_ids_BT, self.compute_dtype),
                          ("batch", "seq", "embed"))
        cos_BTh, sin_BTh = rope_cos_sin(positions_BT, cfg.rope, cfg.head_dim, x_BTD.dtype)
        mask, cache = attention_mask(positions_BT, segment_ids_BT, cache)
        # Qwen2 with max_window_layers mixes full and sliding layers.
        windows = scan_windows(cfg.layer_windows(), self.scan_layers)
        x_BTD = apply_layers(self.layers, x_BTD, cos_BTh, sin_BTh, mask,
                             num_layers=cfg.num_hidden_layers, scan_layers=self.scan_layers,
                             remat=self.remat, layer_args=[{"window": w} for w in windows],
                             cache=None if cache is None else cache.layers)
        if cache is None:
            return self.norm(x_BTD)
        x_BTD, layers_kv = x_BTD
        return self.norm(x_BTD), cache.update(layers_kv)


class Llama(nnx.Module):
    """Causal LM: ``model`` (embeddings, layers, norm) plus ``lm_head`` or tied embeddings.

    ``model(input_ids_BT, positions_BT=None, segment_ids_BT=None)`` returns float32 logits
    ``[B, T, V]``; it equals ``unembed(hidden_states(...))``, which a chunked loss can call
    separately so the full logits are never materialised.
    """

    def __init__(
        self,
        config: LlamaConfig,
        *,
        param_dtype: Any = jnp.float32,
        compute_dtype: Any = None,
        scan_layers: bool = False,
        remat: str = "none",
        attention: str = "auto",
        rngs: nnx.Rngs,
    ):
        check_remat(remat)
        param_dtype = jnp.dtype(param_dtype)
        compute_dtype = jnp.dtype(compute_dtype or param_dtype)
        impl = resolve_attention_impl(attention, compute_dtype, config.head_dim)
        self.config = config
        self.model = LlamaModel(config, param_dtype=param_dtype, compute_dtype=compute_dtype,
                                scan_layers=scan_layers, remat=remat, attention=impl, rngs=rngs)
        self.lm_head = make_lm_head(config, param_dtype=param_dtype, rngs=rngs)

    def kv_cache_layout(self, ring: bool = True) -> tuple[int, ...]:
        """The generation cache: a ring of the window when every layer slides by one
        (Mistral; :func:`~jaxtune.models.decoder.cache_layout_of`)."""
        return cache_layout_of(self.config, ring)

    def hidden_states(self, input_ids_BT, positions_BT=None, segment_ids_BT=None, cache=None):
        """Final-norm hidden states ``[B, T, D]`` in the compute dtype; with a generation
        ``cache`` (``jaxtune.generation.cache.KVCache``), ``(hidden states, updated cache)``."""
        positions_BT, segment_ids_BT = fill_positions(input_ids_BT, positions_BT,
                                                      segment_ids_BT)
        return self.model(input_ids_BT, positions_BT, segment_ids_BT, cache)

    def unembed(self, hidden_D: jax.Array) -> jax.Array:
        """Float32 logits ``[..., V]`` from hidden states ``[..., D]``."""
        return project_logits(self.model.embed_tokens, self.lm_head, hidden_D)

    def __call__(self, input_ids_BT, positions_BT=None, segment_ids_BT=None) -> jax.Array:
        return self.unembed(self.hidden_states(input_ids_BT, positions_BT, segment_ids_BT))
