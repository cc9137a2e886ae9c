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


def load_model_folder(path: str, *, dtype: str = "float32", scan_layers: bool = True) -> Loaded:
    """A HF model folder or cached hub id, with its tokenizer and generation config."""
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
    model = from_pretrained(model_dir, dtype=dtype, scan_layers=scan_layers)
    return Loaded(model, tokenizer, read_generation_config(model_dir), str(model_dir))


def load_run(run_dir: str, step: int | None = None) -> Loaded:
    """Checkpoint ``step`` (default: the latest) of a run, adapters applied, unmerged."""
    from jaxtune.run_dir import load_run as read_run

    run = read_run(run_dir, step)
    return Loaded(run.model, run.tokenizer, run.generation_config, run.description)


def load(path: str, *, step: int | None = None, dtype: str = "float32",
         scan_layers: bool = True) -> Loaded:
    """A run directory's checkpoint, or a model folder / hub id."""
    if is_run_dir(path):
        return load_run(path, step)
    if step is not None:
        raise GenerateError(f"--step {step} needs a run directory (with config.yaml); {path} "
                            "is a model folder or hub id.")
    from jaxtune.errors import JaxtuneError

    try:
        return load_model_folder(path, dtype=dtype, scan_layers=scan_layers)
    except JaxtuneError as e:
        if Path(path).expanduser().exists():
            raise
        raise GenerateError(
            f"{e} A run directory is also accepted (a training run's run.output_dir, holding "
            "config.yaml and checkpoints/): train first, e.g. `jaxtune train "
            "configs/quickstart.yaml` writes runs/quickstart.") from None
