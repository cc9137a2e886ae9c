"""A new user's bad inputs, through the real CLI: exit 2, one ``error:`` paragraph naming the
culprit and the fix, no traceback, no huggingface_hub repo-id error for a local path.

The README's "Using jaxtune" commands are run in order as on a fresh clone (the quickstart's
model not built yet, no run directory): each works or names the missing piece and the command
that provides it. The CLI runs in process (``jaxtune.cli.main``): any exception other than a
``JaxtuneError`` would escape it and fail the test with its traceback.
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest
import yaml

from jaxtune.cli import main
from tests.fixtures_data import chat_rows, write_jsonl
from tests.fixtures_models import make_tiny_hf_model

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def recipe(tmp_path: Path, model: dict, *, rows=None, eval_path=None, steps: int = 1) -> str:
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(8) if rows is None else rows)
    raw = {
        "run": {"output_dir": str(tmp_path / "run")},
        "model": model,
        "data": {"sources": [{"path": data}], "seq_len": 32, "cache_dir": str(tmp_path / "c")},
        "trainer": {"steps": steps, "global_batch_size": 2, "progress": False},
        "checkpoint": {"enabled": False},
        "logging": {"tensorboard": False, "jsonl": False, "stdout": False},
    }
    if eval_path is not None:
        raw["data"]["eval_sources"] = [{"path": str(eval_path)}]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def fails(capsys, *argv: str) -> str:
    """Run the CLI; it must exit 2 with one error paragraph and no traceback."""
    capsys.readouterr()  # drop what fixtures printed
    assert main(list(argv)) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert err.startswith("error: "), err
    assert "Traceback" not in err + captured.out
    assert "Repo id must be" not in err and "valid JSON file" not in err, err
    return " ".join(err.split())  # one paragraph: compare without the line breaks


# --------------------------------------------------------------------------- model.path


@pytest.mark.parametrize("command", ["train", "inspect-data"])
def test_missing_model_folder_is_named_before_the_tokenizer(command, tmp_path, capsys):
    missing = tmp_path / "models" / "my-model"
    msg = fails(capsys, command, recipe(tmp_path, {"path": str(missing)}))
    assert f"model.path is '{missing}': that folder does not exist" in msg
    assert "config.json" in msg
    assert not (tmp_path / "run").exists()  # nothing written for a run that cannot start


def test_relative_missing_folder_names_the_working_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    msg = fails(capsys, "inspect-data", recipe(tmp_path, {"path": "./checkpoints/base"}))
    assert "'./checkpoints/base'" in msg and "does not exist" in msg
    assert f"working directory, {tmp_path}" in msg


def test_safetensors_file_instead_of_its_folder(tiny_hf_model, tmp_path, capsys):
    file = tiny_hf_model("llama") / "model.safetensors"
    for command in ("train", "inspect-data"):
        msg = fails(capsys, command, recipe(tmp_path, {"path": str(file)}))
        assert f"model.path is '{file}', which is a file; give the folder that holds it " \
               f"({file.parent})" in msg


def test_folder_without_config_json(tiny_hf_model, tmp_path, capsys, data_tokenizers):
    folder = tmp_path / "weights-only"
    folder.mkdir()
    shutil.copy(tiny_hf_model("llama") / "model.safetensors", folder)
    msg = fails(capsys, "train", recipe(
        tmp_path, {"path": str(folder), "tokenizer": data_tokenizers["chatml"]}))
    assert f"{folder} (model.path) has no config.json" in msg


def test_missing_tokenizer_folder_names_model_tokenizer(tiny_hf_model, tmp_path, capsys):
    msg = fails(capsys, "inspect-data", recipe(
        tmp_path, {"path": str(tiny_hf_model("llama")), "tokenizer": str(tmp_path / "tok")}))
    assert f"model.tokenizer is '{tmp_path / 'tok'}': that folder does not exist" in msg


def test_uncached_hub_id_offline_names_the_cache(tmp_path, capsys, monkeypatch):
    cache = tmp_path / "hub-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for command in ("train", "inspect-data"):
        msg = fails(capsys, command, recipe(tmp_path, {"path": "some-org/some-model"}))
        assert "model.path is 'some-org/some-model'" in msg
        assert "hub is unreachable offline" in msg and f"({cache})" in msg
        assert "hf download some-org/some-model" in msg


def test_quickstart_model_not_built_names_the_build_command(tmp_path, capsys, monkeypatch):
    """The quickstart recipe as written, before scripts/quickstart.sh built the model."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # a fresh machine: nothing cached
    monkeypatch.setenv("JAXTUNE_CACHE", str(tmp_path / "cache"))
    work = tmp_path / "clone"  # a fresh clone: no runs/ of an earlier quickstart in the way
    shutil.copytree(ROOT / "configs", work / "configs")
    shutil.copytree(ROOT / "examples", work / "examples")
    monkeypatch.chdir(work)
    built = tmp_path / "cache" / "smollm2-135m-instruct"
    msg = fails(capsys, "inspect-data", "configs/quickstart.yaml", "-n", "1")
    assert "model.path is '~/.cache/jaxtune/smollm2-135m-instruct'" in msg
    assert "`python scripts/make_smollm2.py`" in msg and f"writes {built}" in msg
    # JAXTUNE_CACHE moves the build: the message says which --model.path to pass then
    assert f"--model.path={built}" in msg
    monkeypatch.delenv("JAXTUNE_CACHE")
    msg = fails(capsys, "train", "configs/quickstart.yaml", "--trainer.steps=1")
    assert "python scripts/make_smollm2.py" in msg and "--model.path" not in msg


def test_readme_commands_on_a_fresh_clone(tmp_path, capsys, monkeypatch):
    """README's 'Using jaxtune' block in order, before the quickstart ever ran."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("JAXTUNE_CACHE", raising=False)
    work = tmp_path / "clone"
    shutil.copytree(ROOT / "configs", work / "configs")
    shutil.copytree(ROOT / "examples", work / "examples")
    monkeypatch.chdir(work)
    block = README.split("## Using jaxtune", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [shlex.split(line.split("#")[0]) for line in block.splitlines() if line.strip()]
    assert [c[:2] for c in commands] == [["jaxtune", "train"], ["jaxtune", "print-config"],
                                         ["jaxtune", "inspect-data"], ["jaxtune", "export"],
                                         ["jaxtune", "generate"], ["jaxtune", "train"],
                                         ["jaxtune", "eval"], ["jaxtune", "launch"]]
    needs = {"train": "python scripts/make_smollm2.py",
             "quickstart-grpo": "runs/quickstart/hf",
             "inspect-data": "python scripts/make_smollm2.py",
             "export": "jaxtune train configs/quickstart.yaml",
             "generate": "jaxtune train configs/quickstart.yaml",
             "eval": "jaxtune train configs/quickstart.yaml"}
    for argv in commands:
        name = argv[1]
        if name == "train" and "grpo" in argv[2]:
            name = "quickstart-grpo"  # RL starts from the SFT quickstart's export
        if name in needs:
            assert needs[name] in fails(capsys, *argv[1:]), argv
            continue
        if name == "launch":  # --help exits through argparse
            with pytest.raises(SystemExit) as done:
                main(argv[1:])
            assert done.value.code == 0
        else:
            assert main(argv[1:]) == 0
        assert "Traceback" not in capsys.readouterr().err
    assert not (work / "runs").exists()


# --------------------------------------------------------------------------- tokenizer vs model


def test_tokenizer_larger_than_the_embedding_is_refused_before_training(
        tmp_path, capsys, data_tokenizers):
    from transformers import AutoTokenizer

    tok = data_tokenizers["chatml"]
    n = len(AutoTokenizer.from_pretrained(tok))
    small = make_tiny_hf_model("llama", tmp_path / "small-vocab", vocab_size=n - 40)
    cfg = recipe(tmp_path, {"path": str(small), "tokenizer": tok})
    for command in ("train", "inspect-data"):
        msg = fails(capsys, command, cfg)
        assert f"The tokenizer has {n} tokens" in msg
        assert f"vocab_size={n - 40}" in msg and "resize_token_embeddings" in msg
        assert "learning_rate" not in msg
    # the same tokenizer with a model that embeds exactly its ids is accepted
    fits = make_tiny_hf_model("llama", tmp_path / "fits", vocab_size=n)
    assert main(["inspect-data", recipe(tmp_path, {"path": str(fits), "tokenizer": tok})]) == 0


# --------------------------------------------------------------------------- data files


@pytest.mark.parametrize("content, what", [("", "is empty (0 bytes)"),
                                           ("\n  \n\n", "holds only blank lines")])
def test_empty_data_file(content, what, tmp_path, capsys, data_tokenizers):
    cfg = recipe(tmp_path, {"tokenizer": data_tokenizers["chatml"]}, rows=[])
    Path(tmp_path / "train.jsonl").write_text(content)
    msg = fails(capsys, "inspect-data", cfg)
    assert f"'{tmp_path / 'train.jsonl'}' (data.sources[0]) {what}" in msg
    assert "StopIteration" not in msg


def test_empty_eval_file_and_missing_eval_file_name_eval_sources(
        tmp_path, capsys, data_tokenizers):
    missing = tmp_path / "held-out.jsonl"
    cfg = recipe(tmp_path, {"tokenizer": data_tokenizers["chatml"]}, eval_path=missing)
    msg = fails(capsys, "inspect-data", cfg)
    assert "Fix data.eval_sources[0].path" in msg and "data.sources[0]" not in msg
    missing.write_text("")
    msg = fails(capsys, "inspect-data", cfg)
    assert "(data.eval_sources[0]) is empty" in msg and "evaluate" in msg


def test_empty_file_in_a_data_folder(tmp_path, capsys, data_tokenizers):
    folder = tmp_path / "shards"
    write_jsonl(folder / "a.jsonl", chat_rows(3))
    (folder / "b.jsonl").write_text("")
    cfg = recipe(tmp_path, {"tokenizer": data_tokenizers["chatml"]})
    raw = yaml.safe_load(Path(cfg).read_text())
    raw["data"]["sources"] = [{"path": str(folder)}]
    Path(cfg).write_text(yaml.safe_dump(raw))
    msg = fails(capsys, "inspect-data", cfg)
    assert re.search(r"'\S*b\.jsonl' \(data\.sources\[0\]\) is empty", msg), msg


def test_model_folder_without_tokenizer_says_to_set_model_tokenizer(
        tiny_hf_model, tmp_path, capsys):
    model = tiny_hf_model("llama")  # save_pretrained of the model only: no tokenizer files
    msg = fails(capsys, "inspect-data", recipe(tmp_path, {"path": str(model)}))
    assert f"{model} (model.path) holds no tokenizer files" in msg
    assert "Set model.tokenizer" in msg
