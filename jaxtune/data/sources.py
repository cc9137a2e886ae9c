"""Where rows come from: local files and folders, or Hugging Face Hub datasets, via ``datasets``.

A source (``data.sources[i]``) resolves to one or more *shards*: each local file is a shard of
its own (so a bad row is reported with its file and row, and changing one file re-tokenizes
only that file); a hub dataset is one shard. Local files are keyed by their content hash, hub
datasets by ``datasets``' fingerprint of the loaded split.

Splits: a folder's files are assigned to splits by their names the way ``datasets`` does it
(``test.jsonl``, ``eval-*.parquet``...; everything else is ``train``). Slices like
``train[:90%]`` or ``train[10:20]`` select rows of the whole source (all its files in order).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from jaxtune.data.errors import DataError

# File extension -> datasets builder. Compressed variants (.jsonl.gz) are read transparently.
BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".txt": "text",
    ".arrow": "arrow",
}
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst")


def _builder_for(path: str) -> str | None:
    name = path.lower()
    for ext in _COMPRESSED:
        if name.endswith(ext):
            name = name[: -len(ext)]
    return BUILDERS.get(os.path.splitext(name)[1])


@dataclass(frozen=True)
class Shard:
    """One file of a local source, or a whole hub dataset split."""

    source_index: int
    name: str  # shown in messages: the file path, or the hub id with subset and split
    path: str  # file path or hub id
    builder: str | None  # datasets builder for a file; None for a hub dataset
    subset: str = ""  # hub configuration name
    split: str = "train"  # hub split expression (files are read whole, sliced later)

    @property
    def is_file(self) -> bool:
        return self.builder is not None

    def identity(self, hf_cache: str | None = None) -> dict[str, Any]:
        """What the cached tokens of this shard depend on (besides tokenizer and format)."""
        if self.is_file:
            return {"file_sha256": _file_sha256(self.path), "builder": self.builder}
        ds = self.load(hf_cache)
        return {"hub": self.path, "subset": self.subset, "split": self.split,
                "fingerprint": getattr(ds, "_fingerprint", None)}

    def load(self, hf_cache: str | None = None):
        """The shard as a (memory-mapped) ``datasets.Dataset``."""
        return self._load(hf_cache, streaming=False)

    def stream(self, hf_cache: str | None = None):
        """The shard as a ``datasets.IterableDataset`` (read lazily)."""
        return self._load(hf_cache, streaming=True)

    def _load(self, hf_cache: str | None, streaming: bool):
        import datasets

        with _quiet():
            try:
                if self.is_file:
                    kwargs = {"sample_by": "document"} if self.builder == "text" else {}
                    return datasets.load_dataset(
                        self.builder, data_files=self.path, split="train", cache_dir=hf_cache,
                        streaming=streaming, **kwargs,
                    )
                return datasets.load_dataset(
                    self.path, name=self.subset or None, split=self.split, cache_dir=hf_cache,
                    streaming=streaming,
                )
            except DataError:
                raise
            except Exception as e:  # noqa: BLE001 -- datasets raises many kinds; name the file
                raise DataError(_load_problem(self, e)) from None


def _load_problem(shard: Shard, e: Exception) -> str:
    causes, cur = [], e
    while cur is not None and len(causes) < 4:
        causes.append(f"{type(cur).__name__}: {cur}")
        cur = cur.__cause__ or cur.__context__
    detail = " <- ".join(causes)
    if shard.is_file:
        return (f"Could not read data file '{shard.path}' as {shard.builder}: {detail}. "
                "Check that every row has the same fields with the same types.")
    return (f"Could not load '{shard.path}' (subset '{shard.subset}', split '{shard.split}') "
            f"from the Hugging Face Hub: {detail}. It is not a local file or folder; if it is "
            "a hub id, check the name and that the machine is online.")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hide datasets' progress bars while we load (our own report says what happened)."""
    import datasets

    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was:
            datasets.enable_progress_bars()


# (path, size, mtime) -> content hash: eval iterators are rebuilt at every evaluation, so a
# file is hashed once per process unless it changes.
_HASHES: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: str) -> str:
    st = os.stat(path)
    memo = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if memo not in _HASHES:
        _HASHES[memo] = _hash_file(path)
    return _HASHES[memo]


def _hash_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def split_name(split: str) -> str:
    """``'train[:90%]'`` -> ``'train'``."""
    return split.split("[", 1)[0].split("+", 1)[0].strip() or "train"


def is_sliced(split: str) -> bool:
    return "[" in split or "+" in split


def slice_ranges(src, total: int) -> list[Any]:
    """The ``[from_, to)`` row ranges a sliced split (``train[:90%]``) keeps of a local source
    of ``total`` rows (``datasets``' own slice arithmetic)."""
    import datasets

    name = src.split.split("[", 1)[0].strip()
    try:
        spec = src.split.replace(name, "train") if name != "train" else src.split
        return datasets.ReadInstruction.from_spec(spec).to_absolute({"train": total})
    except (ValueError, AssertionError) as e:
        raise DataError(f"Data source '{src.path}': bad split '{src.split}': {e}") from None


def resolve_source(index: int, src, key: str = "data.sources") -> list[Shard]:
    """The shards of ``DataSourceConfig`` ``src`` (local files in a stable order, or the hub).

    ``key`` is the config list the source is in (``data.sources`` or ``data.eval_sources``),
    so messages name the entry to fix.
    """
    path = os.path.expanduser(src.path)
    entry = f"{key}[{index}]"
    if not src.path:
        raise DataError(f"Data source {index} of {key} has no path; set {entry}.path.")
    if os.path.isfile(path):
        builder = _builder_for(path)
        if builder is None:
            raise DataError(
                f"Data file '{src.path}' ({entry}.path) has an unknown extension; use one of "
                f"{', '.join(BUILDERS)} (optionally compressed)."
            )
        if split_name(src.split) != "train":
            raise DataError(
                f"Data file '{src.path}' ({entry}) has a single split, 'train', not "
                f"'{split_name(src.split)}'; select rows with a slice like train[90%:]."
            )
        _check_not_empty(path, src.path, entry)
        return [Shard(index, src.path, path, builder)]
    if os.path.isdir(path):
        files = _folder_files(index, path, src, entry)
        for f in files:
            _check_not_empty(f, f, entry)
        return [Shard(index, f, f, _builder_for(f)) for f in files]
    if _looks_local(src.path):
        raise DataError(
            f"Data source {index} of {key}: '{src.path}' does not exist (no such file or "
            f"folder; working directory '{os.getcwd()}'). Fix {entry}.path."
        )
    return [Shard(index, f"{src.path}:{src.subset or 'default'}:{src.split}", src.path, None,
                  src.subset, src.split)]


_EMPTY_PROBE = 1 << 16  # files up to this size are read to tell "only blank lines"


def _check_not_empty(path: str, shown: str, entry: str) -> None:
    """An empty (or blank) file has no rows; say so rather than let a reader fail on it."""
    size = os.path.getsize(path)
    if size > _EMPTY_PROBE or path.lower().endswith(_COMPRESSED):
        return
    with open(path, "rb") as f:
        blank = not f.read().strip()
    if blank:
        what = "is empty (0 bytes)" if size == 0 else "holds only blank lines"
        raise DataError(
            f"Data file '{shown}' ({entry}) {what}, so it has no rows to "
            f"{'evaluate' if 'eval' in entry else 'train'} on. Write the rows into it (one JSON "
            f"object per line for .jsonl), or remove it from {entry.split('[')[0]}."
        )


def _looks_local(path: str) -> bool:
    """A path no hub id could be ('owner/name' has one slash and no file extension)."""
    return (path.startswith(("/", "./", "../", "~", "\\")) or path.count("/") > 1
            or _builder_for(path) is not None or os.sep != "/" and os.sep in path)


def _folder_files(index: int, path: str, src, entry: str) -> list[str]:
    files = []
    for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [os.path.join(root, n) for n in sorted(names)
                  if not n.startswith(".") and _builder_for(n)]
    if not files:
        raise DataError(
            f"Data folder '{src.path}' ({entry}) holds no data files "
            f"({', '.join(BUILDERS)})."
        )
    builders = {_builder_for(f) for f in files}
    if len(builders) > 1:
        raise DataError(
            f"Data folder '{src.path}' mixes file types ({', '.join(sorted(builders))}); "
            "give each type its own source."
        )
    by_split = _files_by_split(path)
    want = split_name(src.split)
    if want in by_split:
        chosen = set(by_split[want])
    elif want == "train":
        others = {f for fs in by_split.values() for f in fs}
        chosen = {f for f in files if os.path.abspath(f) not in others}
    else:
        raise DataError(
            f"Data folder '{src.path}' has no files for split '{want}' (file names give the "
            f"split, e.g. {want}.jsonl); splits found: {', '.join(sorted(by_split)) or 'train'}."
        )
    picked = [f for f in files if os.path.abspath(f) in chosen or f in chosen]
    if not picked:
        raise DataError(f"Data folder '{src.path}' has no files for split '{want}'.")
    return picked


def _files_by_split(path: str) -> dict[str, list[str]]:
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        patterns = get_data_patterns(os.path.abspath(path))
        found = DataFilesDict.from_patterns(patterns, base_path=os.path.abspath(path))
    except Exception:  # noqa: BLE001 -- no split-named files: everything is train
        return {}
    return {str(k): [os.path.abspath(f) for f in v] for k, v in found.items()}
