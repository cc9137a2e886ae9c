"""Reading a run directory: the one reader that export, generate, eval, RL and distillation use.

A run directory (``run.output_dir``) holds ``config.yaml`` and ``checkpoints/<step>/`` (or the
``checkpoint.dir`` the config names), laid out by ``jaxtune.checkpoint``.

- :func:`open_run` gives a step's :class:`RunCheckpoint`: the config saved with it and its
  arrays on disk, read straight from Orbax's files with TensorStore one parameter (for stacked
  layers, one chunk-sized block of layers) at a time, so one CPU host can export a checkpoint
  written by a whole pod without ever holding the model.
- :func:`base_model` names the model the run started from (its folder, ``config.json``, family
  and the family config the run trained).
- :func:`load_run` builds the trained model in memory: a LoRA run's adapters applied to the
  unquantised base without merging, a full fine-tune's parameters as saved; with the run's
  tokenizer (chat-template override included) and the base's generation config.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from etils import epath

from jaxtune.checkpoint import ITEMS
from jaxtune.config import TrainConfig, config_from_dict, load_config
from jaxtune.errors import JaxtuneError


class RunDirError(JaxtuneError):
    """A run directory, or the step asked for, is missing or cannot be read."""


@dataclass(frozen=True)
class SavedArray:
    """One array of a checkpoint's ``state`` item, from Orbax's metadata (nothing read)."""

    name: str  # Orbax's param name, e.g. params.model.norm.scale.value
    shape: tuple[int, ...]
    dtype: np.dtype
    chunk_shape: tuple[int, ...]


@dataclass
class RunCheckpoint:
    """One complete checkpoint step of a run, ready to be read."""

    run_dir: Path
    directory: epath.Path  # the checkpoints folder
    step: int
    config: TrainConfig  # the config saved with this step
    meta: dict[str, Any]
    arrays: dict[str, SavedArray]
    _flags: tuple[bool, bool] = (True, False)  # (use_ocdbt, use_zarr3)

    @property
    def state_dir(self) -> epath.Path:
        return self.directory / str(self.step) / "state"

    def find(self, path: str) -> SavedArray | None:
        """The saved array of model parameter ``path`` (trainable ``params`` or ``frozen``)."""
        for item in ("params", "frozen"):
            for name in (f"{item}.{path}.value", f"{item}.{path}"):
                if name in self.arrays:
                    return self.arrays[name]
        return None

    def open(self, name: str):
        """A TensorStore handle on a saved array (no data read until sliced and read)."""
        import tensorstore as ts

        use_ocdbt, use_zarr3 = self._flags
        base = _kvstore_url(self.state_dir)
        kvstore: Any = ({"driver": "ocdbt", "base": base, "path": name} if use_ocdbt
                        else base + name)
        spec = {"driver": "zarr3" if use_zarr3 else "zarr", "kvstore": kvstore}
        # No cache: a chunk is decoded, copied out and dropped.
        context = ts.Context({"cache_pool": {"total_bytes_limit": 0}})
        try:
            return ts.open(spec, open=True, read=True, context=context).result()
        except Exception as e:  # noqa: BLE001 -- TensorStore raises ValueError / its own
            raise RunDirError(f"Cannot read {name} from {self.state_dir}: {e}") from None

    def read_float32(self, saved: SavedArray) -> np.ndarray:
        """A saved array, whole, as float32 (adapters and other small arrays)."""
        return np.asarray(self.open(saved.name).read().result()).astype(np.float32)

    def source(self, path: str):
        """A lazy :class:`ParamSource` for model parameter ``path`` read from this step; reads
        go by blocks of the first axis (a stacked parameter's chunk along layers)."""
        from jaxtune.export.tensors import ParamSource

        saved = self.find(path)
        assert saved is not None
        stacked = len(saved.shape) > 0

        def read(lo: int, hi: int) -> np.ndarray:
            # A handle per read: a live handle keeps its last chunk's buffers (as much again
            # as the tensor), so it is dropped as soon as the data is out.
            store = self.open(saved.name)
            view = store[lo:hi] if stacked else store
            return np.asarray(view.read().result())

        block = saved.chunk_shape[0] if stacked and saved.chunk_shape else 1
        return ParamSource(path, saved.shape, saved.dtype, stacked, read, max(1, block))


def _kvstore_url(path: epath.Path) -> str:
    text = str(path)
    if "://" in text:
        return text.rstrip("/") + "/"
    return "file://" + str(Path(text).resolve()) + "/"


def _read_run_config(run_dir: Path) -> TrainConfig:
    file = run_dir / "config.yaml"
    if not file.is_file():
        raise RunDirError(
            f"{run_dir} is not a jaxtune run directory: it has no config.yaml. Give the "
            "run.output_dir of a training run (the folder holding config.yaml and checkpoints/)."
        )
    return load_config(str(file))


def _complete(step_dir: epath.Path) -> bool:
    needed = ["_CHECKPOINT_METADATA", "state/_METADATA", *ITEMS[1:]]
    return all((step_dir / n).exists() for n in needed)


def complete_steps(directory: epath.Path) -> list[int]:
    """Steps under ``directory`` whose checkpoint is complete (as ``jaxtune.checkpoint``)."""
    if not directory.exists():
        return []
    return sorted(int(p.name) for p in directory.iterdir()
                  if p.name.isdigit() and p.is_dir() and _complete(p))


def open_run(run_dir: str | Path, step: int | None = None) -> RunCheckpoint:
    """The checkpoint of ``step`` (default: the latest complete one) of a run directory."""
    run_dir = Path(run_dir).expanduser().absolute()  # TensorStore wants absolute paths
    if not run_dir.is_dir():
        raise RunDirError(
            f"Run directory {run_dir} does not exist. A training run writes it (its "
            "run.output_dir, holding config.yaml and checkpoints/): train first, e.g. "
            "`jaxtune train configs/quickstart.yaml` writes runs/quickstart, or give the "
            "run.output_dir of an existing run.")
    cfg = _read_run_config(run_dir)
    # checkpoint.dir when set; else the given folder's checkpoints/, so a run directory that
    # was moved or copied still exports.
    directory = epath.Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else \
        epath.Path(run_dir / "checkpoints")
    steps = complete_steps(directory)
    if not steps:
        raise RunDirError(
            f"{directory} holds no complete checkpoint, so there is nothing to export from "
            f"{run_dir}. Train first (checkpoints are saved at the end of training unless "
            "checkpoint.enabled is false), or point at the run that has them."
        )
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise RunDirError(f"{directory} has no complete checkpoint of step {step}; complete "
                          f"steps: {', '.join(map(str, steps))}.")
    import orbax.checkpoint as ocp

    step_dir = directory / str(step)
    saved_cfg = ocp.JsonCheckpointHandler().restore(step_dir / "config")
    meta = ocp.JsonCheckpointHandler().restore(step_dir / "meta")
    return RunCheckpoint(run_dir, directory, step, config_from_dict(saved_cfg), meta,
                         _saved_arrays(step_dir / "state"), _storage_flags(step_dir / "state"))


def _saved_arrays(state_dir: epath.Path) -> dict[str, SavedArray]:
    import jax
    import orbax.checkpoint as ocp

    meta = ocp.StandardCheckpointHandler().metadata(state_dir)
    tree = getattr(meta, "tree", meta)
    out = {}
    for m in jax.tree.leaves(tree):
        name = getattr(m, "name", None)
        if name is None or getattr(m, "shape", None) is None:
            continue
        storage = getattr(m, "storage", None)
        chunk = tuple(getattr(storage, "chunk_shape", None) or m.shape)
        out[name] = SavedArray(name, tuple(m.shape), np.dtype(m.dtype), chunk)
    return out


def _storage_flags(state_dir: epath.Path) -> tuple[bool, bool]:
    """Orbax's (use_ocdbt, use_zarr3) for this checkpoint, from its ``_METADATA``."""
    try:
        meta = json.loads((state_dir / "_METADATA").read_text())
    except (OSError, ValueError):
        return True, False
    return bool(meta.get("use_ocdbt", True)), bool(meta.get("use_zarr3", False))


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class BaseModel:
    """The model a run started from, as its config names it."""

    directory: Path  # the base model's folder (a hub id resolved to its cached folder)
    hf_config: dict[str, Any]  # its config.json as saved (without the run's overrides)
    family: Any  # jaxtune.models.Family
    config: Any  # the family config the run trained (config.json plus model.overrides)


def base_model(ckpt: RunCheckpoint) -> BaseModel:
    """The run's base model: folder, ``config.json``, family and the config it trained."""
    from jaxtune.models import get_family
    from jaxtune.weights import load_hf_config, resolve_model_dir

    m = ckpt.config.model
    if not m.path:
        raise RunDirError(f"The config of {ckpt.run_dir} has no model.path, so the model it "
                          "trained is unknown.")
    try:
        base_dir = resolve_model_dir(m.path)
    except JaxtuneError as e:  # say where the path came from (relative paths: the cwd)
        raise RunDirError(f"{e} (model.path in the config of {ckpt.run_dir}; the base model's "
                          "config.json, weights and tokenizer are read from there)") from None
    base_hf = load_hf_config(base_dir)
    family = get_family({**base_hf, **m.overrides}.get("model_type"))
    return BaseModel(Path(base_dir), base_hf,
                     family, family.config_cls.from_hf_config({**base_hf, **m.overrides}))


def checkpoint_sources(ckpt: RunCheckpoint, config: Any) -> list:
    """A lazy :class:`~jaxtune.export.tensors.ParamSource` for every parameter of the model
    the run trained (a full fine-tune's), read from ``ckpt``."""
    from flax import nnx

    from jaxtune.models import abstract_model
    from jaxtune.models.layers import WEIGHTS

    m = ckpt.config.model
    abstract = abstract_model(config, param_dtype=m.dtype, scan_layers=m.scan_layers)
    sources, missing, wrong = [], [], []
    for path, var in nnx.to_flat_state(nnx.state(abstract, WEIGHTS)):
        name = ".".join(map(str, path))
        shape = tuple(var.get_value().shape)
        saved = ckpt.find(name)
        if saved is None:
            missing.append(name)
        elif saved.shape != shape:
            wrong.append(f"{name}: checkpoint {list(saved.shape)}, model {list(shape)}")
        else:
            sources.append(ckpt.source(name))
    if missing or wrong:
        raise RunDirError(
            f"Checkpoint {ckpt.directory}/{ckpt.step} does not hold the model its config "
            f"describes: missing {missing[:6]}{' ...' * (len(missing) > 6)}, "
            f"shape mismatches {wrong[:6]}. Was model.path or model.overrides changed after "
            "training? Point them back at the model the run trained."
        )
    return sources


def adapter_model(ckpt: RunCheckpoint, base_dir: Path) -> Any:
    """The run's adapter-applied model, unmerged, in float32 on the unquantised base."""
    import dataclasses

    import jax.numpy as jnp
    from flax import nnx

    from jaxtune.lora import apply_lora
    from jaxtune.weights import from_pretrained

    cfg = ckpt.config
    base = from_pretrained(base_dir, dtype="float32", scan_layers=cfg.model.scan_layers,
                           **cfg.model.overrides)
    lora_cfg = dataclasses.replace(cfg.lora, quantize_base="none", base_dtype="", dropout=0.0)
    model, trainable = apply_lora(base, lora_cfg, seed=cfg.run.seed)
    flat = []
    for path, var in nnx.to_flat_state(nnx.state(model, trainable)):
        name = ".".join(map(str, path))
        saved = ckpt.find(name)
        if saved is None:
            raise RunDirError(f"Checkpoint {ckpt.directory}/{ckpt.step} lacks {name}.")
        flat.append((path, var.replace(jnp.asarray(ckpt.read_float32(saved)))))
    nnx.update(model, nnx.from_flat_state(flat))
    return model


@dataclass
class LoadedRun:
    """A run's trained model in memory (float32), with what it needs to be used."""

    model: Any  # the NNX model: LoRA adapters applied unmerged, or the full fine-tune
    tokenizer: Any  # the run's tokenizer (data.chat_template applied)
    generation_config: dict[str, Any] | None  # the base model's generation_config.json
    checkpoint: RunCheckpoint
    base: BaseModel

    @property
    def description(self) -> str:
        kind = "LoRA adapters on" if self.checkpoint.config.lora.rank > 0 \
            else "full fine-tune of"
        return (f"{self.checkpoint.run_dir} step {self.checkpoint.step} ({kind} "
                f"{self.base.directory})")


def load_run(run_dir: str | Path, step: int | None = None) -> LoadedRun:
    """Checkpoint ``step`` (default: the latest) of a run as a float32 model in memory, laid
    out as the run trained it (scanned layers or not).

    A LoRA run's adapters are applied to the unquantised base without merging; a full
    fine-tune's parameters are read as saved.
    """
    from jaxtune.data import load_tokenizer
    from jaxtune.export.writer import read_generation_config, reference_model

    ckpt = open_run(run_dir, step)
    base = base_model(ckpt)
    if ckpt.config.lora.rank > 0:
        model = adapter_model(ckpt, base.directory)
    else:
        sources = checkpoint_sources(ckpt, base.config)
        model = reference_model(base.config, sources, ckpt.config.model.scan_layers)
    return LoadedRun(model, load_tokenizer(ckpt.config),
                     read_generation_config(base.directory), ckpt, base)
