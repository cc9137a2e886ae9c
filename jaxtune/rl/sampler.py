"""Completions from a model on the training mesh, cut at their stop id: what every on-policy
producer samples with (RL's rollouts, distillation's student and teacher completions).

A :class:`ModelSampler` keeps one :class:`~jaxtune.generation.loop.Generator` per model graph
and points it at the arrays it is given each time (a train state's parameters after a step:
nothing is copied, synced or recompiled), generates with jaxtune's own KV-cache loop and cuts
each row at its first stop id (:func:`~jaxtune.rl.rollout.cut_at_stop`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from jaxtune.errors import JaxtuneError
from jaxtune.rl.rollout import Completion, cut_at_stop


class ModelSampler:
    """Sampling completions of token prompts from a model (see the module docstring)."""

    def __init__(self, mesh: Any, rules: Any, stop_ids: Sequence[int]):
        self.mesh, self.rules = mesh, rules
        self.stop_ids = list(stop_ids)
        self._generators: dict[Any, Any] = {}

    def generator(self, model: Any):
        """The KV-cache generator over ``model``'s current arrays."""
        from flax import nnx

        from jaxtune.generation.loop import Generator

        graphdef = nnx.graphdef(model)
        gen = self._generators.get(graphdef)
        if gen is None:
            gen = self._generators[graphdef] = Generator(model, mesh=self.mesh,
                                                         rules=self.rules)
        return gen.use(model)

    def sample(self, model: Any, prompts: Sequence[Sequence[int]], sampling: Any, *,
               max_new_tokens: int, seed: int = 0) -> tuple[list[Completion], float, int]:
        """One completion per prompt, the seconds it took and the new tokens."""
        start = time.perf_counter()
        out = self.generator(model).generate(
            [list(p) for p in prompts], max_new_tokens=max_new_tokens, sampling=sampling,
            seed=seed, stop_ids=self.stop_ids)
        took = time.perf_counter() - start
        completions = [cut_at_stop(ids, logps, self.stop_ids, max_new_tokens)
                       for ids, logps in zip(out.tokens, out.logps, strict=True)]
        return completions, took, sum(len(c.ids) for c in completions)


def stop_ids(cfg: Any, tokenizer: Any) -> list[int]:
    """The base model's generation_config EOS ids, the tokenizer's EOS and end-of-turn."""
    from jaxtune.export.writer import read_generation_config
    from jaxtune.generation.api import default_stop_ids
    from jaxtune.weights import resolve_model_dir

    generation = read_generation_config(resolve_model_dir(cfg.model.path))
    ids = default_stop_ids(tokenizer, generation)
    if not ids:
        raise JaxtuneError(
            f"Neither the tokenizer nor {cfg.model.path}'s generation_config names an EOS or "
            "end-of-turn token, so completions could never end; set the tokenizer's "
            "eos_token (or a chat template with an end-of-turn token).")
    return ids


def pad_id(tokenizer: Any) -> int:
    """The id written into padding: the tokenizer's pad (or unk) id, else 0."""
    for tok in (tokenizer.pad_token_id, tokenizer.unk_token_id):
        if tok is not None:
            return int(tok)
    return 0  # padding has segment 0: its id is never seen by a real token nor trained
