"""Batches: epochs, seeded shuffling, source weights, per-process slices, exact resume.

For each epoch a *plan* is computed from the seed alone: which documents take part (each
source contributes ``round(weight * size)`` documents: weight 2 repeats every document twice,
0.5 takes a different seeded half each epoch), how they pack into rows (best fit decreasing
over the whole epoch, which fills rows to ~95-99%), and the shuffled order of those rows.
The rows of all epochs form one stream; global batch ``k`` is the next ``global_batch_size``
rows of it, and process ``p`` of ``P`` builds only rows
``[p * B / P, (p + 1) * B / P)`` of each batch. Every process computes the same plan, so the
slices are disjoint and together form the global batch.

The iterator's state is just ``(epoch, row)``, the next row of the stream, so restoring it
reproduces exactly the batches an uninterrupted run would have seen.

We use plain numpy here rather than Grain: with tokens cached and lengths known, the plan is a
pure function of (seed, epoch), which makes the state two integers and keeps resume trivially
exact; Grain's loader would add worker processes we do not need for memory-mapped arrays.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from jaxtune.data.errors import DataError
from jaxtune.data.packing import build_rows, pack
from jaxtune.data.prepare import PreparedData, prepare

log = logging.getLogger(__name__)

_STATE_VERSION = 1


class Plan:
    """One epoch's rows, stored flat: row ``r`` holds ``docs[offsets[r]:offsets[r + 1]]``."""

    def __init__(self, rows: list[list[int]], lengths: np.ndarray):
        self.offsets = np.zeros(len(rows) + 1, np.int64)
        np.cumsum([len(r) for r in rows], out=self.offsets[1:])
        self.docs = np.fromiter((d for r in rows for d in r), np.int64, int(self.offsets[-1]))
        self.slots = int((lengths[self.docs] - 1).sum())  # positions holding a document

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, rows: slice) -> list[list[int]]:
        lo, hi, _ = rows.indices(len(self))
        return [self.docs[self.offsets[r]:self.offsets[r + 1]].tolist() for r in range(lo, hi)]

    def __iter__(self):
        return iter(self[:])

    def __eq__(self, other) -> bool:
        return (isinstance(other, Plan) and np.array_equal(self.offsets, other.offsets)
                and np.array_equal(self.docs, other.docs))


class BatchIterator:
    """Host batches for one process: dicts of numpy arrays ``[B / P, seq_len]``.

    Keys: ``input_ids``, ``targets`` (int32), ``loss_mask`` (float32), ``segment_ids`` and
    ``positions`` (int32). Train iterators are infinite; eval iterators make one pass and pad
    the last batch with rows whose loss mask is all zero.
    """

    def __init__(
        self, data: PreparedData, *, seq_len: int, global_batch_size: int,
        process_index: int = 0, process_count: int = 1, seed: int = 0, shuffle: bool = True,
        packing: bool = True, train: bool = True, pad_id: int = 0, row_len: int | None = None,
    ):
        if global_batch_size % process_count:
            raise DataError(
                f"trainer.global_batch_size ({global_batch_size}) must divide evenly over "
                f"{process_count} processes; use a multiple of {process_count}."
            )
        if not 0 <= process_index < process_count:
            raise DataError(f"process_index {process_index} is not in [0, {process_count}).")
        self.data = data
        self.seq_len, self.global_batch_size = seq_len, global_batch_size
        self.process_index, self.process_count = process_index, process_count
        self.local_batch_size = global_batch_size // process_count
        self.seed, self.shuffle, self.packing, self.train = seed, shuffle, packing, train
        self.pad_id = pad_id
        #: positions a row holds, which the packer fills (``seq_len``, or a pair row's both sides)
        self.row_len = seq_len if row_len is None else row_len
        self.epoch, self.row, self.batches = 0, 0, 0
        self._plans: dict[int, Plan] = {}
        #: per local row of the last batch: ``(source, shard, row)`` of each of its documents
        self.last_examples: list[list[tuple[int, int, int]]] = []
        #: per local row of the last batch: its documents' indices into ``data.docs``
        self.last_docs: list[list[int]] = []
        if train and len(data.docs) == 0:
            raise DataError(
                "The training data has no usable examples (all were dropped or skipped); "
                f"totals: {data.stats}. Check data.format, the field names and data.seq_len."
            )

    # ----------------------------------------------------------------- plan per epoch

    def _selection(self, epoch: int) -> np.ndarray:
        docs = self.data.docs
        if not self.train:
            return np.arange(len(docs))
        picked = []
        for s, weight in enumerate(self.data.weights):
            ids = np.flatnonzero(docs.source == s)
            if len(ids) == 0:
                continue
            count = int(round(weight * len(ids)))
            full, rest = divmod(count, len(ids))
            picked.append(np.tile(ids, full))
            if rest:
                rng = np.random.default_rng([self.seed, epoch, s, 1])
                picked.append(np.sort(rng.choice(ids, rest, replace=False)))
        sel = np.concatenate(picked) if picked else np.zeros(0, np.int64)
        if self.shuffle:
            sel = np.random.default_rng([self.seed, epoch, 0]).permutation(sel)
        return sel

    def plan(self, epoch: int) -> Plan:
        """Rows of ``epoch`` as lists of document indices (computed once, then cached)."""
        if epoch not in self._plans:
            sel = self._selection(epoch)
            lengths = self.data.docs.length
            if not self.packing:
                rows = [[int(d)] for d in sel]
            elif self.shuffle:
                # Best fit decreasing (longest first, ties in shuffled order), then the rows
                # in a seeded random order: ~4 points denser than packing in arrival order.
                sel = sel[np.argsort(-lengths[sel], kind="stable")]
                packed = pack(lengths[sel] - 1, self.row_len, window=len(sel))
                order = np.random.default_rng([self.seed, epoch, 4]).permutation(len(packed))
                rows = [sel[packed[r]].tolist() for r in order]
            else:  # keep the data order: best fit within a window of open rows
                rows = [sel[row].tolist() for row in pack(lengths[sel] - 1, self.row_len)]
            if self.train and not rows:
                raise DataError(f"Epoch {epoch} has no rows: every source weight rounds to 0.")
            for old in [e for e in self._plans if e < epoch - 1]:
                del self._plans[old]
            self._plans[epoch] = Plan(rows, lengths)
        return self._plans[epoch]

    # ----------------------------------------------------------------- iteration

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows, epoch, row = self._global_rows(self.epoch, self.row)
        if rows is None:
            raise StopIteration
        lo = self.process_index * self.local_batch_size
        mine = rows[lo:lo + self.local_batch_size]
        self.epoch, self.row = epoch, row
        self.batches += 1
        docs = self.data.docs
        self.last_docs = [list(r) for r in mine]
        self.last_examples = [
            [(int(docs.source[d]), int(docs.shard[d]), int(docs.row[d])) for d in r] for r in mine
        ]
        return build_rows(mine, docs, self.data.tokenized, self.seq_len, self.pad_id)

    def _global_rows(self, epoch: int, row: int):
        """The next global batch as row lists, and the position after it."""
        rows: list[list[int]] = []
        if not self.train:
            plan = self.plan(0)
            if row >= len(plan):
                return None, epoch, row
            rows = plan[row:row + self.global_batch_size]
            rows += [[] for _ in range(self.global_batch_size - len(rows))]
            return rows, epoch, row + self.global_batch_size
        while len(rows) < self.global_batch_size:
            plan = self.plan(epoch)
            take = plan[row:row + self.global_batch_size - len(rows)]
            rows += take
            row += len(take)
            if row >= len(plan):
                epoch, row = epoch + 1, 0
        return rows, epoch, row

    # ----------------------------------------------------------------- state and stats

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position; :meth:`set_state` resumes exactly here."""
        return {
            "version": _STATE_VERSION, "split": "train" if self.train else "eval",
            "epoch": self.epoch, "row": self.row, "batches": self.batches,
            "data_key": self.data.key, "seed": self.seed, "seq_len": self.seq_len,
            "global_batch_size": self.global_batch_size,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`get_state` result (e.g. from a checkpoint)."""
        split = "train" if self.train else "eval"
        if state.get("streaming"):
            raise DataError("This data state was saved by the streaming pipeline; resume with "
                            "data.streaming: true.")
        if state.get("split", split) != split:
            raise DataError(f"Cannot restore a {state.get('split')} iterator state into {split}.")
        changed = [k for k in ("data_key", "seed", "seq_len")
                   if k in state and state[k] != self.get_state()[k]]
        if changed:
            log.warning(
                "Restoring the data position (epoch %s, row %s) although %s changed since it "
                "was saved; the batches will not match the interrupted run's.",
                state["epoch"], state["row"], ", ".join(changed),
            )
        self.epoch, self.row = int(state["epoch"]), int(state["row"])
        self.batches = int(state.get("batches", 0))

    @property
    def stats(self) -> dict[str, Any]:
        """Dataset totals plus the packing efficiency and rows of the current epoch's plan."""
        plan = self.plan(self.epoch if self.train else 0)
        return {
            **self.data.stats,
            "epoch": self.epoch,
            "rows_per_epoch": len(plan),
            "packing_efficiency": plan.slots / (len(plan) * self.row_len) if len(plan) else 0.0,
        }


def make_batch_iterator(
    cfg, tokenizer, *, split: str = "train", process_index: int | None = None,
    process_count: int | None = None,
) -> BatchIterator:
    """The batch iterator of this process for ``split`` ("train" or "eval"); see module doc."""
    if split not in ("train", "eval"):
        raise DataError(f"split must be 'train' or 'eval', got '{split}'.")
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if cfg.data.streaming:
        from jaxtune.data.streaming import StreamingBatchIterator

        return StreamingBatchIterator(cfg, tokenizer, split=split, process_index=process_index,
                                      process_count=process_count)
    data = prepare(cfg, tokenizer, split)
    return BatchIterator(
        data, seq_len=cfg.data.seq_len, global_batch_size=cfg.trainer.global_batch_size,
        process_index=process_index, process_count=process_count, seed=cfg.run.seed,
        shuffle=cfg.data.shuffle and split == "train", packing=cfg.data.packing,
        train=split == "train", pad_id=data.pad_id,
    )


def to_global_batch(host_batch: dict[str, np.ndarray], mesh) -> dict[str, Any]:
    """Place each process's rows into global arrays sharded by ``batch_sharding(mesh)``."""
    import jax

    from jaxtune.sharding import batch_sharding

    out = {}
    for name, local in host_batch.items():
        sharding = batch_sharding(mesh, ndim=local.ndim)
        global_shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
        out[name] = jax.make_array_from_process_local_data(sharding, local, global_shape)
    return out
