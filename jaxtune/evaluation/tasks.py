"""Which lm_eval tasks a run asks for: names checked, datasets loaded, problems said plainly.

Tasks come from jaxtune's offline folder (``offline_tasks/``: the Nimbrel Sync support set,
tag ``nimbrel_support``), the user's ``--include-path`` folders, and lm_eval's own
catalogue. lm_eval's catalogue takes seconds to index, so it is read only when a name is
not found in the first two. A name may also be a YAML file or a glob (``mmlu_*``).

A misspelt name gets the closest known ones; a task whose dataset is on the Hugging Face hub
when the hub cannot be reached (``HF_HUB_OFFLINE=1``, no network, not cached) gets an error
that says so, and nothing is downloaded behind the user's back.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxtune.evaluation.errors import EvalError

OFFLINE_TASKS = Path(__file__).resolve().parent / "offline_tasks"
#: lm_eval warns about ``custom_dataset`` loaders at every load; jaxtune's tasks use one to
#: read their files next to the YAML, which is not something a user must act on.
_NOISE = "Custom kwargs can be passed to `--metadata`"


class _DropCustomDatasetNote(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _NOISE not in record.getMessage()


def _quiet_lm_eval() -> None:
    logger = logging.getLogger("lm_eval.api.task")
    if not any(isinstance(f, _DropCustomDatasetNote) for f in logger.filters):
        logger.addFilter(_DropCustomDatasetNote())


def _known(manager: Any, name: str) -> bool:
    if name in manager.all_tasks or Path(name).suffix in (".yaml", ".yml"):
        return True
    return any(ch in name for ch in "*?[") and bool(manager.match_tasks([name]))


def task_manager(names: Sequence[str], include_paths: Sequence[str] = ()) -> Any:
    """An lm_eval ``TaskManager`` that knows every name in ``names`` (else :class:`EvalError`
    naming the closest ones)."""
    _quiet_lm_eval()
    for path in include_paths:
        if not Path(path).is_dir():
            raise EvalError(f"--include-path {path} is not a folder; give a folder of lm_eval "
                            "task YAML files (docs/eval.md shows one).")
    paths = (str(OFFLINE_TASKS), *map(str, include_paths))
    manager = _manager(paths, defaults=False)
    if all(_known(manager, n) for n in names):
        return manager
    manager = _manager(paths, defaults=True)
    unknown = [n for n in names if not _known(manager, n)]
    if unknown:
        name = unknown[0]
        close = difflib.get_close_matches(name, manager.all_tasks, n=5, cutoff=0.6)
        hint = f" Closest names: {', '.join(close)}." if close else ""
        raise EvalError(
            f"Unknown lm_eval task '{name}'.{hint} jaxtune's offline tasks are "
            f"{', '.join(offline_task_names())} (tag nimbrel_support); lm_eval's catalogue is "
            "listed by `lm_eval ls tasks`; a folder of your own task YAML files is added with "
            "--include-path DIR.")
    return manager


_MANAGERS: dict[tuple[tuple[str, ...], bool], Any] = {}


def _manager(paths: tuple[str, ...], defaults: bool) -> Any:
    """A task index, built once per process (lm_eval's own takes seconds); each ``load``
    still builds fresh Task objects."""
    from lm_eval.tasks import TaskManager

    key = (paths, defaults)
    if key not in _MANAGERS:
        _MANAGERS[key] = TaskManager(include_path=list(paths), include_defaults=defaults)
    return _MANAGERS[key]


def offline_task_names() -> list[str]:
    """The names of jaxtune's offline tasks (their YAML files' ``task:``)."""
    names = []
    for path in sorted(OFFLINE_TASKS.glob("*/*.yaml")):
        names += [line.split(":", 1)[1].strip() for line in path.read_text().splitlines()
                  if line.startswith("task:")]
    return sorted(names)


def expand(manager: Any, names: Sequence[str]) -> list[str]:
    """Globs replaced by the task names they match (order kept, no repeats)."""
    out: list[str] = []
    for name in names:
        found = manager.match_tasks([name]) if any(ch in name for ch in "*?[") else [name]
        out += [n for n in found if n not in out]
    return out


def _is_offline_error(err: BaseException) -> bool:
    names = {type(e).__name__ for e in (err, err.__cause__, err.__context__) if e is not None}
    text = str(err)
    return bool(names & {"ConnectionError", "OfflineModeIsEnabled", "LocalEntryNotFoundError",
                         "ConnectTimeout", "ReadTimeout", "ConnectError"}) \
        or "on the Hub" in text or "offline mode" in text.lower()


def load_tasks(manager: Any, names: Sequence[str]) -> list[Any]:
    """lm_eval Task / Group objects for ``names``, datasets loaded; problems as EvalError."""
    objects: list[Any] = []
    for name in expand(manager, names):
        try:
            loaded = manager.load([name])
        except Exception as e:  # noqa: BLE001 -- lm_eval and datasets raise many kinds
            if _is_offline_error(e):
                offline = " (HF_HUB_OFFLINE=1)" if os.environ.get("HF_HUB_OFFLINE") else ""
                raise EvalError(
                    f"lm_eval task '{name}' reads its dataset from the Hugging Face hub, which "
                    f"cannot be reached from here{offline}, and the dataset is not in the local "
                    f"cache ({e}). Nothing was downloaded. Run it once where the hub is "
                    "reachable (datasets caches it), or evaluate offline on local files: "
                    f"jaxtune's {', '.join(offline_task_names())} or your own task YAML "
                    "with --include-path DIR (docs/eval.md).") from None
            raise EvalError(f"lm_eval could not load task '{name}': {type(e).__name__}: "
                            f"{e}") from None
        groups = loaded.get("groups") or {}
        if name in groups:
            objects.append(groups[name])
        else:  # a task, or a tag's tasks; each task once (a glob may name a tag and its tasks)
            seen = {getattr(o, "task_name", None) for o in objects}
            objects += [t for n, t in loaded["tasks"].items() if n not in seen]
    return objects


def split_names(text: str | Sequence[str]) -> list[str]:
    """``"a,b, c"`` (or a list) -> ``["a", "b", "c"]``."""
    items = text.split(",") if isinstance(text, str) else list(text)
    return [n.strip() for n in items if n and n.strip()]
