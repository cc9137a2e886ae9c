"""The Gemma 4 family: HF model types gemma4_text and gemma4's language model (registers
itself). See ``model.py`` for what it computes and ``config.py`` for what it reads."""

from jaxtune.models.family import Family, register_family
from jaxtune.models.gemma4.config import ARCHITECTURES, MODEL_TYPES, Gemma4Config
from jaxtune.models.gemma4.hf import hf_table, layer_groups
from jaxtune.models.gemma4.model import Gemma4ForCausalLM

FAMILY = Family("gemma4", MODEL_TYPES, Gemma4Config, Gemma4ForCausalLM, hf_table, ARCHITECTURES,
                layer_groups=layer_groups)
register_family(FAMILY)

__all__ = ["FAMILY", "MODEL_TYPES", "Gemma4Config", "Gemma4ForCausalLM", "hf_table"]
