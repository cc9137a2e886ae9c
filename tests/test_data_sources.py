"""Reading sources: every local file type, folders, and clear errors for missing paths."""

from __future__ import annotations

import pytest

from jaxtune.config import DataSourceConfig
from jaxtune.data.errors import DataError
from jaxtune.data.prepare import prepare
from jaxtune.data.sources import resolve_source
from jaxtune.data.tokenizer import load_tokenizer
from tests.fixtures_data import make_data_config

TEXTS = ["The quick brown fox.", "Hello world, how are you?", "Seven eleven numbers."]


def _write(tmp_path, kind):
    import datasets

    ds = datasets.Dataset.from_dict({"text": TEXTS})
    path = tmp_path / f"data.{kind}"
    if kind == "jsonl":
        ds.to_json(path)
    elif kind == "parquet":
        ds.to_parquet(path)
    elif kind == "csv":
        ds.to_csv(path, index=False)
    elif kind == "arrow":
        folder = tmp_path / "saved"
        ds.save_to_disk(folder)
        path = next(folder.glob("*.arrow"))
    elif kind == "txt":  # one document per file
        folder = tmp_path / "txt"
        folder.mkdir()
        for i, t in enumerate(TEXTS):
            (folder / f"doc{i}.txt").write_text(t)
        path = folder
    return path


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "csv", "arrow", "txt"])
def test_every_file_type_reads_the_same_documents(tmp_path, data_tokenizers, kind):
    cfg = make_data_config(tmp_path, data_tokenizers["chatml"], [_write(tmp_path, kind)],
                           format="text", shuffle=False)
    tok = load_tokenizer(cfg)
    data = prepare(cfg, tok)
    texts = sorted(
        tok.decode(t.tokens[t.offsets[i]:t.offsets[i + 1]].tolist(), skip_special_tokens=True)
        for t in data.tokenized for i in range(t.num_examples))
    assert texts == sorted(TEXTS)


def test_missing_local_paths_fail_fast(tmp_path):
    for path in ["data/train.jsonl", "./x", str(tmp_path / "nope"), "a/b/c"]:
        with pytest.raises(DataError, match="does not exist"):
            resolve_source(0, DataSourceConfig(path=path))
    shard, = resolve_source(0, DataSourceConfig(path="owner/name", subset="s", split="test"))
    assert not shard.is_file and shard.name == "owner/name:s:test"


def test_single_file_split_names(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n')
    with pytest.raises(DataError, match="single split, 'train'"):
        resolve_source(0, DataSourceConfig(path=str(path), split="test"))
    assert len(resolve_source(0, DataSourceConfig(path=str(path), split="train[:50%]"))) == 1
