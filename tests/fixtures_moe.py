"""Tiny random transformers MoE checkpoints (mixtral, qwen2_moe, qwen3_moe), odd sizes.

``moe_hf_model(name)`` builds each :data:`MOE_VARIANTS` entry once per session: 5 experts,
top-2, hidden 30, 3 query heads of 10 over 1 kv head, expert width 14, dense width 22, shared
expert width 18, vocab 67, 3 layers; weights redrawn as in ``fixtures_models``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures_models import _redraw

MOE_TINY: dict[str, Any] = dict(
    vocab_size=67, hidden_size=30, num_hidden_layers=3, num_attention_heads=3,
    num_key_value_heads=1, max_position_embeddings=128, num_experts_per_tok=2,
)

#: name -> (model_type, overrides): with / without shared experts, norm_topk_prob on / off,
#: all-sparse and dense + sparse mixes.
MOE_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral": ("mixtral", dict(intermediate_size=14, num_local_experts=5)),
    "mixtral_sliding": ("mixtral", dict(intermediate_size=14, num_local_experts=5,
                                        sliding_window=5)),
    "qwen2_moe": ("qwen2_moe", dict(intermediate_size=22, moe_intermediate_size=14,
                                    shared_expert_intermediate_size=18, num_experts=5,
                                    norm_topk_prob=False)),
    "qwen2_moe_mixed": ("qwen2_moe", dict(intermediate_size=22, moe_intermediate_size=14,
                                          shared_expert_intermediate_size=18, num_experts=5,
                                          norm_topk_prob=True, decoder_sparse_step=2)),
    "qwen3_moe": ("qwen3_moe", dict(intermediate_size=22, moe_intermediate_size=14,
                                    num_experts=5, head_dim=8, norm_topk_prob=True)),
    "qwen3_moe_mixed": ("qwen3_moe", dict(intermediate_size=22, moe_intermediate_size=14,
                                          num_experts=5, head_dim=8, norm_topk_prob=False,
                                          mlp_only_layers=[1], tie_word_embeddings=True)),
}

_CONFIG_CLASSES = {"mixtral": "MixtralConfig", "qwen2_moe": "Qwen2MoeConfig",
                   "qwen3_moe": "Qwen3MoeConfig"}


def make_moe_hf_model(model_type: str, out_dir: str | Path | None = None, *, seed: int = 0,
                      **overrides: Any) -> Path:
    """Save a tiny random MoE causal LM with transformers' ``save_pretrained``."""
    import torch
    import transformers

    out = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix=f"tiny-{model_type}-"))
    config = getattr(transformers, _CONFIG_CLASSES[model_type])(**{**MOE_TINY, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    _redraw(model, seed)
    model.eval().save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def moe_hf_model(tmp_path_factory):
    """``moe_hf_model(name)`` -> folder of the :data:`MOE_VARIANTS` entry, built once."""
    built: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("moe_hf_models")

    def get(name: str) -> Path:
        if name not in built:
            model_type, overrides = MOE_VARIANTS[name]
            built[name] = make_moe_hf_model(model_type, root / name, **overrides)
        return built[name]

    return get
