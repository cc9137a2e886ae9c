"""HF <-> jaxtune parameter table for the Gemma family.

Names map 1:1 (see ``jaxtune.models.layers`` for the kernel layouts). A ``gemma3`` checkpoint
(``Gemma3ForConditionalGeneration``) keeps its language model under ``model.language_model.``
(``language_model.model.`` in checkpoints saved before transformers 4.52); those keys load into
the same parameters, and the vision tower and projector are known and skipped. Export writes
the first (text-only, ``Gemma3ForCausalLM``) spelling, because the rules are tried in order.
"""

from __future__ import annotations

from jaxtune.models.gemma.model import GemmaConfig
from jaxtune.models.table import Rule, Transform

_T = "model.layers.{i}"
#: Where a checkpoint keeps the decoder: text-only first (the one export writes).
_PREFIXES = (r"model\.", r"model\.language_model\.", r"language_model\.model\.")


def _rules(prefix: str) -> list[Rule]:
    layer = prefix + r"layers\.(?P<i>\d+)"
    norms = ("input_layernorm|post_attention_layernorm|pre_feedforward_layernorm|"
             "post_feedforward_layernorm")
    return [
        Rule(prefix + r"embed_tokens\.weight", "model.embed_tokens.embedding"),
        Rule(prefix + r"norm\.weight", "model.norm.scale"),
        Rule(layer + rf"\.(?P<n>{norms})\.weight", _T + ".{n}.scale"),
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
        Rule(layer + r"\.self_attn\.rotary_emb\.inv_freq", None),
    ]


def hf_table(cfg: GemmaConfig) -> tuple[Rule, ...]:
    """The rules for one model; only Gemma 3 checkpoints may use the multimodal prefixes."""
    prefixes = _PREFIXES if cfg.model_type == "gemma3_text" else _PREFIXES[:1]
    rules = [r for p in prefixes for r in _rules(p)]
    if cfg.model_type == "gemma3_text":
        # A multimodal checkpoint's vision side: known, not part of the language model.
        rules.append(Rule(r"(model\.)?(vision_tower|multi_modal_projector)\..*", None))
        rules.append(Rule(r"language_model\.lm_head\.weight", None))
    if cfg.tie_word_embeddings:
        rules.append(Rule(r"lm_head\.weight", None))  # a stored copy of the tied embedding
    else:
        rules.append(Rule(r"lm_head\.weight", "lm_head.kernel", Transform.LINEAR))
    return tuple(rules)
