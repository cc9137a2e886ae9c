"""Checkpoints: Orbax's CheckpointManager around the TrainState, the data position and the config.

A step directory ``<checkpoint dir>/<step>/`` holds four items, written together:

- ``state``: step, trainable ``params``, ``opt_state``, ``rng`` and, for full fine-tuning when
  it holds anything, ``frozen``. A LoRA run (``lora.rank > 0``) never saves ``frozen`` (the
  base model); ``meta`` records a fingerprint of the base instead, checked on resume.
- ``data``: the train iterator's ``get_state()`` (one entry per process).
- ``config``: the resolved TrainConfig as JSON.
- ``meta``: format version, the base fingerprint, the model's shape-defining HF config fields.

Saves are asynchronous: ``save`` blocks only while arrays are copied off the device, then Orbax
writes in a background thread into ``<step>.orbax-checkpoint-tmp`` and renames it when complete
(on GCS, where there is no rename, a ``commit_success.txt`` marks completion). A step directory
that lacks any item or Orbax's ``_CHECKPOINT_METADATA`` is treated as partial: resume skips it
and the next start deletes it. A failed background write surfaces at the next step boundary as
a :class:`CheckpointError` naming the checkpoints that remain, so training never goes on without
them. Restoring reads each array straight into the shardings of the current state, so a
checkpoint saved on one mesh resumes on any other.

SIGTERM (single process) or JAX's preemption sync point (multi-process, e.g. TPU pods) makes
:meth:`Checkpointer.preemption_requested` true; the trainer then saves at that step boundary
and exits cleanly.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jaxtune.checkpoint_reads import describe_read_error, error_chain, quiet_abandoned_reads
from jaxtune.config import TrainConfig, config_to_dict
from jaxtune.errors import JaxtuneError

log = logging.getLogger("jaxtune")

FORMAT_VERSION = 1
ITEMS = ("state", "data", "config", "meta")

#: Config keys that change the shapes or structure of what a checkpoint holds; a resume with
#: any of them changed is refused. Everything else (learning rate, steps, logging, eval, data
#: mixture...) may change between runs.
STRUCTURAL_KEYS = (
    "model.dtype", "model.scan_layers",
    "lora.rank", "lora.targets", "lora.modules_to_save", "lora.quantize_base",
    "optimizer.name", "optimizer.state_dtype", "optimizer.freeze",
)

#: Keys whose switching on or off (0 <-> non-zero) adds or removes an optimizer transform,
#: and so changes the optimizer state's layout; other changes of their values are harmless.
SWITCH_KEYS = ("optimizer.weight_decay", "optimizer.max_grad_norm")

#: HF config.json fields (after model.overrides) that fix parameter shapes.
ARCH_KEYS = (
    "model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings",
    "num_experts", "num_local_experts", "moe_intermediate_size",
)


class CheckpointError(JaxtuneError):
    """A checkpoint could not be saved or resumed; the message says why and what is left."""


def checkpoint_dir(cfg: TrainConfig) -> epath.Path:
    """Where the run's checkpoints live: ``checkpoint.dir`` or ``<output_dir>/checkpoints``.

    Local paths are made absolute (Orbax refuses relative ones); ``gs://`` paths pass through.
    """
    path = cfg.checkpoint.dir or os.path.join(cfg.run.output_dir, "checkpoints")
    if "://" not in path:
        path = os.path.abspath(os.path.expanduser(path))
    return epath.Path(path)


class Checkpointer:
    """Saves and restores a run's TrainState, data position and config with Orbax.

    ``Checkpointer(cfg, mesh)``; ``restore(state, data_iter)`` at the start of training,
    ``save(step, state, data_iter, force=False)`` at every step boundary (it decides whether
    the step is due), ``preemption_requested(step)`` after it, and ``close()`` at the end.

    ``read_only=True`` opens the folder without creating, cleaning or deleting anything and
    without a SIGTERM handler: :func:`check_resume` uses it to refuse a resume before a run
    writes into its directory.
    """

    def __init__(self, cfg: TrainConfig, mesh: jax.sharding.Mesh | None = None, *,
                 read_only: bool = False):
        self.cfg = cfg
        self.mesh = mesh
        self.directory = checkpoint_dir(cfg)
        self.last_save_blocked_s = 0.0  # how long the last save() held up the caller
        self._last_saved: int | None = None
        self._failed = False
        self._preempted = False
        self._sync_point_usable = True
        self._prev_handler: Any = None
        self.read_only = read_only
        # A damaged array file makes Orbax abandon the other reads of a restore; their late
        # ends must not print tracebacks around the one-paragraph error.
        quiet_abandoned_reads()
        absl, level = logging.getLogger("absl"), logging.getLogger("absl").level
        if read_only:  # Orbax warns that a read-only manager will not save
            absl.setLevel(logging.ERROR)
        try:
            self._manager = self._open_manager(read_only)
        finally:
            absl.setLevel(level)
        if not read_only:
            self._drop_partial_steps()
            self._install_sigterm_handler()

    def _open_manager(self, read_only: bool) -> ocp.CheckpointManager:
        c = self.cfg.checkpoint
        options = ocp.CheckpointManagerOptions(
            max_to_keep=c.keep or None,
            keep_period=c.keep_every or None,
            enable_async_checkpointing=c.async_save and not read_only,
            # a save cut off by a kill leaves only a tmp dir
            cleanup_tmp_directories=not read_only,
            create=not read_only,
            read_only=read_only,
        )
        handlers = {"state": ocp.StandardCheckpointHandler(),
                    **{k: ocp.JsonCheckpointHandler() for k in ITEMS[1:]}}
        try:
            return ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        except Exception as e:  # bad bucket, no permission, a file in the way...
            raise CheckpointError(
                f"Cannot open the checkpoint folder {self.directory}: {_short(e)}. Check "
                "checkpoint.dir / run.output_dir (for gs:// paths see docs/checkpoints.md)."
            ) from e

    # ------------------------------------------------------------------ steps on disk

    def complete_steps(self) -> list[int]:
        """Steps whose directories hold every item, oldest first (what resume can use)."""
        self._manager.reload()
        return sorted(s for s in self._manager.all_steps() if self._is_complete(s))

    def _is_complete(self, step: int) -> bool:
        path = self.directory / str(step)
        needed = ["_CHECKPOINT_METADATA", "state/_METADATA", *ITEMS[1:]]
        return all((path / n).exists() for n in needed)

    def _drop_partial_steps(self) -> None:
        self._manager.reload()
        for step in self._manager.all_steps():
            if not self._is_complete(step):
                log.warning("checkpoint %s/%d is incomplete (a save was cut off); deleting it",
                            self.directory, step)
                self._manager.delete(step)

    # ------------------------------------------------------------------ save

    def due(self, step: int, force: bool = False) -> bool:
        """Whether :meth:`save` would save ``step`` (every ``save_every``, or ``force``)."""
        every = self.cfg.checkpoint.save_every
        return (force or (every > 0 and step % every == 0)) and step != self._last_saved

    def save(self, step: int, state, data_iter, force: bool = False) -> bool:
        """Save ``state`` as ``step`` when it is due (every ``save_every``) or ``force``.

        Returns whether a save started. Raises :class:`CheckpointError` if an earlier
        background save failed or this one cannot start, and refuses a state that holds a
        NaN or Inf anywhere (nothing of that step is written), so every checkpoint on disk
        can be resumed. The trainer checks the step's loss before calling this; the check
        here also catches a state that overflowed while the loss still looked finite.
        """
        self._raise_pending_failure()
        if not self.due(step, force):
            return False
        tick = time.perf_counter()
        items = self._state_items(state)
        bad = nonfinite_arrays(items)
        if bad:
            raise CheckpointError(
                f"The state of step {step} holds NaN or Inf in {_some(bad)}, so it was not "
                f"saved. {self._left_note()} Try a lower optimizer.learning_rate, "
                "optimizer.max_grad_norm > 0 or model.compute_dtype: float32."
            )
        # Orbax waits for the previous save before starting one; waiting here first lets a
        # failure of that earlier save be reported under its own step.
        self.wait()
        if self.cfg.checkpoint.async_save and jax.default_backend() == "cpu":
            # On CPU Orbax writes straight from the arrays' buffers, and the next train step,
            # which donates them, would wait for the whole write; a copy lets it run.
            items = jax.tree.map(lambda x: x.copy(), items)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(items),
            data=ocp.args.JsonSave(self._data_state(data_iter)),
            config=ocp.args.JsonSave(config_to_dict(self.cfg)),
            meta=ocp.args.JsonSave(self._meta(step, saved_frozen="frozen" in items)),
        )
        if step in self._manager.all_steps():  # left by a run this one branched off from
            self._manager.delete(step)
        try:
            self._manager.save(step, args=args, force=True)
        except Exception as e:
            raise self._failure(step, e) from e
        self._last_saved = step
        self.last_save_blocked_s = time.perf_counter() - tick
        log.info("checkpoint of step %d started (training held up %.2f s)", step,
                 self.last_save_blocked_s)
        return True

    def wait(self) -> None:
        """Block until background saves are written; raise CheckpointError if one failed."""
        try:
            self._manager.wait_until_finished()
            self._manager.check_for_errors()
        except Exception as e:
            raise self._failure(self._last_saved, e) from e

    def close(self) -> None:
        """Finish pending saves, then release Orbax's threads and the SIGTERM handler."""
        try:
            if not self._failed:
                self.wait()
        finally:
            self._restore_sigterm_handler()
            self._manager.close()

    def _raise_pending_failure(self) -> None:
        try:
            self._manager.check_for_errors()
        except Exception as e:
            raise self._failure(self._last_saved, e) from e

    def _failure(self, step: int | None, err: Exception) -> CheckpointError:
        self._failed = True
        try:
            left = self.complete_steps()
        except Exception:  # the storage itself may be what broke
            left = []
        which = f"step {step}" if step is not None else "a checkpoint"
        keep = self._left_note(left)
        return CheckpointError(
            f"Saving {which} to {self.directory} failed, so training stopped rather than go on "
            f"without checkpoints: {_short(err)}. {keep} Check free space and write access "
            "there (checkpoint.dir), then run the same command again."
        )

    def _left_note(self, left: list[int] | None = None) -> str:
        """Which complete checkpoints remain, and what a restart resumes."""
        if left is None:
            try:
                self.wait()
                left = self.complete_steps()
            except Exception:  # the storage itself may be what broke
                left = []
        return (f"Complete checkpoints still in place: steps {left}; a restart resumes from "
                f"step {left[-1]}." if left else "No complete checkpoint is in place yet.")

    def _state_items(self, state) -> dict[str, Any]:
        # Every array field of the state, by name (a new field is saved without an edit here),
        # except a LoRA run's frozen part: the base model, re-read from model.path instead.
        items = state.array_fields()
        if self.cfg.lora.rank > 0 or not jax.tree.leaves(state.frozen):
            items.pop("frozen", None)
        return items

    def _data_state(self, data_iter) -> dict[str, Any]:
        own = data_iter.get_state() if data_iter is not None else None
        states = [own] if jax.process_count() == 1 else _allgather_json(own)
        return {"process_count": len(states), "states": states}

    def _meta(self, step: int, saved_frozen: bool) -> dict[str, Any]:
        meta: dict[str, Any] = {"format": FORMAT_VERSION, "step": step,
                                "saved_frozen": saved_frozen, "arch": model_arch(self.cfg)}
        if self.cfg.lora.rank > 0:
            meta["base"] = base_fingerprint(self.cfg.model.path)
        return meta

    # ------------------------------------------------------------------ restore

    def resume_step(self) -> int | None:
        """The step ``checkpoint.resume`` picks (None: start fresh), checked without reading
        an array or writing anything.

        Raises :class:`CheckpointError` for a resume that :meth:`restore` would refuse on the
        checkpoint's small items alone: a step that is not there, ``none`` into a folder that
        holds checkpoints, a changed model/optimizer layout or LoRA base, or an unreadable
        ``meta``/``config`` item.
        """
        return self._pick()[0]

    def _pick(self) -> tuple[int | None, list[int], dict[str, Any]]:
        """(step to resume or None, the complete steps, that step's meta item)."""
        resume = str(self.cfg.checkpoint.resume)
        steps = self.complete_steps()
        if resume == "none":
            if steps:
                raise CheckpointError(
                    f"checkpoint.resume is none, but {self.directory} already holds checkpoints "
                    f"of steps {steps} that this run would mix with. Resume them "
                    "(checkpoint.resume: auto), or start fresh in another run.output_dir or "
                    "checkpoint.dir (or delete that folder)."
                )
            return None, steps, {}
        if resume == "auto":
            if not steps:
                return None, steps, {}
            step = steps[-1]
        else:
            step = int(resume)
            if step not in steps:
                raise CheckpointError(
                    f"checkpoint.resume is {step}, but {self.directory} has no complete "
                    f"checkpoint of that step; complete steps: {steps or 'none'}."
                )
        return step, steps, self._check_step(step)

    def _check_step(self, step: int) -> dict[str, Any]:
        """Read step's meta and config items, refuse an incompatible step; return the meta."""
        meta = self._read_json(step, "meta")
        self._check_compatible(step, meta, self._read_json(step, "config"))
        return meta

    def restore(self, state, data_iter):
        """Resume per ``checkpoint.resume``: the restored TrainState, or None to start fresh.

        Arrays are read straight into the shardings of ``state`` (the current mesh). The
        given state's restored arrays are freed first so peak memory stays at one copy; use
        only the returned state afterwards. ``data_iter.set_state`` gets the saved position.

        A checkpoint holding NaN or Inf (one written before jaxtune refused to save such a
        state) is never resumed: with ``resume: auto`` the latest finite checkpoint before it
        is, with a warning naming both; an explicit step is refused. A damaged step (an item
        that cannot be read) is refused naming the file and the earlier step to resume.
        """
        step, steps, meta = self._pick()
        if step is None:
            return None
        candidates = [step]
        if str(self.cfg.checkpoint.resume) == "auto":
            candidates += [s for s in reversed(steps) if s < step]
        saved_frozen = bool(meta.get("saved_frozen"))
        current = state.array_fields()  # every array field of the state, by name
        if not saved_frozen:
            current.pop("frozen", None)
        self._check_shapes(step, current)
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), current)
        for x in jax.tree.leaves(current):  # overwritten anyway: keep one copy in memory
            x.delete()
        for i, chosen in enumerate(candidates):
            if i:  # an earlier step, after a non-finite one: check it as the first was
                meta = self._check_step(chosen)
                if bool(meta.get("saved_frozen")) != saved_frozen:
                    raise CheckpointError(
                        f"Checkpoint {self.directory}/{chosen} was saved with a different "
                        f"layout from step {candidates[0]}; resume it with "
                        f"--checkpoint.resume={chosen} in a new process.")
                self._check_shapes(chosen, target)
            out = self._read_state(chosen, target)
            bad = nonfinite_arrays(out)
            if not bad:
                break
            for x in jax.tree.leaves(out):
                x.delete()
            earlier = [s for s in steps if s < chosen]
            if chosen == candidates[-1]:
                hint = (f"Resume an earlier one with --checkpoint.resume=<step> (complete "
                        f"steps before it: {earlier})." if earlier else
                        "No earlier complete checkpoint exists: start fresh with "
                        "--checkpoint.resume=none in another run.output_dir.")
                raise CheckpointError(
                    f"Checkpoint {self.directory}/{chosen} holds NaN or Inf in {_some(bad)} "
                    f"(the run had diverged), so it is not resumed. {hint}")
            log.warning("checkpoint %s/%d holds NaN or Inf in %s (the run had diverged); "
                        "trying the step before it, %d", self.directory, chosen, _some(bad),
                        candidates[i + 1])
        if chosen != step:
            log.warning("resuming from step %d, the last checkpoint with finite values", chosen)
        restored_step = int(jax.device_get(out["step"]))
        if restored_step != chosen:
            raise CheckpointError(
                f"Checkpoint {self.directory}/{chosen} holds step {restored_step}.")
        self._set_data_state(chosen, self._read_json(chosen, "data"), data_iter)
        later = [s for s in steps if s > chosen]
        if later:
            log.warning("resuming from step %d: the later checkpoints %s belong to the run being "
                        "replaced and are deleted", chosen, later)
            for s in later:
                self._manager.delete(s)
        self._last_saved = chosen
        log.info("restored checkpoint %s/%d", self.directory, chosen)
        return state.replace(**out)

    def _read_json(self, step: int, item: str) -> dict[str, Any]:
        try:
            value = self._manager.restore(step, args=ocp.args.Composite(
                **{item: ocp.args.JsonRestore()}))[item]
        except Exception as e:
            raise self._damaged(step, item, e) from e
        if not isinstance(value, dict):
            raise self._damaged(step, item, ValueError(f"holds {type(value).__name__}, not an "
                                                       "object"))
        return value

    def _read_state(self, step: int, target):
        try:
            return self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target)))["state"]
        except Exception as e:
            raise self._damaged(step, "state", e) from e

    def _damaged(self, step: int, item: str, err: BaseException) -> CheckpointError:
        """One paragraph for an unreadable item: the step, the file, the earlier step to use."""
        step_dir = f"{self.directory}/{step}"
        where, reason = describe_read_error(err, step_dir)
        if not where:
            json_err = any(isinstance(e, json.JSONDecodeError) for e in error_chain(err))
            where = {"state": "state/_METADATA" if json_err else "state"}.get(
                item, f"{item}/metadata")
        try:
            earlier = [s for s in self.complete_steps() if s < step]
        except Exception:  # the storage itself may be what broke
            earlier = []
        if earlier:
            hint = (f"The latest earlier complete checkpoint is step {earlier[-1]}: resume it "
                    f"with --checkpoint.resume={earlier[-1]} (the checkpoints after it, this "
                    "one included, are then deleted).")
        else:
            hint = ("No earlier complete checkpoint exists: start fresh with "
                    "--checkpoint.resume=none in another run.output_dir (or move "
                    f"{self.directory} away).")
        return CheckpointError(
            f"Checkpoint {step_dir} is damaged: reading {where} failed ({reason}), so it "
            f"cannot be resumed. {hint}")

    def _set_data_state(self, step: int, saved: dict[str, Any], data_iter) -> None:
        if data_iter is None:
            return
        states = saved.get("states")
        if not isinstance(states, list) or not states:
            raise self._damaged(step, "data", ValueError("it holds no list of data positions"))
        n, me = jax.process_count(), jax.process_index()
        if len(states) == n:
            own = states[me]
        elif all(s == states[0] for s in states):
            own = states[0]  # every process was at the same position: any count may resume
        else:
            raise CheckpointError(
                f"Checkpoint step {step} holds the data positions of {len(states)} processes, "
                f"which differ, but this run has {n}: resume it with {len(states)} processes."
            )
        if own is not None:
            data_iter.set_state(own)

    # ------------------------------------------------------------------ compatibility

    def _check_compatible(self, step: int, meta: dict[str, Any], old_cfg: dict[str, Any]) -> None:
        if meta.get("format") != FORMAT_VERSION:
            raise CheckpointError(
                f"Checkpoint {self.directory}/{step} has format {meta.get('format')}; this "
                f"jaxtune reads format {FORMAT_VERSION}."
            )
        old, new = _flatten(old_cfg), _flatten(config_to_dict(self.cfg))
        problems = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in STRUCTURAL_KEYS
                    if old.get(k) != new.get(k)]
        problems += [f"{k}: {old.get(k)!r} -> {new.get(k)!r} (turning it on or off changes the "
                     "optimizer state)" for k in SWITCH_KEYS
                     if bool(old.get(k)) != bool(new.get(k))]
        arch_old, arch_new = meta.get("arch") or {}, model_arch(self.cfg)
        if arch_old and arch_new:
            problems += [f"model config.json {k}: {arch_old.get(k)!r} -> {arch_new.get(k)!r}"
                         for k in ARCH_KEYS if arch_old.get(k) != arch_new.get(k)]
        if problems:
            raise CheckpointError(
                f"Checkpoint {self.directory}/{step} was saved with a different model/optimizer "
                f"layout, so this run cannot resume it: {'; '.join(problems)}. Set those keys "
                "back, or start fresh (checkpoint.resume: none, in another run.output_dir)."
            )
        if self.cfg.lora.rank > 0:
            self._check_base(step, meta.get("base") or {})
        changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                   if old.get(k) != new.get(k) and k != "checkpoint.resume"]
        if changed:
            log.info("config changed since checkpoint %d (allowed): %s", step, "; ".join(changed))

    def _check_base(self, step: int, saved: dict[str, Any]) -> None:
        now = base_fingerprint(self.cfg.model.path)
        same = (saved.get("sha256") == now.get("sha256") if saved.get("sha256") and
                now.get("sha256") else saved.get("path") == now.get("path"))
        if not same:
            raise CheckpointError(
                f"The LoRA adapters in checkpoint {self.directory}/{step} were trained on the base "
                f"model {_describe_base(saved)}, but model.path is now {_describe_base(now)}. "
                "Point model.path at the original base weights."
            )

    def _check_shapes(self, step: int, current: dict[str, Any]) -> None:
        """Name every array whose path, shape or dtype differs from the checkpoint's."""
        try:
            meta = self._manager.item_metadata(step)["state"]
        except Exception as e:
            raise self._damaged(step, "state", e) from e
        tree = getattr(meta, "tree", meta)
        saved = {m.name: (tuple(m.shape), str(m.dtype)) for m in jax.tree.leaves(tree)}
        names = jax.tree.leaves(ocp.tree.get_param_names(current, include_empty_nodes=False))
        leaves = jax.tree.leaves(current)
        want = {n: (tuple(x.shape), str(x.dtype)) for n, x in zip(names, leaves, strict=True)}
        diffs = [f"{n}: checkpoint {saved.get(n, 'absent')}, run {want.get(n, 'absent')}"
                 for n in sorted(set(saved) | set(want)) if saved.get(n) != want.get(n)]
        if diffs:
            more = f" (and {len(diffs) - 6} more)" if len(diffs) > 6 else ""
            raise CheckpointError(
                f"Checkpoint {self.directory}/{step} does not match this run's state: "
                f"{'; '.join(diffs[:6])}{more}. The model or optimizer settings differ from the "
                "run that saved it; set them back, or start fresh in another run.output_dir."
            )

    # ------------------------------------------------------------------ preemption

    def preemption_requested(self, step: int) -> bool:
        """True once this run should save at ``step`` and stop (SIGTERM / preemption notice).

        With several processes every one must call this at every step: JAX's preemption sync
        point makes them all agree on the same step.
        """
        if self._preempted:
            return True
        if jax.process_count() > 1 and self._sync_point_usable:
            from jax.experimental import multihost_utils

            try:
                self._preempted = bool(multihost_utils.reached_preemption_sync_point(step))
            except RuntimeError:  # preemption service off: rely on the signal handler
                self._sync_point_usable = False
        return self._preempted

    @property
    def preempted(self) -> bool:
        """Whether a SIGTERM or preemption notice has been seen so far (no collective)."""
        return self._preempted

    def _install_sigterm_handler(self) -> None:
        # With several processes JAX's coordination service owns SIGTERM and propagates it
        # through the preemption sync point; a Python handler would shadow it.
        if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
            return
        self._prev_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _restore_sigterm_handler(self) -> None:
        if self._prev_handler is not None:
            signal.signal(signal.SIGTERM, self._prev_handler)
            self._prev_handler = None

    def _on_sigterm(self, signum, frame) -> None:
        self._preempted = True
        log.warning("SIGTERM received: saving at the next step boundary, then stopping")


def check_resume(cfg: TrainConfig) -> int | None:
    """The step a run of ``cfg`` will resume (None: a fresh start), found without creating,
    cleaning or writing anything; raises :class:`CheckpointError` for a resume it must refuse
    (see :meth:`Checkpointer.resume_step`). Call it before the run writes into its directory,
    so that a refused resume leaves the directory as it was."""
    ck = Checkpointer(cfg, read_only=True)
    try:
        return ck.resume_step()
    finally:
        ck.close()


# --------------------------------------------------------------------------- helpers


def model_arch(cfg: TrainConfig) -> dict[str, Any]:
    """The shape-defining HF config.json fields of ``model.path`` (with overrides), if local."""
    path = os.path.join(cfg.model.path, "config.json")
    if not cfg.model.path or not os.path.isfile(path):
        return {}
    with open(path) as f:
        hf = {**json.load(f), **cfg.model.overrides}
    return {k: hf[k] for k in ARCH_KEYS if k in hf}


def base_fingerprint(path: str, sample_bytes: int = 1 << 20) -> dict[str, Any]:
    """Identify a base model cheaply: file names, sizes and the first/last MiB of each shard.

    Reading whole multi-GB shards would take minutes; the sampled bytes cover the safetensors
    header (names, shapes, offsets) and real weight data at both ends of every file, which
    tells apart two fine-tunes of the same architecture.
    """
    if not os.path.isdir(path):
        return {"path": path}  # a hub id: only the name can be compared
    files = sorted(f for f in os.listdir(path)
                   if f.endswith(".safetensors") or f == "model.safetensors.index.json")
    h = hashlib.sha256()
    total = 0
    for name in files:
        full = os.path.join(path, name)
        size = os.path.getsize(full)
        total += size
        h.update(f"{name}:{size};".encode())
        with open(full, "rb") as f:
            h.update(f.read(sample_bytes))
            f.seek(max(0, size - sample_bytes))
            h.update(f.read(sample_bytes))
    return {"path": path, "files": len(files), "bytes": total, "sha256": h.hexdigest()}


def _describe_base(fp: dict[str, Any]) -> str:
    if "sha256" in fp:
        return f"'{fp['path']}' ({fp['files']} files, {fp['bytes']} bytes, sha {fp['sha256'][:12]})"
    return f"'{fp.get('path')}'"


def _flatten(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """``{'model': {'dtype': ..}}`` -> ``{'model.dtype': ..}`` (sections are one level deep)."""
    return {f"{section}.{k}": v for section, fields in cfg_dict.items()
            if isinstance(fields, dict) for k, v in fields.items()}


def _allgather_json(obj: Any) -> list[Any]:
    """Every process's JSON-able ``obj``, in process order (a collective: all must call)."""
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(obj, sort_keys=True).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([raw.size], np.int32)))
    buf = np.zeros(int(sizes.max()), np.uint8)
    buf[: raw.size] = raw
    every = np.asarray(multihost_utils.process_allgather(buf))
    return [json.loads(every[i, : int(sizes[i, 0])].tobytes()) for i in range(len(sizes))]


@functools.cache
def _finite_flags(out_sharding: jax.sharding.Sharding | None):
    """Jitted ``[all finite?]`` per array; the result replicated, so every process reads it."""
    return jax.jit(lambda leaves: jnp.stack([jnp.isfinite(x).all() for x in leaves]),
                   out_shardings=out_sharding)


def nonfinite_arrays(tree: Any) -> list[str]:
    """Names (Orbax's dotted paths) of the floating-point arrays in ``tree`` holding a NaN or
    Inf, in one reduction on the devices and one small read back (it waits for the arrays)."""
    names = jax.tree.leaves(ocp.tree.get_param_names(tree, include_empty_nodes=False))
    leaves = jax.tree.leaves(tree)
    floats = [(n, x) for n, x in zip(names, leaves, strict=True)
              if jnp.issubdtype(getattr(x, "dtype", np.float32), jnp.inexact)]
    if not floats:
        return []
    arrays = [x for _, x in floats]
    sharding = getattr(arrays[0], "sharding", None)
    replicated = (jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
                  if isinstance(sharding, jax.sharding.NamedSharding) else None)
    flags = np.asarray(_finite_flags(replicated)(arrays))
    return [n for (n, _), ok in zip(floats, flags, strict=True) if not ok]


def _some(names: list[str], limit: int = 4) -> str:
    more = f" (and {len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _short(err: BaseException, limit: int = 500) -> str:
    """One line; a long message keeps its head and its tail (where the OS error usually is)."""
    lines = f"{type(err).__name__}: {err}".strip().splitlines()
    text = " ".join(line.strip() for line in lines if line.strip())
    return text if len(text) <= limit else f"{text[:limit // 3]} ... {text[-(2 * limit // 3):]}"
