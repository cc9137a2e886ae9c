"""The Llama family: HF model types llama, mistral, qwen2 and qwen3 (registers itself)."""

from jaxtune.models.family import Family, register_family
from jaxtune.models.llama.hf import hf_table
from jaxtune.models.llama.model import ARCHITECTURES, MODEL_TYPES, Llama, LlamaConfig

FAMILY = Family("llama", MODEL_TYPES, LlamaConfig, Llama, hf_table, ARCHITECTURES)
register_family(FAMILY)

__all__ = ["FAMILY", "MODEL_TYPES", "Llama", "LlamaConfig", "hf_table"]
