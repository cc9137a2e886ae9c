"""Checkpointer on a toy NNX model: exact resume, retention, partial and failed saves, LoRA,
config compatibility, SIGTERM. The toy pieces here are reused by the multi-device reshard test.

The reference for "exact" is always an uninterrupted run of the same steps: a resumed run must
match it bitwise (step, RNG, parameters, optimizer state and data position all restored).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxtune.checkpoint import Checkpointer, CheckpointError, base_fingerprint
from jaxtune.config import TrainConfig
from jaxtune.mesh import make_mesh
from jaxtune.sharding import batch_sharding, state_shardings
from jaxtune.train_state import create_train_state
from jaxtune.train_step import jit_train_step, train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMBED, MLP, ROWS = 8, 12, 4

# --------------------------------------------------------------------------- toy pieces


class Toy(nnx.Module):
    """Two parameters with logical axes; ``rank > 0`` adds LoRA-style adapters."""

    def __init__(self, embed: int = EMBED, mlp: int = MLP, rank: int = 0, seed: int = 0):
        k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
        self.w = nnx.Param(jax.random.normal(k1, (embed, mlp)) * 0.5, logical_axes=("embed", "mlp"))
        self.b = nnx.Param(jax.random.normal(k2, (mlp,)) * 0.1, logical_axes=("mlp",))
        if rank:
            self.lora_a = nnx.Param(jax.random.normal(k3, (embed, rank)) * 0.1,
                                    logical_axes=("embed", "lora_rank"))
            self.lora_b = nnx.Param(jnp.zeros((rank, mlp)), logical_axes=("lora_rank", "mlp"))

    def __call__(self, x):
        h = x @ self.w + self.b
        if hasattr(self, "lora_a"):
            h = h + x @ self.lora_a @ self.lora_b
        return jnp.tanh(h)


def lora_filter(path, value) -> bool:
    return isinstance(value, nnx.Param) and str(path[-1]).startswith("lora")


def toy_loss(model, batch):
    """Squared activations plus RNG noise, so a wrongly restored RNG changes the loss."""
    h = model(batch["x"])
    h = h + 0.01 * jax.random.normal(batch["rng"], h.shape)
    per_row = (h ** 2).sum(-1) * batch["loss_mask"][:, 0]
    return per_row.sum() / batch["loss_denominator"], {}


class ToyData:
    """Deterministic batches by position; ``get_state``/``set_state`` like the real iterator."""

    def __init__(self, seed: int = 0, rows: int = ROWS, embed: int = EMBED):
        self.seed, self.rows, self.embed, self.pos = seed, rows, embed, 0

    def __iter__(self):
        return self

    def __next__(self):
        rng = np.random.default_rng([self.seed, self.pos])
        self.pos += 1
        return {"x": rng.standard_normal((self.rows, self.embed), np.float32),
                "loss_mask": np.ones((self.rows, 1), np.float32)}

    def get_state(self):
        return {"pos": self.pos, "seed": self.seed}

    def set_state(self, state):
        self.pos, self.seed = state["pos"], state["seed"]


def toy_optimizer():
    return optax.adamw(optax.linear_schedule(3e-2, 1e-3, 20), weight_decay=0.01)


def toy_state(mesh, embed: int = EMBED, mlp: int = MLP, rank: int = 0, seed: int = 0):
    """A sharded TrainState of the toy model (only the adapters train when ``rank > 0``)."""
    model = Toy(embed, mlp, rank, seed)
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, state_shardings(state, mesh)))
    trainable = lora_filter if rank else nnx.Param
    return create_train_state(model, toy_optimizer(), mesh=mesh, seed=seed, trainable=trainable)


def toy_step(mesh, state):
    return jit_train_step(train_step, state, mesh, loss_fn=toy_loss, optimizer=toy_optimizer())


def run_steps(step_fn, state, data, mesh, first: int, last: int, ckpt=None):
    """Steps ``first..last`` (1-based, inclusive); returns the state and {step: loss}."""
    losses = {}
    for step in range(first, last + 1):
        batch = jax.device_put(next(data), batch_sharding(mesh))
        state, metrics = step_fn(state, batch)
        losses[step] = float(metrics["loss"])
        if ckpt is not None:
            ckpt.save(step, state, data)
    return state, losses


def make_cfg(tmp_path, **checkpoint) -> TrainConfig:
    cfg = TrainConfig()
    cfg.run.output_dir = str(tmp_path / "run")
    for k, v in checkpoint.items():
        setattr(cfg.checkpoint, k, v)
    return cfg


def host(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def assert_bitwise(a, b):
    for x, y in zip(host(a), host(b), strict=True):
        np.testing.assert_array_equal(x, y)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def mesh():
    return make_mesh()


@pytest.fixture(scope="module")
def step_fn(mesh):
    return toy_step(mesh, toy_state(mesh))


@pytest.fixture(scope="module")
def reference(mesh, step_fn):
    """The uninterrupted run: 8 steps straight, no checkpoints."""
    state, losses = run_steps(step_fn, toy_state(mesh), ToyData(), mesh, 1, 8)
    return host(state.params), host(state.opt_state), losses


def ckpt_dir(cfg) -> str:
    return os.path.join(cfg.run.output_dir, "checkpoints")


# --------------------------------------------------------------------------- tests


def test_exact_resume_matches_uninterrupted_run(tmp_path, mesh, step_fn, reference):
    cfg = make_cfg(tmp_path, save_every=3)
    ck = Checkpointer(cfg, mesh)
    assert ck.restore(toy_state(mesh), ToyData()) is None  # nothing to resume yet
    run_steps(step_fn, toy_state(mesh), ToyData(), mesh, 1, 5, ck)  # "dies" after step 5
    ck.close()

    ck = Checkpointer(cfg, mesh)
    data = ToyData()
    state = ck.restore(toy_state(mesh), data)
    assert int(state.step) == 3 and data.pos == 3
    state, losses = run_steps(step_fn, state, data, mesh, 4, 8, ck)
    ck.save(8, state, data, force=True)
    ck.close()
    params, opt_state, ref_losses = reference
    assert [losses[s] for s in range(4, 9)] == [ref_losses[s] for s in range(4, 9)]
    for got, want in zip(host(state.params), params, strict=True):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(host(state.opt_state), opt_state, strict=True):
        np.testing.assert_array_equal(got, want)
    with open(os.path.join(ckpt_dir(cfg), "8", "config", "metadata")) as f:
        assert json.load(f)["checkpoint"]["save_every"] == 3  # the resolved config rides along


def test_retention_keep_last_and_keep_every(tmp_path, mesh, step_fn):
    cfg = make_cfg(tmp_path, save_every=2, keep=2, keep_every=4)
    ck = Checkpointer(cfg, mesh)
    run_steps(step_fn, toy_state(mesh), ToyData(), mesh, 1, 10, ck)
    ck.close()
    assert Checkpointer(cfg, mesh).complete_steps() == [4, 8, 10]


def test_async_save_survives_donation_of_the_saved_buffers(tmp_path, mesh, step_fn):
    """The step donates the state; the background write must still see the saved values."""
    cfg = make_cfg(tmp_path, save_every=1)
    ck = Checkpointer(cfg, mesh)
    state, data = toy_state(mesh), ToyData()
    state, _ = run_steps(step_fn, state, data, mesh, 1, 1)
    saved = host(state.params)
    ck.save(1, state, data)
    run_steps(step_fn, state, data, mesh, 2, 4)  # donates and overwrites step 1's buffers
    ck.close()
    restored = Checkpointer(make_cfg(tmp_path, resume="1"), mesh).restore(
        toy_state(mesh), ToyData())
    for got, want in zip(host(restored.params), saved, strict=True):
        np.testing.assert_array_equal(got, want)


def test_partial_step_directory_is_skipped_and_removed(tmp_path, mesh, step_fn):
    cfg = make_cfg(tmp_path, save_every=2)
    ck = Checkpointer(cfg, mesh)
    run_steps(step_fn, toy_state(mesh), ToyData(), mesh, 1, 4, ck)
    ck.close()
    # A cut-off save: step 6 lacks its data item and Orbax's metadata; a tmp dir for step 8.
    root = ckpt_dir(cfg)
    os.makedirs(os.path.join(root, "6", "state"))
    with open(os.path.join(root, "6", "state", "garbage"), "w") as f:
        f.write("x")
    os.makedirs(os.path.join(root, "8.orbax-checkpoint-tmp-123", "state"))
    ck = Checkpointer(cfg, mesh)
    data = ToyData()
    state = ck.restore(toy_state(mesh), data)
    ck.close()
    assert int(state.step) == 4 and data.pos == 4
    assert sorted(os.listdir(root)) == ["2", "4"]


KILL_DURING_SAVE = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, sys.argv[1])
    import jax
    from tests.test_checkpoint import Checkpointer, ToyData, make_mesh, toy_state
    from jaxtune.config import TrainConfig
    cfg = TrainConfig()
    cfg.run.output_dir = sys.argv[2]
    cfg.checkpoint.save_every = 1
    mesh = make_mesh()
    state, data = toy_state(mesh, embed=2048, mlp=4096), ToyData()  # 32 MB of weights
    ck = Checkpointer(cfg, mesh)
    data.pos = 1
    ck.save(1, state.replace(step=state.step + 1), data)
    ck.wait()
    # Die inside step 2's background save, once its files are written but before they are
    # committed (renamed into place): a known point, however fast or slow the write is.
    from orbax.checkpoint._src.path import atomicity
    async def die(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)
    atomicity.AtomicRenameTemporaryPath.finalize = die
    data.pos = 2
    ck.save(2, state.replace(step=state.step + 2), data)  # returns once copied to host
    ck.wait()  # never returns: the background save kills the process
    sys.exit("step 2 was committed: the kill hook never ran (did Orbax's atomicity move?)")
""")


def test_kill_during_async_save_resumes_previous_step(tmp_path, mesh):
    cfg = make_cfg(tmp_path)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, ROOT, cfg.run.output_dir],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    left = sorted(os.listdir(ckpt_dir(cfg)))
    assert "1" in left and "2" not in left, left  # step 2 was cut off mid-write
    assert any(name.startswith("2.orbax-checkpoint-tmp") for name in left), left
    ck = Checkpointer(cfg, mesh)
    data = ToyData()
    state = ck.restore(toy_state(mesh, embed=2048, mlp=4096), data)
    ck.close()
    assert int(state.step) == 1 and data.pos == 1
    assert ck.complete_steps() == [1]
    assert sorted(os.listdir(ckpt_dir(cfg))) == ["1"]  # the partial one is gone


def test_failed_save_stops_training_and_keeps_earlier_checkpoints(tmp_path, mesh):
    cfg = make_cfg(tmp_path, save_every=1)
    state, data = toy_state(mesh, embed=512, mlp=1024), ToyData()
    ck = Checkpointer(cfg, mesh)
    ck.save(1, state, data)
    ck.wait()
    # No disk space, simulated: writes past 256 KiB fail with EFBIG (SIGXFSZ ignored).
    old_sig = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, old_limit[1]))
    try:
        with pytest.raises(CheckpointError) as err:
            ck.save(2, state, data)
            ck.save(3, state, data)  # the background failure surfaces here at the latest
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_sig)
    ck.close()
    msg = str(err.value)
    assert "failed" in msg and "steps [1]" in msg and "resumes from step 1" in msg, msg
    assert Checkpointer(cfg, mesh).complete_steps() == [1]


def test_incompatible_config_is_refused_naming_the_keys(tmp_path, mesh, step_fn):
    cfg = make_cfg(tmp_path, save_every=2)
    ck = Checkpointer(cfg, mesh)
    run_steps(step_fn, toy_state(mesh), ToyData(), mesh, 1, 2, ck)
    ck.close()

    changed = make_cfg(tmp_path, save_every=2)
    changed.optimizer.name = "lion"
    changed.model.dtype = "bfloat16"
    changed.optimizer.max_grad_norm = 0.0
    with pytest.raises(CheckpointError) as err:
        Checkpointer(changed, mesh).restore(toy_state(mesh), ToyData())
    msg = str(err.value)
    assert "optimizer.name: 'adamw' -> 'lion'" in msg
    assert "model.dtype: 'float32' -> 'bfloat16'" in msg
    assert "optimizer.max_grad_norm: 1.0 -> 0.0 (turning it on or off" in msg

    harmless = make_cfg(tmp_path, save_every=5)
    harmless.optimizer.learning_rate = 3e-3
    harmless.optimizer.max_grad_norm = 0.5
    harmless.trainer.steps = 500
    harmless.logging.tensorboard = False
    state = Checkpointer(harmless, mesh).restore(toy_state(mesh), ToyData())
    assert int(state.step) == 2


def test_changed_parameter_shapes_are_named(tmp_path, mesh, step_fn):
    cfg = make_cfg(tmp_path, save_every=1)
    ck = Checkpointer(cfg, mesh)
    run_steps(step_fn, toy_state(mesh), ToyData(), mesh, 1, 1, ck)
    ck.close()
    with pytest.raises(CheckpointError, match=r"params\.w\.value: checkpoint \(\(8, 12\)"):
        Checkpointer(cfg, mesh).restore(toy_state(mesh, mlp=10), ToyData())


def test_lora_saves_adapters_only_and_checks_the_base(tmp_path, mesh):
    base = tmp_path / "base"
    base.mkdir()
    (base / "model.safetensors").write_bytes(b"weights-a" * 1000)
    cfg = make_cfg(tmp_path, save_every=1)
    cfg.lora.rank = 2
    cfg.model.path = str(base)
    state = toy_state(mesh, embed=256, mlp=512, rank=2)
    state = state.replace(step=state.step + 1)
    assert "w" in state.frozen and "lora_a" in state.params
    ck = Checkpointer(cfg, mesh)
    ck.save(1, state, ToyData())
    ck.close()
    saved = os.path.join(ckpt_dir(cfg), "1")
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(saved) for f in fs)
    base_bytes = 256 * 512 * 4
    assert size < base_bytes / 4, size  # adapters + optimizer only, not the 512 KB base
    with open(os.path.join(saved, "meta", "metadata")) as f:
        assert json.load(f)["base"] == base_fingerprint(str(base))

    restored = Checkpointer(cfg, mesh).restore(toy_state(mesh, embed=256, mlp=512, rank=2,
                                                         seed=1), ToyData())
    assert_bitwise(restored.params, state.params)

    other = make_cfg(tmp_path, save_every=1)
    other.lora.rank, other.model.path = 2, str(base)
    other.lora.targets = ["q_proj", "v_proj"]
    with pytest.raises(CheckpointError, match=r"lora\.targets: \['all-linear'\] -> \['q_proj'"):
        Checkpointer(other, mesh).restore(toy_state(mesh, embed=256, mlp=512, rank=2), ToyData())

    (base / "model.safetensors").write_bytes(b"weights-b" * 1000)  # another base, same size
    with pytest.raises(CheckpointError, match="trained on the base model"):
        Checkpointer(cfg, mesh).restore(toy_state(mesh, embed=256, mlp=512, rank=2), ToyData())


def test_resume_choices(tmp_path, mesh, step_fn):
    cfg = make_cfg(tmp_path, save_every=2, keep=0)
    ck = Checkpointer(cfg, mesh)
    run_steps(step_fn, toy_state(mesh), ToyData(), mesh, 1, 6, ck)
    ck.close()

    with pytest.raises(CheckpointError, match=r"no complete checkpoint of that step.*\[2, 4, 6\]"):
        Checkpointer(make_cfg(tmp_path, resume="3"), mesh).restore(toy_state(mesh), ToyData())
    with pytest.raises(CheckpointError, match="resume is none"):
        Checkpointer(make_cfg(tmp_path, resume="none"), mesh).restore(toy_state(mesh), ToyData())

    # An explicit earlier step branches off: later checkpoints go, so 'auto' can't pick them.
    ck = Checkpointer(make_cfg(tmp_path, resume="2", save_every=2, keep=0), mesh)
    data = ToyData()
    state = ck.restore(toy_state(mesh), data)
    assert int(state.step) == 2 and data.pos == 2
    assert ck.complete_steps() == [2]
    ck.close()


def test_sigterm_requests_a_save_and_stop(tmp_path, mesh):
    previous = signal.getsignal(signal.SIGTERM)
    ck = Checkpointer(make_cfg(tmp_path), mesh)
    assert not ck.preemption_requested(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert ck.preemption_requested(2)
    ck.close()
    assert signal.getsignal(signal.SIGTERM) == previous


def test_changed_model_architecture_is_named(tmp_path, mesh, step_fn):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    hf = {"model_type": "llama", "hidden_size": 72, "num_hidden_layers": 3, "vocab_size": 389}
    (model_dir / "config.json").write_text(json.dumps(hf))
    cfg = make_cfg(tmp_path, save_every=1)
    cfg.model.path = str(model_dir)
    ck = Checkpointer(cfg, mesh)
    run_steps(step_fn, toy_state(mesh), ToyData(), mesh, 1, 1, ck)
    ck.close()
    (model_dir / "config.json").write_text(json.dumps({**hf, "hidden_size": 96}))
    with pytest.raises(CheckpointError, match="model config.json hidden_size: 72 -> 96"):
        Checkpointer(cfg, mesh).restore(toy_state(mesh), ToyData())
    cfg.model.overrides = {"num_hidden_layers": 2}  # overrides count as the architecture too
    (model_dir / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match="num_hidden_layers: 3 -> 2"):
        Checkpointer(cfg, mesh).restore(toy_state(mesh), ToyData())


def test_relative_output_dir_saves_and_resumes(tmp_path, mesh, step_fn, monkeypatch):
    """Recipes say runs/<name>: a relative run directory must work (Orbax wants absolute)."""
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig()
    cfg.run.output_dir = "runs/relative"
    cfg.checkpoint.save_every = 2
    ck = Checkpointer(cfg, mesh)
    run_steps(step_fn, toy_state(mesh), ToyData(), mesh, 1, 2, ck)
    ck.close()
    assert (tmp_path / "runs/relative/checkpoints/2").is_dir()
    state = Checkpointer(cfg, mesh).restore(toy_state(mesh), ToyData())
    assert int(state.step) == 2


# --------------------------------------------------------------------------- failure paths


def with_nan(state, name: str = "w"):
    """``state`` with one NaN in parameter ``name`` (a diverged state)."""
    def poison(path, x):
        hit = jax.tree_util.keystr(path).startswith(f"['{name}']")
        return x.at[(0,) * x.ndim].set(jnp.nan) if hit else x

    return state.replace(params=jax.tree_util.tree_map_with_path(poison, state.params))


def test_a_non_finite_state_is_never_saved(tmp_path, mesh, step_fn):
    cfg = make_cfg(tmp_path, save_every=1)
    ck = Checkpointer(cfg, mesh)
    state, data = toy_state(mesh), ToyData()
    state, _ = run_steps(step_fn, state, data, mesh, 1, 2, ck)
    bad = with_nan(state)
    with pytest.raises(CheckpointError, match=r"step 3 holds NaN or Inf in params\.w.*not saved"
                       r".*steps \[1, 2\]; a restart resumes from step 2"):
        ck.save(3, bad.replace(step=bad.step + 1), data)
    ck.close()
    assert sorted(os.listdir(ckpt_dir(cfg))) == ["1", "2"]  # nothing of step 3, not even tmp


def test_resume_auto_skips_a_non_finite_checkpoint_and_says_so(tmp_path, mesh, step_fn,
                                                              monkeypatch, caplog):
    """A NaN checkpoint (as older versions could write) is never resumed."""
    from jaxtune import checkpoint

    cfg = make_cfg(tmp_path, save_every=2, keep=0)
    ck = Checkpointer(cfg, mesh)
    state, data = toy_state(mesh), ToyData()
    state, _ = run_steps(step_fn, state, data, mesh, 1, 4, ck)
    good = host(state.params)
    with monkeypatch.context() as m:  # write diverged steps 6 and 8 past the save-time check
        m.setattr(checkpoint, "nonfinite_arrays", lambda tree: [])
        bad = with_nan(state, "b")
        for step in (6, 8):
            data.pos = step
            ck.save(step, bad.replace(step=bad.step * 0 + step), data)
    ck.close()

    with pytest.raises(CheckpointError, match=r"/8 holds NaN or Inf in params\.b.*not resumed"
                       r".*--checkpoint\.resume=<step>.*\[2, 4, 6\]"):
        Checkpointer(make_cfg(tmp_path, resume="8"), mesh).restore(toy_state(mesh), ToyData())
    assert Checkpointer(cfg, mesh).complete_steps() == [2, 4, 6, 8]  # the refusal deleted none

    data = ToyData()
    with caplog.at_level("WARNING", logger="jaxtune"):
        ck = Checkpointer(cfg, mesh)
        restored = ck.restore(toy_state(mesh), data)
    assert int(restored.step) == 4 and data.pos == 4
    for got, want in zip(host(restored.params), good, strict=True):
        np.testing.assert_array_equal(got, want)
    text = caplog.text
    assert "/8 holds NaN or Inf" in text and "/6 holds NaN or Inf" in text, text
    assert "resuming from step 4, the last checkpoint with finite values" in text, text
    assert ck.complete_steps() == [2, 4]  # the diverged ones are gone, auto can't pick them
    ck.close()


def _truncate(path: str, size: int = 10) -> None:
    with open(path, "r+") as f:
        f.truncate(size)


def _array_files(step_dir: str) -> list[str]:
    """The OCDBT data files that hold the arrays (``state/d/*``)."""
    d = os.path.join(step_dir, "state", "d")
    return [os.path.join(d, f) for f in sorted(os.listdir(d))]


DAMAGE = {  # what is damaged -> (how, the file the message must name)
    "meta json": (lambda s: _truncate(os.path.join(s, "meta", "metadata")), "meta/metadata"),
    "config json": (lambda s: _truncate(os.path.join(s, "config", "metadata")),
                    "config/metadata"),
    "data json": (lambda s: _truncate(os.path.join(s, "data", "metadata")), "data/metadata"),
    "state metadata": (lambda s: _truncate(os.path.join(s, "state", "_METADATA")),
                       "state/_METADATA"),
    "meta missing": (lambda s: os.remove(os.path.join(s, "meta", "metadata")),
                     "meta/metadata"),
    "array file truncated": (lambda s: [_truncate(f, 100) for f in _array_files(s)],
                             "state/d/"),
    "array file missing": (lambda s: [os.remove(f) for f in _array_files(s)], "state/d/"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_refused_naming_the_step_the_file_and_the_way_back(
        tmp_path, mesh, step_fn, damage):
    cfg = make_cfg(tmp_path, save_every=2)
    ck = Checkpointer(cfg, mesh)
    run_steps(step_fn, toy_state(mesh), ToyData(), mesh, 1, 4, ck)
    ck.close()
    how, file = DAMAGE[damage]
    step_dir = os.path.join(ckpt_dir(cfg), "4")
    how(step_dir)
    with pytest.raises(CheckpointError) as err:
        Checkpointer(cfg, mesh).restore(toy_state(mesh), ToyData())
    msg = str(err.value)
    assert msg.startswith(f"Checkpoint {step_dir} is damaged: reading {file}"), msg
    assert "earlier complete checkpoint is step 2: resume it with --checkpoint.resume=2" in msg
    assert "tensorstore_spec" not in msg and "\n" not in msg and len(msg) < 700, msg
    # The suggested override works, and replaces the damaged step.
    data = ToyData()
    state = Checkpointer(make_cfg(tmp_path, resume="2"), mesh).restore(toy_state(mesh), data)
    assert int(state.step) == 2 and data.pos == 2


def test_a_damaged_only_checkpoint_says_there_is_no_earlier_one(tmp_path, mesh, step_fn):
    cfg = make_cfg(tmp_path, save_every=2)
    ck = Checkpointer(cfg, mesh)
    run_steps(step_fn, toy_state(mesh), ToyData(), mesh, 1, 2, ck)
    ck.close()
    _truncate(os.path.join(ckpt_dir(cfg), "2", "meta", "metadata"))
    with pytest.raises(CheckpointError, match=r"meta/metadata failed \(not valid JSON.*No "
                       r"earlier complete checkpoint exists: start fresh"):
        Checkpointer(cfg, mesh).restore(toy_state(mesh), ToyData())


def tree_digest(root) -> dict[str, str]:
    """{relative path: sha256} of every file under ``root``, and every folder (as 'dir')."""
    import hashlib

    out = {}
    for d, dirs, files in os.walk(root):
        for name in dirs:
            out[os.path.relpath(os.path.join(d, name), root)] = "dir"
        for name in files:
            with open(os.path.join(d, name), "rb") as f:
                out[os.path.relpath(os.path.join(d, name), root)] = hashlib.sha256(
                    f.read()).hexdigest()
    return out


def test_check_resume_refuses_without_touching_the_folder(tmp_path, mesh, step_fn):
    from jaxtune.checkpoint import check_resume

    cfg = make_cfg(tmp_path, save_every=2)
    ck = Checkpointer(cfg, mesh)
    run_steps(step_fn, toy_state(mesh), ToyData(), mesh, 1, 4, ck)
    ck.close()
    # What a normal start would clean up: a cut-off save and a partial step.
    os.makedirs(os.path.join(ckpt_dir(cfg), "6.orbax-checkpoint-tmp-1", "state"))
    os.makedirs(os.path.join(ckpt_dir(cfg), "5", "state"))
    before = tree_digest(tmp_path)
    assert check_resume(cfg) == 4
    with pytest.raises(CheckpointError, match="no complete checkpoint of that step"):
        check_resume(make_cfg(tmp_path, resume="999"))
    with pytest.raises(CheckpointError, match="resume is none"):
        check_resume(make_cfg(tmp_path, resume="none"))
    changed = make_cfg(tmp_path)
    changed.lora.rank = 4
    with pytest.raises(CheckpointError, match="lora.rank: 0 -> 4"):
        check_resume(changed)
    assert tree_digest(tmp_path) == before
    assert check_resume(make_cfg(tmp_path / "elsewhere")) is None
    assert not (tmp_path / "elsewhere").exists()
