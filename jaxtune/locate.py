"""Where a model (or tokenizer) folder is: a local path, or a hub id in the Hugging Face cache.

Every command that reads a model (``train``, ``inspect-data``, ``export``, ``from_pretrained``)
resolves ``model.path`` and ``model.tokenizer`` here first, before any tokenizer or weights
are read, so a wrong path gets one message naming the key and the fix instead of whatever
``transformers`` or ``huggingface_hub`` say about a string they take for a repo id.

A string is *local-looking* when no hub id could be it: absolute, starting with ``.`` or
``~``, holding more than one ``/`` (hub ids are ``org/name``), an OS separator other than
``/``, or characters hub ids never have. A local-looking path that does not exist is reported
as a missing folder (for the quickstart's model, with the command that builds it); anything
else is looked up as a hub id, and offline a miss names the cache that was searched.

This module imports neither JAX nor ``transformers``, so the checks cost nothing up front.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from jaxtune.errors import JaxtuneError

# Files a model folder needs from the hub (weights, config, tokenizer, chat template).
HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
QUICKSTART_MODEL = "smollm2-135m-instruct"  # the folder scripts/make_smollm2.py builds
_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


class ModelFolderError(JaxtuneError, ValueError):
    """A Hugging Face model folder (its config.json or its safetensors) cannot become the model;
    says why. (``jaxtune.checkpoint.CheckpointError`` is the other kind: a run's checkpoint.)"""


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` is on (read now, not at huggingface_hub's import)."""
    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if env:
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_cache_dir() -> str:
    """The Hugging Face hub cache (``HF_HUB_CACHE``, ``HF_HOME/hub`` or the default)."""
    # Read at call time (huggingface_hub reads these once, at import).
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def looks_local(text: str) -> bool:
    """True when ``text`` can only be a file system path, never a hub id (``org/name``)."""
    return (text.startswith((".", "/", "~", "\\")) or text.count("/") > 1
            or (os.sep != "/" and os.sep in text) or not _HUB_ID.fullmatch(text))


def quickstart_model_dir() -> Path:
    """Where ``scripts/make_smollm2.py`` builds the quickstart model (honours JAXTUNE_CACHE)."""
    root = Path(os.environ.get("JAXTUNE_CACHE", "~/.cache/jaxtune")).expanduser()
    return root / QUICKSTART_MODEL


def _subject(key: str, text: str) -> str:
    """``model.path is 'x', which is`` with a key, ``'x' is`` without one."""
    return f"{key} is '{text}', which is" if key else f"'{text}' is"


def _missing_folder(text: str, path: Path, key: str) -> ModelFolderError:
    full = path.absolute()
    shown = f"'{text}'" + (f" ({full})" if str(full) != text else "")
    msg = (f"{key} is {shown}: that folder does not exist." if key
           else f"Model folder {shown} does not exist.")
    if path.name == QUICKSTART_MODEL:
        built = quickstart_model_dir()
        msg += (" It is the quickstart's model: build it once with `python "
                f"scripts/make_smollm2.py`, which writes {built} (`bash scripts/quickstart.sh` "
                "builds it and then trains)")
        if built.absolute() != full:
            msg += f"; then pass --{key}={built}" if key else f"; then load {built}"
        return ModelFolderError(msg + ".")
    if not path.is_absolute():
        msg += f" Relative paths start at the working directory, {os.getcwd()}."
    return ModelFolderError(
        msg + f" Point {key or 'it'} at a Hugging Face model folder (config.json and "
        "*.safetensors) or at a hub id such as org/name.")


def resolve_model_dir(path_or_hub_id: str | os.PathLike, key: str = "") -> Path:
    """A local folder for a path or a hub id (``org/name``, via the Hugging Face cache).

    ``key`` names the config field the value came from (``model.path``), for messages.
    Hub ids go through ``huggingface_hub.snapshot_download`` (config, safetensors and
    tokenizer files only), which respects ``HF_HUB_OFFLINE`` and the cache location.
    Raises :class:`ModelFolderError` naming the key and the fix.
    """
    text = str(path_or_hub_id)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelFolderError(
            f"{_subject(key, text)} a file; give the folder that holds it "
            f"({path.absolute().parent}), with config.json and *.safetensors.")
    if looks_local(text):
        raise _missing_folder(text, path, key)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline, cache = hub_offline(), hub_cache_dir()
    try:
        return Path(snapshot_download(text, allow_patterns=HUB_FILES, cache_dir=cache,
                                      local_files_only=offline))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as err:
        if offline:
            raise ModelFolderError(
                f"{_subject(key, text)} not a local folder, so it was taken for a Hugging Face "
                "hub id; the hub is unreachable offline (HF_HUB_OFFLINE is set) and the model "
                f"is not in the Hugging Face cache ({cache}). Download it once "
                f"with network access (`hf download {text}`), point HF_HUB_CACHE at a cache "
                "that has it, or give a local folder (./name for one in this directory)."
            ) from None
        raise ModelFolderError(
            f"{_subject(key, text)} not a local folder and could not be fetched from the "
            f"Hugging Face hub into {cache}: {err}"
        ) from None


def hf_config_file(model_dir: Path, key: str = "") -> Path:
    """``model_dir/config.json``, or a ModelFolderError saying the folder is not a model."""
    file = model_dir / "config.json"
    if not file.is_file():
        named = f" ({key})" if key else ""
        raise ModelFolderError(
            f"{model_dir}{named} has no config.json; a Hugging Face model folder needs "
            "config.json and *.safetensors (as save_pretrained writes them).")
    return file


def read_hf_config(file: Path) -> dict[str, Any]:
    """A ``config.json`` as a dict; ModelFolderError when it is not JSON."""
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelFolderError(f"{file} is not valid JSON: {err}") from None


def check_model_paths(cfg) -> tuple[Path | None, Path | None]:
    """Resolve ``model.path`` and ``model.tokenizer`` of a TrainConfig, before any loading.

    Returns (model folder or None when unset, tokenizer folder or None when it is the model's).
    The model folder must hold config.json.
    """
    m = cfg.model
    model_dir = None
    if m.path:
        model_dir = resolve_model_dir(m.path, "model.path")
        hf_config_file(model_dir, "model.path")
    tok_dir = resolve_model_dir(m.tokenizer, "model.tokenizer") if m.tokenizer else None
    return model_dir, tok_dir


def model_vocab_size(cfg) -> int | None:
    """``vocab_size`` of the model ``cfg.model.path`` names (``model.overrides`` applied)."""
    if not cfg.model.path:
        return None
    model_dir = resolve_model_dir(cfg.model.path, "model.path")
    hf = {**read_hf_config(hf_config_file(model_dir, "model.path")), **cfg.model.overrides}
    size = hf.get("vocab_size", hf.get("text_config", {}).get("vocab_size"))
    return int(size) if size is not None else None
