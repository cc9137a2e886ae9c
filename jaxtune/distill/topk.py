"""Precomputed teacher top-k log-probs, cached with the tokenised data
(``distill.precompute_teacher``).

Before training, the trainer runs :func:`precompute_teacher_topk` (the objective's
``prepare``): the teacher reads every train and eval example once, one example per row, and
keeps at each trained token its ``distill.top_k`` likeliest tokens and their log-probs at
``distill.temperature`` (:func:`jaxtune.distill.divergence.chunked_topk`). They are stored in
one ``.npz`` beside the tokenised data, in document order (the trained tokens of document 0,
then of document 1, ...), keyed by the data, the teacher (its folder's files or its run's
checkpoint), its dtype, ``top_k`` and the temperature, as DPO's precomputed reference
log-probs are; the teacher is then dropped, so training holds only the student.

Training batches get ``teacher_topk_ids`` and ``teacher_topk_logps`` ``[B, T, k]``: for each
row, the cached entries of its documents laid over its trained positions, so packing and
shuffling need nothing recomputed. The loss takes the same top-k divergence as with the
teacher in the step (``top_k`` without ``precompute_teacher``), so both give one trajectory.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from jaxtune.data.errors import DataError

log = logging.getLogger("jaxtune")


class TopKCache:
    """One split's cached top-k per trained token, in document order."""

    def __init__(self, ids: np.ndarray, logps: np.ndarray, trained: np.ndarray):
        self.ids, self.logps = ids, logps
        self.offsets = np.zeros(len(trained) + 1, np.int64)
        np.cumsum(trained, out=self.offsets[1:])
        if self.offsets[-1] != len(ids):
            raise DataError(
                f"The cached teacher top-k holds {len(ids)} tokens but the data has "
                f"{int(self.offsets[-1])} trained tokens; delete the cache file and train again "
                "to recompute it.")

    def rows(self, batch: dict[str, np.ndarray], docs: list[list[int]]) -> dict[str, np.ndarray]:
        """``teacher_topk_ids`` / ``teacher_topk_logps`` ``[rows, T, k]`` for a batch whose row
        ``r`` holds documents ``docs[r]`` (the batch iterator's ``last_docs``)."""
        mask = batch["loss_mask"]
        n, t = mask.shape
        k = self.ids.shape[1]
        ids = np.zeros((n, t, k), np.int32)
        logps = np.zeros((n, t, k), np.float32)
        for r, row in enumerate(docs):
            where = np.flatnonzero(mask[r] > 0)
            if not row:
                continue
            take = np.concatenate([np.arange(self.offsets[d], self.offsets[d + 1])
                                   for d in row])
            if len(take) != len(where):
                raise DataError(
                    f"Row {r} trains {len(where)} tokens but its documents' cached teacher "
                    f"top-k has {len(take)}; the cache does not match the data (delete it).")
            ids[r, where] = self.ids[take]
            logps[r, where] = self.logps[take]
        return {"teacher_topk_ids": ids, "teacher_topk_logps": logps}


def teacher_identity(cfg: Any) -> dict[str, Any]:
    """What the teacher's log-probs depend on besides the data: the teacher's files (a
    model folder's weights and config, a run's checkpoint steps), dtype, k, temperature."""
    path = Path(cfg.distill.teacher).expanduser()
    files = []
    if path.is_dir():
        for p in sorted(path.iterdir()):
            if p.suffix in (".safetensors", ".json", ".yaml"):
                st = p.stat()
                files.append((p.name, st.st_size, int(st.st_mtime)))
        ckpts = path / "checkpoints"
        if ckpts.is_dir():
            files.append(("checkpoints", sorted(p.name for p in ckpts.iterdir())))
    d, m = cfg.distill, cfg.model
    return {"teacher": str(path.absolute()) if path.is_dir() else d.teacher, "files": files,
            "dtype": d.dtype or m.dtype, "compute_dtype": d.dtype or m.compute_dtype,
            "top_k": d.top_k, "temperature": d.temperature}


def cache_path(cfg: Any, data: Any) -> str:
    """Where one split's top-k cache lives, beside the tokenised data."""
    from jaxtune.data import cache
    from jaxtune.data.prepare import cache_root

    key = cache.cache_key({"data": data.key, "teacher": teacher_identity(cfg)})
    return os.path.join(cache_root(cfg.data), f"teacher-topk-{key}.npz")


def load_topk(cfg: Any, data: Any) -> TopKCache:
    """The cached top-k of ``data`` (one split, prepared), computed by the trainer first."""
    path = cache_path(cfg, data)
    try:
        with np.load(path, allow_pickle=False) as f:
            ids, logps = f["ids"], f["logps"]
    except OSError:
        raise DataError(
            f"The teacher's top-k log-probs for this data are not precomputed ({path} is "
            "missing); 'jaxtune train' computes them before training.") from None
    return TopKCache(ids, logps, data.docs.trained)


def _topk_fn(teacher: Any, mesh: Any, rules: Any, cfg: Any):
    """A jitted ``(teacher state, batch) -> (ids, log-probs, loss mask)``, replicated."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxtune.distill.divergence import chunked_topk
    from jaxtune.models.family import hidden_states_and_aux
    from jaxtune.sharding import activation_rules

    d = cfg.distill

    def fn(state, batch):
        with activation_rules(mesh, rules):
            model = teacher.model(state)
            hidden, _ = hidden_states_and_aux(model, batch["input_ids"], batch["positions"],
                                              batch["segment_ids"])
            ids, logps = chunked_topk(model.unembed, hidden, d.top_k, temperature=d.temperature,
                                      chunk_size=cfg.trainer.loss_chunk_size)
            return ids, logps, batch["loss_mask"]

    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(fn, in_shardings=(teacher.shardings(mesh, rules), None),
                   out_shardings=(replicated,) * 3)


def precompute_teacher_topk(trainer: Any) -> None:
    """``Objective.prepare`` of distill with ``precompute_teacher``: compute and cache the
    teacher's top-k of every train and eval example not cached yet (see the module
    docstring). The teacher is loaded only when something is missing, and dropped after."""
    import jax

    from jaxtune.data import to_global_batch
    from jaxtune.data.loader import BatchIterator
    from jaxtune.data.prepare import prepare
    from jaxtune.distill.teacher import load_teacher

    cfg = trainer.cfg
    teacher, fn = None, None
    for split in ("train", "eval"):
        if split == "eval" and not cfg.data.eval_sources:
            continue
        data = prepare(cfg, trainer.tokenizer, split)
        path = cache_path(cfg, data)
        if os.path.exists(path):
            continue
        if teacher is None:
            teacher = load_teacher(cfg, trainer.mesh, trainer.rules)
            fn = _topk_fn(teacher, trainer.mesh, trainer.rules, cfg)
        it = BatchIterator(data, seq_len=cfg.data.seq_len,
                           global_batch_size=cfg.trainer.global_batch_size,
                           process_index=jax.process_index(), process_count=jax.process_count(),
                           shuffle=False, packing=False, train=False, pad_id=data.pad_id)
        ids_out, logps_out = [], []
        for host_batch in it:  # rows are the documents in order, one per row
            ids, logps, mask = jax.device_get(fn(teacher.state,
                                                 to_global_batch(host_batch, trainer.mesh)))
            trained = np.asarray(mask) > 0
            ids_out.append(np.asarray(ids)[trained])
            logps_out.append(np.asarray(logps)[trained])
        k = cfg.distill.top_k
        ids = np.concatenate(ids_out) if ids_out else np.zeros((0, k), np.int32)
        logps = np.concatenate(logps_out) if logps_out else np.zeros((0, k), np.float32)
        TopKCache(ids, logps, data.docs.trained)  # the counts agree
        # Every process writes the same arrays under a private name and renames them into
        # place, so on a shared or a local disk each finds the file once it is done here.
        tmp = f"{path}.tmp-{jax.process_index()}-{os.getpid()}.npz"
        os.makedirs(os.path.dirname(path), exist_ok=True)
        np.savez(tmp, ids=ids.astype(np.int32), logps=logps.astype(np.float32))
        os.replace(tmp, path)
        log.info("precomputed the teacher's top-%d log-probs of %d %s tokens -> %s", k,
                 len(ids), split, path)
    del teacher, fn  # training holds only the student


def with_topk(iterator: Any, cache: TopKCache):
    """The iterator's host batches with their rows' cached teacher top-k added."""
    for batch in iterator:
        yield {**batch, **cache.rows(batch, iterator.last_docs)}


def evaluate_with_topk(trainer: Any) -> dict[str, float]:
    """``Objective.evaluate`` with ``precompute_teacher``: the loss over the eval split, its
    batches carrying the eval examples' cached top-k."""
    from jaxtune.data.loader import make_batch_iterator

    it = make_batch_iterator(trainer.cfg, trainer.tokenizer, split="eval")
    return trainer.evaluate_batches(with_topk(it, load_topk(trainer.cfg, it.data)))
