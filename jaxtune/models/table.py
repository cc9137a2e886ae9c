"""The HF <-> jaxtune parameter table: rules (regex -> target path + named transform).

A family's table is a list of :class:`Rule`. A rule's ``pattern`` matches HF checkpoint keys
(named groups such as ``(?P<i>\\d+)`` capture the layer); ``target`` is the jaxtune parameter
path, formatted with those groups; ``transform`` names the layout change. The same rules run
backwards for export (:meth:`ParamTable.entries`), so import and export cannot drift.

Stacked axes. A placeholder in a rule's pattern names which leading axis of the parameter it
indexes (:data:`STACK_AXES`): ``{i}`` is ``layers``, ``{j}`` is ``experts``. Targets are written
for unstacked layers (``model.layers.{i}.mlp.experts.gate_proj.kernel``): under ``scan_layers``
the ``.{i}`` step leaves the path and becomes the parameter's first axis. A placeholder that is
in the pattern but not in the target (``{j}`` above) always stacks: every HF expert tensor
``...experts.{j}.gate_proj.weight`` is one slice of the one ``[E, ...]`` parameter (``[L, E,
...]`` under scan). :class:`ParamTable` is the one place that turns an HF key into (parameter
path, index into its stacked axes) and a parameter back into its HF keys; the loader (including
per-device partial reads), export, and LoRA/PEFT naming all use it.

A :class:`Transform` is a reshape of the HF tensor into "unflattened" axes followed by a
transpose: ``dst = unflatten(src).transpose(perm)``. That form lets the loader read any
rectangular block of ``dst`` (one device's shard) from a rectangular slice of ``src``.

Layer groups. A family whose layers are not all alike (Gemma 4: sliding and full layers of
different shapes, layers without key/value projections) stacks them, under ``scan_layers``,
in several modules, one per kind of layer: ``model.layers.<group>`` with each parameter
``[layers of that group, ...]``. ``layer_groups`` (per HF layer ``i``: its group and its index
in that group) tells the table so; the scanned form of ``model.layers.{i}.<rest>`` is then
``model.layers.<group>.<rest>`` at that index. Without it the scanned form drops ``.{i}``.

Parts. An HF tensor that holds several parameters side by side (transformers' fused
``gate_up_proj`` of Gemma 4's experts: gate rows, then up rows) is matched by one rule per
parameter, each naming its ``part`` (block ``k`` of ``n`` equal blocks along an HF axis): the
loader reads each parameter's block, and export joins them again.
"""

from __future__ import annotations

import enum
import functools
import itertools
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
    EXPERTS_LINEAR = "experts_linear"  # [E, out, in] -> [E, in, out] (fused expert weights)

    def layout(self, ndim: int) -> _Layout:
        """The (perm, groups) form of this transform for a ``ndim``-dim parameter."""
        if self is Transform.COPY:
            return _Layout(tuple(range(ndim)), tuple((a,) for a in range(ndim)))
        return {
            Transform.LINEAR: _Layout((1, 0), ((0,), (1,))),
            Transform.LINEAR_SPLIT_OUT: _Layout((2, 0, 1), ((0, 1), (2,))),
            Transform.LINEAR_SPLIT_IN: _Layout((1, 2, 0), ((0,), (1, 2))),
            Transform.SPLIT_HEADS: _Layout((0, 1), ((0, 1),)),
            Transform.EXPERTS_LINEAR: _Layout((0, 2, 1), ((0,), (1,), (2,))),
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
    ``part=(k, n, axis)``: the parameter is block ``k`` of ``n`` equal blocks of the HF tensor
    along its ``axis``; one rule per block matches the same key (see the module docstring).
    """

    pattern: str
    target: str | None
    transform: Transform = Transform.COPY
    part: tuple[int, int, int] | None = None

    def hf_shape(self, dst_shape: Sequence[int]) -> tuple[int, ...]:
        """Shape of the whole HF tensor (all its parts) for a parameter of ``dst_shape``."""
        shape = list(self.transform.hf_shape(dst_shape))
        if self.part is not None:
            shape[self.part[2]] *= self.part[1]
        return tuple(shape)

    def part_slices(self, slices: tuple[slice, ...],
                    dst_shape: Sequence[int]) -> tuple[slice, ...]:
        """``slices`` of this rule's block (of a parameter of ``dst_shape``) as slices of the
        whole HF tensor."""
        if self.part is None:
            return slices
        k, _, axis = self.part
        offset = k * self.transform.hf_shape(dst_shape)[axis]
        out = list(slices)
        out[axis] = slice(out[axis].start + offset, out[axis].stop + offset)
        return tuple(out)

    def match(self, hf_key: str) -> re.Match | None:
        return re.fullmatch(self.pattern, hf_key)



#: Placeholder name -> the logical axis it stacks (the parameter's leading axes, in this order).
STACK_AXES = {"i": "layers", "j": "experts"}


def _pattern_groups(pattern: str) -> list[str]:
    return re.findall(r"\(\?P<(\w+)>", pattern)


def _target_fields(target: str) -> set[str]:
    return set(re.findall(r"\{(\w+)\}", target))


@dataclass(frozen=True)
class Location:
    """Where one HF tensor lives: a parameter and an index into its leading stacked axes."""

    path: str  # the parameter's dotted path in the model as built (stacked or not)
    index: tuple[int, ...]  # one entry per stacked axis (layers under scan, then experts ...)
    rule: Rule


@dataclass(frozen=True)
class HFEntry:
    """One HF tensor of a parameter: its key, its index into the stacked axes, its rule."""

    key: str
    index: tuple[int, ...]
    rule: Rule


#: The field of a scanned template that names a layer group (``model.layers.{__g}...``).
GROUP = "__g"


class ParamTable:
    """A family's rules bound to a model layout.

    ``layers_path`` is the module that holds the layers (``model.layers``); ``scan_layers``
    says whether they are stacked (needed only to go from HF keys to parameters: going back, a
    parameter's path says whether it is stacked). ``layer_groups``: per HF layer, ``(group,
    index in the group)`` of its stacked module under scan (see the module docstring); None
    when all layers are one stack.
    """

    def __init__(self, rules: Sequence[Rule], *, layers_path: str = "model.layers",
                 scan_layers: bool = False,
                 layer_groups: Sequence[tuple[str, int]] | None = None):
        self.rules = tuple(rules)
        self.layers_path = layers_path
        self.scan_layers = scan_layers
        self.layer_groups = tuple(layer_groups) if layer_groups is not None else None
        self._layer_of = ({g: i for i, g in enumerate(self.layer_groups)}
                          if self.layer_groups is not None else None)
        self._templates = [self._templates_of(r) for r in self.rules]

    def _templates_of(self, rule: Rule) -> list[tuple[str, tuple[str, ...]]]:
        """``(target template, stacked placeholder names in axis order)`` for both layouts."""
        if rule.target is None:
            return []
        fields = _target_fields(rule.target)
        stacked = tuple(g for g in _pattern_groups(rule.pattern)
                        if g not in fields and g in STACK_AXES)
        unknown = [g for g in _pattern_groups(rule.pattern)
                   if g not in fields and g not in STACK_AXES]
        if unknown:
            raise ValueError(f"rule {rule.pattern}: groups {unknown} are neither in the target "
                             f"nor stacking placeholders {sorted(STACK_AXES)}.")
        out = [(rule.target, stacked)]
        if "i" in fields and ".{i}" in rule.target:  # the scanned form: layers leave the path
            step = "" if self.layer_groups is None else ".{" + GROUP + "}"
            out.append((rule.target.replace(".{i}", step, 1), ("i",) + stacked))
        return out

    def _layout(self, rule_index: int) -> tuple[str, tuple[str, ...]]:
        templates = self._templates[rule_index]
        return templates[-1] if self.scan_layers and len(templates) > 1 else templates[0]

    # ---------------------------------------------------------------- HF key -> parameter

    def locate(self, hf_key: str) -> Location | None:
        """The parameter slice an HF key loads into; ``Location.path`` is None for keys the
        table knows and deliberately skips. None when no rule matches. (A key holding several
        parts has one location per part: :meth:`locate_all`.)"""
        found = self.locate_all(hf_key)
        return found[0] if found else None

    def locate_all(self, hf_key: str) -> list[Location]:
        """Every parameter slice an HF key loads into: one, or one per part (empty when no
        rule matches; one location with path None for a key deliberately skipped)."""
        out = []
        for n, rule in enumerate(self.rules):
            m = rule.match(hf_key)
            if m is None:
                continue
            if rule.target is None:
                return out or [Location(None, (), rule)]  # type: ignore[arg-type]
            template, stacked = self._layout(n)
            groups = m.groupdict()
            index = [int(groups[g]) for g in stacked]
            if self.layer_groups is not None and stacked[:1] == ("i",) and \
                    "{" + GROUP + "}" in template:
                layer = int(groups["i"])
                if layer >= len(self.layer_groups):
                    return []  # a layer the model does not have: unexpected
                groups[GROUP], index[0] = self.layer_groups[layer]
            out.append(Location(template.format(**groups), tuple(index), rule))
            if rule.part is None:
                break
        return out

    # ---------------------------------------------------------------- parameter -> HF keys

    def entries(self, path: str, shape: Sequence[int]) -> list[HFEntry] | None:
        """Every HF tensor of the parameter at ``path`` (stacked or not), in index order;
        None when no rule covers it."""
        for n, rule in enumerate(self.rules):
            for template, stacked in self._templates[n]:
                m = _match_template(rule, template, path)
                if m is None:
                    continue
                if len(shape) < len(stacked):
                    return None
                fields = m.groupdict()
                group = fields.pop(GROUP, None)
                out = []
                for index in itertools.product(*(range(shape[k]) for k in range(len(stacked)))):
                    names = dict(zip(stacked, index, strict=True))
                    if group is not None:
                        names["i"] = self._layer_of.get((group, index[0]))
                        if names["i"] is None:
                            return None  # more stacked layers than the groups say
                    groups = {**fields, **{g: str(v) for g, v in names.items()}}
                    out.append(HFEntry(_fill_pattern(rule.pattern, groups), index, rule))
                return out
        return None

    def stack_depth(self, path: str) -> int | None:
        """How many leading axes of the parameter at ``path`` are stacked (None: unmapped)."""
        for n, rule in enumerate(self.rules):
            for template, stacked in self._templates[n]:
                if _match_template(rule, template, path) is not None:
                    return len(stacked)
        return None

    def hf_module_names(self, kernel_path: str, shape: Sequence[int]) -> list[str] | None:
        """HF module names (``model.layers.3.self_attn.q_proj``) of a Linear's kernel, one per
        stacked slice: what LoRA targets and PEFT adapters are named by."""
        entries = self.entries(kernel_path, shape)
        if entries is None:
            return None
        return [e.key.removesuffix(".weight") for e in entries]


def _match_template(rule: Rule, template: str, path: str) -> re.Match | None:
    """Match a parameter path against a target template; each ``{name}`` takes the
    sub-pattern of the same group in the rule's pattern."""
    return _template_regex(rule.pattern, template).fullmatch(path)


@functools.lru_cache(maxsize=4096)
def _template_regex(pattern: str, template: str) -> re.Pattern:
    groups = dict(re.findall(r"\(\?P<(\w+)>([^)]*)\)", pattern))
    groups[GROUP] = r"[A-Za-z_]\w*"  # a layer group's name (never a layer number)
    return re.compile(re.sub(r"\\\{(\w+)\\\}",
                             lambda g: f"(?P<{g.group(1)}>{groups[g.group(1)]})",
                             re.escape(template)))


def _fill_pattern(pattern: str, groups: dict[str, str]) -> str:
    key = re.sub(r"\(\?P<(\w+)>[^)]*\)", lambda g: "{" + g.group(1) + "}", pattern)
    return key.replace("\\.", ".").format(**groups)
