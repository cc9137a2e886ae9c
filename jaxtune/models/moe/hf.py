"""HF <-> jaxtune parameter table for the MoE family (mixtral, qwen2_moe, qwen3_moe).

HF checkpoints (on the hub, and as transformers 5 ``save_pretrained`` writes them) store every
expert apart: ``mlp.experts.{j}.gate_proj.weight`` (Mixtral ``block_sparse_moe.experts.{j}.w1``
/ ``w3`` / ``w2`` for gate / up / down). ``{j}`` stacks them on the ``experts`` axis of one
kernel ``[E, D, F]`` (``[L, E, D, F]`` under scan), and export writes them apart again.

A model mixing dense and sparse layers keeps its layers as a list under ``scan_layers`` (see
``model.py``); its rules name the layer group ``n`` instead of the stacking placeholder ``i``,
so the table never stacks its layers.
"""

from __future__ import annotations

import re

from jaxtune.models.family import FusedExpert
from jaxtune.models.moe.config import MoeConfig
from jaxtune.models.table import Rule, Transform

_MIXTRAL_EXPERT = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def hf_table(cfg: MoeConfig) -> tuple[Rule, ...]:
    """The rules for one model (a key matching a parameter the model lacks is unexpected)."""
    g = "n" if cfg.mixed_layers else "i"
    layer, t = rf"model\.layers\.(?P<{g}>\d+)", "model.layers.{" + g + "}"
    rules = [
        Rule(r"model\.embed_tokens\.weight", "model.embed_tokens.embedding"),
        Rule(r"model\.norm\.weight", "model.norm.scale"),
        Rule(layer + r"\.(?P<m>input_layernorm|post_attention_layernorm)\.weight",
             t + ".{m}.scale"),
        Rule(layer + r"\.self_attn\.(?P<p>q|k|v)_proj\.weight",
             t + ".self_attn.{p}_proj.kernel", Transform.LINEAR_SPLIT_OUT),
        Rule(layer + r"\.self_attn\.(?P<p>q|k|v)_proj\.bias",
             t + ".self_attn.{p}_proj.bias", Transform.SPLIT_HEADS),
        Rule(layer + r"\.self_attn\.o_proj\.weight", t + ".self_attn.o_proj.kernel",
             Transform.LINEAR_SPLIT_IN),
        Rule(layer + r"\.self_attn\.o_proj\.bias", t + ".self_attn.o_proj.bias"),
        Rule(layer + r"\.self_attn\.(?P<p>q|k)_norm\.weight", t + ".self_attn.{p}_norm.scale"),
        Rule(layer + r"\.self_attn\.rotary_emb\.inv_freq", None),
    ]
    if cfg.model_type == "mixtral":
        moe = r"\.block_sparse_moe"
        rules.append(Rule(layer + moe + r"\.gate\.weight", t + ".block_sparse_moe.gate.kernel",
                          Transform.LINEAR))
        for w, name in _MIXTRAL_EXPERT.items():
            rules.append(Rule(layer + moe + rf"\.experts\.(?P<j>\d+)\.{w}\.weight",
                              t + f".block_sparse_moe.experts.{name}.kernel", Transform.LINEAR))
    else:
        rules += [
            Rule(layer + r"\.mlp\.gate\.weight", t + ".mlp.gate.kernel", Transform.LINEAR),
            Rule(layer + r"\.mlp\.experts\.(?P<j>\d+)\.(?P<p>gate|up|down)_proj\.weight",
                 t + ".mlp.experts.{p}_proj.kernel", Transform.LINEAR),
            Rule(layer + r"\.mlp\.shared_expert\.(?P<p>gate|up|down)_proj\.weight",
                 t + ".mlp.shared_expert.{p}_proj.kernel", Transform.LINEAR),
            Rule(layer + r"\.mlp\.shared_expert_gate\.weight",
                 t + ".mlp.shared_expert_gate.kernel", Transform.LINEAR),
            # dense layers (mlp_only_layers, decoder_sparse_step)
            Rule(layer + r"\.mlp\.(?P<p>gate|up|down)_proj\.weight", t + ".mlp.{p}_proj.kernel",
                 Transform.LINEAR),
        ]
    if cfg.tie_word_embeddings:
        rules.append(Rule(r"lm_head\.weight", None))
    else:
        rules.append(Rule(r"lm_head\.weight", "lm_head.kernel", Transform.LINEAR))
    return tuple(rules)


#: transformers 5 in memory: ``mlp.experts.gate_up_proj`` [E, 2F, D] (gate rows, then up), then
#: ``mlp.experts.down_proj`` [E, D, F], for all three model types (Mixtral too, not
#: ``block_sparse_moe``).
_FUSED = {"gate_proj": ("gate_up_proj", 0, 2, 0), "up_proj": ("gate_up_proj", 1, 2, 0),
          "down_proj": ("down_proj", 0, 1, 1)}
_EXPERT_MODULE = re.compile(r"(model\.layers\.\d+)\.(?:mlp|block_sparse_moe)\.experts\.\d+\.(\w+)")


def fused_experts(hf_module: str) -> FusedExpert | None:
    """Where transformers keeps the expert projection ``hf_module`` (checkpoint name)."""
    m = _EXPERT_MODULE.fullmatch(hf_module)
    if m is None:
        return None
    return FusedExpert(f"{m[1]}.mlp.experts", *_FUSED[_MIXTRAL_EXPERT.get(m[2], m[2])])
