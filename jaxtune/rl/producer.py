"""The rollout producer: each RL step's batch, generated with the step's current parameters.

A :class:`~jaxtune.batches.BatchSource` (``on_policy``): for each step it

1. takes ``global_batch_size / num_generations`` prompts from the data (resumable position);
2. generates ``num_generations`` completions of each with jaxtune's own KV-cache generator,
   from the train state's parameters as they are (LoRA adapters on), on the training mesh:
   no copy of the weights, nothing to sync, any number of SPMD processes;
3. scores them with the reward functions (each process its share of rows, then gathered);
4. computes TRL's group advantages, and with ``rl.dynamic_sampling`` (DAPO) first replaces
   groups whose rewards are all equal with groups of further prompts, a bounded number of
   generation rounds;
5. lays the rows out (:mod:`jaxtune.rl.rollout`) and places them on the mesh, with the old
   log-probs (``num_iterations`` > 1) and the reference's (``beta`` > 0) computed once, in one
   jitted forward pass.

With ``num_iterations`` (mu) > 1 the same batch serves mu steps. The producer's state (the
prompt position, the number of generation rounds, which seeds the sampling, and a batch with
uses left) is saved in every checkpoint, so a resumed run generates exactly what an
uninterrupted one would.

:func:`evaluate_rewards` is the objective's held-out evaluation: greedy answers to the eval
prompts, scored by the same reward functions.
"""

from __future__ import annotations

import base64
import io
import logging
import time
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from jaxtune.batches import Produced
from jaxtune.data.prompts import Prompt, PromptIterator, load_prompts
from jaxtune.rl.advantages import advantages, informative_groups, nanstd, total_rewards
from jaxtune.rl.rewards import Reward, TrainerStateView, load_rewards, score
from jaxtune.rl.rollout import Completion, rollout_arrays
from jaxtune.rl.sampler import ModelSampler, pad_id, stop_ids

log = logging.getLogger("jaxtune")

_SCALARS = ("num_completion_tokens", "num_sequences")


@dataclass
class Rollout:
    """Rows of one step before layout: prompts (repeated per generation), completions,
    rewards ``[N, F]``."""

    prompts: list[Prompt]
    completions: list[Completion]
    rewards: np.ndarray
    generated_tokens: int = 0
    generate_s: float = 0.0
    score_s: float = 0.0

    def groups(self, g: int) -> list[Rollout]:
        return [Rollout(self.prompts[i:i + g], self.completions[i:i + g], self.rewards[i:i + g])
                for i in range(0, len(self.prompts), g)]

    @staticmethod
    def join(parts: list[Rollout]) -> Rollout:
        return Rollout([p for r in parts for p in r.prompts],
                       [c for r in parts for c in r.completions],
                       np.concatenate([r.rewards for r in parts]))


@dataclass
class _Pending:
    """A placed batch with uses left (num_iterations > 1), and its host arrays for checkpoints."""

    host: dict[str, np.ndarray]
    metrics: dict[str, float]
    uses: int
    batch: dict[str, jax.Array] | None = None
    tokens: float = 0.0


class RolloutProducer:
    """RL's batch source (see the module docstring)."""

    on_policy = True

    def __init__(self, trainer: Any):
        cfg = trainer.cfg
        self.cfg, self.rl = cfg, cfg.rl
        self.mesh, self.rules = trainer.mesh, trainer.rules
        self.tokenizer = trainer.tokenizer
        self.batch_axes = trainer.loss_fn.batch_axes
        self.rewards: list[Reward] = load_rewards(cfg.rl)
        self.weights = np.asarray([r.weight for r in self.rewards], np.float32)
        self.prompts = load_prompts(cfg, self.tokenizer, "train")
        self.iterator = PromptIterator(self.prompts, seed=cfg.run.seed, shuffle=cfg.data.shuffle)
        self.group = cfg.rl.num_generations
        self.prompts_per_step = cfg.trainer.global_batch_size // self.group
        budget = cfg.data.seq_len - cfg.rl.max_completion_length
        longest = max(len(p.ids) for p in self.prompts)
        self.prompt_width = min(budget, -(-longest // 8) * 8)  # static: one compiled step
        self.completion_width = cfg.rl.max_completion_length
        self.stop_ids = stop_ids(cfg, self.tokenizer)
        self.pad_id = pad_id(self.tokenizer)
        self.max_steps = cfg.trainer.steps
        self.rounds = 0  # generation rounds so far: round r samples with seed (seed, r)
        self.pending: _Pending | None = None
        self.sampler = ModelSampler(self.mesh, self.rules, self.stop_ids)
        self._logps_fn = None
        self._eval_prompts: list[Prompt] | None = None

    # ------------------------------------------------------------------ generation

    def generator(self, state: Any):
        """The KV-cache generator over the state's current parameters."""
        return self.sampler.generator(state.model())

    def sample(self, state: Any, prompts: list[Prompt], *, greedy: bool = False,
               max_new_tokens: int | None = None, seed: int = 0) -> tuple[list[Completion],
                                                                          float, int]:
        """Completions of ``prompts`` (one each), the seconds it took and the new tokens."""
        from jaxtune.generation.sampling import Sampling

        rl = self.rl
        sampling = Sampling() if greedy else Sampling(rl.temperature, rl.top_k, rl.top_p,
                                                      rl.min_p)
        return self.sampler.sample(state.model(), [p.ids for p in prompts], sampling,
                                   max_new_tokens=max_new_tokens or self.completion_width,
                                   seed=seed)

    def score(self, prompts: list[Prompt], completions: list[Completion], step: int
              ) -> np.ndarray:
        """``[N, F]`` rewards: each process scores its share of rows, then all are gathered."""
        n, count, me = len(prompts), jax.process_count(), jax.process_index()
        share = -(-n // count)
        lo, hi = min(n, me * share), min(n, (me + 1) * share)
        texts = self.tokenizer.batch_decode([c.ids for c in completions[lo:hi]],
                                            skip_special_tokens=True)
        mine = prompts[lo:hi]
        shown = [t if isinstance(p.prompt, str) else [{"role": "assistant", "content": t}]
                 for p, t in zip(mine, texts, strict=True)]
        names = sorted({k for p in mine for k in p.columns})
        columns = {k: [p.columns.get(k) for p in mine] for k in names}
        local = score(self.rewards, [p.prompt for p in mine], shown,
                      [c.ids for c in completions[lo:hi]], columns, [p.where for p in mine],
                      TrainerStateView(step, self.max_steps)) if mine else \
            np.zeros((0, len(self.rewards)), np.float32)
        if count == 1:
            return local
        from jax.experimental import multihost_utils

        padded = np.full((share, len(self.rewards)), np.nan, np.float32)
        padded[:len(local)] = local
        gathered = np.asarray(multihost_utils.process_allgather(padded))
        return gathered.reshape(-1, len(self.rewards))[:n]

    def _round(self, state: Any, step: int) -> Rollout:
        prompts = [p for p in self.iterator.take(self.prompts_per_step)
                   for _ in range(self.group)]
        seed = (self.cfg.run.seed * 1_000_003 + self.rounds) % (2**31 - 1)
        self.rounds += 1
        completions, gen_s, new = self.sample(state, prompts, seed=seed)
        start = time.perf_counter()
        rewards = self.score(prompts, completions, step)
        return Rollout(prompts, completions, rewards, new, gen_s, time.perf_counter() - start)

    def rollout(self, state: Any, step: int) -> tuple[Rollout, dict[str, float]]:
        """One step's rows (dynamic sampling included) and its sampling metrics."""
        rounds, kept, spare = [], [], []
        for _ in range(self.rl.max_sampling_rounds if self.rl.dynamic_sampling else 1):
            r = self._round(state, step)
            rounds.append(r)
            if not self.rl.dynamic_sampling:
                kept = r.groups(self.group)
                break
            useful = informative_groups(r.rewards, self.weights, self.group)
            for group, ok in zip(r.groups(self.group), useful, strict=True):
                (kept if ok else spare).append(group)
            if len(kept) >= self.prompts_per_step:
                break
        informative = min(len(kept), self.prompts_per_step)
        groups = (kept + spare)[:self.prompts_per_step]
        rollout = Rollout.join(groups)
        rollout.generated_tokens = sum(r.generated_tokens for r in rounds)
        rollout.generate_s = sum(r.generate_s for r in rounds)
        rollout.score_s = sum(r.score_s for r in rounds)
        metrics = {}
        if self.rl.dynamic_sampling:
            metrics = {"dynamic_sampling/rounds": float(len(rounds)),
                       "dynamic_sampling/informative_groups": informative / self.prompts_per_step}
            if informative < self.prompts_per_step:
                log.info("dynamic sampling: %d of %d groups carry a signal after %d rounds; the "
                         "rest are groups of equal rewards (zero advantage)", informative,
                         self.prompts_per_step, len(rounds))
        return rollout, metrics

    # ------------------------------------------------------------------ the batch

    def next(self, state: Any) -> Produced:
        mu = self.rl.num_iterations
        if self.pending is not None and self.pending.uses < mu:
            p = self.pending
            if p.batch is None:  # restored from a checkpoint: place it again
                p.batch, p.tokens = self._place(p.host), float((p.host["segment_ids"] > 0).sum())
            p.uses += 1
            return Produced(p.batch, p.tokens, {**p.metrics, "rl/iteration": float(p.uses)})
        step = int(jax.device_get(state.step)) + 1
        rollout, metrics = self.rollout(state, step)
        host = self._host_arrays(rollout)
        batch = self._place(host)
        extra = self._stored_logps(state, batch)
        batch.update(extra)
        metrics.update(self._metrics(rollout, host, extra))
        tokens = float((host["segment_ids"] > 0).sum())
        if mu > 1:
            host.update({k: np.asarray(_gather(v)) for k, v in extra.items()})
            self.pending = _Pending(host, metrics, 1, batch, tokens)
        return Produced(batch, tokens, {**metrics, "rl/iteration": 1.0})

    def _host_arrays(self, rollout: Rollout) -> dict[str, np.ndarray]:
        host = rollout_arrays([p.ids for p in rollout.prompts], rollout.completions,
                              prompt_width=self.prompt_width,
                              completion_width=self.completion_width, pad_id=self.pad_id,
                              mask_truncated=self.rl.mask_truncated_completions)
        adv, _ = advantages(rollout.rewards, self.weights, self.group, self.rl.scale_rewards)
        host["advantages"] = adv
        host["rewards"] = rollout.rewards  # host only: metrics and checkpoints
        host["num_completion_tokens"] = np.float32(host["completion_mask"].sum())
        host["num_sequences"] = np.float32(len(adv))
        return host

    def _place(self, host: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """The batch's global arrays, each sharded by its logical axes (the same on every
        process: every process holds the whole rollout)."""
        from jax.sharding import NamedSharding, PartitionSpec

        from jaxtune.sharding import named_sharding, present_rules

        rules = present_rules(self.rules, self.mesh)
        keys = [k for k in host if k in self.batch_axes or k in _SCALARS]
        if self.rl.num_iterations > 1:
            keys = [k for k in keys if k != "sampler_logps"]  # the check is made on the host
        out = {}
        for k in keys:
            x = np.asarray(host[k])
            sharding = (NamedSharding(self.mesh, PartitionSpec()) if x.ndim == 0 else
                        named_sharding(self.mesh, self.batch_axes[k], rules, x.shape))
            out[k] = jax.make_array_from_callback(x.shape, sharding, lambda i, x=x: x[i])
        return out

    def _stored_logps(self, state: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """Old log-probs (num_iterations > 1) and the reference's (beta > 0), computed once
        per rollout by the same function as the loss's."""
        need_old, need_ref = self.rl.num_iterations > 1, self.rl.beta != 0.0
        if not (need_old or need_ref):
            return {}
        if self._logps_fn is None:
            self._logps_fn = _logps_fn(state, self.mesh, self.rules, self.cfg, need_old,
                                       need_ref)
        return self._logps_fn(state, {k: v for k, v in batch.items() if k not in _SCALARS})

    def _metrics(self, rollout: Rollout, host: dict[str, np.ndarray],
                 extra: dict[str, jax.Array]) -> dict[str, float]:
        lengths = np.asarray([len(c.ids) for c in rollout.completions], np.float32)
        totals = total_rewards(rollout.rewards, self.weights)
        _, std = advantages(rollout.rewards, self.weights, self.group, "group")
        out = {
            "reward": _nanmean(totals),
            "reward_std": float(nanstd(totals)),
            "frac_reward_zero_std": float(np.isclose(np.nan_to_num(std, nan=0.0), 0).mean()),
            "completions/mean_length": float(lengths.mean()),
            "completions/max_length": float(lengths.max()),
            "completions/min_length": float(lengths.min()),
            "completions/clipped_ratio": float(np.mean([not c.stopped
                                                        for c in rollout.completions])),
            "time/generate_s": rollout.generate_s,
            "time/score_s": rollout.score_s,
            "rollout/tokens_per_s": rollout.generated_tokens / max(rollout.generate_s, 1e-9),
        }
        for j, r in enumerate(self.rewards):
            out[f"rewards/{r.name}/mean"] = _nanmean(rollout.rewards[:, j])
            out[f"rewards/{r.name}/std"] = float(nanstd(rollout.rewards[:, j]))
        if "old_logps" in extra:  # the sampler-vs-trainer check on the host (mu > 1)
            mask = host["completion_mask"] > 0
            diff = np.abs(np.asarray(_gather(extra["old_logps"])) - host["sampler_logps"])[mask]
            out["sampling/logp_diff_mean"] = float(diff.mean()) if diff.size else 0.0
            out["sampling/logp_diff_max"] = float(diff.max()) if diff.size else 0.0
        return out

    # ------------------------------------------------------------------ state

    def get_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"kind": "rollouts", "prompts": self.iterator.get_state(),
                                 "rounds": self.rounds, "pending": None}
        p = self.pending
        if p is not None and p.uses < self.rl.num_iterations:
            state["pending"] = {"uses": p.uses, "metrics": p.metrics,
                                "arrays": _encode_arrays(p.host)}
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        from jaxtune.data.errors import DataError

        if state.get("kind") != "rollouts":
            raise DataError("This checkpoint's data position was saved by another objective's "
                            "data (not RL rollouts); resume it with the objective it trained.")
        self.iterator.set_state(state["prompts"])
        self.rounds = int(state["rounds"])
        pending = state.get("pending")
        self.pending = None if pending is None else _Pending(
            _decode_arrays(pending["arrays"]), dict(pending["metrics"]), int(pending["uses"]))

    @property
    def stats(self) -> dict[str, Any]:
        return {"prompts": len(self.prompts), "prompts_per_step": self.prompts_per_step,
                "num_generations": self.group, "prompt_width": self.prompt_width,
                "completion_width": self.completion_width}

    # ------------------------------------------------------------------ held-out

    def evaluate(self, state: Any) -> dict[str, float]:
        """Greedy answers to the eval prompts, scored by the reward functions."""
        if self._eval_prompts is None:
            self._eval_prompts = load_prompts(self.cfg, self.tokenizer, "eval")
        prompts = self._eval_prompts
        if not prompts:
            return {}
        limit = self.rl.eval_max_completion_length or self.completion_width
        size = self.cfg.trainer.global_batch_size
        completions: list[Completion] = []
        for i in range(0, len(prompts), size):
            done, _, _ = self.sample(state, prompts[i:i + size], greedy=True,
                                     max_new_tokens=limit)
            completions += done
        step = int(jax.device_get(state.step))
        rewards = self.score(prompts, completions, step)
        out = {"eval_reward": _nanmean(total_rewards(rewards, self.weights)),
               "eval_completions/mean_length": float(np.mean([len(c.ids)
                                                              for c in completions])),
               "eval_prompts": float(len(prompts))}
        for j, r in enumerate(self.rewards):
            out[f"eval_rewards/{r.name}/mean"] = _nanmean(rewards[:, j])
            # full marks (an exact answer, every key fact): the share of answers scoring >= 1
            out[f"eval_rewards/{r.name}/full"] = float(np.mean(rewards[:, j] >= 1.0 - 1e-6))
        return out


def make_rollout_producer(trainer: Any) -> RolloutProducer:
    """``Objective.batch_source`` of RL objectives."""
    return RolloutProducer(trainer)


def evaluate_rewards(trainer: Any) -> dict[str, float]:
    """``Objective.evaluate`` of RL objectives: rewards of greedy answers to held-out prompts."""
    producer = trainer.batches if isinstance(trainer.batches, RolloutProducer) \
        else RolloutProducer(trainer)
    return producer.evaluate(trainer.state)


# --------------------------------------------------------------------------- helpers


def _nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, np.float64)
    finite = x[~np.isnan(x)]
    return float(finite.mean()) if finite.size else float("nan")


def _gather(x: jax.Array) -> np.ndarray:
    from jaxtune.sharding import host_array

    return host_array(x)


def _logps_fn(state, mesh, rules, cfg, need_old: bool, need_ref: bool):
    """A jitted ``(state, batch) -> {old_logps, ref_logps}`` of the rollout rows."""
    from jaxtune.objectives import reference_available, reference_model
    from jaxtune.rl.logps import completion_logps
    from jaxtune.sharding import activation_rules, constrain
    from jaxtune.train_state import train_state_shardings

    kwargs = dict(temperature=cfg.rl.temperature, chunk_size=cfg.trainer.loss_chunk_size)

    def fn(state, batch):
        with activation_rules(mesh, rules):
            model = state.model()
            out = {}
            if need_old:
                out["old_logps"] = completion_logps(model, batch, **kwargs)[0]
            if need_ref:
                with reference_available(state.reference_model()), \
                        reference_model(model) as ref:
                    out["ref_logps"] = completion_logps(ref, batch, **kwargs)[0]
            return {k: constrain(jax.lax.stop_gradient(v), ("batch", "seq"))
                    for k, v in out.items()}

    return jax.jit(fn, in_shardings=(train_state_shardings(state, mesh, rules), None))


def _encode_arrays(arrays: dict[str, np.ndarray]) -> str:
    buf = io.BytesIO()
    np.savez_compressed(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _decode_arrays(text: str) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(base64.b64decode(text)), allow_pickle=False) as data:
        return {k: data[k] for k in data.files}
