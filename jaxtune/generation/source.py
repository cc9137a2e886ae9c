"""What ``jaxtune generate`` reads: a model folder, a hub id or a run directory.

A run directory (holding ``config.yaml``) gives its latest complete checkpoint (or
``--step``) through :func:`jaxtune.run_dir.load_run`, the reader every command shares: a LoRA
run's adapters applied to the unquantised base without merging, a full fine-tune's parameters
as they were saved, both in float32; the run's tokenizer (chat-template override included) and
the base model's generation config.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jaxtune.generation.errors import GenerateError


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    generation_config: dict[str, Any] | None
    description: str


def is_run_dir(path: str) -> bool:
    p = Path(path).expanduser()
    return p.is_dir() and (p / "config.yaml").is_file()


def load_model_folder(path: str, *, dtype: str = "float32", scan_layers: bool = True,
                      mesh: Any = None, rules: Any = None) -> Loaded:
    """A HF model folder or cached hub id, with its tokenizer and generation config
    (parameters sharded over ``mesh`` by ``rules`` when given)."""
    from transformers import AutoTokenizer

    from jaxtune.export.writer import read_generation_config
    from jaxtune.locate import resolve_model_dir
    from jaxtune.weights import from_pretrained

    model_dir = resolve_model_dir(path, key="MODEL")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise GenerateError(f"{model_dir} has no usable tokenizer ({e}); generation needs "
                            "the tokenizer files save_pretrained writes.") from None
    model = from_pretrained(model_dir, dtype=dtype, scan_layers=scan_layers, mesh=mesh,
                            rules=rules)
    return Loaded(model, tokenizer, read_generation_config(model_dir), str(model_dir))


def load_run(run_dir: str, step: int | None = None, *, mesh: Any = None,
             rules: Any = None) -> Loaded:
    """Checkpoint ``step`` (default: the latest) of a run, adapters applied, unmerged (and
    placed on ``mesh`` by ``rules`` when given)."""
    from jaxtune.run_dir import load_run as read_run

    run = read_run(run_dir, step)
    if mesh is not None:
        place_on_mesh(run.model, mesh, rules)
    return Loaded(run.model, run.tokenizer, run.generation_config, run.description)


def place_on_mesh(model: Any, mesh: Any, rules: Any = None) -> None:
    """Move a model's arrays (the same on every process) onto ``mesh``, sharded by ``rules``:
    each process hands over its own shards, so this works across hosts."""
    import jax
    import numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding

    from jaxtune.sharding import state_shardings

    state = nnx.state(model)

    def put(sharding, var):
        host = np.asarray(var.get_value() if isinstance(var, nnx.Variable) else var)
        array = jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
        return var.replace(array) if isinstance(var, nnx.Variable) else array

    nnx.update(model, jax.tree.map(put, state_shardings(state, mesh, rules), state,
                                   is_leaf=lambda x: isinstance(x, NamedSharding)))


def load(path: str, *, step: int | None = None, dtype: str = "float32",
         scan_layers: bool = True, mesh: Any = None, rules: Any = None) -> Loaded:
    """A run directory's checkpoint, or a model folder / hub id (on ``mesh`` when given)."""
    if is_run_dir(path):
        return load_run(path, step, mesh=mesh, rules=rules)
    if step is not None:
        raise GenerateError(f"--step {step} needs a run directory (with config.yaml); {path} "
                            "is a model folder or hub id.")
    from jaxtune.errors import JaxtuneError

    try:
        return load_model_folder(path, dtype=dtype, scan_layers=scan_layers, mesh=mesh,
                                 rules=rules)
    except JaxtuneError as e:
        if Path(path).expanduser().exists():
            raise
        raise GenerateError(
            f"{e} A run directory is also accepted (a training run's run.output_dir, holding "
            "config.yaml and checkpoints/): train first, e.g. `jaxtune train "
            "configs/quickstart.yaml` writes runs/quickstart.") from None
