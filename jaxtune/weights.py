"""Strict, streaming Hugging Face weights in and out, driven by each family's table.

Loading (:func:`from_pretrained`):

1. resolve the folder (local path, or a hub id through ``huggingface_hub``'s cache);
2. ``config.json`` -> family config; the model is built abstractly (``nnx.eval_shape``);
3. every safetensors header is matched against the family's HF table *before* any data is
   read: every key consumed, every parameter filled, every shape and dtype checked, and all
   problems reported in one :class:`ModelFolderError`;
4. each parameter is created with ``jax.make_array_from_callback`` over its sharding; the
   callback reads only that device's block (``safe_open(...).get_slice``) and converts it to
   the requested dtype, so no host ever holds the whole model.

Pickled checkpoints (``.bin``) are never opened: unpickling runs arbitrary code.

Export (``jaxtune.export``) runs the same table (``jaxtune.models.table.ParamTable``) backwards.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from safetensors import safe_open

from jaxtune.dtypes import LOADABLE_CODES
from jaxtune.errors import JaxtuneError
from jaxtune.locate import ModelFolderError, hf_config_file, read_hf_config, resolve_model_dir
from jaxtune.models import Family, abstract_model, get_family, init_model
from jaxtune.models.build import single_device_mesh
from jaxtune.models.family import family_table
from jaxtune.models.table import Rule
from jaxtune.sharding import Rules, state_shardings

__all__ = ["ModelFolderError", "checkpoint_index", "from_pretrained", "init_model",
           "load_hf_config", "resolve_model_dir"]

SAFETENSORS_DTYPES = LOADABLE_CODES  # the safetensors codes a checkpoint may hold
INDEX_FILE = "model.safetensors.index.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


# --------------------------------------------------------------------------- locating
# Paths and hub ids are resolved in jaxtune.locate (light: every command checks them first).


def load_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of a model folder (or hub id) as a dict."""
    path = Path(path)
    file = path if path.is_file() else hf_config_file(resolve_model_dir(path))
    return read_hf_config(file)


# --------------------------------------------------------------------------- the checkpoint


@dataclass(frozen=True)
class TensorInfo:
    """Where one checkpoint tensor lives, from its safetensors header (no data read)."""

    file: Path
    key: str
    dtype: str  # safetensors dtype code: F32, BF16, F16, ...
    shape: tuple[int, ...]


def _pickle_error(model_dir: Path, files: list[Path]) -> ModelFolderError:
    names = ", ".join(f.name for f in files[:5])
    return ModelFolderError(
        f"{model_dir} has only PyTorch pickle weights ({names}); jaxtune never unpickles "
        "files (loading a pickle can run arbitrary code). Convert the folder to safetensors "
        "once, e.g. in Python with transformers: "
        f"AutoModelForCausalLM.from_pretrained('{model_dir}').save_pretrained('OUT_DIR') "
        "(writes model.safetensors), then load OUT_DIR."
    )


def checkpoint_index(model_dir: Path) -> dict[str, TensorInfo]:
    """Every tensor in the folder's safetensors (single file or indexed shards)."""
    index_file = model_dir / INDEX_FILE
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text()).get("weight_map", {})
        files = sorted({model_dir / f for f in weight_map.values()})
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise ModelFolderError(f"{index_file} lists shard files that are missing: {absent}.")
    else:
        weight_map = None
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        pickles = sorted(f for f in model_dir.iterdir() if f.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise _pickle_error(model_dir, pickles)
        raise ModelFolderError(f"{model_dir} has no *.safetensors weights.")
    tensors: dict[str, TensorInfo] = {}
    problems: list[str] = []
    for file in files:
        with safe_open(file, framework="numpy") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                if key in tensors:
                    problems.append(f"{key} is in both {tensors[key].file.name} and {file.name}")
                elif weight_map is not None and weight_map.get(key) != file.name:
                    problems.append(f"{key} is in {file.name} but {INDEX_FILE} says "
                                    f"{weight_map.get(key)}")
                tensors[key] = TensorInfo(file, key, sl.get_dtype(), tuple(sl.get_shape()))
    if weight_map is not None:
        problems += [f"{INDEX_FILE} lists {k} in {v}, which lacks it"
                     for k, v in weight_map.items() if k not in tensors]
    if problems:
        raise ModelFolderError(f"{model_dir}: inconsistent safetensors files:\n  "
                              + "\n  ".join(problems))
    return tensors


@dataclass
class _ParamPlan:
    """Where every slice of one parameter comes from: one HF tensor per index into its leading
    stacked axes (layers under scan, experts, ...; ``()`` for an unstacked parameter)."""

    shape: tuple[int, ...]
    depth: int = 0  # how many leading axes are stacked
    rule: Rule | None = None  # its transform and, for a part of an HF tensor, which part
    sources: dict[tuple[int, ...], TensorInfo] = field(default_factory=dict)

    def indices(self) -> Iterator[tuple[int, ...]]:
        return itertools.product(*(range(n) for n in self.shape[:self.depth]))


def _flat_params(state: nnx.State) -> dict[str, nnx.Variable]:
    return {".".join(map(str, p)): v for p, v in nnx.to_flat_state(state)}


def plan_load(family: Family, cfg: Any, abstract_state: nnx.State,
              tensors: Mapping[str, TensorInfo], *, scan_layers: bool,
              where: str) -> dict[str, _ParamPlan]:
    """Match checkpoint keys to parameters; raise one error listing every problem."""
    table = family_table(cfg, scan_layers)
    plans: dict[str, _ParamPlan] = {}
    for path, var in _flat_params(abstract_state).items():
        shape = tuple(var.get_value().shape)
        plans[path] = _ParamPlan(shape, table.stack_depth(path) or 0)
    unexpected, wrong, dtypes = [], [], []
    for key in sorted(tensors, key=_natural):
        info = tensors[key]
        locations = table.locate_all(key)
        if not locations:
            unexpected.append(f"{key} (no rule in the {family.name} table)")
            continue
        for loc in locations:
            if loc.path is None:
                continue  # known, deliberately not loaded
            plan = plans.get(loc.path)
            if plan is None or len(loc.index) != plan.depth or any(
                    i >= n for i, n in zip(loc.index, plan.shape, strict=False)):
                unexpected.append(f"{key} (the model built from config.json has no "
                                  f"{loc.path}{list(loc.index) if loc.index else ''})")
                break
            want = loc.rule.hf_shape(plan.shape[plan.depth:])
            if info.shape != want:
                wrong.append(f"{key}: file has {list(info.shape)}, the model needs {list(want)}")
            if info.dtype not in SAFETENSORS_DTYPES:
                dtypes.append(f"{key}: {info.dtype} (supported: {', '.join(SAFETENSORS_DTYPES)})")
            plan.rule = loc.rule
            plan.sources[loc.index] = info
    missing = []
    for path, plan in plans.items():
        entries = table.entries(path, plan.shape) or []
        keys = {e.index: e.key for e in entries}
        for index in plan.indices():
            if index not in plan.sources:
                missing.append(f"{keys.get(index, '?')} (for {path}"
                               f"{list(index) if index else ''})")
    sections = [("missing keys", missing), ("unexpected keys", unexpected),
                ("wrong shapes", wrong), ("unsupported dtypes", dtypes)]
    problems = [(title, items) for title, items in sections if items]
    if problems:
        count = sum(len(items) for _, items in problems)
        lines = [f"{where} does not match the {cfg.model_type} model its config.json describes "
                 f"({count} problem{'s' if count > 1 else ''}):"]
        for title, items in problems:
            lines.append(f"  {title} ({len(items)}):")
            lines += [f"    {item}" for item in items]
        lines.append("  Check that config.json belongs to these weights, or fix the overrides.")
        raise ModelFolderError("\n".join(lines))
    return plans


def _natural(key: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


# --------------------------------------------------------------------------- reading


def _read_slices(info: TensorInfo, slices: tuple[slice, ...]) -> np.ndarray:
    # One open per read: the file's memory map (and the pages it touched) is released right
    # after, so a big single-file checkpoint never counts fully in the process's RSS.
    with safe_open(info.file, framework="numpy") as f:
        return f.get_slice(info.key)[slices]


def read_block(plan: _ParamPlan, block: tuple[slice, ...], dtype: np.dtype) -> np.ndarray:
    """One device's block of a parameter: each stacked slice read from its own HF tensor."""
    lead, rest = block[:plan.depth], block[plan.depth:]
    inner = plan.shape[plan.depth:]
    out = np.empty([s.stop - s.start for s in block], dtype=dtype)
    rule = plan.rule
    for index in itertools.product(*(range(s.start, s.stop) for s in lead)):
        info = plan.sources[index]
        local = tuple(i - s.start for i, s in zip(index, lead, strict=True))
        out[local] = rule.transform.read_block(
            lambda s, info=info: _read_slices(info, rule.part_slices(s, inner)), rest, inner)
    return out


def _make_array(plan: _ParamPlan, sharding: jax.sharding.Sharding, dtype: np.dtype) -> jax.Array:
    cache: dict[tuple, np.ndarray] = {}  # replicated shards are read once

    def callback(index: tuple[slice, ...]) -> np.ndarray:
        block = tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, plan.shape, strict=True))
        key = tuple((s.start, s.stop) for s in block)
        if key not in cache:
            cache[key] = read_block(plan, block, dtype)
        return cache[key]

    return jax.make_array_from_callback(plan.shape, sharding, callback)


def _as_dtype(dtype: Any) -> np.dtype:
    try:
        return np.dtype(jnp.dtype(dtype))
    except TypeError:
        raise JaxtuneError(f"dtype '{dtype}' is not a dtype; use float32, bfloat16 or "
                           "float16.") from None


def from_pretrained(
    path_or_hub_id: str | os.PathLike,
    dtype: Any = "float32",
    mesh: Mesh | None = None,
    *,
    compute_dtype: Any = None,
    scan_layers: bool = False,
    remat: str = "none",
    attention: str = "auto",
    rules: Rules | None = None,
    **overrides: Any,
) -> nnx.Module:
    """Load an HF checkpoint (folder or hub id) as a Flax NNX model on ``mesh``.

    Args:
      path_or_hub_id: a folder with config.json and *.safetensors, or a hub id.
      dtype: parameter dtype (float32, bfloat16, float16); weights are converted on read.
      mesh: the device mesh (default: the first device); parameters are sharded by ``rules``.
      compute_dtype: activation dtype (default: ``dtype``).
      scan_layers, remat, attention: model options (see ``jaxtune.models.llama.model``).
      rules: logical-axis rules (default ``jaxtune.sharding.DEFAULT_RULES``).
      **overrides: config.json fields to replace before the model is built.

    Returns:
      The model; ``model(input_ids)`` gives float32 logits ``[batch, seq, vocab]``.
    """
    model_dir = resolve_model_dir(path_or_hub_id)
    hf_config = {**load_hf_config(model_dir), **overrides}
    family = get_family(hf_config.get("model_type"))
    cfg = family.config_cls.from_hf_config(hf_config)
    tensors = checkpoint_index(model_dir)
    param_dtype = _as_dtype(dtype)
    abstract = abstract_model(cfg, param_dtype=param_dtype,
                              compute_dtype=_as_dtype(compute_dtype or dtype),
                              scan_layers=scan_layers, remat=remat, attention=attention)
    graphdef, abstract_state = nnx.split(abstract)
    plans = plan_load(family, cfg, abstract_state, tensors, scan_layers=scan_layers,
                      where=str(model_dir))
    shardings = _flat_params(state_shardings(abstract_state, mesh or single_device_mesh(),
                                             rules))
    flat = []
    for path, var in nnx.to_flat_state(abstract_state):
        name = ".".join(map(str, path))
        flat.append((path, var.replace(_make_array(plans[name], shardings[name], param_dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
