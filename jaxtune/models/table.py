"""The HF <-> jaxtune parameter table: rules (regex -> target path + named transform).

A family's table is a list of :class:`Rule`. A rule's ``pattern`` matches HF checkpoint keys
(named groups such as ``(?P<i>\\d+)`` capture the layer); ``target`` is the jaxtune parameter
path, formatted with those groups; ``transform`` names the layout change. The same rules run
backwards for export (:meth:`Rule.hf_key`), so import and export cannot drift.

Paths are written for unstacked layers (``model.layers.{i}.…``); ``weights.py`` maps them to
the stacked ``layers`` axis when ``scan_layers`` is on.

A :class:`Transform` is a reshape of the HF tensor into "unflattened" axes followed by a
transpose: ``dst = unflatten(src).transpose(perm)``. That form lets the loader read any
rectangular block of ``dst`` (one device's shard) from a rectangular slice of ``src``.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class _Layout:
    perm: tuple[int, ...]  # dst axis i is unflattened axis perm[i]
    groups: tuple[tuple[int, ...], ...]  # src axis j is the product of unflattened axes groups[j]


class Transform(enum.Enum):
    """Named layout changes from an HF tensor to a jaxtune parameter."""

    COPY = "copy"  # same shape: norms, embeddings, MLP biases, o_proj bias
    LINEAR = "linear"  # torch Linear [out, in] -> kernel [in, out]
    LINEAR_SPLIT_OUT = "linear_split_out"  # [N*H, D] -> [D, N, H] (q/k/v_proj)
    LINEAR_SPLIT_IN = "linear_split_in"  # [D, N*H] -> [N, H, D] (o_proj)
    SPLIT_HEADS = "split_heads"  # [N*H] -> [N, H] (q/k/v biases)

    def layout(self, ndim: int) -> _Layout:
        """The (perm, groups) form of this transform for a ``ndim``-dim parameter."""
        if self is Transform.COPY:
            return _Layout(tuple(range(ndim)), tuple((a,) for a in range(ndim)))
        return {
            Transform.LINEAR: _Layout((1, 0), ((0,), (1,))),
            Transform.LINEAR_SPLIT_OUT: _Layout((2, 0, 1), ((0, 1), (2,))),
            Transform.LINEAR_SPLIT_IN: _Layout((1, 2, 0), ((0,), (1, 2))),
            Transform.SPLIT_HEADS: _Layout((0, 1), ((0, 1),)),
        }[self]

    def _unflat_shape(self, dst_shape: Sequence[int]) -> list[int]:
        lay = self.layout(len(dst_shape))
        unflat = [0] * len(dst_shape)
        for i, p in enumerate(lay.perm):
            unflat[p] = dst_shape[i]
        return unflat

    def hf_shape(self, dst_shape: Sequence[int]) -> tuple[int, ...]:
        """Shape of the HF tensor that becomes a parameter of shape ``dst_shape``."""
        unflat = self._unflat_shape(dst_shape)
        return tuple(math.prod(unflat[a] for a in g) for g in self.layout(len(dst_shape)).groups)

    def read_block(self, read: Callable[[tuple[slice, ...]], np.ndarray],
                   block: Sequence[slice], dst_shape: Sequence[int]) -> np.ndarray:
        """The ``block`` (slices with concrete bounds) of the parameter, read from HF slices.

        ``read(src_slices)`` returns that slice of the HF tensor. For a split axis only its
        outermost part is narrowed in the read; inner parts are cut after the reshape.
        """
        lay = self.layout(len(dst_shape))
        unflat = self._unflat_shape(dst_shape)
        u_block: list[slice] = [slice(0)] * len(unflat)
        for i, p in enumerate(lay.perm):
            u_block[p] = block[i]
        src_slices, read_shape, cut = [], [], []
        for g in lay.groups:
            outer, inner = g[0], g[1:]
            inner_size = math.prod(unflat[a] for a in inner)
            s = u_block[outer]
            src_slices.append(slice(s.start * inner_size, s.stop * inner_size))
            read_shape += [s.stop - s.start] + [unflat[a] for a in inner]
            cut += [slice(None)] + [u_block[a] for a in inner]
        data = read(tuple(src_slices)).reshape(read_shape)[tuple(cut)]
        return data.transpose(lay.perm)

    def to_hf(self, param: np.ndarray) -> np.ndarray:
        """The HF tensor for a whole parameter (inverse of loading)."""
        lay = self.layout(param.ndim)
        inverse = np.argsort(lay.perm)
        return param.transpose(inverse).reshape(self.hf_shape(param.shape))


@dataclass(frozen=True)
class Rule:
    """One line of a family's table.

    ``target=None`` marks a key that is known and deliberately not loaded (a duplicate of a
    tied embedding, a RoPE buffer recomputed from the config); export never writes it.
    """

    pattern: str
    target: str | None
    transform: Transform = Transform.COPY

    def match(self, hf_key: str) -> re.Match | None:
        return re.fullmatch(self.pattern, hf_key)

    def target_path(self, m: re.Match) -> str | None:
        return None if self.target is None else self.target.format(**m.groupdict())

    def match_target(self, path: str) -> re.Match | None:
        """Match a jaxtune parameter path against ``target`` (for export)."""
        if self.target is None:
            return None
        # Each {name} in the target takes the sub-pattern of the same group in ``pattern``.
        groups = dict(re.findall(r"\(\?P<(\w+)>([^)]*)\)", self.pattern))
        regex = re.sub(r"\\\{(\w+)\\\}", lambda g: f"(?P<{g.group(1)}>{groups[g.group(1)]})",
                       re.escape(self.target))
        return re.fullmatch(regex, path)

    def hf_key(self, m: re.Match) -> str:
        """The HF key for a target-path match: the pattern with its groups filled in."""
        key = re.sub(r"\(\?P<(\w+)>[^)]*\)", lambda g: "{" + g.group(1) + "}", self.pattern)
        return key.replace("\\.", ".").format(**m.groupdict())
