"""The MoE family's config: HF model types ``mixtral``, ``qwen2_moe`` and ``qwen3_moe``.

The three differ in switches read from ``config.json`` (transformers' defaults where a key is
absent):

- ``mixtral``: every layer sparse (``block_sparse_moe``, experts ``w1/w3/w2``), top-k weights
  always renormalised and kept in float32, no biases, optional sliding window on every layer.
- ``qwen2_moe``: biases on q/k/v (``qkv_bias``), a shared expert gated by
  ``sigmoid(shared_expert_gate(x))``, ``norm_topk_prob``, and ``decoder_sparse_step`` /
  ``mlp_only_layers`` choosing which layers are sparse (the rest are dense gated MLPs).
- ``qwen3_moe``: RMSNorm on each query/key head, optional biases (``attention_bias``),
  ``norm_topk_prob``, ``decoder_sparse_step`` / ``mlp_only_layers``; no shared expert.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from jaxtune.errors import ModelConfigError
from jaxtune.models.family import write_back_hf_config
from jaxtune.models.layers import ACTIVATIONS, RopeParameters

MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")
ARCHITECTURES = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}
SLIDING, FULL = "sliding_attention", "full_attention"
_MAX_POSITIONS = {"mixtral": 4096 * 32, "qwen2_moe": 32768, "qwen3_moe": 32768}
_EPS = {"mixtral": 1e-5, "qwen2_moe": 1e-6, "qwen3_moe": 1e-6}
_ROPE_THETA = {"mixtral": 1e6, "qwen2_moe": 10000.0, "qwen3_moe": 10000.0}
_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")


@dataclass(frozen=True)
class MoeConfig:
    """Architecture of one MoE model (hashable, so it can be static under jit)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense layers' MLP width (Mixtral: each expert's)
    moe_intermediate_size: int  # each routed expert's MLP width
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_experts: int
    num_experts_per_tok: int
    norm_topk_prob: bool = True  # renormalise the top-k routing weights to sum to 1
    shared_expert_intermediate_size: int = 0  # 0: no shared expert (Qwen2-MoE has one)
    sparse_layers: tuple[bool, ...] = ()  # per layer: routed experts (True) or a dense MLP
    rms_norm_eps: float = 1e-6
    rope: RopeParameters = RopeParameters()
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    attention_bias: bool = False  # biases on q/k/v
    attention_out_bias: bool = False  # bias on o_proj
    qk_norm: bool = False  # Qwen3-MoE
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    router_aux_loss_coef: float = 0.001  # weight of the load-balancing loss (on by default)
    router_z_loss_coef: float = 0.0  # weight of the router z-loss (ST-MoE); 0 turns it off
    hf_source: str = "{}"  # the config.json this was read from (JSON), written back as it was

    def __post_init__(self):
        n = self.num_hidden_layers
        if not self.sparse_layers:
            object.__setattr__(self, "sparse_layers", (True,) * n)
        if not self.layer_types:
            object.__setattr__(self, "layer_types", (FULL,) * n)
        if len(self.sparse_layers) != n or len(self.layer_types) != n:
            raise ModelConfigError(f"sparse_layers / layer_types must have {n} entries.")
        if not 0 < self.num_experts_per_tok <= self.num_experts and any(self.sparse_layers):
            raise ModelConfigError(
                f"num_experts_per_tok={self.num_experts_per_tok} must be between 1 and "
                f"num_experts={self.num_experts}.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelConfigError(f"num_attention_heads={self.num_attention_heads} is not a "
                                   f"multiple of num_key_value_heads={self.num_key_value_heads}.")

    @property
    def mixed_layers(self) -> bool:
        """Some layers dense and some sparse: the layers are then a list even under scan
        (one stacked module needs every layer to have the same parameters)."""
        return len(set(self.sparse_layers)) > 1

    @property
    def moe_block_name(self) -> str:
        """Where HF keeps a sparse layer's MoE block."""
        return "block_sparse_moe" if self.model_type == "mixtral" else "mlp"

    def layer_windows(self) -> tuple[int | None, ...]:
        return tuple(self.sliding_window if t == SLIDING else None for t in self.layer_types)

    def active_mlp_params(self) -> int:
        """Matmul parameters one token meets in the MLPs of all layers: top-k experts, the
        shared expert and its gate, the router, and dense layers (for FLOPs / MFU)."""
        d = self.hidden_size
        total = 0
        for sparse in self.sparse_layers:
            if not sparse:
                total += 3 * d * self.intermediate_size
                continue
            total += self.num_experts_per_tok * 3 * d * self.moe_intermediate_size
            total += d * self.num_experts  # router
            if self.shared_expert_intermediate_size:
                total += 3 * d * self.shared_expert_intermediate_size + d
        return total

    def replace(self, **changes: Any) -> MoeConfig:
        n = changes.get("num_hidden_layers", self.num_hidden_layers)
        if n != self.num_hidden_layers:
            for key, values in (("layer_types", self.layer_types),
                                ("sparse_layers", self.sparse_layers)):
                if key not in changes:
                    if len(set(values)) > 1:
                        raise ModelConfigError(f"give {key} along with a new num_hidden_layers.")
                    changes[key] = values[:1] * n
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ HF config.json

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> MoeConfig:
        """Read a transformers ``config.json`` dict, with transformers' defaults."""
        mt = hf.get("model_type")
        if mt not in MODEL_TYPES:
            raise ModelConfigError(f"model_type '{mt}' is not an MoE type {MODEL_TYPES}.")
        missing = [k for k in _REQUIRED if hf.get(k) is None]
        if missing:
            raise ModelConfigError(f"config.json lacks {missing}, which a {mt} model needs.")
        act = hf.get("hidden_act", "silu")
        if act not in ACTIVATIONS:
            raise ModelConfigError(f"hidden_act '{act}' is not supported; use one of "
                                   f"{list(ACTIVATIONS)}.")
        n, heads = hf["num_hidden_layers"], hf["num_attention_heads"]
        max_pos = hf.get("max_position_embeddings") or _MAX_POSITIONS[mt]
        params = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
        params.setdefault("rope_theta", hf.get("rope_theta", _ROPE_THETA[mt]))
        params.setdefault("rope_type", params.pop("type", "default"))
        params.pop("type", None)
        kv = hf.get("num_key_value_heads") or {"mixtral": 8, "qwen2_moe": 16,
                                               "qwen3_moe": 4}[mt]
        fields: dict[str, Any] = dict(
            model_type=mt, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            num_hidden_layers=n, num_attention_heads=heads, num_key_value_heads=kv,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=float(hf.get("rms_norm_eps", _EPS[mt])),
            rope=RopeParameters.from_hf(params, max_pos), max_position_embeddings=max_pos,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)), hidden_act=act,
            router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)),
            router_z_loss_coef=float(hf.get("router_z_loss_coef", 0.0)),
        )
        if mt == "mixtral":
            window = hf.get("sliding_window")
            fields.update(
                intermediate_size=hf.get("intermediate_size", 14336),
                moe_intermediate_size=hf.get("intermediate_size", 14336),
                num_experts=hf.get("num_local_experts", 8),
                num_experts_per_tok=hf.get("num_experts_per_tok", 2), norm_topk_prob=True,
                sliding_window=window, layer_types=((SLIDING if window else FULL),) * n)
        else:
            experts = hf.get("num_experts", hf.get("num_local_experts"))
            experts = experts if experts is not None else (60 if mt == "qwen2_moe" else 128)
            step = hf.get("decoder_sparse_step", 1)
            only = set(hf.get("mlp_only_layers") or [])
            sparse = tuple(i not in only and experts > 0 and (i + 1) % step == 0
                           for i in range(n))
            fields.update(
                intermediate_size=hf.get("intermediate_size",
                                         5632 if mt == "qwen2_moe" else 6144),
                moe_intermediate_size=hf.get("moe_intermediate_size",
                                             1408 if mt == "qwen2_moe" else 768),
                num_experts=experts,
                num_experts_per_tok=hf.get("num_experts_per_tok",
                                           4 if mt == "qwen2_moe" else 8),
                norm_topk_prob=bool(hf.get("norm_topk_prob", False)), sparse_layers=sparse)
            fields.update(_qwen_attention(mt, hf, n))
        fields["hf_source"] = json.dumps(hf, sort_keys=True)
        return cls(**fields)

    def to_hf_config(self) -> dict[str, Any]:
        """Exactly the ``config.json`` this was read from, with changed fields rewritten."""
        return write_back_hf_config(self, MoeConfig, MoeConfig._modelled_hf_fields)

    def _modelled_hf_fields(self) -> dict[str, Any]:
        """The fields this class models, in transformers' v5 spelling."""
        out: dict[str, Any] = dict(
            model_type=self.model_type, architectures=[ARCHITECTURES[self.model_type]],
            vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps, rope_parameters=self.rope.to_hf(),
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings, hidden_act=self.hidden_act,
            num_experts_per_tok=self.num_experts_per_tok,
            router_aux_loss_coef=self.router_aux_loss_coef,
        )
        if self.router_z_loss_coef:
            out["router_z_loss_coef"] = self.router_z_loss_coef
        if self.model_type == "mixtral":
            out.update(num_local_experts=self.num_experts, sliding_window=self.sliding_window)
            return out
        only = [i for i, s in enumerate(self.sparse_layers) if not s]
        out.update(num_experts=self.num_experts, moe_intermediate_size=self.moe_intermediate_size,
                   norm_topk_prob=self.norm_topk_prob, decoder_sparse_step=1,
                   mlp_only_layers=only, use_sliding_window=self.sliding_window is not None,
                   sliding_window=self.sliding_window)
        if self.model_type == "qwen2_moe":
            out.update(shared_expert_intermediate_size=self.shared_expert_intermediate_size,
                       qkv_bias=self.attention_bias, layer_types=list(self.layer_types))
        else:
            out.update(attention_bias=self.attention_bias)
        return out


def _qwen_attention(mt: str, hf: dict[str, Any], n: int) -> dict[str, Any]:
    """Biases, q/k norm, sliding windows and the shared expert of the Qwen MoE types."""
    use_window = bool(hf.get("use_sliding_window", False))
    window = hf.get("sliding_window", 4096) if use_window else None
    if mt == "qwen3_moe":
        bias = bool(hf.get("attention_bias", False))
        return dict(attention_bias=bias, attention_out_bias=bias, qk_norm=True,
                    sliding_window=window, layer_types=((SLIDING if window else FULL),) * n)
    types = hf.get("layer_types") or [
        SLIDING if (i + 1) % 2 and i < hf.get("max_window_layers", 28) and use_window else FULL
        for i in range(n)]
    if len(types) != n or any(t not in (SLIDING, FULL) for t in types):
        raise ModelConfigError(f"layer_types {types} must list {n} of '{FULL}' / '{SLIDING}'.")
    if SLIDING in types and not window:
        raise ModelConfigError("layer_types has sliding layers but use_sliding_window is off.")
    return dict(attention_bias=bool(hf.get("qkv_bias", True)), attention_out_bias=False,
                sliding_window=window, layer_types=tuple(types),
                shared_expert_intermediate_size=hf.get("shared_expert_intermediate_size", 5632))
