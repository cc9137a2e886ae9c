"""Export to Hugging Face: exact round trips, trained exports checked in transformers, shards,
atomic output and bad input.

References: the original safetensors files (round trips must give them back bit for bit, in
their dtype), transformers' logits on the exported folder against jaxtune's on the trained
state, and the training tokenizer (chat template, EOS) against ``AutoTokenizer`` on the export.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import optax
import pytest
from safetensors.numpy import load_file

from jaxtune.checkpoint import Checkpointer
from jaxtune.cli import main as cli_main
from jaxtune.config import config_from_dict, save_config
from jaxtune.export import ExportError, export_run, save_pretrained
from jaxtune.export.hf_folder import end_of_turn_token
from jaxtune.export.safetensors_out import TensorGroup, TensorSpec, parse_size, write_safetensors
from jaxtune.models import get_family
from jaxtune.models.build import single_device_mesh
from jaxtune.train_state import create_train_state
from jaxtune.weights import from_pretrained
from tests.fixtures_data import chat_rows, write_jsonl
from tests.fixtures_models import TINY_VARIANTS, hf_logits, make_tiny_hf_model


def hf_tensors(folder: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_same_tensors(original: Path, exported: Path) -> None:
    a, b = hf_tensors(original), hf_tensors(exported)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert np.array_equal(a[k].view(np.uint8), b[k].view(np.uint8)), k


def checkpoint_run(root: Path, model_dir: Path, tokenizer: str, *, scan: bool,
                   dtype: str = "float32", step: int = 0, mesh=None, **sections) -> Path:
    """A run directory whose checkpoint holds the model exactly as loaded (no training),
    saved from ``mesh`` (default: one device)."""
    run = root / "run"
    raw = {"run": {"output_dir": str(run)},
           "model": {"path": str(model_dir), "tokenizer": tokenizer, "scan_layers": scan,
                     "dtype": dtype},
           "checkpoint": {"async_save": False}, **sections}
    cfg = config_from_dict(raw)
    save_config(cfg, run / "config.yaml")
    mesh = mesh or single_device_mesh()
    model = from_pretrained(model_dir, dtype=dtype, scan_layers=scan, mesh=mesh)
    state = create_train_state(model, optax.set_to_zero(), mesh=mesh)
    ckpt = Checkpointer(cfg, mesh)
    ckpt.save(step, state, None, force=True)
    ckpt.close()
    return run


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("variant", list(TINY_VARIANTS))
def test_checkpoint_round_trip_is_exact(variant, tiny_hf_model, data_tokenizers, tmp_path):
    """HF folder -> jaxtune -> Orbax checkpoint -> export gives the original tensors back."""
    model_dir = tiny_hf_model(variant)
    original_cfg = json.loads((model_dir / "config.json").read_text())
    for scan in (False, True):
        run = checkpoint_run(tmp_path / f"scan{scan}", model_dir, data_tokenizers["chatml"],
                             scan=scan)
        out = export_run(run, tmp_path / f"out-scan{scan}", echo=lambda _: None)
        assert_same_tensors(model_dir, out)
        assert json.loads((out / "config.json").read_text()) == original_cfg
        if original_cfg.get("tie_word_embeddings"):
            assert "lm_head.weight" not in hf_tensors(out)


@pytest.mark.parametrize("variant", list(TINY_VARIANTS))
def test_save_pretrained_round_trip_is_exact(variant, tiny_hf_model, tmp_path):
    model_dir = tiny_hf_model(variant)
    for scan in (False, True):
        model = from_pretrained(model_dir, scan_layers=scan)
        out = save_pretrained(model, tmp_path / f"scan{scan}")
        assert_same_tensors(model_dir, out)
        written = json.loads((out / "config.json").read_text())
        original = json.loads((model_dir / "config.json").read_text())
        # The original config.json key for key (no head_dim or other key added), dtype aside.
        assert {k: v for k, v in written.items() if k != "dtype"} == \
            {k: v for k, v in original.items() if k != "dtype"}
        family = get_family(written["model_type"])
        again = family.config_cls.from_hf_config(written)
        assert dataclasses.replace(again, hf_source="") == \
            dataclasses.replace(model.config, hf_source="")
        assert again.to_hf_config() == written
        assert written["dtype"] == "float32"


def test_bfloat16_checkpoint_round_trip(data_tokenizers, tmp_path):
    """A bf16 model trained in bf16 exports (dtype auto) to the same bf16 bytes."""
    model_dir = make_tiny_hf_model("qwen3", tmp_path / "bf16", dtype="bfloat16", head_dim=16,
                                   num_key_value_heads=2, max_shard_size="150KB")
    run = checkpoint_run(tmp_path, model_dir, data_tokenizers["chatml"], scan=True,
                         dtype="bfloat16")
    out = export_run(run, tmp_path / "out", max_shard_size="150KB", echo=lambda _: None)
    assert_same_tensors(model_dir, out)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert (out / "model.safetensors.index.json").is_file()


# --------------------------------------------------------------------------- after training


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_hf_model, data_tokenizers):
    """A few steps of full fine-tuning (scanned layers) with the trainer's own export and
    --verify; a Llama 3 style tokenizer trained with the ChatML template override, so the
    end-of-turn token (<|im_end|>) differs from the tokenizer's EOS (<|eot_id|>)."""
    from jaxtune.trainer import train

    root = tmp_path_factory.mktemp("export_trained")
    data = write_jsonl(root / "chats.jsonl", chat_rows(24, seed=1))
    cfg = config_from_dict({
        "run": {"output_dir": str(root / "run"), "seed": 1},
        "model": {"path": str(tiny_hf_model("llama")), "tokenizer": data_tokenizers["llama3"],
                  "scan_layers": True},
        "data": {"sources": [{"path": data}], "format": "chat", "chat_template": "chatml",
                 "seq_len": 32, "cache_dir": str(root / "cache")},
        "optimizer": {"learning_rate": 1e-2, "schedule": "constant"},
        "trainer": {"steps": 3, "global_batch_size": 4, "progress": False},
        "logging": {"tensorboard": False, "stdout": False},
        "export": {"enabled": True, "dtype": "float32", "verify": True},
    })
    result = train(cfg)
    return cfg, result, root


def test_trained_export_matches_in_transformers(trained_run, tiny_hf_model, capsys):
    cfg, result, root = trained_run
    out = root / "run" / "hf"
    ids = np.random.default_rng(0).integers(0, 389, (2, 20))
    ref = np.asarray(result.state.model()(ids))
    got = hf_logits(out, ids)
    assert np.max(np.abs(got - ref)) <= 1e-4
    # training moved the weights, so the comparison is not with the original model
    assert np.max(np.abs(hf_logits(tiny_hf_model("llama"), ids) - ref)) > 1e-2


def test_trained_export_tokenizer_and_eos(trained_run):
    from transformers import AutoTokenizer

    from jaxtune.data import load_tokenizer

    cfg, _, root = trained_run
    out = root / "run" / "hf"
    trained, exported = load_tokenizer(cfg), AutoTokenizer.from_pretrained(out)
    chat = chat_rows(1, seed=5)[0]["messages"]
    assert exported.apply_chat_template(chat, tokenize=False) == \
        trained.apply_chat_template(chat, tokenize=False)
    assert "<|im_start|>" in exported.apply_chat_template(chat, tokenize=False)
    assert exported.eos_token_id == trained.eos_token_id == trained.convert_tokens_to_ids(
        "<|eot_id|>")
    assert end_of_turn_token(exported) == "<|im_end|>"
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [trained.convert_tokens_to_ids("<|eot_id|>"),
                                   trained.convert_tokens_to_ids("<|im_end|>")]
    assert gen["bos_token_id"] == trained.bos_token_id
    from transformers import GenerationConfig

    assert GenerationConfig.from_pretrained(out).eos_token_id == gen["eos_token_id"]


def test_multi_file_bf16_export_through_cli(trained_run, tmp_path, capsys):
    """Small --max-shard-size: several files plus an index that transformers reloads;
    --verify checks the bf16 export exactly and the rounding against the f32 model."""
    _, result, root = trained_run
    out = tmp_path / "sharded"
    rc = cli_main(["export", str(root / "run"), "--out", str(out), "--dtype", "bfloat16",
                   "--max-shard-size", "100KB", "--verify"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "max |logit difference| transformers vs jaxtune" in printed
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in hf_tensors(out).values())
    assert all(t.dtype.name == "bfloat16" for t in hf_tensors(out).values())
    # transformers reloads it: same logits as the f32 export rounded to bf16 (both in f32)
    f32 = hf_tensors(root / "run" / "hf")
    bf16 = hf_tensors(out)
    assert all(np.array_equal(f32[k].astype(bf16[k].dtype), bf16[k]) for k in f32)
    ids = np.arange(24)[None] % 389
    assert np.all(np.isfinite(hf_logits(out, ids)))


# --------------------------------------------------------------------------- bad input


def test_bad_input_is_a_clear_error(trained_run, tmp_path, capsys):
    _, _, root = trained_run
    run = str(root / "run")

    def export(*args) -> str:
        assert cli_main(["export", *args]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return err

    assert "no config.yaml" in export(str(tmp_path), "--out", str(tmp_path / "a"))
    empty = tmp_path / "empty_run"
    save_config(config_from_dict({"run": {"output_dir": str(empty)}}), empty / "config.yaml")
    assert "holds no complete checkpoint" in export(str(empty), "--out", str(tmp_path / "b"))
    assert "no complete checkpoint of step 7; complete steps: 3" in \
        export(run, "--step", "7", "--out", str(tmp_path / "c"))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    assert "is not empty; nothing was written" in export(run, "--out", str(busy))
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    assert "reads from" in export(run, "--out", run, "--overwrite")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    # --overwrite replaces the folder as a whole
    assert cli_main(["export", run, "--out", str(busy), "--overwrite"]) == 0
    assert not (busy / "keep.txt").exists() and (busy / "model.safetensors").is_file()


def test_export_target_that_cannot_be_created(trained_run, tmp_path, capsys, monkeypatch):
    """Under a file, in a read-only folder, or refused by the file system: exit 2, nothing
    left behind, no FileExistsError / FileNotFoundError traceback from the staging code."""
    import errno
    import os

    _, _, root = trained_run
    run = str(root / "run")

    def export(out) -> str:
        capsys.readouterr()
        assert cli_main(["export", run, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err
        return " ".join(err.split())

    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a folder")
    for out in (blocker / "hf", blocker / "deeper" / "hf"):
        assert f"{blocker} is a file, not a folder" in export(out)
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    try:
        if not os.access(readonly, os.W_OK):  # root may write anyway: then nothing to check
            assert f"{readonly} is not writable" in export(readonly / "hf")
    finally:
        readonly.chmod(0o755)

    from jaxtune.export import hf_folder

    def refused(*_, **__):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "ro"))

    monkeypatch.setattr(hf_folder.tempfile, "mkdtemp", refused)
    msg = export(tmp_path / "ro" / "hf")
    assert "cannot be created: Read-only file system" in msg and "Nothing was written" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "readonly"]


def test_missing_run_dir_names_the_command_that_makes_it(tmp_path, capsys):
    assert cli_main(["export", str(tmp_path / "runs" / "quickstart"), "--out",
                     str(tmp_path / "m")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "does not exist" in err and "`jaxtune train configs/quickstart.yaml`" in err


def test_failed_export_leaves_nothing(trained_run, tmp_path, monkeypatch):
    _, _, root = trained_run
    from jaxtune.export import hf_folder

    def broken(*_):
        raise OSError("disk full")

    monkeypatch.setattr(hf_folder, "save_tokenizer", broken)
    with pytest.raises(OSError):
        export_run(root / "run", tmp_path / "new", echo=lambda _: None)
    keep = tmp_path / "old"
    keep.mkdir()
    (keep / "model.safetensors").write_text("previous export")
    with pytest.raises(OSError):
        export_run(root / "run", keep, overwrite=True, echo=lambda _: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]  # no temporary folders
    assert (keep / "model.safetensors").read_text() == "previous export"


def test_verify_fails_past_tolerance(trained_run, data_tokenizers):
    from jaxtune.export import verify

    _, result, root = trained_run
    out = root / "run" / "hf"
    model = result.state.model()
    ok = verify.verify(out, [verify.Check("trained", lambda: verify.jaxtune_logits(model))],
                       vocab_size=389, echo=lambda _: None)
    assert ok["trained"] <= 1e-4
    with pytest.raises(ExportError, match="logits differ"):
        verify.verify(out, [verify.Check("shifted", lambda: lambda ids: np.asarray(
            model(ids)) + 0.01)], vocab_size=389, echo=lambda _: None)
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(data_tokenizers["llama3"])  # its own llama3 template
    problems = verify.check_tokenizer(out, other)
    assert any("chat template" in p for p in problems)


# --------------------------------------------------------------------------- writer


def test_sizes_and_sharding(tmp_path):
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30
    assert parse_size("100KB") == 100_000 and parse_size(123) == 123
    with pytest.raises(ExportError, match="not a size"):
        parse_size("big")
    arrays = {"a": np.ones((10, 10), np.float32), "b": np.arange(100, dtype=np.float32),
              "c": np.full((3,), 2, np.float32)}
    groups = [TensorGroup([TensorSpec(k, v.shape, np.dtype("float32"))], lambda v=v: iter([v]))
              for k, v in arrays.items()]
    weight_map = write_safetensors(tmp_path, groups, 300)  # a and b (400 B each) alone
    assert weight_map == {"a": "model-00001-of-00003.safetensors",
                          "b": "model-00002-of-00003.safetensors",
                          "c": "model-00003-of-00003.safetensors"}
    back = hf_tensors(tmp_path)
    assert all(np.array_equal(back[k], v) for k, v in arrays.items())
