"""The Gemma family: HF model types gemma, gemma2, gemma3_text and gemma3's text part
(registers itself)."""

from jaxtune.models.family import Family, register_family
from jaxtune.models.gemma.hf import hf_table
from jaxtune.models.gemma.model import ARCHITECTURES, MODEL_TYPES, Gemma, GemmaConfig

#: Gemma 4 (transformers' Gemma4TextModel) is not Gemma 3 with new numbers: these parts of it
#: have no counterpart here yet, so its checkpoints are refused rather than loaded wrong.
GEMMA4_MISSING = (
    "Gemma 4 is not modelled yet: its per-layer input embeddings (a second embedding table, "
    "added at every layer, where a checkpoint has one), key/value sharing across the last "
    "layers (num_kv_shared_layers), keys reused as values (attention_k_eq_v), a larger "
    "head_dim and its own KV-head count on global layers, 'proportional' partial RoPE on "
    "global layers, the double-wide MLP and its optional mixture-of-experts block have no "
    "counterpart in jaxtune's Gemma. Fine-tune a Gemma 3 checkpoint (model_type gemma3 or "
    "gemma3_text) instead.")
DECLINED = tuple((mt, GEMMA4_MISSING) for mt in ("gemma4", "gemma4_text"))

FAMILY = Family("gemma", MODEL_TYPES, GemmaConfig, Gemma, hf_table, ARCHITECTURES,
                declined=DECLINED)
register_family(FAMILY)

__all__ = ["FAMILY", "MODEL_TYPES", "Gemma", "GemmaConfig", "hf_table"]
