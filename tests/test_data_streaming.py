"""Streaming sources: same rows as the cached path, exact resume, processes, eval padding."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxtune.data import make_batch_iterator
from jaxtune.data.errors import BadRowError, DataError
from jaxtune.data.tokenizer import load_tokenizer
from tests.fixtures_data import chat_rows, make_data_config, write_jsonl
from tests.test_data_loader import assert_batches_equal, take


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    return (write_jsonl(root / "a.jsonl", chat_rows(20, seed=1)),
            write_jsonl(root / "b.jsonl", chat_rows(12, seed=2)))


def iterator(cfg, p=0, n=1, split="train"):
    return make_batch_iterator(cfg, load_tokenizer(cfg), split=split, process_index=p,
                               process_count=n)


def test_unshuffled_stream_equals_cached_rows(tmp_path, data_tokenizers, files):
    kw = dict(shuffle=False, seq_len=96)
    cached = iterator(make_data_config(tmp_path, data_tokenizers["chatml"], [files[0]], **kw))
    streamed = iterator(make_data_config(tmp_path, data_tokenizers["chatml"], [files[0]],
                                         streaming=True, **kw))
    rows = cached.stats["rows_per_epoch"]
    n = rows // 4 + 3  # into the second epoch
    assert_batches_equal(take(streamed, n), take(cached, n))
    assert streamed.epoch == 1
    assert streamed.stats["examples"] > 0 and streamed.stats["packing_efficiency"] > 0.5


def test_streaming_resume_is_exact_with_shuffle_and_weights(tmp_path, data_tokenizers, files):
    cfg = make_data_config(tmp_path, data_tokenizers["chatml"],
                           [{"path": files[0], "weight": 1.0}, {"path": files[1], "weight": 3.0}],
                           streaming=True, shuffle_buffer=8, seed=5)
    full_it = iterator(cfg)
    full = take(full_it, 24)
    assert full_it.epoch >= 2
    part = iterator(cfg)
    take(part, 9)
    state = json.loads(json.dumps(part.get_state()))
    resumed = iterator(cfg)
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 15), full[9:])


def test_streaming_processes_and_eval(tmp_path, data_tokenizers, files):
    cfg = make_data_config(tmp_path, data_tokenizers["chatml"], [files[1]],
                           eval_sources=[files[1]], streaming=True, batch=4, packing=False)
    one = iterator(cfg)
    two = [iterator(cfg, p, 2) for p in range(2)]
    for _ in range(5):
        whole, parts = next(one), [next(t) for t in two]
        np.testing.assert_array_equal(
            np.concatenate([p["input_ids"] for p in parts]), whole["input_ids"])
        seen = [{d for r in t.last_examples for d in r} for t in two]
        assert not seen[0] & seen[1]
    batches = list(iterator(cfg, split="eval"))
    assert len(batches) == 3  # 12 examples, one per row, 4 rows per batch
    assert (np.concatenate([b["loss_mask"] for b in batches]).sum(1) > 0).all()
    cfg.data.eval_sources[0].path = write_jsonl(tmp_path / "ten.jsonl", chat_rows(10))
    batches = list(iterator(cfg, split="eval"))
    mask = np.concatenate([b["loss_mask"] for b in batches]).sum(1)
    assert len(batches) == 3 and (mask[:10] > 0).all() and (mask[10:] == 0).all()


def test_streaming_bad_rows_and_slices(tmp_path, data_tokenizers):
    path = write_jsonl(tmp_path / "bad.jsonl", chat_rows(3) + [{"messages": []}])
    cfg = make_data_config(tmp_path, data_tokenizers["chatml"], [path], streaming=True,
                           shuffle=False, batch=1)
    with pytest.raises(BadRowError, match=r"bad.jsonl, row 3: field 'messages'"):
        next(iterator(cfg))
    cfg.data.on_bad_row = "skip"
    it = iterator(cfg)
    next(it)
    assert it.stats["skipped_bad_rows"] == 1
    cfg.data.sources[0].split = "train[:50%]"
    with pytest.raises(DataError, match="need the cached path"):
        iterator(cfg)
