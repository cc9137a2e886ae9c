"""The Llama family: HF model types llama, mistral, qwen2 and qwen3."""

from jaxtune.models.llama.hf import hf_table
from jaxtune.models.llama.model import MODEL_TYPES, Llama, LlamaConfig

__all__ = ["MODEL_TYPES", "Llama", "LlamaConfig", "hf_table"]
