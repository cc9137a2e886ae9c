"""A toy_moe HF checkpoint written by hand (safetensors + config.json), odd sizes throughout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

CONFIG = {"model_type": "toy_moe", "architectures": ["ToyMoeForCausalLM"], "vocab_size": 37,
          "hidden_size": 12, "intermediate_size": 10, "num_hidden_layers": 3,
          "num_attention_heads": 3, "num_experts": 4, "dtype": "float32",
          "custom_key_kept_as_is": [1, 2]}


def write_toy_checkpoint(folder: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Write the checkpoint into ``folder``; returns its tensors by HF key."""
    rng = np.random.default_rng(seed)
    c = CONFIG
    d, f, v, e = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_experts"]

    def w(*shape):
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    tensors = {"model.embed_tokens.weight": w(v, d), "model.norm.weight": 1 + w(d),
               "lm_head.weight": w(v, d)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors[p + "input_layernorm.weight"] = 1 + w(d)
        tensors[p + "post_attention_layernorm.weight"] = 1 + w(d)
        for name in ("q", "k", "v", "o"):
            tensors[p + f"self_attn.{name}_proj.weight"] = w(d, d)
        for j in range(e):
            tensors[p + f"mlp.experts.{j}.gate_proj.weight"] = w(f, d)
            tensors[p + f"mlp.experts.{j}.up_proj.weight"] = w(f, d)
            tensors[p + f"mlp.experts.{j}.down_proj.weight"] = w(d, f)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(c, indent=2))
    return tensors
