"""Generation until stop ids or stop strings, for lm_eval's ``generate_until``.

Stop ids (EOS, end of turn) end a row on device, inside the decoding loop. Stop strings
(a task's ``until``) can span tokens, so they are checked on the host: the loop runs
``CHUNK`` tokens at a time and, between chunks, every row whose decoded text holds a stop
string is marked done, so it stops costing decode steps. Greedy tokens do not depend on the
chunking. Every process runs this with the same inputs and makes the same decisions (its
tokens are gathered to every host), so it runs unchanged on many hosts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import jax
import numpy as np

from jaxtune.generation.errors import GenerateError
from jaxtune.generation.loop import DONE, MAX_STOP_IDS, NEW_TOKENS_BUCKET, Generator
from jaxtune.generation.sampling import Sampling

CHUNK = 32  # new tokens per on-device loop between stop-string checks


@dataclass(frozen=True)
class GenerationRequest:
    """One batch of prompts (token ids) with the same generation settings."""

    prompts: tuple[tuple[int, ...], ...]
    max_new_tokens: int
    sampling: Sampling
    seed: int
    stop_ids: tuple[int, ...]
    stop_strings: tuple[str, ...]


def _has_stop(tokenizer, tokens: list[int], stops: Sequence[str]) -> bool:
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    return any(s and s in text for s in stops)


def generate_until(gen: Generator, tokenizer, req: GenerationRequest) -> list[list[int]]:
    """New tokens per prompt: up to ``max_new_tokens``, ending at a stop id (kept), or a
    little past the first stop string (the caller cuts the text there)."""
    if req.max_new_tokens < 1:
        raise GenerateError(f"max_gen_toks={req.max_new_tokens} must be at least 1.")
    stops = sorted(set(req.stop_ids))
    if len(stops) > MAX_STOP_IDS:
        raise GenerateError(f"{len(stops)} stop ids; at most {MAX_STOP_IDS} are supported.")
    stops_S = np.full((MAX_STOP_IDS,), DONE, np.int32)
    stops_S[:len(stops)] = stops
    ids, positions, segs, nxt = gen.layout_prompts(req.prompts)
    n = len(req.prompts)
    cache = gen.new_cache(ids.shape[0], ids.shape[1] + -(-req.max_new_tokens // NEW_TOKENS_BUCKET)
                          * NEW_TOKENS_BUCKET)
    logits_BV, cache = gen.prefill(ids, positions, segs, cache)
    done = np.arange(ids.shape[0]) >= n
    out: list[list[int]] = [[] for _ in range(n)]
    position = nxt.copy()
    key = jax.random.key(req.seed)
    made = 0
    while made < req.max_new_tokens:
        steps = min(CHUNK, req.max_new_tokens - made)
        tokens_BN, cache = gen.decode_steps(
            logits_BV, position, cache, steps=steps, bucket=CHUNK, sampling=req.sampling,
            key=jax.random.fold_in(key, made), done_B=done, stops_S=stops_S)
        tokens_BN = tokens_BN[:, :steps]
        for i in range(n):
            if not done[i]:
                new = [int(t) for t in tokens_BN[i] if t != DONE]
                out[i] += new
                if (new and new[-1] in stops) or (req.stop_strings and _has_stop(
                        tokenizer, out[i], req.stop_strings)):
                    done[i] = True
        made += steps
        if done.all() or made >= req.max_new_tokens:
            break
        # Feed each row's last token: the next chunk starts from its logits.
        last = np.array([o[-1] if o and not d else 0 for o, d in
                         zip(out + [[]] * (len(done) - n), done, strict=True)], np.int32)
        position = position + steps - 1
        logits_BV, cache = gen.decode(last, position, cache)
        position = position + 1
    return out
