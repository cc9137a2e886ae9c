"""jaxtune: JAX-native fine-tuning of large language models.

Public API (imported lazily, so ``import jaxtune`` is cheap)::

    model = jaxtune.from_pretrained("path/or/hub-id", dtype="float32", mesh=None)
    logits = model(input_ids)                      # [batch, seq, vocab]
    jaxtune.save_pretrained(model, "out_dir", tokenizer=tok)
    cfg = jaxtune.load_config("configs/quickstart.yaml", ["--trainer.steps=10"])
    jaxtune.train(cfg)
    answers = jaxtune.generate(model, tokenizer, ["Hi!"], max_new_tokens=64)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "from_pretrained": "jaxtune.weights",
    "save_pretrained": "jaxtune.export",
    "TrainConfig": "jaxtune.config",
    "load_config": "jaxtune.config",
    "train": "jaxtune.trainer",
    "make_mesh": "jaxtune.mesh",
    "generate": "jaxtune.generation",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jaxtune' has no attribute '{name}'")
