"""The tokenization cache: one folder of ``.npy`` arrays and a ``meta.json`` per shard.

The key hashes everything the tokens depend on: the shard's content (file hash or hub
fingerprint), the tokenizer (vocabulary, merges, special tokens, chat template) and the format
settings, plus :data:`CACHE_VERSION`. Change any of them and the shard is tokenized again; a
cache made with another tokenizer can never be read by mistake.

Folders are written under a temporary name and renamed into place, so a crash or a second
process writing the same key never leaves a half-written entry. Nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Bump when the cached arrays' meaning changes (masking rules, array layout).
CACHE_VERSION = 2  # 2: chat replies located by probing renders (issue #20)

_ARRAYS = ("tokens", "trained", "offsets", "rows")


def cache_key(parts: dict[str, Any]) -> str:
    """A stable hex key for a JSON-serialisable description."""
    blob = json.dumps({"version": CACHE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


@dataclass
class TokenizedShard:
    """The tokenized rows of one shard, as flat arrays.

    Example ``i`` is ``tokens[offsets[i]:offsets[i + 1]]`` with per-token ``trained`` flags;
    it came from row ``rows[i]`` of the shard (bad rows that were skipped leave gaps).
    """

    tokens: np.ndarray  # int32 [total tokens]
    trained: np.ndarray  # uint8 [total tokens]; 1 where the token is a training target
    offsets: np.ndarray  # int64 [examples + 1]
    rows: np.ndarray  # int64 [examples]: the shard row each example came from
    meta: dict[str, Any] = field(default_factory=dict)  # rows read, bad rows, ...

    @property
    def num_examples(self) -> int:
        return len(self.rows)


def load(cache_dir: str, key: str) -> TokenizedShard | None:
    """The cached shard for ``key``, memory-mapped; None when absent or unreadable."""
    folder = os.path.join(cache_dir, key)
    try:
        with open(os.path.join(folder, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
        arrays = {
            name: np.load(os.path.join(folder, f"{name}.npy"), mmap_mode="r", allow_pickle=False)
            for name in _ARRAYS
        }
    except (OSError, ValueError):
        return None
    if meta.get("key") != key:
        return None
    return TokenizedShard(meta=meta, **arrays)


def save(cache_dir: str, key: str, shard: TokenizedShard) -> str:
    """Write ``shard`` under ``key`` atomically; returns the folder."""
    os.makedirs(cache_dir, exist_ok=True)
    final = os.path.join(cache_dir, key)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=cache_dir)
    try:
        for name in _ARRAYS:
            np.save(os.path.join(tmp, f"{name}.npy"), np.ascontiguousarray(getattr(shard, name)))
        with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
            json.dump({**shard.meta, "key": key}, f, indent=1, sort_keys=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not os.path.isdir(final):  # not a lost race with another writer: a real failure
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return final
