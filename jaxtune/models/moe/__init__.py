"""The MoE family: HF model types mixtral, qwen2_moe and qwen3_moe (registers itself)."""

from jaxtune.models.family import Family, register_family
from jaxtune.models.moe.config import ARCHITECTURES, MODEL_TYPES, MoeConfig
from jaxtune.models.moe.hf import fused_experts, hf_table
from jaxtune.models.moe.model import MoeForCausalLM

FAMILY = Family("moe", MODEL_TYPES, MoeConfig, MoeForCausalLM, hf_table, ARCHITECTURES,
                fused_experts=fused_experts)
register_family(FAMILY)

__all__ = ["FAMILY", "MODEL_TYPES", "MoeConfig", "MoeForCausalLM", "hf_table"]
