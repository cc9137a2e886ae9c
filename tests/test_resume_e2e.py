"""Exact resume with real processes and real signals, through the ``jaxtune train`` CLI.

Run A trains 12 steps straight. Run B saves every 4 steps, is killed with SIGKILL after step
6 and restarted with the same command; it must reach step 12 with the losses of steps 5-12
and the final state (parameters, optimizer state, RNG, step) bitwise equal to A's. Run C gets
SIGTERM after step 5: it must save that step and exit 0, and its restart must again end
bitwise equal to A. A and C export at the end (``export.enabled``): the preempted C writes no
export, and the C that finishes exports files byte for byte equal to A's. Packing and
shuffling are on, on a tiny Llama at seq 32.

The processes run ``jaxtune.cli`` through a small launcher that prints each step's loss and,
after the checkpoint call of the step the test stops at (``E2E_STOP_AT``), waits for the
background saves to finish and then blocks until the test writes a line to its stdin. The test
sends its signal while the process is blocked there, so the signal lands at a known step
whatever the load on the machine: no pause to outrun, no race with async saves. The kill
itself is a real ``kill -9``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import yaml

from tests.fixtures_data import chat_rows, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12
EXPORT = "--export.enabled=true"

LAUNCHER = textwrap.dedent("""
    import os, sys
    from jaxtune import checkpoint, trainer
    stop_at = int(os.environ.get("E2E_STOP_AT", "0"))
    save, finish = checkpoint.Checkpointer.save, trainer.Trainer._finish_step

    def held_save(self, step, *args, **kwargs):
        out = save(self, step, *args, **kwargs)
        if step == stop_at:
            self.wait()  # the earlier checkpoints are complete on disk
            print(f"E2E-STEP {step}", flush=True)
            sys.stdin.readline()  # blocked here while the test sends its signal
        return out

    def printed_finish(self, step, *args, **kwargs):
        values = finish(self, step, *args, **kwargs)
        reward = f" {values['reward']!r}" if "reward" in values else ""  # RL runs
        print(f"E2E-LOSS {step} {values['loss']!r}{reward}", flush=True)
        return values

    checkpoint.Checkpointer.save = held_save
    trainer.Trainer._finish_step = printed_finish
    from jaxtune.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_hf_model, data_tokenizers):
    root = tmp_path_factory.mktemp("resume_e2e")
    data = write_jsonl(root / "chats.jsonl", chat_rows(40, seed=3))
    cfg = {
        "run": {"name": "resume-e2e", "seed": 5},
        "model": {"path": str(tiny_hf_model("llama")), "tokenizer": data_tokenizers["chatml"]},
        "data": {"sources": [{"path": data}], "format": "chat", "seq_len": 32, "packing": True,
                 "shuffle": True, "cache_dir": str(root / "cache")},
        "optimizer": {"learning_rate": 3e-3, "warmup_steps": 2, "weight_decay": 0.01},
        "trainer": {"steps": STEPS, "global_batch_size": 4, "progress": False},
        "checkpoint": {"save_every": 4, "keep": 2},
        "logging": {"tensorboard": False},
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return root, str(path)


def launch(recipe_path: str, run_dir: str, *overrides: str, stop_after: int | None = None,
           sig: int = signal.SIGKILL) -> tuple[int, dict[int, float], str]:
    """Run ``jaxtune train``; send ``sig`` while it is held after step ``stop_after``.

    Returns the exit code, {step: loss} as printed, and the whole output.
    """
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "E2E_STOP_AT": str(stop_after or 0),
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-c", LAUNCHER, "train", recipe_path, f"--run.output_dir={run_dir}",
           *overrides]
    stdin = subprocess.PIPE if stop_after is not None else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdin=stdin, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if stop_after is not None and line.strip() == f"E2E-STEP {stop_after}":
                proc.send_signal(sig)  # handled (SIGTERM) or fatal (SIGKILL) while held
                try:
                    proc.stdin.write("go\n")
                    proc.stdin.close()
                except BrokenPipeError:  # already gone (SIGKILL)
                    pass
                stop_after = None
        rc = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    losses = {}
    for line in lines:
        if line.startswith("E2E-LOSS "):
            _, step, value = line.split()[:3]
            losses[int(step)] = float(value)
    return rc, losses, "".join(lines)


def rewards_of(out: str) -> dict[int, float]:
    """{step: mean reward} of an RL run's output (the launcher prints it after the loss)."""
    return {int(f[1]): float(f[3]) for f in (line.split() for line in out.splitlines())
            if f and f[0] == "E2E-LOSS" and len(f) == 4}


def final_state(run_dir: str, step: int = STEPS) -> list[np.ndarray]:
    """Every array of the saved TrainState at ``step``, in a fixed order."""
    import jax
    import orbax.checkpoint as ocp

    tree = ocp.StandardCheckpointer().restore(os.path.join(run_dir, "checkpoints", str(step),
                                                           "state"))
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def run_a(recipe):
    root, path = recipe
    run_dir = str(root / "a")
    rc, losses, out = launch(path, run_dir, EXPORT)
    assert rc == 0, out[-3000:]
    assert os.path.isfile(os.path.join(run_dir, "hf", "model.safetensors")), out[-3000:]
    assert sorted(losses) == list(range(1, STEPS + 1)), out[-3000:]
    return losses, final_state(run_dir)


def assert_same_end(run_dir: str, losses: dict[int, float], reference) -> None:
    ref_losses, ref_state = reference
    for step in range(9, STEPS + 1):
        assert losses[step] == ref_losses[step], (step, losses[step], ref_losses[step])
    state = final_state(run_dir)
    assert len(state) == len(ref_state)
    for got, want in zip(state, ref_state, strict=True):
        np.testing.assert_array_equal(got, want)


def test_sigkill_after_step_6_then_restart_matches_straight_run(recipe, run_a):
    root, path = recipe
    run_dir = str(root / "b")
    rc, first, out = launch(path, run_dir, stop_after=6, sig=signal.SIGKILL)
    assert rc == -signal.SIGKILL, out[-3000:]
    assert max(first) < STEPS
    rc, second, out = launch(path, run_dir)  # the same command again
    assert rc == 0, out[-3000:]
    assert min(second) == 5, out[-3000:]  # resumed from the step-4 checkpoint
    assert all(second[s] == run_a[0][s] for s in range(5, STEPS + 1))
    assert_same_end(run_dir, second, run_a)


def read_folder(folder: str) -> dict[str, bytes]:
    out = {}
    for d, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(d, name), "rb") as f:
                out[os.path.relpath(os.path.join(d, name), folder)] = f.read()
    return out


def test_sigterm_saves_the_step_reached_exits_0_and_the_finished_run_exports(recipe, run_a):
    root, path = recipe
    run_dir = str(root / "c")
    hf = os.path.join(run_dir, "hf")
    rc, first, out = launch(path, run_dir, EXPORT, stop_after=5, sig=signal.SIGTERM)
    assert rc == 0, out[-3000:]
    assert max(first) == 5, out[-3000:]  # stopped at the boundary where SIGTERM arrived
    assert "5" in os.listdir(os.path.join(run_dir, "checkpoints"))
    assert not os.path.exists(hf), os.listdir(hf)  # a preempted run never exports
    assert "not exporting: the run was preempted at step 5 of 12" in out, out[-3000:]
    rc, second, out = launch(path, run_dir, EXPORT)
    assert rc == 0, out[-3000:]
    assert min(second) == 6, out[-3000:]
    assert_same_end(run_dir, second, run_a)
    got, want = read_folder(hf), read_folder(os.path.join(root / "a", "hf"))
    assert sorted(got) == sorted(want) and "model.safetensors" in got
    for name in want:
        assert got[name] == want[name], name


def test_lora_int8_run_saves_adapters_only_and_resumes_exactly(recipe, monkeypatch):
    """In process (one compile per run): LoRA on an int8 base, preempted at step 3."""
    import jax

    from jaxtune.checkpoint import Checkpointer
    from jaxtune.config import load_config
    from jaxtune.trainer import train

    root, path = recipe
    args = ["--lora.rank=4", "--lora.quantize_base=int8", "--trainer.steps=6",
            "--checkpoint.save_every=0", "--optimizer.weight_decay=0"]
    straight = train(load_config(path, args + [f"--run.output_dir={root / 'lora_a'}"]))
    cfg = load_config(path, args + [f"--run.output_dir={root / 'lora_b'}"])
    with monkeypatch.context() as m:
        m.setattr(Checkpointer, "preemption_requested", lambda self, step: step >= 3)
        first = train(cfg)
    assert first.steps == 3
    resumed = train(cfg)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history[3:]]
    for got, want in zip(jax.tree.leaves(resumed.state.params),
                         jax.tree.leaves(straight.state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

    step_dir = os.path.join(cfg.run.output_dir, "checkpoints", "6")
    saved = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(step_dir)
                for f in fs)
    base = sum(os.path.getsize(os.path.join(cfg.model.path, f))
               for f in os.listdir(cfg.model.path) if f.endswith(".safetensors"))
    assert saved < base / 2, (saved, base)  # adapters and their optimizer state only
    import orbax.checkpoint as ocp

    items = ocp.StandardCheckpointer().restore(os.path.join(step_dir, "state"))
    assert sorted(items) == ["opt_state", "params", "rng", "step"]  # no frozen base
    assert all("lora" in "/".join(map(str, path)) for path, _ in
               jax.tree_util.tree_flatten_with_path(items["params"])[0])
