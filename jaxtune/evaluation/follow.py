"""Many hosts: process 0 drives lm_eval, every other process follows its requests.

lm_eval is a single-process program: it builds requests, calls the model and scores. Here it
runs on process 0 only. Each model call (a packed log-likelihood batch, a batch of prompts
to generate for) is an :class:`~jaxtune.evaluation.engine.Engine` operation that every
process must run together, since the model is sharded over all of them. So process 0
(:class:`Leader`) first broadcasts ``(operation, inputs)`` to the others, then runs it; the
others (:func:`follow`) wait for the next message and run the same operation on the same
inputs, until process 0 says stop (or sends its error, which they raise too, so every
process ends the same way).

Messages are pickled and broadcast as int32 words with ``jax.experimental.multihost_utils``
(length first, then the words padded to a power of two, so few shapes compile). With one
process nothing is broadcast. Both log-likelihood and generation run on every host; as in
Levanter's harness adapter, process 0 alone talks to lm_eval.
"""

from __future__ import annotations

import pickle
from typing import Any

import jax
import numpy as np

from jaxtune.evaluation.errors import EvalError

OPERATIONS = ("score", "score_shared", "generate")


class LeaderStopped(EvalError):
    """Process 0 ended the evaluation with an error (a follower raises its message)."""


_STOP, _ERROR = "stop", "error"
_MIN_WORDS = 256


def _broadcast(message: Any = None) -> Any:
    """``message`` from process 0, on every process (others pass nothing)."""
    from jax.experimental import multihost_utils

    source = jax.process_index() == 0
    data = pickle.dumps(message) if source else b""
    n = int(multihost_utils.broadcast_one_to_all(np.array([len(data)], np.int32))[0])
    words = max(_MIN_WORDS, 1 << max(0, -(-n // 4) - 1).bit_length())
    buf = np.zeros(words * 4, np.uint8)
    if source:
        buf[:n] = np.frombuffer(data, np.uint8)
    out = multihost_utils.broadcast_one_to_all(buf.view(np.int32))
    return pickle.loads(np.asarray(out, np.int32).view(np.uint8)[:n].tobytes())


class Leader:
    """Process 0's side: run an engine operation on every process."""

    def __init__(self, engine: Any = None):
        self.engine = engine  # may be set later (process 0 may fail before it has one)
        self.followers = jax.process_count() > 1
        self.stopped = False

    def call(self, operation: str, inputs: Any) -> Any:
        """``engine.<operation>(inputs)``, run by every process; the result of process 0's."""
        if operation not in OPERATIONS:
            raise ValueError(f"unknown engine operation {operation!r}")
        if self.followers:
            _broadcast((operation, inputs))
        return getattr(self.engine, operation)(inputs)

    def stop(self, error: str | None = None) -> None:
        """Release the followers: done, or failed with ``error`` (they raise it too)."""
        if self.followers and not self.stopped:
            _broadcast((_ERROR, error) if error else (_STOP, None))
        self.stopped = True


def follow(engine: Any) -> None:
    """The other processes' side: run process 0's operations until it says stop."""
    while True:
        operation, inputs = _broadcast()
        if operation == _STOP:
            return
        if operation == _ERROR:
            raise LeaderStopped(f"process 0 stopped the evaluation: {inputs}")
        getattr(engine, operation)(inputs)
