"""Packing, batches, processes, resume, mixtures, truncation, eval and the tokenization cache.

References: each packed document is compared against its own encoding, a resumed iterator
against an uninterrupted one, two processes against one, and cached data against a fresh
tokenization.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from transformers import AutoTokenizer

from jaxtune.data import make_batch_iterator
from jaxtune.data import prepare as prepare_mod
from jaxtune.data.encode import Encoder
from jaxtune.data.errors import DataError
from jaxtune.data.formats import FormatSpec
from jaxtune.data.tokenizer import load_tokenizer
from tests.fixtures_data import CHATML, chat_rows, make_data_config, random_text, write_jsonl


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("chat") / "chat.jsonl", chat_rows(40, turns=3))


def iterator(cfg, **kw):
    return make_batch_iterator(cfg, load_tokenizer(cfg), process_index=kw.pop("p", 0),
                               process_count=kw.pop("n", 1), **kw)


def reference_docs(cfg, path):
    """Each row's tokens and trained flags, encoded directly (no cache, no packing)."""
    rows = [json.loads(line) for line in open(path)]
    enc = Encoder(load_tokenizer(cfg), FormatSpec.from_config(cfg.data))
    return enc.encode_batch(rows, lambda i, p: (_ for _ in ()).throw(p))


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# --------------------------------------------------------------------------- packing


@pytest.mark.parametrize("packing", [True, False])
def test_rows_hold_whole_documents_with_targets_inside_each(tmp_path, data_tokenizers,
                                                            chat_file, packing):
    cfg = make_data_config(tmp_path, data_tokenizers["chatml"], [chat_file], seq_len=96,
                           packing=packing)
    ref = reference_docs(cfg, chat_file)
    it = iterator(cfg)
    seen = 0
    for _ in range(6):
        batch = next(it)
        assert {k: (v.dtype.name, v.shape) for k, v in batch.items()} == {
            "input_ids": ("int32", (4, 96)), "targets": ("int32", (4, 96)),
            "loss_mask": ("float32", (4, 96)), "segment_ids": ("int32", (4, 96)),
            "positions": ("int32", (4, 96))}
        for r, docs in enumerate(it.last_examples):
            seg = batch["segment_ids"][r]
            pos = 0
            for k, (_, _, row) in enumerate(docs):
                tokens, trained = ref[row]
                tokens, trained = tokens[:97], trained[:97]  # truncation to seq_len + 1
                m = len(tokens) - 1
                sl = slice(pos, pos + m)
                np.testing.assert_array_equal(batch["input_ids"][r, sl], tokens[:-1])
                np.testing.assert_array_equal(batch["targets"][r, sl], tokens[1:])
                np.testing.assert_array_equal(batch["loss_mask"][r, sl], trained[1:])
                np.testing.assert_array_equal(seg[sl], k + 1)
                np.testing.assert_array_equal(batch["positions"][r, sl], np.arange(m))
                pos += m
                seen += 1
            assert (seg[pos:] == 0).all() and (batch["loss_mask"][r, pos:] == 0).all()
            if not packing:
                assert len(docs) == 1
    assert seen >= 24
    if packing:
        assert it.stats["packing_efficiency"] > 0.85


def test_packing_efficiency_and_totals(tmp_path, data_tokenizers, chat_file):
    cfg = make_data_config(tmp_path, data_tokenizers["chatml"], [chat_file], seq_len=256)
    it = iterator(cfg)
    ref = reference_docs(cfg, chat_file)
    s = it.stats
    assert s["examples"] == 40 and s["truncated"] == 0 and s["dropped"] == 0
    assert s["tokens"] == sum(len(t) - 1 for t, _ in ref)
    assert s["trained_tokens"] == sum(int(m[1:].sum()) for _, m in ref)
    assert s["packing_efficiency"] == pytest.approx(s["tokens"] / (s["rows_per_epoch"] * 256))
    unpacked = iterator(make_data_config(tmp_path, data_tokenizers["chatml"], [chat_file],
                                         seq_len=256, packing=False))
    assert unpacked.stats["rows_per_epoch"] == 40
    assert s["rows_per_epoch"] < 20


# --------------------------------------------------------------------------- resume, processes


def test_resume_equals_uninterrupted_over_two_epochs(tmp_path, data_tokenizers, chat_file):
    cfg = make_data_config(tmp_path, data_tokenizers["chatml"], [chat_file], seed=7)
    full_it = iterator(cfg)
    full = take(full_it, 40)
    assert full_it.epoch >= 2  # shuffled, and more than two epochs crossed
    first = iterator(cfg)
    take(first, 13)
    state = json.loads(json.dumps(first.get_state()))
    resumed = iterator(cfg)
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 27), full[13:])
    # a different seed reshuffles; a new epoch reshuffles too
    other = take(iterator(make_data_config(tmp_path, data_tokenizers["chatml"], [chat_file],
                                           seed=8)), 1)
    assert not np.array_equal(other[0]["input_ids"], full[0]["input_ids"])
    plans = [full_it.plan(e) for e in (0, 1)]
    assert plans[0] != plans[1]


def test_two_processes_split_every_global_batch(tmp_path, data_tokenizers, chat_file):
    cfg = make_data_config(tmp_path, data_tokenizers["chatml"], [chat_file], batch=6)
    one = iterator(cfg)
    procs = [iterator(cfg, p=p, n=2) for p in range(2)]
    seen: list[list] = [[], []]  # source rows each process saw during epoch 0
    for _ in range(12):  # crosses an epoch boundary
        whole = next(one)
        parts = [next(p) for p in procs]
        assert all(v.shape[0] == 3 for part in parts for v in part.values())
        for k in whole:
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[k])
        if one.epoch == 0:
            for i, p in enumerate(procs):
                seen[i] += [d for row in p.last_examples for d in row]
    assert len(seen[0]) > 10 and len(seen[1]) > 10
    assert len(set(seen[0] + seen[1])) == len(seen[0]) + len(seen[1])  # each row seen once
    with pytest.raises(DataError, match="divide evenly over 4 processes"):
        iterator(cfg, p=0, n=4)


def test_eval_is_one_padded_pass(tmp_path, data_tokenizers):
    path = write_jsonl(tmp_path / "eval.jsonl", chat_rows(10, seed=5))
    cfg = make_data_config(tmp_path, data_tokenizers["chatml"], [path], eval_sources=[path],
                           packing=False, batch=4)
    batches = list(iterator(cfg, split="eval"))
    assert len(batches) == 3
    rows_mask = np.concatenate([b["loss_mask"] for b in batches]).sum(axis=1)
    assert (rows_mask[:10] > 0).all() and (rows_mask[10:] == 0).all()
    assert_batches_equal(list(iterator(cfg, split="eval")), batches)  # deterministic
    halves = [list(iterator(cfg, split="eval", p=p, n=2)) for p in range(2)]
    assert [len(h) for h in halves] == [3, 3]
    for k in range(3):
        np.testing.assert_array_equal(
            np.concatenate([halves[0][k]["input_ids"], halves[1][k]["input_ids"]]),
            batches[k]["input_ids"])


# --------------------------------------------------------------------------- mixtures, slices


def test_source_weights_repeat_and_subsample(tmp_path, data_tokenizers):
    a = write_jsonl(tmp_path / "a.jsonl", chat_rows(10, seed=1))
    b = write_jsonl(tmp_path / "b.jsonl", chat_rows(10, seed=2))
    cfg = make_data_config(tmp_path, data_tokenizers["chatml"],
                           [{"path": a, "weight": 2.0}, {"path": b, "weight": 0.5}])
    it = iterator(cfg)
    picks = []
    for epoch in (0, 1):
        docs = [d for row in it.plan(epoch) for d in row]
        src = it.data.docs.source[docs]
        rows_a = np.bincount(it.data.docs.row[docs][src == 0], minlength=10)
        assert (rows_a == 2).all()  # weight 2: every example twice
        picks.append(set(it.data.docs.row[docs][src == 1].tolist()))
        assert len(picks[-1]) == 5  # weight 0.5: half of them
    assert picks[0] != picks[1]  # a different half each epoch


def test_split_slices_select_rows_of_the_whole_source(tmp_path, data_tokenizers):
    folder = tmp_path / "folder"
    write_jsonl(folder / "part0.jsonl", chat_rows(6, seed=1))
    write_jsonl(folder / "part1.jsonl", chat_rows(4, seed=2))
    write_jsonl(folder / "test.jsonl", chat_rows(3, seed=3))
    tok_dir = data_tokenizers["chatml"]

    def rows(split):
        cfg = make_data_config(tmp_path, tok_dir, [{"path": str(folder), "split": split}])
        data = prepare_mod.prepare(cfg, load_tokenizer(cfg))
        names = [data.shards[s].name.rsplit("/", 1)[1] for s in data.docs.shard]
        return sorted(zip(names, data.docs.row.tolist(), strict=True))

    assert len(rows("train")) == 10 and len(rows("test")) == 3
    head, tail = rows("train[:70%]"), rows("train[70%:]")
    assert len(head) == 7 and len(tail) == 3 and not set(head) & set(tail)
    assert ("part1.jsonl", 0) in head and ("part1.jsonl", 1) in tail
    with pytest.raises(DataError, match="no files for split 'validation'"):
        rows("validation")


# --------------------------------------------------------------------------- truncation


def test_truncation_policies(tmp_path, data_tokenizers):
    rows = [{"text": random_text(random.Random(i), n)} for i, n in enumerate([3, 40, 5, 60])]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    tok_dir = data_tokenizers["chatml"]

    def data(policy):
        cfg = make_data_config(tmp_path, tok_dir, [path], format="text", seq_len=24,
                               truncation=policy)
        return prepare_mod.prepare(cfg, load_tokenizer(cfg))

    t = data("truncate")
    assert t.stats["truncated"] == 2 and t.stats["documents"] == 4
    assert (t.docs.length <= 25).all()
    d = data("drop")
    assert d.stats["dropped"] == 2 and sorted(d.docs.row.tolist()) == [0, 2]
    with pytest.raises(DataError, match=r"t.jsonl, row 1: the example has \d+ tokens"):
        data("error")
    s = data("split")
    full = sum(len(x) - 1 for x, _ in reference_docs(
        make_data_config(tmp_path, tok_dir, [path], format="text"), path))
    assert s.stats["tokens"] == full and s.stats["examples"] == 4  # every target kept once
    assert s.stats["documents"] > 4 and (s.docs.length <= 25).all()


def test_split_truncation_only_for_text(tmp_path, data_tokenizers, chat_file):
    cfg = make_data_config(tmp_path, data_tokenizers["chatml"], [chat_file], truncation="split")
    with pytest.raises(DataError, match="only suits the text format"):
        iterator(cfg)


# --------------------------------------------------------------------------- cache


def test_cache_hits_and_invalidation(tmp_path, data_tokenizers, monkeypatch):
    path = write_jsonl(tmp_path / "c.jsonl", chat_rows(8, seed=4))
    calls = []
    real = prepare_mod.tokenize_shard
    monkeypatch.setattr(prepare_mod, "tokenize_shard",
                        lambda *a, **k: calls.append(1) or real(*a, **k))

    def run(style="chatml", **data):
        cfg = make_data_config(tmp_path, data_tokenizers[style], [path], **data)
        before = len(calls)
        out = prepare_mod.prepare(cfg, load_tokenizer(cfg))
        return out, len(calls) > before

    first, built = run()
    assert built
    again, built = run()
    assert not built  # cached
    for k in ("tokens", "trained", "offsets", "rows"):
        np.testing.assert_array_equal(getattr(again.tokenized[0], k),
                                      getattr(first.tokenized[0], k))
    assert not run(seq_len=128)[1]  # packing settings do not re-tokenize
    assert run("generation")[1]  # another tokenizer (same vocabulary, other template)
    assert run("llama3")[1]  # another tokenizer
    assert not run(chat_template=CHATML)[1]  # an override equal to its own template
    custom = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|im_end|>{% endfor %}"
    assert run(chat_template=custom)[1]  # another template
    assert run(train_on_inputs=True)[1]  # another format setting
    write_jsonl(path, chat_rows(8, seed=5))
    assert run()[1]  # other data
    assert not run()[1]


def test_cache_is_atomic_and_pickle_free(tmp_path, data_tokenizers):
    path = write_jsonl(tmp_path / "c.jsonl", chat_rows(3))
    cfg = make_data_config(tmp_path, data_tokenizers["chatml"], [path])
    prepare_mod.prepare(cfg, load_tokenizer(cfg))
    entries = [p for p in (tmp_path / "cache").iterdir() if p.name != "hf"]
    assert len(entries) == 1 and not entries[0].name.startswith(".tmp")
    assert sorted(p.name for p in entries[0].iterdir()) == [
        "meta.json", "offsets.npy", "rows.npy", "tokens.npy", "trained.npy"]
    for p in entries[0].glob("*.npy"):
        np.load(p, allow_pickle=False)


def test_relative_cache_dir_is_under_working_directory(tmp_path, data_tokenizers, monkeypatch):
    path = write_jsonl(tmp_path / "c.jsonl", chat_rows(2))
    monkeypatch.chdir(tmp_path)
    cfg = make_data_config(tmp_path, data_tokenizers["chatml"], [path], cache_dir="rel/cache")
    prepare_mod.prepare(cfg, AutoTokenizer.from_pretrained(data_tokenizers["chatml"]))
    assert (tmp_path / "rel" / "cache").is_dir()
