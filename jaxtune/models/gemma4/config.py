"""The Gemma 4 config: HF model types ``gemma4_text`` and the language model of ``gemma4``.

Read as transformers' ``Gemma4TextConfig`` reads ``config.json`` (its defaults where a key is
absent), with every per-layer fact derived once here, so the model only reads data:

- ``layer_types``: sliding or full attention per layer (the last layer is always full).
- Geometry: sliding layers use ``head_dim`` and ``num_key_value_heads``; full layers use
  ``global_head_dim`` (default 512) and, with ``attention_k_eq_v``,
  ``num_global_key_value_heads``. A file saved by transformers 5 spells this as
  ``per_layer_config`` (layer index -> ``head_dim`` / ``num_key_value_heads``); both are read.
- KV sharing: the last ``num_kv_shared_layers`` layers have no key/value projections and
  attend with the keys and values of the last earlier layer of their type
  (:meth:`Gemma4Config.kv_source`); ``use_double_wide_mlp`` doubles those layers' MLP.
- RoPE per layer type (``rope_parameters[type]``): ``default`` on sliding layers (its
  ``partial_rotary_factor`` is ignored, as transformers' Gemma 4 ignores it), ``proportional``
  on full layers.
- Layer kinds (:meth:`Gemma4Config.layer_kind`): sliding / full, own keys or shared. Layers of
  one kind have the same parameters; under ``scan_layers`` each kind is one stacked module.

A ``gemma4`` (multimodal) config.json is read as its ``text_config``: the model is the
language model and exports as a text-only ``gemma4_text`` / ``Gemma4ForCausalLM``; the
towers it leaves out are named in ``skipped_modules``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from jaxtune.errors import ModelConfigError
from jaxtune.models.family import write_back_hf_config
from jaxtune.models.layers import ACTIVATIONS, RopeParameters

MODEL_TYPES = ("gemma4_text", "gemma4")
ARCHITECTURES = {"gemma4_text": "Gemma4ForCausalLM", "gemma4": "Gemma4ForConditionalGeneration"}
SLIDING, FULL = "sliding_attention", "full_attention"
#: What a gemma4 checkpoint holds besides the language model (config key -> checkpoint modules).
TOWERS = {"vision_config": ("vision_tower", "embed_vision"),
          "audio_config": ("audio_tower", "embed_audio")}

#: transformers' Gemma4TextConfig defaults for keys a config.json omits.
_DEFAULTS: dict[str, Any] = dict(
    vocab_size=262_144, hidden_size=2304, intermediate_size=9216, num_hidden_layers=30,
    num_attention_heads=8, num_key_value_heads=4, head_dim=256,
    hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131_072, rms_norm_eps=1e-6,
    tie_word_embeddings=True, attention_bias=False, sliding_window=512,
    final_logit_softcapping=None, vocab_size_per_layer_input=262_144,
    hidden_size_per_layer_input=256, attention_k_eq_v=False, num_kv_shared_layers=0,
    enable_moe_block=False, use_double_wide_mlp=False, global_head_dim=512,
)
_DEFAULT_ROPE = {SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
                 FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                        "rope_theta": 1_000_000.0}}
_LAYER_OVERRIDES = ("head_dim", "num_key_value_heads")


@dataclass(frozen=True)
class Gemma4Config:
    """Architecture of one Gemma 4 language model (hashable, so it can be static under jit)."""

    model_type: str  # gemma4_text
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int  # sliding layers
    head_dim: int  # sliding layers
    global_head_dim: int  # full layers
    num_global_key_value_heads: int  # full layers
    layer_types: tuple[str, ...]
    rope: RopeParameters  # full layers
    rope_local: RopeParameters  # sliding layers
    sliding_window: int
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 131_072
    tie_word_embeddings: bool = True
    hidden_act: str = "gelu_pytorch_tanh"
    attention_bias: bool = False
    final_logit_softcapping: float | None = None
    hidden_size_per_layer_input: int = 0  # 0: no per-layer embeddings
    vocab_size_per_layer_input: int = 0
    attention_k_eq_v: bool = False
    num_kv_shared_layers: int = 0
    use_double_wide_mlp: bool = False
    enable_moe_block: bool = False
    num_experts: int = 0
    top_k_experts: int = 0
    moe_intermediate_size: int = 0
    router_aux_loss_coef: float = 0.0  # transformers' Gemma 4 trains with no router loss
    router_z_loss_coef: float = 0.0
    skipped_modules: tuple[str, ...] = ()  # a gemma4 checkpoint's towers, not loaded
    hf_source: str = "{}"  # the config.json this was read from (JSON), written back as it was

    def __post_init__(self):
        n = self.num_hidden_layers
        if len(self.layer_types) != n or any(t not in (SLIDING, FULL)
                                             for t in self.layer_types):
            raise ModelConfigError(f"layer_types {list(self.layer_types)} must list {n} of "
                                   f"'{FULL}' / '{SLIDING}'.")
        for kv in (self.num_key_value_heads, self.num_global_key_value_heads):
            if self.num_attention_heads % kv:
                raise ModelConfigError(f"num_attention_heads={self.num_attention_heads} is not "
                                       f"a multiple of the key/value head count {kv}.")
        shared = self.num_kv_shared_layers
        if not 0 <= shared < n:
            raise ModelConfigError(
                f"num_kv_shared_layers={shared} must be between 0 and num_hidden_layers - 1 "
                f"({n - 1}): shared layers reuse the keys and values of earlier layers.")
        own = set(self.layer_types[:n - shared])
        if shared and own != set(self.layer_types):
            raise ModelConfigError(
                "num_kv_shared_layers: every layer type of the shared (last "
                f"{shared}) layers needs an earlier layer of that type to take its keys and "
                f"values from; the layers before them are all {sorted(own)}.")
        cap = self.final_logit_softcapping
        if cap is not None and cap <= 0:
            raise ModelConfigError(f"final_logit_softcapping={cap} must be positive, or null "
                                   "for no soft-cap (transformers divides by it).")
        if self.enable_moe_block and not (0 < self.top_k_experts <= self.num_experts
                                          and self.moe_intermediate_size > 0):
            raise ModelConfigError(
                f"enable_moe_block needs num_experts, top_k_experts (1..num_experts) and "
                f"moe_intermediate_size; got {self.num_experts}, {self.top_k_experts}, "
                f"{self.moe_intermediate_size}.")

    # ------------------------------------------------------------------ per-layer facts

    @property
    def first_shared_layer(self) -> int:
        return self.num_hidden_layers - self.num_kv_shared_layers

    def is_shared(self, i: int) -> bool:
        """Layer ``i`` reads another layer's keys and values (it has no k/v projections)."""
        return i >= self.first_shared_layer

    def kv_source(self, i: int) -> int:
        """The layer whose keys and values layer ``i`` attends with (itself, or for a shared
        layer the last earlier layer of its type that has its own)."""
        if not self.is_shared(i):
            return i
        t = self.layer_types[i]
        return max(j for j in range(self.first_shared_layer) if self.layer_types[j] == t)

    def kv_stores(self) -> tuple[int, ...]:
        """The layers whose keys and values shared layers read (one per layer type at most)."""
        return tuple(sorted({self.kv_source(i) for i in range(self.num_hidden_layers)
                             if self.is_shared(i)}))

    def geometry(self, layer_type: str) -> tuple[int, int]:
        """``(key/value heads, head dim)`` of a layer type."""
        if layer_type == FULL:
            return self.num_global_key_value_heads, self.global_head_dim
        return self.num_key_value_heads, self.head_dim

    def mlp_width(self, i: int) -> int:
        """The dense MLP's width in layer ``i`` (doubled on shared layers with
        ``use_double_wide_mlp``)."""
        double = self.use_double_wide_mlp and self.is_shared(i)
        return self.intermediate_size * (2 if double else 1)

    def layer_kind(self, i: int) -> str:
        """The stacked module layer ``i`` belongs to under scan: layers of one kind have the
        same parameters (``sliding``, ``full``, ``sliding_shared``, ``full_shared``)."""
        kind = "sliding" if self.layer_types[i] == SLIDING else "full"
        return kind + ("_shared" if self.is_shared(i) else "")

    def layer_kinds(self) -> dict[str, int]:
        """Each kind present and how many layers it has, in order of first appearance."""
        out: dict[str, int] = {}
        for i in range(self.num_hidden_layers):
            kind = self.layer_kind(i)
            out[kind] = out.get(kind, 0) + 1
        return out

    def layer_groups(self) -> tuple[tuple[str, int], ...]:
        """Per layer, ``(its kind, its index among the layers of that kind)``."""
        seen: dict[str, int] = {}
        out = []
        for i in range(self.num_hidden_layers):
            kind = self.layer_kind(i)
            out.append((kind, seen.get(kind, 0)))
            seen[kind] = seen.get(kind, 0) + 1
        return tuple(out)

    def layer_windows(self) -> tuple[int | None, ...]:
        """The sliding window of each layer (None: full causal attention)."""
        return tuple(self.sliding_window if t == SLIDING else None for t in self.layer_types)

    @property
    def head_dim_max(self) -> int:
        return max(self.head_dim, self.global_head_dim)

    @property
    def num_experts_per_tok(self) -> int:
        """``top_k_experts`` by the MoE family's name: the experts one token meets, which the
        generic FLOPs count reads (:func:`jaxtune.lora.lora_matmuls`)."""
        return self.top_k_experts

    def active_mlp_params(self) -> int:
        """Matmul parameters one token meets outside attention in all layers (FLOPs / MFU):
        the dense MLP, the top-k experts and the router, the per-layer input gate and
        projection; plus the per-layer embeddings' model projection."""
        d = self.hidden_size
        total = 0
        for i in range(self.num_hidden_layers):
            total += 3 * d * self.mlp_width(i)
            if self.enable_moe_block:
                total += self.top_k_experts * 3 * d * self.moe_intermediate_size
                total += d * self.num_experts
            total += 2 * d * self.hidden_size_per_layer_input
        total += d * self.num_hidden_layers * self.hidden_size_per_layer_input
        return total

    def replace(self, **changes: Any) -> Gemma4Config:
        """A copy with ``changes``; a new layer count needs its ``layer_types``."""
        n = changes.get("num_hidden_layers", self.num_hidden_layers)
        if n != self.num_hidden_layers and "layer_types" not in changes:
            raise ModelConfigError("Give layer_types along with a new num_hidden_layers.")
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ HF config.json

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> Gemma4Config:
        """Read a transformers ``config.json`` dict, with transformers' defaults for absent
        fields. A ``gemma4`` (multimodal) config is read as its ``text_config``."""
        mt = hf.get("model_type")
        skipped: tuple[str, ...] = ()
        if mt == "gemma4":
            hf, skipped = _text_config_of(hf)
            mt = "gemma4_text"
        if mt != "gemma4_text":
            raise ModelConfigError(f"model_type '{mt}' is not a Gemma 4 type {MODEL_TYPES}.")
        if hf.get("use_bidirectional_attention") == "all":
            raise ModelConfigError("use_bidirectional_attention: all (an embedding model) is "
                                   "not supported; jaxtune trains causal language models.")

        def get(key: str) -> Any:
            return hf[key] if key in hf else _DEFAULTS.get(key)

        n = get("num_hidden_layers")
        types = _layer_types(hf, n)
        k_eq_v = bool(get("attention_k_eq_v"))
        kv, head_dim = get("num_key_value_heads"), get("head_dim")
        geometry = _geometry(hf, types, kv, head_dim, k_eq_v)
        act = get("hidden_activation") or "gelu_pytorch_tanh"
        if act not in ACTIVATIONS:
            raise ModelConfigError(f"hidden_activation '{act}' is not supported; use one of "
                                   f"{list(ACTIVATIONS)}.")
        ropes = _ropes(hf, types, get("max_position_embeddings"))
        moe = bool(get("enable_moe_block"))
        ple = get("hidden_size_per_layer_input") or 0
        fields: dict[str, Any] = dict(
            model_type=mt, vocab_size=get("vocab_size"), hidden_size=get("hidden_size"),
            intermediate_size=get("intermediate_size"), num_hidden_layers=n,
            num_attention_heads=get("num_attention_heads"),
            num_key_value_heads=geometry[SLIDING][0], head_dim=geometry[SLIDING][1],
            num_global_key_value_heads=geometry[FULL][0], global_head_dim=geometry[FULL][1],
            layer_types=types, rope=ropes[FULL], rope_local=ropes[SLIDING],
            sliding_window=get("sliding_window"), rms_norm_eps=float(get("rms_norm_eps")),
            max_position_embeddings=get("max_position_embeddings"),
            tie_word_embeddings=bool(get("tie_word_embeddings")), hidden_act=act,
            attention_bias=bool(get("attention_bias")),
            final_logit_softcapping=get("final_logit_softcapping"),
            hidden_size_per_layer_input=ple,
            vocab_size_per_layer_input=(get("vocab_size_per_layer_input") or 0) if ple else 0,
            attention_k_eq_v=k_eq_v, num_kv_shared_layers=get("num_kv_shared_layers") or 0,
            use_double_wide_mlp=bool(get("use_double_wide_mlp")), enable_moe_block=moe,
            num_experts=(hf.get("num_experts") or 0) if moe else 0,
            top_k_experts=(hf.get("top_k_experts") or 0) if moe else 0,
            moe_intermediate_size=(hf.get("moe_intermediate_size") or 0) if moe else 0,
            router_aux_loss_coef=float(hf.get("router_aux_loss_coef") or 0.0),
            router_z_loss_coef=float(hf.get("router_z_loss_coef") or 0.0),
            skipped_modules=skipped,
        )
        fields["hf_source"] = json.dumps(hf, sort_keys=True)
        return cls(**fields)

    def to_hf_config(self) -> dict[str, Any]:
        """The ``config.json`` dict that rebuilds this model: exactly the file it was read from
        (a multimodal one's ``text_config``), with only the fields changed since rewritten."""
        return write_back_hf_config(self, Gemma4Config, Gemma4Config._modelled_hf_fields)

    def _modelled_hf_fields(self) -> dict[str, Any]:
        """The fields this class models, in transformers' v5 spelling."""
        out: dict[str, Any] = dict(
            model_type=self.model_type, architectures=[ARCHITECTURES[self.model_type]],
            vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
            global_head_dim=self.global_head_dim, layer_types=list(self.layer_types),
            rope_parameters={FULL: self.rope.to_hf(), SLIDING: self.rope_local.to_hf()},
            sliding_window=self.sliding_window, rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings, hidden_activation=self.hidden_act,
            attention_bias=self.attention_bias,
            final_logit_softcapping=self.final_logit_softcapping,
            hidden_size_per_layer_input=self.hidden_size_per_layer_input,
            attention_k_eq_v=self.attention_k_eq_v,
            num_kv_shared_layers=self.num_kv_shared_layers,
            use_double_wide_mlp=self.use_double_wide_mlp,
            enable_moe_block=self.enable_moe_block,
        )
        if self.attention_k_eq_v:
            out["num_global_key_value_heads"] = self.num_global_key_value_heads
        if self.hidden_size_per_layer_input:
            out["vocab_size_per_layer_input"] = self.vocab_size_per_layer_input
        if self.enable_moe_block:
            out.update(num_experts=self.num_experts, top_k_experts=self.top_k_experts,
                       moe_intermediate_size=self.moe_intermediate_size)
        for key in ("router_aux_loss_coef", "router_z_loss_coef"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        return out


def _text_config_of(hf: dict[str, Any]) -> tuple[dict[str, Any], tuple[str, ...]]:
    """A gemma4 (multimodal) config.json's language model as a gemma4_text config.json, and
    the checkpoint modules (towers, embedders) the language model leaves out."""
    text = dict(hf.get("text_config") or {})
    text["model_type"] = "gemma4_text"
    text["architectures"] = [ARCHITECTURES["gemma4_text"]]
    text.setdefault("tie_word_embeddings", hf.get("tie_word_embeddings", True))
    for key in ("dtype", "torch_dtype", "transformers_version"):
        if key in hf:
            text.setdefault(key, hf[key])
    skipped = tuple(m for key, mods in TOWERS.items() if hf.get(key) for m in mods)
    return text, skipped


def _layer_types(hf: dict[str, Any], n: int) -> tuple[str, ...]:
    """``layer_types``, or transformers' default (5 sliding then 1 full); the last is full."""
    types = list(hf.get("layer_types") or [SLIDING if (i + 1) % 6 else FULL for i in range(n)])
    if len(types) != n or any(t not in (SLIDING, FULL) for t in types):
        raise ModelConfigError(f"layer_types {types} must list {n} of '{FULL}' / '{SLIDING}'.")
    types[-1] = FULL  # transformers forces it (with a warning)
    return tuple(types)


def _geometry(hf: dict[str, Any], types: tuple[str, ...], kv: int, head_dim: int,
              k_eq_v: bool) -> dict[str, tuple[int, int]]:
    """``(kv heads, head dim)`` per layer type, from ``per_layer_config`` when the file has
    it (transformers 5's spelling), else from ``global_head_dim`` and, with
    ``attention_k_eq_v``, ``num_global_key_value_heads`` on full layers."""
    per_layer = hf.get("per_layer_config")
    if per_layer is None:
        glob = hf.get("global_head_dim", _DEFAULTS["global_head_dim"])
        if glob is None:
            raise ModelConfigError("global_head_dim is null; full-attention layers need a head "
                                   "dim (transformers' default is 512).")
        override: dict[str, int] = {"head_dim": glob}
        gkv = hf.get("num_global_key_value_heads")
        if k_eq_v and gkv is not None:
            override["num_key_value_heads"] = gkv
        per_layer = {str(i): override for i, t in enumerate(types) if t == FULL}
    found: dict[str, set[tuple[int, int]]] = {SLIDING: set(), FULL: set()}
    for i, t in enumerate(types):
        o = dict(per_layer.get(str(i)) or per_layer.get(i) or {})
        extra = sorted(set(o) - set(_LAYER_OVERRIDES))
        if extra:
            raise ModelConfigError(f"per_layer_config of layer {i} overrides {extra}; jaxtune's "
                                   f"Gemma 4 takes per-layer {list(_LAYER_OVERRIDES)} only.")
        found[t].add((o.get("num_key_value_heads", kv), o.get("head_dim", head_dim)))
    out = {}
    for t, shapes in found.items():
        if len(shapes) > 1:
            raise ModelConfigError(f"the {t} layers have different (kv heads, head dim) "
                                   f"{sorted(shapes)}; jaxtune's Gemma 4 needs one per layer type.")
        out[t] = shapes.pop() if shapes else (kv, head_dim)
    return out


def _ropes(hf: dict[str, Any], types: tuple[str, ...],
           max_pos: int) -> dict[str, RopeParameters]:
    """RoPE per layer type from ``rope_parameters`` (transformers' defaults when absent)."""
    params = hf.get("rope_parameters") or _DEFAULT_ROPE
    out = {}
    for t in (SLIDING, FULL):
        p = params.get(t) if isinstance(params, dict) else None
        if p is None:
            if t in types:
                raise ModelConfigError(f"rope_parameters has no '{t}' entry; Gemma 4 takes one "
                                       f"RoPE per layer type ({SLIDING}, {FULL}).")
            p = _DEFAULT_ROPE[t]
        p = dict(p)
        p.setdefault("rope_type", p.pop("type", "default"))
        p.pop("type", None)
        if p["rope_type"] == "default":
            p.pop("partial_rotary_factor", None)  # transformers' Gemma 4 ignores it here
        if "rope_theta" not in p:
            raise ModelConfigError(f"rope_parameters['{t}'] has no rope_theta.")
        out[t] = RopeParameters.from_hf(p, max_pos)
    return out
