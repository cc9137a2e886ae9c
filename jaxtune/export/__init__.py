"""Export to Hugging Face: full weights, merged LoRA and PEFT adapters, checked in transformers.

- :func:`export_run` / ``jaxtune export RUN_DIR``: a run's Orbax checkpoint (read by
  :mod:`jaxtune.run_dir`), streamed one tensor at a time, to a folder ``transformers`` loads
  (``tensors.py``, ``safetensors_out.py``, ``hf_folder.py``); LoRA runs merged and/or as a
  PEFT adapter (``lora_export.py``); ``--verify`` compares logits in transformers (``verify.py``).
- :func:`save_pretrained`: the same folder from a model in memory.

See ``docs/export.md``.
"""

from __future__ import annotations

from jaxtune.export.api import export_run, save_pretrained
from jaxtune.export.command import export_main
from jaxtune.export.errors import ExportError

__all__ = ["ExportError", "export_main", "export_run", "save_pretrained"]
