"""The Gemma family: HF model types gemma, gemma2, gemma3_text and gemma3's text part
(registers itself). Gemma 4 is its own family (``jaxtune.models.gemma4``): its layers are not
Gemma 3's with new numbers."""

from jaxtune.models.family import Family, register_family
from jaxtune.models.gemma.hf import hf_table
from jaxtune.models.gemma.model import ARCHITECTURES, MODEL_TYPES, Gemma, GemmaConfig

FAMILY = Family("gemma", MODEL_TYPES, GemmaConfig, Gemma, hf_table, ARCHITECTURES)
register_family(FAMILY)

__all__ = ["FAMILY", "MODEL_TYPES", "Gemma", "GemmaConfig", "hf_table"]
