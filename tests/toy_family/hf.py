"""HF <-> jaxtune table of the toy family: ``{i}`` stacks layers, ``{j}`` stacks experts."""

from jaxtune.models.table import Rule, Transform

_LAYER = r"model\.layers\.(?P<i>\d+)"
_T = "model.layers.{i}"


def hf_table(cfg) -> tuple[Rule, ...]:
    return (
        Rule(r"model\.embed_tokens\.weight", "model.embed_tokens.embedding"),
        Rule(r"model\.norm\.weight", "model.norm.scale"),
        Rule(r"lm_head\.weight", "lm_head.kernel", Transform.LINEAR),
        Rule(_LAYER + r"\.(?P<n>input_layernorm|post_attention_layernorm)\.weight",
             _T + ".{n}.scale"),
        Rule(_LAYER + r"\.self_attn\.(?P<p>q|k|v)_proj\.weight",
             _T + ".self_attn.{p}_proj.kernel", Transform.LINEAR_SPLIT_OUT),
        Rule(_LAYER + r"\.self_attn\.o_proj\.weight", _T + ".self_attn.o_proj.kernel",
             Transform.LINEAR_SPLIT_IN),
        Rule(_LAYER + r"\.mlp\.experts\.(?P<j>\d+)\.(?P<p>gate|up|down)_proj\.weight",
             _T + ".mlp.{p}_proj", Transform.LINEAR),
    )
