"""Where a step's batch comes from: the one seam between the loop and whatever feeds it.

The loop (``jaxtune.trainer``) and the jitted step (``jaxtune.train_step``) are the same for
every objective. What differs is the producer of the next global batch:

- :class:`DataBatches`: the data iterator (SFT, DPO, ORPO, SimPO): host batches of this
  process, placed on the mesh;
- a rollout producer for RL (:mod:`jaxtune.rl.producer`): prompts, completions generated with
  the step's current parameters on the training mesh, rewards, advantages, a batch;
- a student-rollout producer for on-policy distillation, the same with a teacher's signal.

An objective names its producer (``Objective.batch_source``); without one it trains on the
data iterator. A producer is resumable like the data iterator: ``get_state()`` is saved in
every checkpoint (one JSON entry per process) and ``set_state()`` restores it, so a resumed
run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import jax


@dataclass
class Produced:
    """One step's global batch and what the loop logs about it."""

    batch: dict[str, jax.Array]  # global arrays, sharded by the objective's batch axes
    tokens: float  # real tokens the step trains on (for tokens/s), all processes together
    metrics: dict[str, float] = field(default_factory=dict)  # host-side metrics of this batch


class BatchSource(Protocol):
    """What the loop asks for each step's batch (see the module docstring)."""

    #: True when the next batch depends on the state the previous step produced (on-policy
    #: rollouts): the loop then reads that step's metrics back before asking, so a diverged
    #: step stops the run before anything is generated with its parameters.
    on_policy: bool

    def next(self, state: Any) -> Produced:
        """The batch of the next step, given the train state it will update."""
        ...

    def get_state(self) -> dict[str, Any]:
        """A JSON-serialisable position that :meth:`set_state` resumes exactly."""
        ...

    def set_state(self, state: dict[str, Any]) -> None:
        ...


class DataBatches:
    """The data iterator as a batch source: its host batches placed on the mesh."""

    on_policy = False

    def __init__(self, iterator: Any, mesh: jax.sharding.Mesh):
        self.iterator = iterator
        self.mesh = mesh

    def next(self, state: Any) -> Produced:
        from jaxtune.data import to_global_batch

        host_batch = next(self.iterator)
        # Tokens of every side (both sides of preference pairs), this process's rows.
        tokens = sum(int((v != 0).sum()) for k, v in host_batch.items()
                     if k.endswith("segment_ids"))
        return Produced(to_global_batch(host_batch, self.mesh),
                        float(tokens * jax.process_count()))

    def get_state(self) -> dict[str, Any]:
        return self.iterator.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self.iterator.set_state(state)

    @property
    def stats(self) -> dict[str, Any] | None:
        return getattr(self.iterator, "stats", None)


def make_batch_source(trainer: Any) -> BatchSource:
    """The run's batch source: the objective's producer, else the data iterator."""
    build = getattr(trainer.loss_fn, "batch_source", None)
    if build is not None:
        return build(trainer)
    from jaxtune import data

    return DataBatches(data.make_batch_iterator(trainer.cfg, trainer.tokenizer, split="train"),
                       trainer.mesh)
