"""From model parameters to the HF tensors of an export, through the family's table in reverse.

A :class:`ParamSource` is one jaxtune parameter (stacked over layers or not) and a way to
read it: from a model in memory, or from an Orbax checkpoint on disk (``run_dir.py``).
:func:`hf_groups` maps every source to its HF keys with the same table the loader uses
(``jaxtune.models.<family>.hf``), so import and export cannot drift, and returns
:class:`~jaxtune.export.safetensors_out.TensorGroup` s that read lazily: a stacked parameter
is read a block of layers at a time and written as one HF tensor per layer.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxtune.export.errors import ExportError
from jaxtune.export.safetensors_out import TensorGroup, TensorSpec
from jaxtune.models import get_family
from jaxtune.models.table import Rule, Transform


@dataclass(frozen=True)
class ParamSource:
    """One jaxtune parameter: path, full shape, stored dtype and a reader.

    ``read(lo, hi)`` returns layers ``[lo, hi)`` of a stacked parameter, or the whole
    parameter when it is not stacked (then ``lo, hi = 0, 1``). ``block`` is how many layers
    one read should cover (a stacked array's chunk along the layers axis).
    """

    path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    stacked: bool
    read: Callable[[int, int], np.ndarray]
    block: int = 1


def natural_key(key: str) -> list[Any]:
    """Sort key that puts ``layers.2`` before ``layers.10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def is_stacked(path: str, layers_path: str) -> bool:
    """Whether ``path`` is a scanned parameter (``model.layers.x``, not ``model.layers.3.x``)."""
    prefix = layers_path + "."
    return path.startswith(prefix) and not path[len(prefix):].split(".")[0].isdigit()


def layer_path(path: str, layers_path: str, layer: int | None) -> str:
    """``model.layers.x`` -> ``model.layers.{layer}.x`` (unchanged when ``layer`` is None)."""
    if layer is None:
        return path
    return path.replace(layers_path + ".", f"{layers_path}.{layer}.", 1)


def hf_rule_for(rules: tuple[Rule, ...], path: str) -> tuple[str, Transform] | None:
    """The HF key and transform for one unstacked jaxtune parameter path."""
    for rule in rules:
        m = rule.match_target(path)
        if m:
            return rule.hf_key(m), rule.transform
    return None


def hf_groups(sources: list[ParamSource], config: Any, dtype: Any = None) -> list[TensorGroup]:
    """One :class:`TensorGroup` per parameter, in the order transformers would list them.

    ``dtype`` (a numpy dtype) is the written dtype; None keeps each parameter's dtype.
    Raises :class:`ExportError` listing parameters the family's table does not cover (e.g.
    LoRA adapters that were not merged).
    """
    family = get_family(config.model_type)
    rules = family.hf_table(config)
    groups, unmapped = [], []
    for src in sources:
        layers = list(range(src.shape[0])) if src.stacked else [None]
        per_layer = src.shape[1:] if src.stacked else src.shape
        keys, transform = [], None
        for layer in layers:
            found = hf_rule_for(rules, layer_path(src.path, family.layers_path, layer))
            if found is None:
                unmapped.append(layer_path(src.path, family.layers_path, layer))
                break
            keys.append(found[0])
            transform = found[1]
        if len(keys) != len(layers):
            continue
        out = np.dtype(dtype) if dtype is not None else np.dtype(src.dtype)
        specs = [TensorSpec(k, transform.hf_shape(per_layer), out) for k in keys]
        groups.append(TensorGroup(specs, _producer(src, transform)))
    if unmapped:
        raise ExportError(
            f"The {config.model_type} table has no Hugging Face key for {unmapped[:8]}"
            f"{' ...' if len(unmapped) > 8 else ''}; LoRA adapters must be merged (or written "
            "as a PEFT adapter) before a full-weight export."
        )
    groups.sort(key=lambda g: natural_key(g.specs[0].key))
    return groups


def _producer(src: ParamSource, transform: Transform) -> Callable[[], Iterator[np.ndarray]]:
    def produce() -> Iterator[np.ndarray]:
        if not src.stacked:
            yield transform.to_hf(np.asarray(src.read(0, 1)))
            return
        n = src.shape[0]
        step = max(1, src.block)
        for lo in range(0, n, step):
            block = np.asarray(src.read(lo, min(n, lo + step)))
            for i in range(block.shape[0]):
                yield transform.to_hf(block[i])
            del block

    return produce


# --------------------------------------------------------------------------- in memory


def host_array(x: jax.Array) -> np.ndarray:
    """A jax array on this host (gathered from every process when it is not addressable)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def model_sources(state: nnx.State, layers_path: str) -> list[ParamSource]:
    """Sources for the parameters of a model in memory (``nnx.state(model, nnx.Param)``)."""
    out = []
    for path, var in nnx.to_flat_state(state):
        name = ".".join(map(str, path))
        value = var.get_value() if isinstance(var, nnx.Variable) else var
        stacked = is_stacked(name, layers_path)

        def read(lo: int, hi: int, value=value, stacked=stacked) -> np.ndarray:
            return host_array(value[lo:hi] if stacked else value)

        out.append(ParamSource(name, tuple(value.shape), np.dtype(value.dtype), stacked, read))
    return out
