"""Prefill, decode and the on-device decoding loop, for any family's model.

Batched prompts are **left-padded** to a shape bucket (the prompt length rounded up to a power
of two, at least 16; the batch to a power of two the batch mesh axes divide). Why left
padding rather than per-row write positions: every row then writes the same cache slot at
every step, so the cache update is one ``dynamic_update_slice`` (no per-row scatter), the
prompt's last logits sit at the same index for every row, and the decode step's shapes never
depend on the prompt lengths. Each row keeps its own true positions (``0..n-1`` for its
prompt, counting on from ``n`` while decoding), so RoPE sees exactly what it would unpadded;
padding slots have segment 0 and are masked out (``jaxtune.generation.cache``).

Three jitted pieces, each compiled once per shape bucket, the cache donated to each:

- :func:`prefill` ``(params, ids, positions, segment_ids, cache) -> (last logits, cache)``
- :func:`decode` ``(params, token, position, cache) -> (logits, cache)``
- :func:`decode_loop`: ``lax.while_loop`` over decode + sampling until every row has emitted
  a stop id or ``max_new_tokens`` are out, all on device.

A family supports this by threading ``cache=`` through ``hidden_states`` (see
``jaxtune.models.family.CausalLM``); nothing here names a family.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxtune.generation.cache import KVCache, cache_layout, empty_cache, empty_grouped_cache
from jaxtune.generation.errors import GenerateError
from jaxtune.generation.sampling import Sampling, sample, token_logps
from jaxtune.sharding import (
    Rules,
    activation_rules,
    batch_axis_size,
    batch_sharding,
    host_array,
)

MIN_PROMPT_BUCKET = 16
NEW_TOKENS_BUCKET = 32  # max_new_tokens rounds up to a multiple of this (the cache's slots)
DONE = -1  # the token id written after a row has stopped
MAX_STOP_IDS = 16  # stop ids are data (no recompile per set), padded to this many


# --------------------------------------------------------------------------- jitted pieces


def _forward(graphdef, ctx, state, ids_BT, positions_BT, segment_ids_BT, cache):
    """Last-position float32 logits ``[B, V]`` and the updated cache."""
    mesh, rules = ctx if ctx is not None else (None, None)
    with activation_rules(mesh, dict(rules) if rules else None):
        model = nnx.merge(graphdef, state)
        hidden_BTD, cache = model.hidden_states(ids_BT, positions_BT, segment_ids_BT,
                                                cache=cache)
        return model.unembed(hidden_BTD[:, -1]), cache


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(6,))
def prefill(graphdef, ctx, state, ids_BT, positions_BT, segment_ids_BT, cache):
    """Run the (left-padded) prompts into an empty cache: ``(last logits [B, V], cache)``."""
    return _forward(graphdef, ctx, state, ids_BT, positions_BT, segment_ids_BT, cache)


def _decode(graphdef, ctx, state, token_B, position_B, cache):
    return _forward(graphdef, ctx, state, token_B[:, None], position_B[:, None], None, cache)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(5,))
def decode(graphdef, ctx, state, token_B, position_B, cache):
    """One token per row at ``position_B``: ``(logits [B, V], cache)``."""
    return _decode(graphdef, ctx, state, token_B, position_B, cache)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), donate_argnums=(7,))
def decode_loop(graphdef, ctx, sampling: Sampling, bucket: int, state, logits_BV, position_B,
                cache, key, done_B, stops, max_new):
    """Sample up to ``max_new`` (<= ``bucket``) tokens per row from the prefill's logits,
    stopping a row at any id of ``stops`` (``[MAX_STOP_IDS]``, padded with ``DONE``).

    Returns ``(tokens [B, bucket], logps [B, bucket], steps, cache)``: a row's tokens end with
    its stop id and are ``DONE`` after it (and after ``max_new``); ``logps`` holds each token's
    log-prob under the temperature-scaled softmax over the whole vocabulary
    (:func:`~jaxtune.generation.sampling.token_logps`, 0 after the row stopped)."""
    def pick(logits_BV, step, done_B):
        token_B = sample(logits_BV, jax.random.fold_in(key, step), sampling)
        logp_B = jnp.where(done_B, 0.0, token_logps(logits_BV, token_B, sampling))
        token_B = jnp.where(done_B, DONE, token_B)
        return token_B, logp_B, done_B | jnp.isin(token_B, stops)

    first_B, logp_B, done_B = pick(logits_BV, 0, done_B)
    tokens_BN = jnp.full((first_B.shape[0], bucket), DONE, jnp.int32).at[:, 0].set(first_B)
    logps_BN = jnp.zeros((first_B.shape[0], bucket), jnp.float32).at[:, 0].set(logp_B)

    def cond(carry):
        step, _, _, _, _, _, done_B = carry
        return (step < max_new) & ~jnp.all(done_B)

    def body(carry):
        step, token_B, position_B, cache, tokens_BN, logps_BN, done_B = carry
        # A stopped row feeds token 0: its cache slots are never read for its answer again.
        logits_BV, cache = _decode(graphdef, ctx, state, jnp.maximum(token_B, 0), position_B,
                                   cache)
        token_B, logp_B, done_B = pick(logits_BV, step, done_B)
        tokens_BN = jax.lax.dynamic_update_slice(tokens_BN, token_B[:, None], (0, step))
        logps_BN = jax.lax.dynamic_update_slice(logps_BN, logp_B[:, None], (0, step))
        return step + 1, token_B, position_B + 1, cache, tokens_BN, logps_BN, done_B

    carry = (jnp.int32(1), first_B, position_B, cache, tokens_BN, logps_BN, done_B)
    step, _, _, cache, tokens_BN, logps_BN, _ = jax.lax.while_loop(cond, body, carry)
    return tokens_BN, logps_BN, step, cache


_sample = jax.jit(sample, static_argnums=(2,))
# Executables by (function, static args, argument shapes / dtypes / shardings), shared by every
# Generator: a model's graph is the same from call to call (new parameters reuse them).
_COMPILED: dict[Any, Any] = {}
_MAX_COMPILED = 64


# --------------------------------------------------------------------------- the generator


def _bucket(n: int, minimum: int) -> int:
    return max(minimum, 1 << max(0, n - 1).bit_length())


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _model_mesh(state: Any) -> Mesh | None:
    for leaf in jax.tree.leaves(state):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return sharding.mesh
    return None


def supports_cache(model: Any) -> bool:
    """Whether the family's ``hidden_states`` takes a generation ``cache``."""
    try:
        return "cache" in inspect.signature(model.hidden_states).parameters
    except (TypeError, ValueError, AttributeError):
        return False


@dataclass
class Generated:
    """Token ids per prompt (ending with the stop id when one was emitted) and timings."""

    tokens: list[list[int]]
    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float
    compile_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    #: per prompt, each new token's log-prob under the temperature-scaled softmax over the
    #: whole vocabulary (the sampler's side of RL's sampler-vs-trainer check); None when
    #: streamed
    logps: list[list[float]] | None = None

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / max(self.prefill_s, 1e-9)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.new_tokens / max(self.decode_s, 1e-9)


class Generator:
    """Generation from one model: its parameters split once, its mesh and cache layout.

    ``mesh`` defaults to the mesh the parameters are sharded over (none: one device);
    ``rules`` are the logical sharding rules (default ``jaxtune.sharding.DEFAULT_RULES``).
    """

    def __init__(self, model: nnx.Module, *, mesh: Mesh | None = None,
                 rules: Rules | None = None):
        if not supports_cache(model):
            raise GenerateError(
                f"{type(model).__name__}.hidden_states takes no generation cache, so this "
                "family cannot generate yet (see the cache contract in "
                "jaxtune/models/family.py CausalLM).")
        self.graphdef, self.state = nnx.split(model)
        self.mesh = mesh or _model_mesh(self.state)
        self.rules = rules
        self.ctx = None if self.mesh is None else (
            self.mesh, tuple(sorted(rules.items())) if rules else None)
        self.layout = cache_layout(model)
        self.vocab_size = model.config.vocab_size
        self.compile_s = 0.0  # seconds spent compiling, all shape buckets together
        self.batch_multiple = 1 if self.mesh is None else batch_axis_size(self.mesh, rules)
        probe = jax.ShapeDtypeStruct((1, 1), jnp.int32)
        self.dtype = jax.eval_shape(
            lambda st, ids: nnx.merge(self.graphdef, st).hidden_states(ids), self.state,
            probe).dtype

    def use(self, model: nnx.Module) -> Generator:
        """Generate from ``model``'s current parameters from now on (a train state's model
        after a step: same graph and mesh, new arrays; nothing is copied or recompiled)."""
        self.graphdef, self.state = nnx.split(model)
        return self

    # ------------------------------------------------------------ building blocks

    def new_cache(self, batch: int, slots: int) -> KVCache:
        if isinstance(self.layout, dict):  # one stack per kind of layer (Gemma 4)
            return empty_grouped_cache(self.layout, batch, slots, self.dtype, self.mesh,
                                       self.rules)
        layers, kv_heads, head_dim, *window = self.layout  # a window: a ring (cache.py)
        return empty_cache(layers, batch, slots, kv_heads, head_dim, self.dtype, self.mesh,
                           self.rules, window=window[0] if window else None)

    def _put(self, x: np.ndarray) -> jax.Array:
        """A host array (the same on every process) as a global array split over batch."""
        if self.mesh is None:
            return jnp.asarray(x)
        x = np.asarray(x)
        sharding = batch_sharding(self.mesh, self.rules, x.ndim)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    def layout_prompts(self, prompts: Sequence[Sequence[int]]
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Left-padded ``ids, positions, segment_ids [Bb, P]`` and each row's next position
        ``[Bb]``. Rows added to fill the batch bucket hold one token and are ignored."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise GenerateError("every prompt needs at least one token.")
        lengths = [len(p) for p in prompts]
        t = _bucket(max(lengths), MIN_PROMPT_BUCKET)
        b = _round_up(_bucket(len(prompts), 1), self.batch_multiple)
        ids = np.zeros((b, t), np.int32)
        segs = np.zeros((b, t), np.int32)
        positions = np.zeros((b, t), np.int32)
        rows = [list(p) for p in prompts] + [[0]] * (b - len(prompts))
        nxt = np.zeros((b,), np.int32)
        for i, row in enumerate(rows):
            n = len(row)
            ids[i, t - n:] = row
            segs[i, t - n:] = 1
            positions[i, t - n:] = np.arange(n)
            nxt[i] = n
        return ids, positions, segs, nxt

    def _call(self, fn, static: tuple, *dynamic: Any):
        """``fn(*static, *dynamic)`` through an executable compiled once per shape bucket (so
        compile time is counted apart from prefill and decode time)."""
        key = (fn, static, jax.tree.structure(dynamic),
               tuple((x.shape, x.dtype, getattr(x, "sharding", None))
                     for x in jax.tree.leaves(dynamic)))
        compiled = _COMPILED.get(key)
        if compiled is None:
            start = time.perf_counter()
            compiled = fn.lower(*static, *dynamic).compile()
            self.compile_s += time.perf_counter() - start
            if len(_COMPILED) >= _MAX_COMPILED:  # drop the oldest
                _COMPILED.pop(next(iter(_COMPILED)))
            _COMPILED[key] = compiled
        return compiled(*dynamic)

    def prefill(self, ids_BT, positions_BT, segment_ids_BT, cache: KVCache):
        """Last-position logits ``[B, V]`` of left-padded prompts, and the filled cache."""
        return self._call(prefill, (self.graphdef, self.ctx), self.state, self._put(ids_BT),
                          self._put(positions_BT), self._put(segment_ids_BT), cache)

    def decode(self, token_B, position_B, cache: KVCache):
        """Logits ``[B, V]`` after one more token per row, and the updated cache."""
        return self._call(decode, (self.graphdef, self.ctx), self.state,
                          self._put(np.asarray(token_B, np.int32)),
                          self._put(np.asarray(position_B, np.int32)), cache)

    def decode_steps(self, logits_BV, position_B, cache: KVCache, *, steps: int, bucket: int,
                     sampling: Sampling, key: jax.Array, done_B, stops_S) -> tuple:
        """The on-device loop (:func:`decode_loop`) for up to ``steps`` (<= ``bucket``) new
        tokens per row, picked from ``logits_BV`` on: ``(tokens [B, bucket] on the host,
        cache)``. A caller that checks stop strings on the host between calls continues by
        feeding each row's last token to :meth:`decode`."""
        static = (self.graphdef, self.ctx, sampling, bucket)
        tokens_BN, _, _, cache = self._call(  # tokens, their log-probs, steps taken, cache
            decode_loop, static, self.state, logits_BV,
            self._put(np.asarray(position_B, np.int32)), cache, key,
            self._put(np.asarray(done_B)), jnp.asarray(stops_S, jnp.int32), jnp.int32(steps))
        return host_array(tokens_BN), cache

    # ------------------------------------------------------------ the whole thing

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 128,
                 sampling: Sampling | None = None, seed: int = 0,
                 stop_ids: Sequence[int] = (),
                 stream: Callable[[int, list[int]], None] | None = None) -> Generated:
        """New tokens for each prompt (token ids), until a stop id or ``max_new_tokens``.

        ``stream(step, tokens)`` (optional) is called with each step's token per prompt
        (``DONE`` for a finished row); the loop then runs step by step from the host.
        """
        sampling = sampling or Sampling()
        if max_new_tokens < 1:
            raise GenerateError(f"max_new_tokens={max_new_tokens} must be at least 1.")
        bad = [p for p in prompts for t in p if not 0 <= int(t) < self.vocab_size]
        if bad:
            raise GenerateError(f"a prompt holds token ids outside the vocabulary "
                                f"(size {self.vocab_size}): {bad[0]}.")
        ids, positions, segs, nxt = self.layout_prompts(prompts)
        bucket = _round_up(max_new_tokens, NEW_TOKENS_BUCKET)
        cache = self.new_cache(ids.shape[0], ids.shape[1] + bucket)
        n_real = len(prompts)
        done = np.arange(ids.shape[0]) >= n_real
        stops = sorted({int(s) for s in stop_ids})
        if len(stops) > MAX_STOP_IDS:
            raise GenerateError(f"{len(stops)} stop ids; at most {MAX_STOP_IDS} are supported.")
        stops_S = np.full((MAX_STOP_IDS,), DONE, np.int32)
        stops_S[:len(stops)] = stops
        key = jax.random.key(seed)

        compile_before = self.compile_s
        start = time.perf_counter()
        logits_BV, cache = self.prefill(ids, positions, segs, cache)
        logits_BV.block_until_ready()
        prefill_s = time.perf_counter() - start - (self.compile_s - compile_before)
        compile_mid = self.compile_s
        start = time.perf_counter()
        if stream is None:
            static = (self.graphdef, self.ctx, sampling, bucket)
            loop_args = (self.state, logits_BV, self._put(nxt), cache, key, self._put(done),
                         jnp.asarray(stops_S), jnp.int32(max_new_tokens))
            tokens_BN, logps_BN, _, _ = self._call(decode_loop, static, *loop_args)
            tokens_BN, logps_BN = host_array(tokens_BN), host_array(logps_BN)
        else:
            tokens_BN = self._stream(logits_BV, nxt, cache, key, done, stops_S, bucket,
                                     max_new_tokens, sampling, stream, n_real)
            logps_BN = None
        decode_s = time.perf_counter() - start - (self.compile_s - compile_mid)
        out = []
        for row in tokens_BN[:n_real]:
            kept = [int(t) for t in row if t != DONE]
            out.append(kept)
        logps = None if logps_BN is None else [
            [float(x) for x in row[:len(kept)]] for row, kept in zip(logps_BN, out, strict=False)]
        # The first token comes from the prefill's logits: decoding made the rest.
        new = sum(max(0, len(r) - 1) for r in out)
        return Generated(out, sum(len(p) for p in prompts), new, prefill_s, decode_s,
                         self.compile_s - compile_before, logps=logps)

    def _stream(self, logits_BV, nxt, cache, key, done, stops, bucket, max_new, sampling,
                stream, n_real) -> np.ndarray:
        """The decoding loop from the host, one step at a time, reporting each step."""
        tokens = np.full((len(nxt), bucket), DONE, np.int32)
        position = np.asarray(nxt)
        token = np.zeros_like(position)
        for step in range(max_new):
            if step:
                logits_BV, cache = self.decode(np.maximum(token, 0), position, cache)
                position = position + 1
            token = host_array(_sample(logits_BV, jax.random.fold_in(key, step), sampling))
            token = np.where(done, DONE, token)
            tokens[:, step] = token
            done = done | np.isin(token, stops)
            stream(step, [int(t) for t in token[:n_real]])
            if done.all():
                break
        return tokens
