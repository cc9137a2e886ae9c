"""From model parameters to the HF tensors of an export, through the family's table in reverse.

A :class:`ParamSource` is one jaxtune parameter (stacked over layers and/or experts or not) and
a way to read it: from a model in memory, or from an Orbax checkpoint on disk (``run_dir.py``).
:func:`hf_groups` maps every source to its HF keys with the same table the loader uses
(``jaxtune.models.table.ParamTable`` over the family's rules), so import and export cannot
drift, and returns :class:`~jaxtune.export.safetensors_out.TensorGroup` s that read lazily: a
stacked parameter is read a block of its first axis at a time and written as one HF tensor per
stacked slice (layer, expert).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune.export.errors import ExportError
from jaxtune.export.safetensors_out import TensorGroup, TensorSpec
from jaxtune.models.family import family_table
from jaxtune.models.layers import WEIGHTS
from jaxtune.models.table import Transform
from jaxtune.sharding import host_array


@dataclass(frozen=True)
class ParamSource:
    """One jaxtune parameter: path, full shape, stored dtype and a reader.

    ``read(lo, hi)`` returns ``[lo, hi)`` of the first axis when ``stacked`` (any parameter
    with one can be read that way), or the whole parameter (then ``lo, hi = 0, 1``).
    ``block`` is how much of the first axis one read should cover (the stored chunk).
    """

    path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    stacked: bool
    read: Callable[[int, int], np.ndarray]
    block: int = 1


def read_whole(src: ParamSource) -> np.ndarray:
    """The whole parameter of a source."""
    return np.asarray(src.read(0, src.shape[0] if src.stacked else 1))


def natural_key(key: str) -> list[Any]:
    """Sort key that puts ``layers.2`` before ``layers.10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def hf_groups(sources: list[ParamSource], config: Any, dtype: Any = None) -> list[TensorGroup]:
    """One :class:`TensorGroup` per parameter, in the order transformers would list them.

    ``dtype`` (a numpy dtype) is the written dtype; None keeps each parameter's dtype.
    Parameters that are parts of one HF tensor (``Rule.part``) are joined into one group.
    Raises :class:`ExportError` listing parameters the family's table does not cover (e.g.
    LoRA adapters that were not merged).
    """
    table = family_table(config)
    groups, unmapped = [], []
    parts: dict[tuple[str, ...], dict[int, tuple[ParamSource, list]]] = {}
    for src in sources:
        entries = table.entries(src.path, src.shape)
        if entries is None:
            unmapped.append(src.path)
            continue
        rule = entries[0].rule
        if rule.part is not None:
            parts.setdefault(tuple(e.key for e in entries), {})[rule.part[0]] = (src, entries)
            continue
        depth = len(entries[0].index) if entries else 0
        out = np.dtype(dtype) if dtype is not None else np.dtype(src.dtype)
        shape = rule.hf_shape(src.shape[depth:])
        specs = [TensorSpec(e.key, shape, out) for e in entries]
        groups.append(TensorGroup(specs, _producer(src, rule.transform, depth)))
    for keys, found in parts.items():
        groups.append(_joined_group(keys, found, dtype))
    if unmapped:
        raise ExportError(
            f"The {config.model_type} table has no Hugging Face key for {unmapped[:8]}"
            f"{' ...' if len(unmapped) > 8 else ''}; LoRA adapters must be merged (or written "
            "as a PEFT adapter) before a full-weight export."
        )
    groups.sort(key=lambda g: natural_key(g.specs[0].key))
    return groups


def _joined_group(keys: tuple[str, ...], found: dict[int, tuple[ParamSource, list]],
                  dtype: Any) -> TensorGroup:
    """The HF tensors that several parameters are parts of, each part's slice side by side."""
    src0, entries0 = next(iter(found.values()))
    rule = entries0[0].rule
    n, axis = rule.part[1], rule.part[2]
    if sorted(found) != list(range(n)):
        raise ExportError(f"{keys[0]} is written from {n} parameters, and only parts "
                          f"{sorted(found)} are in the model.")
    depth = len(entries0[0].index)
    out = np.dtype(dtype) if dtype is not None else np.dtype(src0.dtype)
    shape = rule.hf_shape(src0.shape[depth:])
    producers = [_producer(found[k][0], found[k][1][0].rule.transform, depth) for k in range(n)]

    def produce() -> Iterator[np.ndarray]:
        for blocks in zip(*(p() for p in producers), strict=True):
            yield np.concatenate(blocks, axis=axis)

    return TensorGroup([TensorSpec(k, shape, out) for k in keys], produce)


def _producer(src: ParamSource, transform: Transform,
              depth: int) -> Callable[[], Iterator[np.ndarray]]:
    """HF tensors of one parameter in index order, reading a block of its first axis at a time
    (every stacked slice below the first axis comes from the block in memory)."""

    def produce() -> Iterator[np.ndarray]:
        if depth == 0:
            yield transform.to_hf(read_whole(src))
            return
        n = src.shape[0]
        step = max(1, src.block)
        for lo in range(0, n, step):
            block = np.asarray(src.read(lo, min(n, lo + step)))
            for index in itertools.product(*(range(k) for k in block.shape[:depth])):
                yield transform.to_hf(block[index])
            del block

    return produce


def iter_hf_tensors(model_or_state: Any, config: Any = None, *,
                    dtype: Any = None) -> Iterator[tuple[str, np.ndarray]]:
    """``(hf_key, array)`` for every parameter of a model in memory, in HF's key order, through
    the same table and transforms a full export writes; one slice on the host at a time.
    ``config`` is needed for a bare state."""
    if isinstance(model_or_state, nnx.Module):
        config = config or model_or_state.config
        state = nnx.state(model_or_state, WEIGHTS)
    else:
        state = model_or_state
    if config is None:
        raise ExportError("iter_hf_tensors needs the family config when given a bare state.")
    out = None if dtype is None else np.dtype(jnp.dtype(dtype))
    table = family_table(config)
    items: dict[str, list] = {}
    for src in model_sources(state):
        entries = table.entries(src.path, src.shape)
        if entries is None:
            hf_groups([src], config)  # raises the export's error naming the parameter
        for e in entries:
            items.setdefault(e.key, []).append((e.index, e.rule, src))
    for key in sorted(items, key=natural_key):
        pieces = []
        for index, rule, src in sorted(items[key], key=lambda it: (it[1].part or (0,))[0]):
            whole = np.asarray(src.read(index[0], index[0] + 1))[0][index[1:]] if index \
                else read_whole(src)
            pieces.append((rule, rule.transform.to_hf(whole)))
        rule = pieces[0][0]
        array = pieces[0][1] if rule.part is None else np.concatenate(
            [a for _, a in pieces], axis=rule.part[2])
        yield key, array if out is None else array.astype(out)


# --------------------------------------------------------------------------- in memory


def model_sources(state: nnx.State) -> list[ParamSource]:
    """Sources for the weights of a model in memory (``nnx.state(model, WEIGHTS)``: its
    parameters and buffers)."""
    out = []
    for path, var in nnx.to_flat_state(state):
        name = ".".join(map(str, path))
        value = var.get_value() if isinstance(var, nnx.Variable) else var
        stacked = value.ndim > 0  # a block of the first axis can be read on its own

        def read(lo: int, hi: int, value=value, stacked=stacked) -> np.ndarray:
            return host_array(value[lo:hi] if stacked else value)

        out.append(ParamSource(name, tuple(value.shape), np.dtype(value.dtype), stacked, read))
    return out
