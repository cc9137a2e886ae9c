"""What the end of a training run exported, so that running the same command again on a
finished, exported run says so and touches nothing.

``jaxtune train`` with ``export.enabled`` writes ``<output_dir>/export_record.json`` after its
export: the step exported, the ``export`` settings, the identity of that step's checkpoint,
and the size and modification time of every file it wrote (rsync's quick check). Before a
run builds anything, :func:`finished_export` compares the record with the run as it is now:

- the export folder is missing or empty: ``None`` (the run trains, or resumes, and exports);
- the run's latest checkpoint is its last step (``trainer.steps``), the record names that
  checkpoint and the current export settings, and the export's files are as written: that
  step (the run is complete and exported; nothing to do);
- anything else (another step, other settings, files changed since, or a folder that holds
  something this run did not record): :class:`ExportError`, before any work, since the
  export at the end could only refuse to overwrite that folder.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from jaxtune.config import TrainConfig, config_to_dict
from jaxtune.export.errors import ExportError

RECORD = "export_record.json"
FORMAT = 1


def export_folders(cfg: TrainConfig) -> list[Path]:
    """The folders the end of ``cfg``'s run exports to: ``export.out_dir`` (default
    ``<output_dir>/hf``), and ``<out>-adapter`` for a LoRA run with ``export.lora: both``."""
    from jaxtune.export.lora_export import adapter_dir_for

    out = Path(cfg.export.out_dir or Path(cfg.run.output_dir) / "hf").absolute()
    if cfg.lora.rank > 0 and cfg.export.lora == "both":
        return [out, adapter_dir_for(out, "both")]
    return [out]


def write_record(cfg: TrainConfig) -> None:
    """Record that the end of ``cfg``'s run exported its latest checkpoint (process 0, after
    the export); written whole or not at all."""
    step = _complete_steps(cfg)[-1]
    record = {"format": FORMAT, "step": step, "export": _settings(cfg),
              "checkpoint": _checkpoint_id(cfg, step),
              "folders": [_files(d) for d in export_folders(cfg)]}
    path = Path(cfg.run.output_dir) / RECORD
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    os.replace(tmp, path)


def finished_export(cfg: TrainConfig) -> int | None:
    """The step at which ``cfg``'s run is complete and exported, unchanged since; ``None``
    when there is no export yet. Raises :class:`ExportError` when the export folder holds
    something else (see the module docstring). Reads only."""
    folders = [d for d in export_folders(cfg) if d.is_dir() and any(d.iterdir())]
    if not folders:
        return None
    record = _read_record(cfg)
    steps = _complete_steps(cfg)
    last = cfg.trainer.steps
    problem = ""
    if record is None:
        problem = "this run has no record of exporting there"
    elif record.get("export") != _settings(cfg):
        problem = (f"it holds this run's export of step {record.get('step')} with other export "
                   f"settings ({_diff(record.get('export') or {}, _settings(cfg))})")
    elif record.get("step") != last:
        problem = (f"it holds this run's export of step {record.get('step')}, and this run now "
                   f"trains to step {last}")
    elif not steps or steps[-1] != last:
        problem = (f"it holds this run's export of step {last}, but the run's checkpoints now "
                   f"end at {f'step {steps[-1]}' if steps else 'none'}")
    elif record.get("checkpoint") != _checkpoint_id(cfg, last):
        problem = f"the checkpoint of step {last} was written again after that export"
    else:
        written = record.get("folders") or []
        folders_now = export_folders(cfg)
        changed = [str(d) for i, d in enumerate(folders_now)
                   if i >= len(written) or written[i] != _files(d)]
        if not changed:
            return last
        problem = (f"its files changed after this run exported step {last} there "
                   f"({', '.join(changed)})")
    raise ExportError(
        f"Export target {folders[0]} is not empty, and {problem}; the export at the end of "
        "this run would refuse to overwrite it, so nothing was started. Move that folder "
        "away (or set export.out_dir to a new folder), or export by hand with `jaxtune "
        "export RUN_DIR --out DIR --overwrite`.")


def _settings(cfg: TrainConfig) -> dict[str, Any]:
    """The ``export`` section as written (an empty ``out_dir`` stays empty, so a run directory
    moved with its export still matches)."""
    settings = dict(config_to_dict(cfg)["export"])
    settings.pop("enabled", None)
    return settings


def _diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return "; ".join(f"export.{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys)


def _files(folder: Path) -> dict[str, list[int]]:
    """{path in ``folder``: [size, modification time in ns]} of every file under it."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            st = os.stat(os.path.join(root, name))
            out[os.path.relpath(os.path.join(root, name), folder)] = [st.st_size, st.st_mtime_ns]
    return dict(sorted(out.items()))


def _checkpoint_dir(cfg: TrainConfig):
    from jaxtune.checkpoint import checkpoint_dir

    return checkpoint_dir(cfg)


def _complete_steps(cfg: TrainConfig) -> list[int]:
    from jaxtune.run_dir import complete_steps

    return complete_steps(_checkpoint_dir(cfg))


def _checkpoint_id(cfg: TrainConfig, step: int) -> list[int] | None:
    """Size and modification time of the step's Orbax ``_CHECKPOINT_METADATA`` (rewritten by
    every save of that step)."""
    path = _checkpoint_dir(cfg) / str(step) / "_CHECKPOINT_METADATA"
    try:
        st = os.stat(str(path)) if "://" not in str(path) else None
    except OSError:
        return None
    if st is None:  # remote storage: a digest of its text instead
        text = path.read_text()
        return [len(text), int(hashlib.sha256(text.encode()).hexdigest()[:12], 16)]
    return [st.st_size, st.st_mtime_ns]


def _read_record(cfg: TrainConfig) -> dict[str, Any] | None:
    path = Path(cfg.run.output_dir) / RECORD
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == FORMAT else None
