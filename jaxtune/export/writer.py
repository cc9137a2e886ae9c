"""Writing an HF folder from parameter sources: staged, verified, moved into place.

Shared by full exports of a run (``api.py``), merged-LoRA exports (``lora_export.py``) and
``save_pretrained``, so every kind of export writes the same files in the same way.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from jaxtune.export import hf_folder
from jaxtune.export.safetensors_out import TensorGroup, write_safetensors
from jaxtune.export.tensors import ParamSource, hf_groups, read_whole


def _write_hf_folder(tmp: Path, groups: list[TensorGroup], max_shard_size: str | int,
                     hf_config: dict[str, Any], base_generation: dict[str, Any] | None,
                     tokenizer) -> dict[str, str]:
    weight_map = write_safetensors(tmp, groups, max_shard_size)
    hf_folder.write_json(tmp / "config.json", hf_config)
    hf_folder.write_json(tmp / "generation_config.json", hf_folder.export_generation_config(
        base_generation, hf_config, tokenizer))
    if tokenizer is not None:
        hf_folder.save_tokenizer(tokenizer, tmp)
    return weight_map


def write_hf_export(out: Path, sources: list[ParamSource], config: Any, *,
                    hf_config: dict[str, Any], generation: dict[str, Any] | None,
                    max_shard_size: str | int, tokenizer, overwrite: bool,
                    out_dtype: Any = None, verify: Callable[[Path], Any] | None = None,
                    ) -> tuple[list[TensorGroup], dict[str, str]]:
    """Write ``sources`` as an HF folder at ``out``: staged, checked by ``verify(staged_dir)``
    when given, then moved into place. Returns the tensor groups and the weight map."""
    groups = hf_groups(sources, config, out_dtype)
    with hf_folder.staged_output(out, overwrite) as tmp:
        weight_map = _write_hf_folder(tmp, groups, max_shard_size, hf_config, generation,
                                      tokenizer)
        if verify is not None:
            verify(tmp)
    return groups, weight_map


def read_generation_config(model_dir: Path) -> dict[str, Any] | None:
    file = model_dir / "generation_config.json"
    return json.loads(file.read_text()) if file.is_file() else None



def reference_model(config: Any, sources: list[ParamSource], scan_layers: bool,
                     round_to: np.dtype | None = None) -> nnx.Module:
    """The model with the sources' values (rounded to ``round_to`` first), in float32."""
    import jax.numpy as jnp

    from jaxtune.models import abstract_model

    abstract = abstract_model(config, param_dtype=jnp.float32, compute_dtype=jnp.float32,
                              scan_layers=scan_layers)
    graphdef, state = nnx.split(abstract)
    by_path = {s.path: s for s in sources}
    flat = []
    for path, var in nnx.to_flat_state(state):
        src = by_path[".".join(map(str, path))]
        value = read_whole(src)
        if round_to is not None:
            value = value.astype(round_to)
        flat.append((path, var.replace(jnp.asarray(value, jnp.float32))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
