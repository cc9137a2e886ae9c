"""The non-weight files of an HF export, and writing the folder atomically.

- ``config.json``: the original model's config (plus the run's ``model.overrides``) with
  ``dtype`` set to the exported dtype; everything else is kept as the original had it.
- ``generation_config.json``: the original's (if any), with ``eos_token_id`` set to what
  training used: the tokenizer's EOS and the end-of-turn token the chat template closes each
  assistant turn with (e.g. ``<|im_end|>``, ``<|eot_id|>``), so generation stops where
  training taught it to; ``bos_token_id`` / ``pad_token_id`` follow the tokenizer.
- the tokenizer files, written by the tokenizer itself, chat template included.

:func:`staged_output` writes into a hidden temporary folder next to the target and renames it
into place only when everything is written, so a failure leaves nothing half-written, and a
non-empty target is never replaced without ``overwrite``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from jaxtune.dtypes import FLOAT_DTYPES
from jaxtune.export.errors import ExportError

EXPORT_DTYPES = FLOAT_DTYPES
_PROBE_USER = "jaxtune export probe question"
_PROBE_REPLY = "jaxtune export probe reply"


# --------------------------------------------------------------------------- dtypes


def resolve_dtype(name: str, base_hf_config: dict[str, Any] | None = None,
                  fallback: Any = None) -> np.dtype:
    """The numpy dtype for ``float32 | bfloat16 | float16``, or for ``auto``: the original
    model's dtype (config.json ``dtype`` / ``torch_dtype``), else ``fallback``, else float32."""
    import jax.numpy as jnp

    if name == "auto":
        hf = base_hf_config or {}
        name = str(hf.get("dtype") or hf.get("torch_dtype") or "")
        if name not in EXPORT_DTYPES:
            return np.dtype(fallback) if fallback is not None else np.dtype("float32")
    if name not in EXPORT_DTYPES:
        raise ExportError(f"export dtype '{name}' is not one of auto, "
                          f"{', '.join(EXPORT_DTYPES)}.")
    return np.dtype(jnp.dtype(name))


# --------------------------------------------------------------------------- config.json


def export_hf_config(base: dict[str, Any], overrides: dict[str, Any] | None,
                     dtype: np.dtype) -> dict[str, Any]:
    """``config.json`` for the export: the original, the run's overrides, the new dtype."""
    out = {**base, **(overrides or {})}
    out["dtype"] = np.dtype(dtype).name
    if "torch_dtype" in out:  # older transformers' spelling: keep the two in agreement
        out["torch_dtype"] = out["dtype"]
    return out


# --------------------------------------------------------------------------- tokens


def _special_tokens(tokenizer) -> tuple[str, ...]:
    from jaxtune.data.tokenizer import TokenizerInfo

    return TokenizerInfo.of(tokenizer).special_tokens


def probe_chat(tokenizer) -> tuple[list[dict[str, str]], str] | None:
    """A two-turn chat and its rendering by the tokenizer's template (None without one)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    for chat in ([{"role": "user", "content": _PROBE_USER},
                  {"role": "assistant", "content": _PROBE_REPLY}],
                 [{"role": "system", "content": "You are helpful."},
                  {"role": "user", "content": _PROBE_USER},
                  {"role": "assistant", "content": _PROBE_REPLY}]):
        try:
            return chat, tokenizer.apply_chat_template(chat, tokenize=False)
        except Exception:  # noqa: BLE001, S112 -- templates raise anything; try the next shape
            continue
    return None


def end_of_turn_token(tokenizer) -> str | None:
    """The special token the chat template writes right after an assistant reply."""
    probe = probe_chat(tokenizer)
    if probe is None:
        return None
    text = probe[1]
    at = text.rfind(_PROBE_REPLY)
    if at < 0:
        return None
    rest = text[at + len(_PROBE_REPLY):]
    hits = [(rest.find(t), -len(t), t) for t in _special_tokens(tokenizer) if t in rest]
    return min(hits)[2] if hits else None


def stop_token_ids(tokenizer) -> list[int]:
    """The tokenizer's EOS id, then the chat template's end-of-turn id (no duplicates)."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    eot = end_of_turn_token(tokenizer)
    if eot is not None:
        eot_id = tokenizer.convert_tokens_to_ids(eot)
        if eot_id is not None and eot_id != tokenizer.unk_token_id and eot_id not in ids:
            ids.append(int(eot_id))
    return ids


def export_generation_config(base: dict[str, Any] | None, hf_config: dict[str, Any],
                             tokenizer) -> dict[str, Any]:
    """``generation_config.json``: the original's sampling settings, the training EOS ids."""
    out = dict(base) if base else {"_from_model_config": True}
    if not base:
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if hf_config.get(k) is not None:
                out[k] = hf_config[k]
    if tokenizer is not None:
        ids = stop_token_ids(tokenizer)
        if ids:
            out["eos_token_id"] = ids[0] if len(ids) == 1 else ids
        if tokenizer.bos_token_id is not None:
            out["bos_token_id"] = int(tokenizer.bos_token_id)
        if tokenizer.pad_token_id is not None:
            out["pad_token_id"] = int(tokenizer.pad_token_id)
    if "transformers_version" not in out:
        import transformers

        out["transformers_version"] = transformers.__version__
    return out


def write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_tokenizer(tokenizer, out: Path) -> None:
    """Write the tokenizer files (tokenizer.json, tokenizer_config.json, chat template)."""
    tokenizer.save_pretrained(str(out))


# --------------------------------------------------------------------------- output folder


def check_output(out: Path, overwrite: bool, protect: tuple[Path, ...] = ()) -> None:
    """Fail before any work if ``out`` cannot be (re)written.

    ``protect`` lists folders that must never be replaced (the run directory, the base
    model): an export into them would delete what it reads from.
    """
    if out.exists() and not out.is_dir():
        raise ExportError(f"Export target {out} is a file; give a folder.")
    _check_creatable(out)
    for p in protect:
        try:
            if out.resolve() == p.resolve() or p.resolve().is_relative_to(out.resolve()):
                raise ExportError(f"Export target {out} is (or holds) {p}, which the export "
                                  "reads from; choose another --out folder.")
        except OSError:
            continue
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"Export target {out} is not empty; nothing was written. Choose "
                          "an empty or new folder, or pass --overwrite to replace it.")


def _check_creatable(out: Path) -> None:
    """The staging folder goes next to ``out``: its nearest existing ancestor must be a
    writable folder (not a file, not read-only)."""
    ancestor = out.absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ExportError(
            f"Export target {out} cannot be created: {ancestor} is a file, not a folder, so "
            "nothing can be written under it. Choose an --out (export.out_dir) whose parent is "
            "a folder or does not exist yet.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ExportError(
            f"Export target {out} cannot be created: {ancestor} is not writable (read-only "
            "or owned by someone else). Choose an --out (export.out_dir) in a folder you can "
            "write, e.g. inside the run directory.")


def _os_problem(out: Path, err: OSError) -> ExportError:
    where = f" ({err.filename})" if err.filename else ""
    return ExportError(
        f"Export target {out} cannot be created: {err.strerror or err}{where}. Nothing was "
        "written; choose an --out (export.out_dir) in a folder you can write.")


@contextlib.contextmanager
def staged_output(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder next to ``out``; on success it becomes ``out``.

    On any exception the temporary folder is removed and ``out`` is untouched.
    """
    check_output(out, overwrite)
    created = [p for p in out.absolute().parents if not p.exists()]  # deepest first
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as err:  # a race with the checks above, or a file system that refuses
        for p in created:  # leave no empty folders behind
            with contextlib.suppress(OSError):
                p.rmdir()
        raise _os_problem(out, err) from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a model folder should not be
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        if any(out.iterdir()):
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
        else:
            out.rmdir()
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
