"""distill's batch source: the data's batches, or the same prompts with generated answers.

TRL's GKD, step by step: with probability ``distill.lmbda`` a step is *on-policy*: each row's
answer is replaced by the student's own completion of the same prompt, sampled at
``distill.temperature`` (top-k 0, top-p 1, as TRL) from the train state's current parameters
on the training mesh with the RL producer's pieces (:class:`~jaxtune.rl.sampler.ModelSampler`,
the row layout of :mod:`jaxtune.rl.rollout`): nothing copied, nothing synced. Otherwise, with
``seq_kd`` the teacher writes the answers (sequence-level KD), else the data's answers stay.
TRL draws once per micro-batch; here once per optimizer step, from ``(run.seed, step)``, so the
choice and the sampling keys of every step are fixed by the seed and a resumed run makes
exactly the batches an uninterrupted one would (the source's state is the data position and
the number of batches made).

A row's prompt is its tokens before its last trained span (the final assistant turn of a
chat, TRL's prompt / completion split); a generated row is laid out as
``[left-padded prompt | completion, right-padded]`` in ``data.seq_len`` tokens, the completion
(through its stop token, or cut at ``max_new_tokens`` / the row's end) being the trained
tokens, so on- and off-policy steps share one compiled train step. When answers are generated,
every process reads the whole global batch (generation is one SPMD program over every row),
and each step's batch carries ``answers_from_data`` (1 or 0: the token cross-entropy of
``ce_weight`` trains only on the data's answers).

With ``precompute_teacher`` the rows carry the teacher's cached top-k log-probs
(:mod:`jaxtune.distill.topk`).
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import numpy as np

from jaxtune.batches import Produced

log = logging.getLogger("jaxtune")

#: Kinds of step: the data's answers, the student's own (on-policy), the teacher's (seq_kd).
DATA, STUDENT, TEACHER = "data", "student", "teacher"


def step_kind(seed: int, step: int, lmbda: float, seq_kd: bool) -> str:
    """Whose answers step ``step`` (1-based) trains on: a seeded draw per step."""
    u = np.random.default_rng([seed, step, 0x6B64]).random()
    if u < lmbda:
        return STUDENT
    return TEACHER if seq_kd else DATA


def prompt_of(ids: np.ndarray, loss_mask: np.ndarray) -> list[int] | None:
    """A row's prompt: its tokens up to its last trained span (None: nothing trained)."""
    trained = np.flatnonzero(loss_mask > 0)
    if trained.size == 0:
        return None
    start = int(trained[-1])
    while start > 0 and loss_mask[start - 1] > 0:
        start -= 1
    # targets[t] = ids[t + 1]: the span's first answer token follows position ``start``
    return [int(t) for t in ids[:start + 1]]


def generated_rows(prompts: list[list[int] | None], completions: list[Any], seq_len: int,
                   pad_id: int) -> dict[str, np.ndarray]:
    """The token batch (``input_ids, targets, loss_mask, segment_ids, positions [N, T]``) of
    prompts and their completions: :func:`jaxtune.rl.rollout.rollout_arrays`' layout, with
    the completion tokens as the trained targets. A None prompt gives an empty row."""
    from jaxtune.rl.rollout import rollout_arrays

    n = len(prompts)
    real = [i for i, p in enumerate(prompts) if p is not None]
    width = max((len(prompts[i]) for i in real), default=1)
    out = {k: np.zeros((n, seq_len), np.int32) for k in ("input_ids", "targets",
                                                         "segment_ids", "positions")}
    out["input_ids"][:] = pad_id
    out["targets"][:] = pad_id
    out["loss_mask"] = np.zeros((n, seq_len), np.float32)
    if not real:
        return out
    arr = rollout_arrays([prompts[i] for i in real], [completions[i] for i in real],
                         prompt_width=width, completion_width=seq_len - width, pad_id=pad_id)
    ids = arr["input_ids"]
    out["input_ids"][real] = ids
    out["targets"][real, :-1] = ids[:, 1:]
    out["segment_ids"][real] = arr["segment_ids"]
    out["positions"][real] = arr["positions"]
    mask = np.zeros_like(ids, dtype=np.float32)
    mask[:, width - 1:seq_len - 1] = arr["completion_mask"][:, :seq_len - width]
    out["loss_mask"][real] = mask
    return out


class DistillBatches:
    """distill's :class:`~jaxtune.batches.BatchSource` (see the module docstring)."""

    def __init__(self, trainer: Any):
        from jaxtune.data import make_batch_iterator

        cfg = trainer.cfg
        self.cfg, self.d = cfg, cfg.distill
        self.mesh, self.rules = trainer.mesh, trainer.rules
        self.batch_axes = trainer.loss_fn.batch_axes
        self.generating = self.d.lmbda > 0 or self.d.seq_kd
        self.on_policy = self.d.lmbda > 0  # the next batch needs the state the last step made
        # Generating, every process takes every row: one SPMD program generates them all.
        whole = {"process_index": 0, "process_count": 1} if self.generating else {}
        self.iterator = make_batch_iterator(cfg, trainer.tokenizer, split="train", **whole)
        self.topk = None
        if self.d.precompute_teacher:
            from jaxtune.distill.topk import load_topk

            self.topk = load_topk(cfg, self.iterator.data)
        self.teacher = trainer.teacher
        self.produced = 0  # batches made so far: batch n is step n's
        self._warned = False
        if self.generating:
            from jaxtune.rl.sampler import ModelSampler, pad_id, stop_ids

            self.sampler = ModelSampler(self.mesh, self.rules, stop_ids(cfg, trainer.tokenizer))
            self.pad_id = pad_id(trainer.tokenizer)

    # ------------------------------------------------------------------ the batch

    def next(self, state: Any) -> Produced:
        host = next(self.iterator)
        self.produced += 1
        metrics: dict[str, float] = {}
        if self.generating:
            kind = step_kind(self.cfg.run.seed, self.produced, self.d.lmbda, self.d.seq_kd)
            metrics["distill/on_policy"] = float(kind == STUDENT)
            if kind != DATA:
                host, more = self._generate(host, state, kind)
                metrics.update(more)
            host["answers_from_data"] = np.float32(kind == DATA)
        if self.topk is not None:
            host.update(self.topk.rows(host, self.iterator.last_docs))
        tokens = float((host["segment_ids"] > 0).sum())
        if self.generating:
            return Produced(self._place_whole(host), tokens, metrics)
        from jaxtune.data import to_global_batch

        return Produced(to_global_batch(host, self.mesh), tokens * jax.process_count(),
                        metrics)

    def _generate(self, host: dict[str, np.ndarray], state: Any, kind: str):
        """The batch with each row's answer replaced by the student's (or teacher's)."""
        from jaxtune.generation.sampling import Sampling

        seq_len = self.cfg.data.seq_len
        prompts = [prompt_of(ids, mask) for ids, mask in zip(host["input_ids"],
                                                              host["loss_mask"], strict=True)]
        # A prompt that fills the row leaves no room for an answer: its row trains nothing.
        prompts = [p if p is not None and len(p) < seq_len else None for p in prompts]
        real = [p for p in prompts if p is not None]
        if not real:
            return host, {}
        room = seq_len - max(len(p) for p in real)
        limit = min(self.d.max_new_tokens, room)
        if limit < self.d.max_new_tokens and not self._warned:
            self._warned = True
            log.warning("a prompt of %d tokens leaves room for only %d of distill.max_new_tokens "
                        "(%d) in data.seq_len %d; raise data.seq_len to fit whole answers",
                        seq_len - room, room, self.d.max_new_tokens, seq_len)
        model = state.model() if kind == STUDENT else self.teacher.model()
        seed = (self.cfg.run.seed * 1_000_003 + self.produced) % (2**31 - 1)
        done, seconds, new = self.sampler.sample(model, real, Sampling(self.d.temperature),
                                                 max_new_tokens=limit, seed=seed)
        it = iter(done)
        completions = [next(it) if p is not None else None for p in prompts]
        rows = generated_rows(prompts, completions, seq_len, self.pad_id)
        lengths = np.asarray([len(c.ids) for c in done], np.float32)
        return rows, {"completions/mean_length": float(lengths.mean()),
                      "completions/clipped_ratio": float(np.mean([not c.stopped
                                                                  for c in done])),
                      "time/generate_s": seconds,
                      "generate/tokens_per_s": new / max(seconds, 1e-9)}

    def _place_whole(self, host: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Global arrays from the whole batch every process holds, each sharded by its
        logical axes (scalars replicated)."""
        from jax.sharding import NamedSharding, PartitionSpec

        from jaxtune.sharding import named_sharding, present_rules

        rules = present_rules(self.rules, self.mesh)
        out = {}
        for k, v in host.items():
            x = np.asarray(v)
            sharding = (NamedSharding(self.mesh, PartitionSpec()) if x.ndim == 0 else
                        named_sharding(self.mesh, self.batch_axes[k], rules, x.shape))
            out[k] = jax.make_array_from_callback(x.shape, sharding, lambda i, x=x: x[i])
        return out

    # ------------------------------------------------------------------ state

    def get_state(self) -> dict[str, Any]:
        return {"kind": "distill", "data": self.iterator.get_state(),
                "produced": self.produced}

    def set_state(self, state: dict[str, Any]) -> None:
        from jaxtune.data.errors import DataError

        if state.get("kind") != "distill":
            raise DataError(
                "This checkpoint's data position was not saved by distillation's batch source "
                "(another objective's data, or a distillation run with lmbda 0, no seq_kd and "
                "no precompute_teacher, whose batches come straight from the data iterator); "
                "resume it with the objective and distill settings it trained with.")
        self.iterator.set_state(state["data"])
        self.produced = int(state["produced"])

    @property
    def stats(self) -> dict[str, Any] | None:
        return getattr(self.iterator, "stats", None)


def make_distill_batches(trainer: Any) -> DistillBatches:
    """``Objective.batch_source`` of distill (when it generates or reads cached top-k)."""
    return DistillBatches(trainer)
