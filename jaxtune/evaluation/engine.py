"""What every process computes for the harness: packed log-likelihood batches and generations.

The :class:`Engine` holds one model's forward pass (:class:`~jaxtune.evaluation.scoring.Scorer`)
and generator (:class:`~jaxtune.generation.loop.Generator`) on one mesh. Its operations are
SPMD: given the same inputs, every process runs the same programs on its share of the mesh
and gets the same host results back. Process 0 decides the inputs (lm_eval runs there);
``jaxtune.evaluation.follow`` hands them to the others.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxtune.evaluation.generation import GenerationRequest, generate_until
from jaxtune.evaluation.scoring import DEFAULT_CHUNK_SIZE, Scorer
from jaxtune.sharding import Rules


class Engine:
    """Scoring and generation for one model (parameters shared, never copied)."""

    def __init__(self, model: nnx.Module, tokenizer: Any, *, mesh: Mesh | None = None,
                 rules: Rules | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE):
        from jaxtune.generation.loop import Generator, supports_cache

        self.tokenizer = tokenizer
        self.config = model.config  # the family config (context length for lm_eval)
        self.scorer = Scorer(model, mesh=mesh, rules=rules, chunk_size=chunk_size)
        # A family without a generation cache can still score log-likelihoods.
        self.generator = Generator(model, mesh=mesh, rules=rules) if supports_cache(model) \
            else None
        self.row_multiple = self.scorer.row_multiple

    def score(self, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """``(logp_BC, greedy_BC)`` of one packed batch (``PackedBatch.arrays()``)."""
        return self.scorer(arrays["ids_BT"], arrays["positions_BT"], arrays["segment_ids_BT"],
                           arrays["index_BC"], arrays["targets_BC"])

    def score_shared(self, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """``(logp_RC, greedy_RC)`` of one batch of requests sharing contexts
        (``SharedBatch.arrays()``): each context runs once."""
        return self.scorer.shared(arrays)

    @property
    def shares_contexts(self) -> bool:
        """Whether requests with one context can share its forward pass (a KV cache)."""
        return self.scorer.cache_spec is not None

    def generate(self, request: GenerationRequest) -> list[list[int]]:
        """New tokens per prompt (see :func:`~jaxtune.evaluation.generation.generate_until`)."""
        if self.generator is None:
            from jaxtune.evaluation.errors import EvalError

            raise EvalError("this model's family cannot generate (its hidden_states takes no "
                            "generation cache), so generation tasks cannot run; "
                            "log-likelihood tasks can.")
        return generate_until(self.generator, self.tokenizer, request)
