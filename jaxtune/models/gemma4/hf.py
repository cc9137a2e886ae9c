"""HF <-> jaxtune parameter table for Gemma 4 (``gemma4_text``; ``gemma4``'s language model).

Names map 1:1 (kernel layouts: ``jaxtune.models.layers``). Which layers hold which tensors is
the model's business: a KV-shared layer has no ``k_proj`` / ``v_proj`` / ``k_norm`` and a full
layer with ``attention_k_eq_v`` no ``v_proj``, so those keys are unexpected there (and never
written back). ``layer_scalar`` is a buffer, loaded and exported like a parameter.

The experts are stored fused as transformers keeps them: ``experts.gate_up_proj`` ``[E, 2F, D]``
(gate rows, then up rows) is two parts, the ``gate_proj`` and ``up_proj`` kernels ``[E, D, F]``
of the MoE family's ``Experts``; ``experts.down_proj`` ``[E, D, F]`` is its ``[E, F, D]``.

A ``gemma4`` checkpoint keeps the language model under ``model.language_model.``; its vision and
audio towers and their embedders are known and not loaded (:data:`config.TOWERS`). Export
writes the text-only (``Gemma4ForCausalLM``) spelling, the first rules.
"""

from __future__ import annotations

from jaxtune.models.gemma4.config import TOWERS, Gemma4Config
from jaxtune.models.table import Rule, Transform

_T = "model.layers.{i}"
#: Where a checkpoint keeps the decoder: text-only first (the one export writes).
_PREFIXES = (r"model\.", r"model\.language_model\.")
_NORMS = ("input_layernorm|post_attention_layernorm|pre_feedforward_layernorm|"
          "post_feedforward_layernorm|post_feedforward_layernorm_1|"
          "post_feedforward_layernorm_2|pre_feedforward_layernorm_2|post_per_layer_input_norm")


def _rules(prefix: str) -> list[Rule]:
    layer = prefix + r"layers\.(?P<i>\d+)"
    experts = layer + r"\.experts\."
    return [
        Rule(prefix + r"embed_tokens\.weight", "model.embed_tokens.embedding"),
        Rule(prefix + r"embed_tokens_per_layer\.weight", "model.embed_tokens_per_layer.embedding"),
        Rule(prefix + r"per_layer_model_projection\.weight",
             "model.per_layer_model_projection.kernel", Transform.LINEAR),
        Rule(prefix + r"per_layer_projection_norm\.weight",
             "model.per_layer_projection_norm.scale"),
        Rule(prefix + r"norm\.weight", "model.norm.scale"),
        Rule(layer + rf"\.(?P<n>{_NORMS})\.weight", _T + ".{n}.scale"),
        Rule(layer + r"\.layer_scalar", _T + ".layer_scalar"),
        Rule(layer + r"\.self_attn\.(?P<p>q|k|v)_proj\.weight",
             _T + ".self_attn.{p}_proj.kernel", Transform.LINEAR_SPLIT_OUT),
        Rule(layer + r"\.self_attn\.(?P<p>q|k|v)_proj\.bias",
             _T + ".self_attn.{p}_proj.bias", Transform.SPLIT_HEADS),
        Rule(layer + r"\.self_attn\.o_proj\.weight", _T + ".self_attn.o_proj.kernel",
             Transform.LINEAR_SPLIT_IN),
        Rule(layer + r"\.self_attn\.o_proj\.bias", _T + ".self_attn.o_proj.bias"),
        Rule(layer + r"\.self_attn\.(?P<p>q|k)_norm\.weight", _T + ".self_attn.{p}_norm.scale"),
        Rule(layer + r"\.mlp\.(?P<p>gate|up|down)_proj\.weight", _T + ".mlp.{p}_proj.kernel",
             Transform.LINEAR),
        Rule(layer + r"\.(?P<p>per_layer_input_gate|per_layer_projection)\.weight",
             _T + ".{p}.kernel", Transform.LINEAR),
        Rule(layer + r"\.router\.proj\.weight", _T + ".router.proj.kernel", Transform.LINEAR),
        Rule(layer + r"\.router\.(?P<p>scale|per_expert_scale)", _T + ".router.{p}"),
        Rule(experts + r"gate_up_proj", _T + ".experts.gate_proj.kernel",
             Transform.EXPERTS_LINEAR, part=(0, 2, 1)),
        Rule(experts + r"gate_up_proj", _T + ".experts.up_proj.kernel",
             Transform.EXPERTS_LINEAR, part=(1, 2, 1)),
        Rule(experts + r"down_proj", _T + ".experts.down_proj.kernel", Transform.EXPERTS_LINEAR),
    ]


def hf_table(cfg: Gemma4Config) -> tuple[Rule, ...]:
    """The rules for one model; a multimodal checkpoint's towers are known and skipped."""
    rules = [r for p in _PREFIXES for r in _rules(p)]
    towers = "|".join(m for mods in TOWERS.values() for m in mods)
    rules.append(Rule(rf"model\.({towers})\..*", None))
    if cfg.tie_word_embeddings:
        rules.append(Rule(r"lm_head\.weight", None))  # a stored copy of the tied embedding
    else:
        rules.append(Rule(r"lm_head\.weight", "lm_head.kernel", Transform.LINEAR))
    return tuple(rules)


def layer_groups(cfg: Gemma4Config) -> tuple[tuple[str, int], ...]:
    """Each HF layer's stacked module under scan (its kind) and index there."""
    return cfg.layer_groups()
