"""A model family defined only inside tests/: one folder that registers itself on import.

It proves a family is one folder (no edit to jaxtune/): ``toy_moe`` is a small decoder whose
MLP is a dense mixture of ``num_experts`` gated MLPs, stored per expert in its HF checkpoint
(``mlp.experts.{j}.gate_proj.weight``) and stacked on an ``experts`` axis in the model, so it
also exercises the table's ``{j}`` placeholder.
"""

from jaxtune.models.family import Family, register_family
from tests.toy_family.hf import hf_table
from tests.toy_family.model import ToyMoe, ToyMoeConfig

FAMILY = Family("toy_moe", ("toy_moe",), ToyMoeConfig, ToyMoe, hf_table,
                {"toy_moe": "ToyMoeForCausalLM"})
register_family(FAMILY)
