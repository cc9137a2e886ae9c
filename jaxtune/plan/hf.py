"""The architecture (``config.json`` fields) of ``model.path``, found offline.

In order: a local folder (or file) with ``config.json``; the Hugging Face cache (no network,
whatever ``HF_HUB_OFFLINE`` says); the ``config.json`` fields jaxtune ships for the hub models
its recipes name (``hf_configs/<org>--<name>.json``, no weights), so a plan can be made before
anything is downloaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from jaxtune.errors import JaxtuneError

SHIPPED_DIR = Path(__file__).parent / "hf_configs"


def shipped_models() -> list[str]:
    """Hub ids whose config.json ships with jaxtune."""
    return sorted(p.stem.replace("--", "/", 1) for p in SHIPPED_DIR.glob("*.json"))


def _read(file: Path) -> dict[str, Any]:
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise JaxtuneError(f"{file} is not valid JSON: {err}") from None


def _from_cache(hub_id: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    from jaxtune.locate import hub_cache_dir

    try:
        found = try_to_load_from_cache(hub_id, "config.json", cache_dir=hub_cache_dir())
    except Exception:  # a malformed id or cache: treat as not cached
        return None
    return Path(found) if isinstance(found, str) and os.path.isfile(found) else None


def find_hf_config(path: str) -> tuple[dict[str, Any], str]:
    """``(config.json as a dict, where it came from)`` for a model path or hub id."""
    if not path:
        raise JaxtuneError("model.path is empty: set it to a Hugging Face folder or hub id.")
    local = Path(path).expanduser()
    if local.is_dir():
        file = local / "config.json"
        if not file.is_file():
            raise JaxtuneError(f"{local} has no config.json; planning needs the model's "
                               "config.json (weights are not read).")
        return _read(file), str(file)
    if local.is_file():
        return _read(local), str(local)
    cached = _from_cache(path)
    if cached is not None:
        return _read(cached), f"{cached} (Hugging Face cache)"
    shipped = SHIPPED_DIR / (path.replace("/", "--", 1) + ".json")
    if "/" in path and shipped.is_file():
        return _read(shipped), f"config.json fields shipped with jaxtune for {path}"
    raise JaxtuneError(
        f"No config.json for model.path '{path}': it is not a local folder, not in the Hugging "
        f"Face cache, and not one of the models jaxtune ships the architecture of "
        f"({', '.join(shipped_models())}). Fetch just its config ('hf download {path} "
        "config.json'), or point model.path at a folder that has config.json.")
