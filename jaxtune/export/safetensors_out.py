"""Streaming safetensors writer: shards and index written one tensor at a time.

``safetensors.save_file`` needs every tensor of a file in memory at once. Here the shapes and
dtypes of all tensors are known before any data is read (they follow from the model's
structure), so each file's header is written first and the tensors are appended as they are
produced. Peak memory is one tensor, whatever the model's size.

The layout is what ``transformers``' ``save_pretrained`` writes: ``model.safetensors`` when
everything fits one shard, else ``model-0000k-of-0000n.safetensors`` plus
``model.safetensors.index.json`` (``metadata.total_size``, ``metadata.total_parameters`` and a
``weight_map``), each file's header carrying ``{"format": "pt"}``.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxtune.dtypes import SAFETENSORS_CODES
from jaxtune.export.errors import ExportError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: str | int) -> int:
    """Bytes in ``"5GB"`` (decimal, as transformers reads it), ``"500MiB"`` or ``1000``."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise ExportError(f"max shard size '{size}' is not a size; write e.g. 5GB, 500MB, 2GiB.")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])


def dtype_code(dtype: np.dtype) -> str:
    try:
        return SAFETENSORS_CODES[np.dtype(dtype).name]
    except KeyError:
        raise ExportError(f"dtype {dtype} cannot be written to safetensors.") from None


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the output: its key, shape and dtype (known before it is read)."""

    key: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


@dataclass
class TensorGroup:
    """Tensors produced together (e.g. every layer of one stacked parameter).

    ``produce()`` yields one array per spec, in order; each is cast to its spec's dtype on
    write. Grouping lets a source read a stacked parameter in chunk-sized blocks of layers.
    """

    specs: list[TensorSpec]
    produce: Callable[[], Iterator[np.ndarray]]


def _shard(groups: list[TensorGroup], max_bytes: int) -> list[list[TensorSpec]]:
    """Specs split into files of at most ``max_bytes`` (a bigger tensor gets its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in (s for g in groups for s in g.specs):
        if shards[-1] and size + spec.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _header(specs: list[TensorSpec]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        header[spec.key] = {"dtype": dtype_code(spec.dtype), "shape": list(spec.shape),
                            "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data to 8 bytes
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors(out_dir: Path, groups: list[TensorGroup], max_shard_size: str | int,
                      prefix: str = "model") -> dict[str, str]:
    """Write ``groups`` as one file or indexed shards in ``out_dir``; returns the weight map.

    Keys must be unique. Arrays are checked against their specs as they arrive.
    """
    specs = [s for g in groups for s in g.specs]
    seen: set[str] = set()
    dupes = [s.key for s in specs if s.key in seen or seen.add(s.key)]
    if dupes:
        raise ExportError(f"internal: tensors {dupes} would be written twice.")
    shards = _shard(groups, parse_size(max_shard_size))
    n = len(shards)
    names = ([f"{prefix}.safetensors"] if n == 1 else
             [f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
    weight_map = {s.key: name for name, shard in zip(names, shards, strict=True) for s in shard}
    arrays = _arrays(groups)
    for name, shard in zip(names, shards, strict=True):
        with open(out_dir / name, "wb") as f:
            f.write(_header(shard))
            for spec in shard:
                spec_, array = next(arrays)
                assert spec_ is spec
                np.ascontiguousarray(array.astype(spec.dtype, copy=False)).tofile(f)
                del array
    if n > 1:
        index = {"metadata": {"total_parameters": sum(math.prod(s.shape) for s in specs),
                              "total_size": sum(s.nbytes for s in specs)},
                 "weight_map": dict(sorted(weight_map.items(), key=lambda kv: kv[0]))}
        (out_dir / f"{prefix}.safetensors.index.json").write_text(
            json.dumps(index, indent=2) + "\n")
    return weight_map


_END = object()


def _arrays(groups: list[TensorGroup]) -> Iterator[tuple[TensorSpec, np.ndarray]]:
    """Each group's arrays in order, checked against their specs.

    No reference outlives its write: a loop variable still bound while the next tensor is
    read would hold two tensors at once, and a producer left suspended after its last array
    would keep its block of layers.
    """
    for group in groups:
        produced = group.produce()
        for spec in group.specs:
            array = next(produced, _END)
            if array is _END:
                raise ExportError(f"internal: {spec.key} was never produced.")
            if tuple(array.shape) != tuple(spec.shape):
                raise ExportError(f"internal: {spec.key} has shape {list(array.shape)}, "
                                  f"expected {list(spec.shape)}.")
            yield spec, array
            del array
        if next(produced, _END) is not _END:  # also lets the producer free its block
            raise ExportError(f"internal: more arrays than specs after {group.specs[-1].key}.")
        del produced
