"""The generation an RL (or on-policy distillation) recipe runs every step, compiled for the
target beside its train step.

RL generates each step's completions on the training mesh, from the parameters the step
updates: the KV cache (rows x (prompt + new tokens) slots per layer, a sliding-window layer's
at most its window) and the decode loop's temporaries live beside the whole train state
(parameters, frozen base, optimizer state, reference copy), which stays resident while
generating. So an RL recipe fits only if both programs fit: the train step
(:mod:`jaxtune.plan.build`), and this one, prefill + the on-device decode loop of
:mod:`jaxtune.generation.loop` lowered for the target's compile-only devices with the shapes
the rollout producer uses (the prompt budget and ``max_completion_length``, bucketed as the
generator buckets them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtune.plan.report import shard_bytes


@dataclass
class GenerationPlan:
    """Per-chip bytes of the rollout generation (``compiler`` from memory_analysis)."""

    rows: int  # generated per step (bucketed)
    slots: int  # cache slots per row: prompt bucket + new-token bucket
    cache: int  # the KV cache
    model: int  # the parameters generation reads (the train state's own arrays)
    resident: int  # the rest of the train state, held while generating (optimizer, reference)
    temporaries: int
    peak: int
    hbm: int
    compiler: dict[str, int]

    @property
    def fits(self) -> bool:
        return self.peak <= self.hbm

    def describe(self) -> str:
        gib = float(1 << 30)
        return (f"rollout generation ({self.rows} rows x {self.slots} slots): KV cache "
                f"{self.cache / gib:.2f} GiB, parameters {self.model / gib:.2f} GiB, optimizer "
                f"state, reference and teacher held {self.resident / gib:.2f} GiB, temporaries "
                f"{self.temporaries / gib:.2f} GiB; peak {self.peak / gib:.2f} GiB of "
                f"{self.hbm / gib:.0f} GiB per chip")


def generation_plan(built: Any, cfg: Any, shape: tuple[int, int, int], platform: str,
                    hbm: int) -> GenerationPlan:
    """Compile prefill + decode of ``shape = (rows, prompt tokens, new tokens)`` over the
    built step's abstract state and mesh, and break its memory down per chip."""
    from jaxtune.generation.loop import (
        NEW_TOKENS_BUCKET,
        Generator,
        _round_up,
        decode_loop,
        prefill,
    )
    from jaxtune.generation.sampling import Sampling
    from jaxtune.kernels import compiling_for
    from jaxtune.sharding import batch_sharding, make_rules, state_shardings
    from jaxtune.train_state import train_state_shardings

    rows, prompt_len, new_tokens = shape
    mesh, rules = built.mesh, make_rules(cfg.mesh.rules)
    state = built.state
    with compiling_for(platform):
        model = nnx.merge(state.graphdef, state.params, state.frozen)
        gen = Generator(model, mesh=mesh, rules=rules)
    ids, positions, segments, nxt = gen.layout_prompts([[0] * prompt_len] * rows)
    bucket = _round_up(new_tokens, NEW_TOKENS_BUCKET)
    rows_b, slots = ids.shape[0], ids.shape[1] + bucket
    cache = jax.eval_shape(lambda: gen.new_cache(rows_b, slots))
    model_sh = state_shardings(gen.state, mesh, rules)
    cache_sh = jax.tree.map(lambda x: _cache_leaf_sharding(x, mesh, rules), cache)
    row_sh, rows_sh = batch_sharding(mesh, rules, 2), batch_sharding(mesh, rules, 1)
    sampling = (Sampling(cfg.distill.temperature) if cfg.trainer.objective == "distill"
                else Sampling(cfg.rl.temperature, cfg.rl.top_k, cfg.rl.top_p, cfg.rl.min_p))

    def rollout(model_state, ids, positions, segments, cache, nxt, key, done, stops):
        logits, cache = prefill(gen.graphdef, gen.ctx, model_state, ids, positions, segments,
                                cache)
        tokens, logps, _, _ = decode_loop(gen.graphdef, gen.ctx, sampling, bucket, model_state,
                                          logits, nxt, cache, key, done, stops,
                                          jnp.int32(new_tokens))
        return tokens, logps

    jitted = jax.jit(rollout, in_shardings=(model_sh, row_sh, row_sh, row_sh, cache_sh, rows_sh,
                                            None, rows_sh, None), donate_argnums=(4,))
    args = (gen.state, *(jax.ShapeDtypeStruct(x.shape, jnp.int32) for x in
                         (ids, positions, segments)), cache,
            jax.ShapeDtypeStruct(nxt.shape, jnp.int32), jax.eval_shape(jax.random.key, 0),
            jax.ShapeDtypeStruct(nxt.shape, jnp.bool_), jax.ShapeDtypeStruct((16,), jnp.int32))
    with compiling_for(platform):
        compiled = jitted.lower(*args).compile()
    stats = compiled.memory_analysis()
    compiler = {k: int(getattr(stats, k)) for k in (
        "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
        "temp_size_in_bytes", "generated_code_size_in_bytes")}
    state_sh = train_state_shardings(state, mesh, rules)
    resident = shard_bytes(state.opt_state, state_sh.opt_state)
    if state.reference is not None:
        resident += shard_bytes(state.reference, state_sh.reference)
    if getattr(built, "teacher", None) is not None:  # distillation's teacher stays on the chips
        resident += shard_bytes(built.teacher.state, built.teacher.shardings(mesh, rules))
    peak = (compiler["argument_size_in_bytes"] + compiler["output_size_in_bytes"]
            - compiler["alias_size_in_bytes"] + compiler["temp_size_in_bytes"]
            + compiler["generated_code_size_in_bytes"] + resident)
    return GenerationPlan(rows_b, slots, shard_bytes(cache, cache_sh),
                          shard_bytes(gen.state, model_sh), resident,
                          compiler["temp_size_in_bytes"], peak, hbm, compiler)


def _cache_leaf_sharding(x: Any, mesh: Any, rules: Any):
    """Where a cache array lives, as :mod:`jaxtune.generation.cache` places it: keys and
    values ``[L, B, S, K, H]`` (a sliding layer's ring: ``W`` slots), slot arrays ``[B, S]``
    and a ring's ``[L, B, W]`` by their logical axes, the write indices replicated."""
    from jaxtune.generation.cache import KV_AXES, RING_SLOT_AXES, SLOT_AXES
    from jaxtune.sharding import named_sharding

    axes = {5: KV_AXES, 3: RING_SLOT_AXES, 2: SLOT_AXES}.get(len(x.shape))
    return named_sharding(mesh, axes, rules, x.shape if axes else None)


def rollout_shape(cfg: Any) -> tuple[int, int, int]:
    """``(rows, prompt tokens, new tokens)`` an RL recipe generates each step at most."""
    rl = cfg.rl
    return (cfg.trainer.global_batch_size, cfg.data.seq_len - rl.max_completion_length,
            rl.max_completion_length)

