"""The training loop: it schedules steps, evaluation, logging and checkpoints, and does no maths.

Step N is dispatched before step N-1's metrics are read, so the host never stalls the device.
A non-finite loss stops the run naming the step and what to try, and a step is checkpointed
only after its metrics were read back finite, so no checkpoint holds a diverged state.
Everything the loop calls is built in :class:`Trainer.__init__` from the config, so tests can
poke at the pieces; the run directory is written only once :meth:`Trainer.run` has accepted
the resume (a refused one leaves it as it was).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from typing import Any

import jax
import numpy as np

from jaxtune import distributed
from jaxtune.config import TrainConfig, save_config
from jaxtune.errors import JaxtuneError

log = logging.getLogger("jaxtune")


#: Data formats with prompts only: an objective must list them (its producer generates the
#: completions), so SFT cannot silently train on prompts alone.
PROMPT_ONLY_FORMATS = ("prompt",)


class TrainingDiverged(JaxtuneError):
    """The loss or gradient norm became NaN/Inf."""


@dataclasses.dataclass
class TrainResult:
    run_dir: str
    steps: int  # optimizer steps taken in total (including before a resume)
    history: list[dict[str, float]]  # per-step metrics read back on the host
    evals: list[dict[str, float]]  # {'step', 'eval_loss', 'eval_perplexity'}
    state: Any  # the final TrainState
    preempted: bool = False  # stopped by SIGTERM / a preemption notice (saved, not exported)


class Trainer:
    """Builds mesh, model, data, optimizer, state and jitted steps from a TrainConfig."""

    def __init__(self, cfg: TrainConfig):
        distributed.initialize(cfg.distributed)
        from jaxtune import data, loss, metrics, optim
        from jaxtune.batches import make_batch_source
        from jaxtune.data.tokenizer import check_vocab_fits
        from jaxtune.mesh import check_batch, make_mesh
        from jaxtune.objectives import make_objective
        from jaxtune.sharding import make_rules
        from jaxtune.train_state import count_params, create_train_state
        from jaxtune.train_step import jit_eval_step, jit_train_step, train_step

        self.cfg = cfg
        if not cfg.model.path:
            raise JaxtuneError("model.path is empty: set it to a Hugging Face folder or hub id.")
        from jaxtune.locate import check_model_paths

        check_model_paths(cfg)  # before the run directory and the tokenizer: name a bad path
        self.run_dir = cfg.run.output_dir
        self.main = distributed.is_main_process()
        if not self.main:  # one log for the job (process 0's); the others report only trouble
            log.setLevel(max(log.getEffectiveLevel(), logging.WARNING))
        if cfg.checkpoint.enabled:
            from jaxtune.checkpoint import check_resume

            # A resume that will be refused (a missing step, resume: none into a run that has
            # checkpoints, a changed layout) fails here, before anything is loaded or written.
            check_resume(cfg)
        self.mesh = make_mesh(cfg.mesh)
        self.rules = make_rules(cfg.mesh.rules)
        check_batch(cfg.trainer.global_batch_size, self.mesh, cfg.trainer.grad_accum_steps,
                    self.rules)

        self.tokenizer = data.load_tokenizer(cfg)
        check_vocab_fits(self.tokenizer, cfg)  # ids past the embedding would give NaN at step 1
        # The objective (and its data format, reward functions...) before any weight is read.
        self.loss_fn = make_objective(cfg)
        self._check_objective(self.loss_fn)
        model, trainable = self._load_model()
        self.model_config = model.config
        self.schedule = optim.make_schedule(cfg.optimizer, cfg.trainer.steps)
        from flax import nnx

        trainable_params = nnx.state(model, trainable)
        self.optimizer = optim.make_optimizer(cfg.optimizer, cfg.trainer.steps, trainable_params)
        self.state = create_train_state(
            model, self.optimizer, mesh=self.mesh, rules=self.rules, seed=cfg.run.seed,
            trainable=trainable,
            keep_reference=self.loss_fn.needs_reference and cfg.lora.rank == 0)
        self.num_params = count_params(self.state.params) + count_params(self.state.frozen)
        self.num_trainable = count_params(self.state.params)
        # A frozen model beside the state (distillation's teacher): its arrays are the jitted
        # step's third argument, never in the state, its optimizer or a checkpoint.
        self.teacher = self.loss_fn.teacher(self) if self.loss_fn.teacher is not None else None
        self.step_inputs = () if self.teacher is None else (self.teacher.state,)

        train_loss = self.loss_fn
        if cfg.lora.rank > 0 and cfg.lora.dropout > 0:  # dropout in the train step only
            from jaxtune.lora import with_dropout

            train_loss = with_dropout(self.loss_fn)
        if cfg.trainer.neftune_noise_alpha > 0:  # embedding noise in the train step only
            from jaxtune.neftune import with_neftune

            train_loss = with_neftune(train_loss, cfg.trainer.neftune_noise_alpha)
        step_fn = loss.load_callable(cfg.trainer.train_step) if cfg.trainer.train_step \
            else train_step
        self.train_step = jit_train_step(
            step_fn, self.state, self.mesh, self.rules, loss_fn=train_loss,
            optimizer=self.optimizer, grad_accum_steps=cfg.trainer.grad_accum_steps,
            schedule=self.schedule, teacher=self.teacher)
        self.eval_step = jit_eval_step(self.state, self.mesh, self.rules, loss_fn=self.loss_fn,
                                       teacher=self.teacher)
        if getattr(self.loss_fn, "prepare", None) is not None:
            self.loss_fn.prepare(self)  # e.g. precomputed reference log-probs, before training
        # Where each step's batch comes from: the data iterator, or the objective's producer
        # (RL rollouts), resumable alike (jaxtune.batches).
        self.batches = make_batch_source(self)
        self.sampler = None  # greedy answers every trainer.sample_every steps
        if cfg.trainer.sample_every:
            from jaxtune.generation.samples import TrainingSampler

            self.sampler = TrainingSampler(cfg, self.tokenizer, self.run_dir, write=self.main)
        self.harness = None  # lm_eval scores every trainer.eval_harness.every steps
        if cfg.trainer.eval_harness.tasks:
            from jaxtune.evaluation.training import TrainingHarness

            self.harness = TrainingHarness(cfg, self.tokenizer, self.mesh, self.rules)
        self.to_global = lambda b: data.to_global_batch(b, self.mesh)

        self.checkpointer = None
        if cfg.checkpoint.enabled:
            from jaxtune.checkpoint import Checkpointer

            self.checkpointer = Checkpointer(cfg, self.mesh)
        self.writer: metrics.MetricsWriter | None = None  # opened by run(), after the restore
        self._estimate_at = -1  # the step after which run() logs the time left
        lora_matmuls = None
        if cfg.lora.rank > 0:  # frozen matrices get no weight gradient: counted as 4N
            from jaxtune.lora import lora_matmuls as count

            lora_matmuls = count(self.state.params, self.model_config)
        self.flops_per_token = metrics.flops_per_token(self.model_config, cfg.data.seq_len,
                                                       lora_matmuls)
        self.peak_flops = metrics.device_peak_flops(jax.devices()[0], cfg.model.compute_dtype,
                                                    peak_tflops=cfg.logging.peak_tflops)
        self.throughput = metrics.Throughput(
            cfg.trainer.global_batch_size * cfg.data.seq_len, self.flops_per_token,
            jax.device_count(), self.peak_flops, remeasure=metrics.peak_remeasure(
                jax.devices()[0], cfg.model.compute_dtype, peak_tflops=cfg.logging.peak_tflops))
        self._metrics = metrics

    def _load_model(self):
        from flax import nnx

        from jaxtune.weights import from_pretrained

        m = self.cfg.model
        if not m.path:
            raise JaxtuneError("model.path is empty: set it to a Hugging Face folder or hub id.")
        model = from_pretrained(
            m.path, dtype=m.dtype, mesh=self.mesh, compute_dtype=m.compute_dtype,
            scan_layers=m.scan_layers, remat=m.remat, attention=m.attention, rules=self.rules,
            **m.overrides)
        if self.cfg.lora.rank > 0:
            from jaxtune.lora import apply_lora

            return apply_lora(model, self.cfg.lora, mesh=self.mesh, rules=self.rules,
                              seed=self.cfg.run.seed)
        return model, nnx.Param

    def _check_objective(self, objective) -> None:
        formats = objective.data_formats
        fmt = self.cfg.data.format
        if formats is not None and fmt not in formats:
            raise JaxtuneError(
                f"trainer.objective '{objective.name}' trains on data.format "
                f"{' or '.join(formats)}, but data.format is '{fmt}'.")
        if formats is None and fmt in PROMPT_ONLY_FORMATS:
            raise JaxtuneError(
                f"data.format '{fmt}' holds prompts without answers, which trainer.objective "
                f"'{objective.name}' cannot train on; use an objective that generates its own "
                "completions (e.g. trainer.objective: grpo), or a format with answers.")

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> dict[str, float] | None:
        """The objective's held-out metrics (None without eval data): by default its loss over
        the eval split (SFT: mean token NLL and perplexity); an objective with its own
        ``evaluate`` (RL: rewards of answers to held-out prompts) computes them itself."""
        if not self.cfg.data.eval_sources:
            return None
        if getattr(self.loss_fn, "evaluate", None) is not None:
            return self.loss_fn.evaluate(self)
        from jaxtune import data

        return self.evaluate_batches(data.make_batch_iterator(self.cfg, self.tokenizer,
                                                              split="eval"))

    def evaluate_batches(self, host_batches) -> dict[str, float]:
        """The objective's eval metrics from its loss summed over these host batches (at most
        ``trainer.eval_batches`` of them)."""
        sums: dict[str, float] = {}
        for i, host_batch in enumerate(host_batches):
            if self.cfg.trainer.eval_batches and i >= self.cfg.trainer.eval_batches:
                break
            out = jax.device_get(self.eval_step(self.state, self.to_global(host_batch),
                                                *self.step_inputs))
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        if not sums:
            sums = {"loss_sum": 0.0, "count": 0.0}
        return self.loss_fn.eval_metrics(sums)

    # ------------------------------------------------------------------ the loop

    def run(self) -> TrainResult:
        t = self.cfg.trainer
        start = self._restore()
        evaluate_start = start == 0 or start == t.steps
        self._open_run_dir(start, evaluate_start)
        history: list[dict[str, float]] = []
        evals: list[dict[str, float]] = []
        self._log_run_header(start)
        if evaluate_start:
            evals.append(self._eval_and_log(start))

        compiled, pending, last, preempted = None, None, start, False
        self._estimate_at = start + 2  # the first step timed without the compile around it
        bar = self._progress(start)
        for step in range(start + 1, t.steps + 1):
            if pending is not None and self.batches.on_policy:
                # The next batch is generated from the state step N-1 produced: read that
                # step back first (a diverged step stops here, before any generation).
                history.append(self._finish_step(*pending, bar))
                pending = None
            produced = self.batches.next(self.state)
            if compiled is None:
                compiled = self._compile(produced.batch)
                self._last_done = time.perf_counter()
            dispatched = time.perf_counter()
            with jax.transfer_guard("disallow"):
                self.state, step_metrics = compiled(self.state, produced.batch,
                                                    *self.step_inputs)
            if pending is not None:  # step N is queued; now read step N-1 back
                history.append(self._finish_step(*pending, bar))
            pending = (step, step_metrics, produced, dispatched)
            evaluate = t.eval_every and step % t.eval_every == 0 and step != t.steps
            # A step is saved only once its metrics are read back and finite (a NaN raises
            # there). The save waits for the step anyway, to copy the state off the device.
            if evaluate or self._save_due(step):
                history.append(self._finish_step(*pending, bar))
                pending = None
            if evaluate:
                evals.append(self._eval_and_log(step))
            if self.sampler is not None and self.sampler.due(step, t.steps):
                self.sampler(step, self.state.model(), self.writer)
            if self.harness is not None and self.harness.due(step, t.steps):
                self.harness(step, self.state.model(), self.writer)
            self._save(step)
            if pending is None:  # step N was read back before evaluating or saving: the next
                self._last_done = time.perf_counter()  # step's time starts after those
            last = step
            if self._preemption_requested(step):
                preempted = True
                break
        if pending is not None:
            history.append(self._finish_step(*pending, bar))
        if bar is not None:
            bar.close()
        if preempted:  # save first; the final evaluation is left to the run that finishes
            log.warning("preemption notice: saving step %d and stopping; run the same command "
                        "to continue%s", last,
                        " (that run exports)" if self.cfg.export.enabled else "")
        elif t.steps > start:
            evals.append(self._eval_and_log(t.steps))
        self._save(last, force=True)
        self.close()
        # A SIGTERM after the last step boundary (during the final evaluation or save) still
        # makes this a preempted run: the machine is going away, so no export starts.
        preempted = preempted or (self.checkpointer is not None and self.checkpointer.preempted)
        return TrainResult(self.run_dir, last, history, [e for e in evals if e], self.state,
                           preempted=preempted)

    def _open_run_dir(self, start: int, evaluate_start: bool) -> None:
        """Write config.yaml and open the metrics, now that the resume is accepted.

        Whatever an interrupted run logged after step ``start`` is dropped (from step 0, all
        of it: that run left no checkpoint), and so is an evaluation at ``start`` when this
        run evaluates there again, so no step appears twice.
        """
        if self.main:
            os.makedirs(self.run_dir, exist_ok=True)
            save_config(self.cfg, os.path.join(self.run_dir, "config.yaml"))
        self.writer = self._metrics.MetricsWriter(self.cfg, self.run_dir, enabled=self.main,
                                                  start_step=start, relog_evals=evaluate_start)

    def _finish_step(self, step: int, step_metrics, produced, dispatched: float,
                     bar) -> dict[str, float]:
        """Read one step's metrics back (blocking on that step only), check, log."""
        values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        now = time.perf_counter()
        elapsed, self._last_done = now - self._last_done, now
        tokens = produced.tokens
        if not (math.isfinite(values["loss"]) and math.isfinite(values.get("grad_norm", 0.0))):
            raise TrainingDiverged(
                f"Loss is {values['loss']} (grad norm {values.get('grad_norm')}) at step {step}. "
                "Try a lower optimizer.learning_rate, more optimizer.warmup_steps, "
                "optimizer.max_grad_norm > 0, or model.compute_dtype: float32; check the data "
                f"with 'jaxtune inspect-data'. {self._diverged_resume_note(step)}"
            )
        values.update(self._throughput(elapsed, tokens))
        # The step's own time beside its whole time, which also holds producing its batch
        # (RL: generating and scoring the rollouts): from its dispatch to its metrics, unless
        # it queued behind the step before (pipelined data batches: then the whole time is it).
        values["train_time_s"] = min(now - dispatched, elapsed)
        values.update(produced.metrics)
        values.update(self._metrics.memory_stats())
        values["step"] = step
        if step == self._estimate_at:
            self._log_estimate(step, elapsed)
        if step % self.cfg.trainer.log_every == 0 or step == self.cfg.trainer.steps:
            self.writer.write(step, values)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{values['loss']:.4f}", tok_s=f"{values['tokens_per_s']:.0f}")
        return values

    def _log_estimate(self, step: int, step_s: float) -> None:
        """How long the rest takes on this machine, from a measured step (CPU speeds differ
        fourfold between machine kinds, so a fixed figure in the docs cannot say)."""
        t = self.cfg.trainer
        left = t.steps - step
        evals = (left // t.eval_every if t.eval_every else 0) + bool(self.cfg.data.eval_sources)
        log.info("step %d took %.1f s: about %.0f min of training left for %d steps%s", step,
                 step_s, step_s * left / 60, left,
                 f", plus {evals} evaluation(s)" if evals else "")

    def _throughput(self, elapsed: float, tokens: float) -> dict[str, float]:
        return self.throughput(elapsed, tokens)

    def _compile(self, batch):
        tick = time.perf_counter()
        compiled = self.train_step.lower(self.state, batch, *self.step_inputs).compile()
        took = time.perf_counter() - tick
        memory = self._metrics.compiled_memory(compiled)
        log.info("compiled the train step in %.1f s%s", took, f" ({memory})" if memory else "")
        return compiled

    def _eval_and_log(self, step: int) -> dict[str, float]:
        result = self.evaluate()
        if result is None:
            return {}
        result = {"step": step, **result}
        self.writer.write(step, {k: v for k, v in result.items() if k != "step"})
        if "eval_perplexity" in result:
            log.info("step %d: eval loss %.4f, perplexity %.2f", step, result["eval_loss"],
                     result["eval_perplexity"])
        else:  # another objective's eval metrics (rewards of preference pairs or of answers)
            log.info("step %d: eval %s", step, ", ".join(
                f"{k[5:]} {v:.4g}" for k, v in result.items() if k.startswith("eval_")))
        return result

    # ------------------------------------------------------------------ checkpoints

    def _restore(self) -> int:
        if self.checkpointer is None:
            return 0
        restored = self.checkpointer.restore(self.state, self.batches)
        if restored is None:
            return 0
        self.state = restored
        step = int(jax.device_get(self.state.step))
        log.info("resumed from step %d", step)
        return step

    def _save_due(self, step: int) -> bool:
        return self.checkpointer is not None and self.checkpointer.due(step)

    def _diverged_resume_note(self, step: int) -> str:
        """Which checkpoint a run continues from after a divergence at ``step``."""
        if self.checkpointer is None:
            return "Checkpoints are off (checkpoint.enabled), so a new run starts at step 0."
        try:
            self.checkpointer.wait()  # saves in flight are of earlier, finite steps
            steps = self.checkpointer.complete_steps()
        except JaxtuneError:
            steps = []
        if not steps:
            return (f"No checkpoint was saved before step {step}, so the next run starts at "
                    "step 0.")
        return (f"Nothing of step {step} was saved; the last checkpoint, step {steps[-1]}, holds "
                "the state from before the divergence: change a setting above and run the "
                "same command to resume from it (checkpoint.resume: auto picks it; or "
                f"--checkpoint.resume={steps[-1]}).")

    def _save(self, step: int, force: bool = False) -> None:
        if self.checkpointer is not None:
            self.checkpointer.save(step, self.state, self.batches, force=force)

    def _preemption_requested(self, step: int) -> bool:
        """SIGTERM or a TPU preemption notice: save at this step boundary and stop cleanly."""
        return self.checkpointer is not None and self.checkpointer.preemption_requested(step)

    def close(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.close()
        if self.writer is not None:
            self.writer.close()

    # ------------------------------------------------------------------ reporting

    def _progress(self, start: int):
        if not (self.main and self.cfg.trainer.progress):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.cfg.trainer.steps, initial=start, desc="train", unit="step",
                    dynamic_ncols=True)

    def _log_run_header(self, start: int) -> None:
        if not self.main:
            return
        c = self.cfg
        log.info(
            "run %s: %d devices, mesh %s, %.1fM params (%.2fM trainable), global batch %d x %d "
            "tokens, %d steps%s", c.run.name, jax.device_count(), dict(self.mesh.shape),
            self.num_params / 1e6, self.num_trainable / 1e6, c.trainer.global_batch_size,
            c.data.seq_len, c.trainer.steps, f", resuming at {start}" if start else "")
        stats = getattr(self.batches, "stats", None)
        if stats:  # what the model will train on, once, so a bad mask or cut shows up early
            log.info("train data: %s", ", ".join(
                f"{k} {v:.1%}" if k == "packing_efficiency" else f"{k} {v}"
                for k, v in stats.items()))


def train(cfg: TrainConfig) -> TrainResult:
    """Run the whole training job described by ``cfg`` and return what happened.

    With ``export.enabled`` the run that reaches ``trainer.steps`` exports its final
    checkpoint (to ``export.out_dir``, default ``<output_dir>/hf``). A preempted run (SIGTERM
    or a preemption notice, even one that arrives after the last step) saves and exits 0
    without exporting, so the export folder never receives a half-trained model and the run
    that resumes and finishes finds it as the user left it. An export folder that is not
    empty is never overwritten: the run refuses before it starts (exit 2 from the CLI).
    Running a finished, exported run again, with its export unchanged, says so and returns at
    once (``history`` empty, ``state`` None), touching nothing (``jaxtune.export.record``).
    """
    logging.basicConfig(level=getattr(logging, cfg.logging.level, logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Orbax and datasets narrate every save and load at INFO; keep their warnings only.
    for noisy in ("absl", "datasets"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    if cfg.export.enabled:
        done = _finished_export(cfg)
        if done is not None:
            log.warning("%s is already complete and exported at step %d (to %s); nothing to do. "
                        "Raise trainer.steps to train on.", cfg.run.output_dir, done,
                        cfg.export.out_dir or os.path.join(cfg.run.output_dir, "hf"))
            return TrainResult(cfg.run.output_dir, done, [], [], None)
    # With several processes, fail_fast reports an error to the others and exits at once,
    # rather than leave them waiting for this process in a collective.
    try:
        trainer = Trainer(cfg)
    except BaseException as e:
        distributed.fail_fast(e)
        raise
    try:
        result = trainer.run()
    except BaseException as e:
        distributed.fail_fast(e)
        trainer.close()
        raise
    if cfg.export.enabled and result.preempted:
        log.warning("not exporting: the run was preempted at step %d of %d; the run that "
                    "finishes exports", result.steps, cfg.trainer.steps)
    elif cfg.export.enabled:
        if distributed.is_main_process():
            from jaxtune.export import export_run
            from jaxtune.export.record import write_record

            try:
                export_run(cfg.run.output_dir, out_dir=cfg.export.out_dir or None)
                write_record(cfg)
            except BaseException as e:
                distributed.fail_fast(e)
                raise
        # The other processes wait for it: leaving early would take the coordinator down.
        distributed.barrier("export", timeout_seconds=24 * 3600)
    return result


def _finished_export(cfg: TrainConfig) -> int | None:
    """The step at which the run is complete and exported (None: train), decided by process
    0, which wrote the export; an export folder in the way raises before anything starts."""
    distributed.initialize(cfg.distributed)
    step = None
    if distributed.is_main_process():
        from jaxtune.export.record import finished_export

        try:
            step = finished_export(cfg)
        except BaseException as e:
            distributed.fail_fast(e)
            raise
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        shared = multihost_utils.broadcast_one_to_all(np.int32(-1 if step is None else step))
        step = None if int(shared) < 0 else int(shared)
    return step
