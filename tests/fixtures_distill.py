"""Session fixtures for distillation: a tiny teacher and a smaller student of another family
that share the vocabulary (389), plus teachers that cannot teach it.

``distill_pair`` holds folders ``teacher`` (Qwen2: hidden 72, 3 layers, tied embeddings,
biases), ``student`` (Llama: hidden 40, 5 heads, 1 KV head, MLP 104, 2 layers), and
``other_vocab`` (the teacher's shape with vocabulary 401) and ``unloadable`` (a config.json
of a model type jaxtune does not build).
"""

from __future__ import annotations

import json

import pytest

from tests.fixtures_models import make_tiny_hf_model

STUDENT = dict(hidden_size=40, intermediate_size=104, num_hidden_layers=2,
               num_attention_heads=5, num_key_value_heads=1)


@pytest.fixture(scope="session")
def distill_pair(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("distill_pair")
    unloadable = root / "unloadable"
    unloadable.mkdir()
    (unloadable / "config.json").write_text(json.dumps(
        {"model_type": "gpt2", "vocab_size": 389, "n_embd": 72, "n_layer": 3}))
    return {
        "teacher": make_tiny_hf_model("qwen2", root / "teacher", seed=1,
                                      tie_word_embeddings=True),
        "student": make_tiny_hf_model("llama", root / "student", seed=2, **STUDENT),
        "other_vocab": make_tiny_hf_model("qwen2", root / "other_vocab", seed=3,
                                          vocab_size=401),
        "unloadable": unloadable,
    }
