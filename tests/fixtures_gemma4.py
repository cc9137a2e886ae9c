"""Tiny random Gemma 4 checkpoints (``Gemma4ForCausalLM`` from ``Gemma4TextConfig``) made by
transformers, with odd sizes and every Gemma 4 switch set so it bites at this size.

Six layers ``sliding, sliding, full`` twice (the pattern repeats, so a scanned stack runs it as
blocks), a sliding window of 5 (the test sequences are longer), hidden 36, 4 query heads;
sliding layers 2 kv heads of 12, full layers ``global_head_dim`` 20 (and with
``attention_k_eq_v`` 1 kv head). Weights are redrawn as in ``fixtures_models`` (O(1) logits),
with the router's scales, the per-expert scales and each layer's ``layer_scalar`` (a buffer)
redrawn away from 1 so none of them can be ignored unnoticed. The per-layer input width is
14: at 6, one token's per-layer projection came out 30x smaller than the others, and the
norm after it amplified float32 rounding past 1e-4 (in transformers as much as here).

``gemma4_model(name)`` builds each :data:`GEMMA4_VARIANTS` entry once per session;
``gemma4_hf(path)`` loads a folder in transformers (eager experts: the grouped_mm path needs
16-byte aligned strides, which odd sizes lack).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.fixtures_gemma import VOCAB
from tests.fixtures_models import _redraw

__all__ = ["GEMMA4_TINY", "GEMMA4_VARIANTS", "gemma4_hf", "gemma4_logits", "gemma4_model",
           "gemma4_tokenizer", "make_gemma4_model", "redraw_gemma4"]

S, F = "sliding_attention", "full_attention"
GEMMA4_TINY: dict[str, Any] = dict(
    vocab_size=VOCAB, vocab_size_per_layer_input=VOCAB, hidden_size=36, intermediate_size=50,
    num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
    global_head_dim=20, sliding_window=5, layer_types=[S, S, F] * 2,
    max_position_embeddings=256, hidden_size_per_layer_input=0,
    rope_parameters={S: {"rope_type": "default", "rope_theta": 100.0},
                     F: {"rope_type": "proportional", "partial_rotary_factor": 0.5,
                         "rope_theta": 1000.0}},
)

#: name -> config overrides: per-layer embeddings; KV sharing (2 layers) with the double-wide
#: MLP and an untied head; keys as values with fewer global kv heads; the MoE block. The final
#: soft-cap is on (5.0) in three and off in one.
GEMMA4_VARIANTS: dict[str, dict[str, Any]] = {
    "ple": dict(hidden_size_per_layer_input=14, final_logit_softcapping=5.0),
    "shared": dict(num_kv_shared_layers=2, use_double_wide_mlp=True,
                   hidden_size_per_layer_input=14, final_logit_softcapping=None,
                   tie_word_embeddings=False),
    "k_eq_v": dict(attention_k_eq_v=True, num_global_key_value_heads=1,
                   final_logit_softcapping=5.0),
    "moe": dict(enable_moe_block=True, num_experts=5, top_k_experts=2, moe_intermediate_size=14,
                attention_k_eq_v=True, num_global_key_value_heads=1,
                final_logit_softcapping=5.0),
}


def redraw_gemma4(model: Any, seed: int) -> None:
    """``_redraw`` plus scales and layer scalars drawn around 1 (not 1, not ~0)."""
    import torch

    _redraw(model, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith(("router.scale", "per_expert_scale", "layer_scalar")):
                noise = torch.randn(t.shape, generator=gen, dtype=torch.float32)
                t.copy_((1.0 + 0.3 * noise).to(t.dtype))


def make_gemma4_model(out_dir: Path, *, seed: int = 0, **overrides: Any) -> Path:
    """Save a tiny random Gemma4ForCausalLM with transformers' ``save_pretrained``."""
    import torch
    import transformers

    config = transformers.Gemma4TextConfig(**{**GEMMA4_TINY, **overrides})
    torch.manual_seed(seed)
    model = transformers.Gemma4ForCausalLM(config)
    redraw_gemma4(model, seed)
    model.eval().save_pretrained(out_dir)
    return Path(out_dir)


def gemma4_hf(path: Path, **config_changes: Any):
    """The folder in transformers (float32, eager experts), config fields changed first."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(path, **config_changes)
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, config=config, dtype=torch.float32, experts_implementation="eager").eval()


def gemma4_logits(model_or_path: Any, ids: np.ndarray) -> np.ndarray:
    import torch

    model = gemma4_hf(model_or_path) if isinstance(model_or_path, str | Path) else model_or_path
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(ids), dtype=torch.long)).logits.float().numpy()


@pytest.fixture(scope="session")
def gemma4_model(tmp_path_factory):
    """``gemma4_model(name)`` -> folder of the :data:`GEMMA4_VARIANTS` entry, built once."""
    built: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("tiny_gemma4_models")

    def get(name: str) -> Path:
        if name not in built:
            built[name] = make_gemma4_model(root / name, **GEMMA4_VARIANTS[name])
        return built[name]

    return get


@pytest.fixture(scope="session")
def gemma4_tokenizer(tmp_path_factory) -> str:
    """Folder of a tokenizer with Gemma 4's chat template (``<turn|>`` ends a turn); its 399
    tokens fit the tiny models' vocabulary (401)."""
    from tests.fixtures_chat_templates import build_template_tokenizer
    from tests.fixtures_data import _train_bpe

    path = tmp_path_factory.mktemp("gemma4_tokenizer")
    build_template_tokenizer("gemma4", _train_bpe()).save_pretrained(path)
    return str(path)
