"""Gemma decoders (HF model types gemma, gemma2, gemma3_text; gemma3's text part) in Flax NNX.

Axis letters: B batch, T query length, S key length, D embed, N query heads, K key/value heads,
H head dim, F mlp, V vocab, L layers, R RoPE tables (local, global).

What the three generations share, as transformers' modeling files compute it:

- embeddings multiplied by ``sqrt(hidden_size)``, the factor rounded to the compute dtype
  first (so a bf16 model multiplies by 55.5, not 55.4256, for hidden 3072);
- RMSNorm with a ``(1 + w)`` weight in float32, rounded after the multiply
  (``RMSNorm(plus_one=True)``);
- a GeGLU MLP with ``gelu_pytorch_tanh`` (Gemma 1 configs that say ``gelu`` mean it too);
- tied embeddings by default.

Gemma 2 adds the attention scale ``query_pre_attn_scalar ** -0.5``, attention-logit and
final-logit soft-capping, sandwich norms (a norm after attention and around the MLP) and
sliding / global layers from ``layer_types``. Gemma 3 drops the soft-caps, adds a ``(1 + w)``
RMSNorm on each query / key head before RoPE, and uses a separate RoPE for local (sliding)
layers: ``rope_parameters["sliding_attention"]`` (``rope_local_base_freq``), with RoPE scaling
on the global layers only.

Layers differ as data (``jaxtune.models.stack``): each gets its window and which RoPE table
it uses (0 local, 1 global) as layer arguments, so ``scan_layers`` works for mixed stacks.

A ``gemma3`` (multimodal) config.json is read as its ``text_config``: the model is the
language model, and it exports as a text-only ``gemma3_text`` / ``Gemma3ForCausalLM``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtune.errors import ModelConfigError
from jaxtune.models.decoder import (
    attention_mask,
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
from jaxtune.models.stack import Slot, apply_layers, apply_slots, check_remat, make_layers
from jaxtune.sharding import constrain

MODEL_TYPES = ("gemma", "gemma2", "gemma3_text", "gemma3")
ARCHITECTURES = {
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "gemma3": "Gemma3ForConditionalGeneration",
}
SLIDING, FULL = "sliding_attention", "full_attention"

#: transformers' defaults (the config classes' field defaults) for keys a config.json omits.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma": dict(vocab_size=256000, hidden_size=3072, intermediate_size=24576,
                  num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=16,
                  head_dim=256, max_position_embeddings=8192, rope_theta=10000.0),
    "gemma2": dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216,
                   num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                   head_dim=256, max_position_embeddings=8192, rope_theta=10000.0,
                   query_pre_attn_scalar=256, sliding_window=4096,
                   final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
    "gemma3_text": dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216,
                        num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                        head_dim=256, max_position_embeddings=131072, rope_theta=1000000.0,
                        rope_local_base_freq=10000.0, query_pre_attn_scalar=256,
                        sliding_window=4096, final_logit_softcapping=None,
                        attn_logit_softcapping=None),
}


@dataclass(frozen=True)
class GemmaConfig:
    """Architecture of one Gemma model (hashable, so it can be static under jit)."""

    model_type: str  # gemma | gemma2 | gemma3_text
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeParameters = RopeParameters()  # global (full-attention) layers
    rope_local: RopeParameters | None = None  # sliding layers (Gemma 3); None: ``rope``
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True
    hidden_act: str = "gelu_pytorch_tanh"  # as config.json spells it
    attention_bias: bool = False  # biases on q, k, v and o
    query_pre_attn_scalar: float | None = None  # None: head_dim (Gemma 1)
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    hf_source: str = "{}"  # the config.json this was read from (JSON), written back as it was

    def __post_init__(self):
        if self.model_type not in _DEFAULTS:
            raise ModelConfigError(f"model_type '{self.model_type}' is not one of "
                                   f"{tuple(_DEFAULTS)}.")
        if not self.layer_types:
            object.__setattr__(self, "layer_types", (FULL,) * self.num_hidden_layers)
        if len(self.layer_types) != self.num_hidden_layers:
            raise ModelConfigError(f"layer_types has {len(self.layer_types)} entries for "
                                   f"{self.num_hidden_layers} layers.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelConfigError(f"num_attention_heads={self.num_attention_heads} is not a "
                                   f"multiple of num_key_value_heads={self.num_key_value_heads}.")

    # ------------------------------------------------------------------ derived switches

    @property
    def activation(self) -> str:
        """The MLP activation transformers runs (Gemma 1's legacy ``gelu`` means the tanh
        approximation: ``GemmaConfig.__post_init__`` rewrites it)."""
        if self.model_type == "gemma" and self.hidden_act == "gelu":
            return "gelu_pytorch_tanh"
        return self.hidden_act

    @property
    def sandwich_norms(self) -> bool:
        """Gemma 2 and 3 normalise attention and MLP outputs too (post / pre-feedforward)."""
        return self.model_type != "gemma"

    @property
    def qk_norm(self) -> bool:
        return self.model_type == "gemma3_text"

    @property
    def attention_scale(self) -> float:
        return float(self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def attention_softcap(self) -> float | None:
        # Gemma 3's attention ignores attn_logit_softcapping (transformers never passes it).
        return self.attn_logit_softcapping if self.model_type == "gemma2" else None

    @property
    def final_softcap(self) -> float | None:
        return None if self.model_type == "gemma" else self.final_logit_softcapping

    def layer_windows(self) -> tuple[int | None, ...]:
        """The sliding window of each layer (None: full causal attention)."""
        return tuple(self.sliding_window if t == SLIDING else None for t in self.layer_types)

    def layer_rope_index(self) -> tuple[int, ...]:
        """Which RoPE table each layer uses: 0 the local (sliding) one, 1 the global one."""
        return tuple(0 if t == SLIDING else 1 for t in self.layer_types)

    def replace(self, **changes: Any) -> GemmaConfig:
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
    def from_hf_config(cls, hf: dict[str, Any]) -> GemmaConfig:
        """Read a transformers ``config.json`` dict, with transformers' defaults for absent
        fields. A ``gemma3`` (multimodal) config is read as its ``text_config``."""
        mt = hf.get("model_type")
        if mt == "gemma3":
            hf = _text_config_of(hf)
            mt = "gemma3_text"
        if mt not in _DEFAULTS:
            raise ModelConfigError(f"model_type '{mt}' is not a Gemma-family type {MODEL_TYPES}.")
        if hf.get("use_bidirectional_attention"):
            raise ModelConfigError("use_bidirectional_attention: true (an embedding model) is "
                                   "not supported; jaxtune trains causal language models.")
        d = _DEFAULTS[mt]

        def get(key: str) -> Any:
            return hf[key] if hf.get(key) is not None else d.get(key)

        act_key = "hidden_act" if mt == "gemma" else "hidden_activation"
        act = hf.get(act_key) or "gelu_pytorch_tanh"
        n = get("num_hidden_layers")
        fields: dict[str, Any] = dict(
            model_type=mt,
            vocab_size=get("vocab_size"),
            hidden_size=get("hidden_size"),
            intermediate_size=get("intermediate_size"),
            num_hidden_layers=n,
            num_attention_heads=get("num_attention_heads"),
            num_key_value_heads=get("num_key_value_heads"),
            head_dim=get("head_dim"),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=get("max_position_embeddings"),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
            hidden_act=act,
            attention_bias=bool(hf.get("attention_bias", False)),
        )
        max_pos = fields["max_position_embeddings"]
        if mt == "gemma3_text":
            fields["rope"], fields["rope_local"] = _gemma3_ropes(hf, max_pos)
        else:
            fields["rope"] = _rope(dict(hf.get("rope_scaling") or hf.get("rope_parameters")
                                        or {}), hf.get("rope_theta", d["rope_theta"]), max_pos)
        if mt != "gemma":
            fields.update(
                query_pre_attn_scalar=get("query_pre_attn_scalar"),
                attn_logit_softcapping=hf.get("attn_logit_softcapping",
                                              d["attn_logit_softcapping"]),
                final_logit_softcapping=hf.get("final_logit_softcapping",
                                               d["final_logit_softcapping"]),
                sliding_window=get("sliding_window"),
                layer_types=_layer_types(mt, hf, n),
            )
        run = "gelu_pytorch_tanh" if mt == "gemma" and act == "gelu" else act
        if run not in ACTIVATIONS:
            raise ModelConfigError(f"{act_key} '{act}' is not supported; use one of "
                                   f"{list(ACTIVATIONS)}.")
        fields["hf_source"] = json.dumps(hf, sort_keys=True)
        return cls(**fields)

    def to_hf_config(self) -> dict[str, Any]:
        """The ``config.json`` dict that rebuilds this model: exactly the file it was read from
        (every key, value and spelling), with only the fields changed since then rewritten."""
        return write_back_hf_config(self, GemmaConfig, GemmaConfig._modelled_hf_fields)

    def _modelled_hf_fields(self) -> dict[str, Any]:
        """The fields this class models, in transformers' v5 spelling."""
        mt = self.model_type
        out: dict[str, Any] = dict(
            model_type=mt,
            architectures=[ARCHITECTURES[mt]],
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            attention_bias=self.attention_bias,
        )
        if mt == "gemma":
            out.update(hidden_act=self.hidden_act, rope_parameters=self.rope.to_hf())
            return out
        out.update(
            hidden_activation=self.hidden_act,
            query_pre_attn_scalar=self.query_pre_attn_scalar,
            attn_logit_softcapping=self.attn_logit_softcapping,
            final_logit_softcapping=self.final_logit_softcapping,
            sliding_window=self.sliding_window,
            layer_types=list(self.layer_types),
        )
        if mt == "gemma2":
            out.update(rope_parameters=self.rope.to_hf())
        else:
            out.update(rope_parameters={FULL: self.rope.to_hf(),
                                        SLIDING: (self.rope_local or self.rope).to_hf()})
        return out


def _text_config_of(hf: dict[str, Any]) -> dict[str, Any]:
    """A gemma3 (multimodal) config.json's language model as a gemma3_text config.json."""
    text = dict(hf.get("text_config") or {})
    text["model_type"] = "gemma3_text"
    text["architectures"] = [ARCHITECTURES["gemma3_text"]]
    if "tie_word_embeddings" in hf:
        text.setdefault("tie_word_embeddings", hf["tie_word_embeddings"])
    for key in ("dtype", "torch_dtype", "transformers_version"):
        if key in hf:
            text.setdefault(key, hf[key])
    return text


def _rope(params: dict[str, Any], theta: float, max_pos: int) -> RopeParameters:
    params.setdefault("rope_theta", theta)
    params.setdefault("rope_type", params.get("type", "default"))
    params.pop("type", None)
    return RopeParameters.from_hf(params, max_pos)


def _gemma3_ropes(hf: dict[str, Any], max_pos: int) -> tuple[RopeParameters, RopeParameters]:
    """(global, local) RoPE: v5's per-layer-type ``rope_parameters``, or the older top-level
    ``rope_theta`` + ``rope_local_base_freq`` with ``rope_scaling`` on the global layers."""
    d = _DEFAULTS["gemma3_text"]
    params = hf.get("rope_parameters") or {}
    nested = isinstance(params, dict) and (FULL in params or SLIDING in params)
    full = dict((params.get(FULL) if nested else params) or {})
    local = dict((params.get(SLIDING) if nested else None) or {"rope_type": "default"})
    if hf.get("rope_scaling"):
        full.update(hf["rope_scaling"])
    glob = _rope(full, hf.get("rope_theta", d["rope_theta"]), max_pos)
    loc = _rope(local, hf.get("rope_local_base_freq", d["rope_local_base_freq"]), max_pos)
    return glob, loc


def _layer_types(mt: str, hf: dict[str, Any], n: int) -> tuple[str, ...]:
    """``layer_types``, or transformers' default pattern (Gemma 2: every other layer sliding;
    Gemma 3: ``sliding_window_pattern - 1`` sliding layers then one global)."""
    types = hf.get("layer_types")
    if not types:
        pattern = 2 if mt == "gemma2" else hf.get("sliding_window_pattern", 6)
        types = [SLIDING if (i + 1) % pattern else FULL for i in range(n)]
    if len(types) != n or any(t not in (SLIDING, FULL) for t in types):
        raise ModelConfigError(f"layer_types {types} must list {n} of '{FULL}' / '{SLIDING}'.")
    return tuple(types)


# --------------------------------------------------------------------------- the model


class DecoderLayer(nnx.Module):
    """Gemma 1: pre-norm ``x + attn(norm(x))``, ``x + mlp(norm(x))``. Gemma 2/3 (sandwich):
    ``x + post_attn_norm(attn(norm(x)))``, ``x + post_ff_norm(mlp(pre_ff_norm(x)))``."""

    def __init__(self, cfg: GemmaConfig, *, param_dtype: Any, attention: str, rngs: nnx.Rngs):
        d = cfg.hidden_size
        norm = functools.partial(RMSNorm, d, eps=cfg.rms_norm_eps, param_dtype=param_dtype,
                                 plus_one=True)
        self.input_layernorm = norm()
        self.self_attn = Attention(
            d, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
            qkv_bias=cfg.attention_bias, out_bias=cfg.attention_bias,
            qk_norm_eps=cfg.rms_norm_eps if cfg.qk_norm else None, qk_norm_plus_one=True,
            scale=cfg.attention_scale, softcap=cfg.attention_softcap,
            implementation=attention, param_dtype=param_dtype, rngs=rngs,
        )
        self.post_attention_layernorm = norm()
        if cfg.sandwich_norms:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()
        else:
            self.pre_feedforward_layernorm = self.post_feedforward_layernorm = None
        self.mlp = GatedMLP(d, cfg.intermediate_size, activation=cfg.activation,
                            param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x_BTD, cos_RBTh, sin_RBTh, mask: AttentionMask, *, window,
                 rope_index, cache=None):
        """``x`` out; with a generation ``cache`` (this layer's LayerKV), ``(x, cache)``."""
        cos_BTh, sin_BTh = cos_RBTh[rope_index], sin_RBTh[rope_index]
        attn = self.self_attn(self.input_layernorm(x_BTD), cos_BTh, sin_BTh, mask, window,
                              cache=cache)
        if cache is not None:
            attn, cache = attn
        if self.pre_feedforward_layernorm is None:  # Gemma 1
            x_BTD = constrain(x_BTD + attn, ("batch", "seq", "embed"))
            x_BTD = x_BTD + self.mlp(self.post_attention_layernorm(x_BTD))
        else:
            x_BTD = constrain(x_BTD + self.post_attention_layernorm(attn),
                              ("batch", "seq", "embed"))
            mlp = self.mlp(self.pre_feedforward_layernorm(x_BTD))
            x_BTD = x_BTD + self.post_feedforward_layernorm(mlp)
        x_BTD = constrain(x_BTD, ("batch", "seq", "embed"))
        return x_BTD if cache is None else (x_BTD, cache)


class GemmaModel(nnx.Module):
    """HF's ``model``: ``embed_tokens`` (scaled by ``sqrt(hidden)``), ``layers``, ``norm``."""

    def __init__(self, cfg: GemmaConfig, *, param_dtype: Any, compute_dtype: Any,
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
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype,
                            plus_one=True)

    def embed(self, input_ids_BT: jax.Array) -> jax.Array:
        """Scaled embeddings ``[B, T, D]`` in the compute dtype."""
        x_BTD = self.embed_tokens(input_ids_BT, self.compute_dtype)
        # transformers rounds sqrt(hidden) to the activations' dtype before multiplying.
        x_BTD = x_BTD * jnp.asarray(math.sqrt(self.config.hidden_size), dtype=x_BTD.dtype)
        return constrain(x_BTD, ("batch", "seq", "embed"))

    def __call__(self, input_ids_BT, positions_BT, segment_ids_BT, cache=None):
        cfg = self.config
        x_BTD = self.embed(input_ids_BT)
        tables = [rope_cos_sin(positions_BT, r, cfg.head_dim, x_BTD.dtype)
                  for r in (cfg.rope_local or cfg.rope, cfg.rope)]
        cos_RBTh = jnp.stack([c for c, _ in tables])
        sin_RBTh = jnp.stack([s for _, s in tables])
        mask, cache = attention_mask(positions_BT, segment_ids_BT, cache)
        if cache is not None and isinstance(cache.layers, dict):  # a ring for sliding layers
            x_BTD, layers_kv = apply_slots(
                {"": self.layers} if self.scan_layers else self.layers, x_BTD, cos_RBTh,
                sin_RBTh, mask, slots=self._cache_slots(), remat=self.remat,
                scan_layers=self.scan_layers, cache=cache.layers)
            return self.norm(x_BTD), cache.update(layers_kv)
        windows = scan_windows(cfg.layer_windows(), self.scan_layers)  # local / global
        layer_args = [{"window": w, "rope_index": r}
                      for w, r in zip(windows, cfg.layer_rope_index(), strict=True)]
        x_BTD = apply_layers(self.layers, x_BTD, cos_RBTh, sin_RBTh, mask,
                             num_layers=cfg.num_hidden_layers, scan_layers=self.scan_layers,
                             remat=self.remat, layer_args=layer_args,
                             cache=None if cache is None else cache.layers)
        if cache is None:
            return self.norm(x_BTD)
        x_BTD, layers_kv = x_BTD
        return self.norm(x_BTD), cache.update(layers_kv)


    def _cache_slots(self) -> list[Slot]:
        """Each layer with its static window and RoPE table, reading the cache stack of its
        kind (:meth:`Gemma.kv_cache_layout`): its index among the layers of that kind."""
        cfg, seen = self.config, {SLIDING: 0, FULL: 0}
        slots = []
        for i, (w, r) in enumerate(zip(cfg.layer_windows(), cfg.layer_rope_index(),
                                       strict=True)):
            kind = FULL if w is None else SLIDING
            slots.append(Slot("", i, (("rope_index", r), ("window", w)), kind, seen[kind]))
            seen[kind] += 1
        return slots


class Gemma(nnx.Module):
    """Causal LM: ``model`` (embeddings, layers, norm) plus tied embeddings (or ``lm_head``).

    ``model(input_ids_BT, positions_BT=None, segment_ids_BT=None)`` returns float32 logits
    ``[B, T, V]``; it equals ``unembed(hidden_states(...))``. ``unembed`` applies the final
    logit soft-cap, so the chunked loss caps each chunk and full logits never exist.
    """

    def __init__(
        self,
        config: GemmaConfig,
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
        impl = resolve_attention_impl(attention, compute_dtype, config.head_dim,
                                      softcap=config.attention_softcap is not None)
        self.config = config
        self.model = GemmaModel(config, param_dtype=param_dtype, compute_dtype=compute_dtype,
                                scan_layers=scan_layers, remat=remat, attention=impl, rngs=rngs)
        self.lm_head = make_lm_head(config, param_dtype=param_dtype, rngs=rngs)

    def kv_cache_layout(self, ring: bool = True
                        ) -> tuple[int, ...] | dict[str, tuple[int, ...]]:
        """The generation cache: ``(layers, kv heads, head dim)`` for Gemma 1 (every layer
        full) or ``ring=False``; with sliding layers, their stack keeps only the window (a
        ring, ``jaxtune.generation.cache``): ``{"sliding": (n, kv heads, head dim, window),
        "full": (m, kv heads, head dim)}`` (one stack when every layer slides)."""
        cfg = self.config
        geometry = (cfg.num_key_value_heads, cfg.head_dim)
        windows = cfg.layer_windows()
        sliding = sum(w is not None for w in windows)
        if not ring or not sliding:
            return (cfg.num_hidden_layers, *geometry)
        if sliding == len(windows):
            return (sliding, *geometry, cfg.sliding_window)
        return {SLIDING: (sliding, *geometry, cfg.sliding_window),
                FULL: (len(windows) - sliding, *geometry)}

    def hidden_states(self, input_ids_BT, positions_BT=None, segment_ids_BT=None, cache=None):
        """Final-norm hidden states ``[B, T, D]`` in the compute dtype; with a generation
        ``cache`` (``jaxtune.generation.cache.KVCache``), ``(hidden states, updated cache)``."""
        positions_BT, segment_ids_BT = fill_positions(input_ids_BT, positions_BT,
                                                      segment_ids_BT)
        return self.model(input_ids_BT, positions_BT, segment_ids_BT, cache)

    def unembed(self, hidden_D: jax.Array) -> jax.Array:
        """Float32 logits ``[..., V]`` from hidden states ``[..., D]``, soft-capped by
        ``final_logit_softcapping`` (Gemma 2) as ``cap * tanh(logits / cap)``."""
        logits = project_logits(self.model.embed_tokens, self.lm_head, hidden_D)
        cap = self.config.final_softcap
        if cap is not None:
            logits = cap * jnp.tanh(logits / cap)
        return logits

    def __call__(self, input_ids_BT, positions_BT=None, segment_ids_BT=None) -> jax.Array:
        return self.unembed(self.hidden_states(input_ids_BT, positions_BT, segment_ids_BT))
