"""HF <-> jaxtune parameter table for the Llama family (llama, mistral, qwen2, qwen3).

Drives both loading (``jaxtune.weights.from_pretrained``) and export (``jaxtune.export``),
through ``jaxtune.models.table.ParamTable``. Names map 1:1; only layouts change (see
``jaxtune.models.layers`` for the kernel layouts and ``jaxtune.models.table`` for transforms).
"""

from __future__ import annotations

from jaxtune.models.llama.model import LlamaConfig
from jaxtune.models.table import Rule, Transform

_LAYER = r"model\.layers\.(?P<i>\d+)"
_T = "model.layers.{i}"


def hf_table(cfg: LlamaConfig) -> tuple[Rule, ...]:
    """The rules for one model. Parameters the model lacks (e.g. biases when the config has
    none) make a checkpoint key that matches them an "unexpected key" in the loader."""
    rules = [
        Rule(r"model\.embed_tokens\.weight", "model.embed_tokens.embedding"),
        Rule(r"model\.norm\.weight", "model.norm.scale"),
        Rule(_LAYER + r"\.(?P<n>input_layernorm|post_attention_layernorm)\.weight",
             _T + ".{n}.scale"),
        Rule(_LAYER + r"\.self_attn\.(?P<p>q|k|v)_proj\.weight",
             _T + ".self_attn.{p}_proj.kernel", Transform.LINEAR_SPLIT_OUT),
        Rule(_LAYER + r"\.self_attn\.(?P<p>q|k|v)_proj\.bias",
             _T + ".self_attn.{p}_proj.bias", Transform.SPLIT_HEADS),
        Rule(_LAYER + r"\.self_attn\.o_proj\.weight", _T + ".self_attn.o_proj.kernel",
             Transform.LINEAR_SPLIT_IN),
        Rule(_LAYER + r"\.self_attn\.o_proj\.bias", _T + ".self_attn.o_proj.bias"),
        Rule(_LAYER + r"\.self_attn\.(?P<p>q|k)_norm\.weight", _T + ".self_attn.{p}_norm.scale"),
        Rule(_LAYER + r"\.mlp\.(?P<p>gate|up|down)_proj\.weight", _T + ".mlp.{p}_proj.kernel",
             Transform.LINEAR),
        Rule(_LAYER + r"\.mlp\.(?P<p>gate|up|down)_proj\.bias", _T + ".mlp.{p}_proj.bias"),
        # Checkpoints converted before transformers 4.31 carry the RoPE buffer; it is
        # recomputed from the config.
        Rule(_LAYER + r"\.self_attn\.rotary_emb\.inv_freq", None),
    ]
    if cfg.tie_word_embeddings:
        # Some tied checkpoints also store the (identical) lm_head; the embedding is used.
        rules.append(Rule(r"lm_head\.weight", None))
    else:
        rules.append(Rule(r"lm_head\.weight", "lm_head.kernel", Transform.LINEAR))
    return tuple(rules)
