"""Session fixtures for preference tuning: a policy and a different reference tiny model, a
chatml tokenizer of the same vocabulary, and a prepared batch of pairs."""

from __future__ import annotations

import random

import numpy as np
import pytest

from tests.fixtures_data import random_text


def preference_rows(n: int, seed: int = 0) -> list[dict]:
    """Pairs of every accepted shape: text prompt, chat prompt, shared turns, HH full text."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        q, good, bad = (random_text(rng, rng.randint(3, 8)), random_text(rng, rng.randint(2, 9)),
                        random_text(rng, rng.randint(1, 7)))
        kind = i % 4
        if kind == 0:
            rows.append({"prompt": q, "chosen": " " + good, "rejected": " " + bad})
        elif kind == 1:
            rows.append({"prompt": [{"role": "user", "content": q}],
                         "chosen": [{"role": "assistant", "content": good}],
                         "rejected": [{"role": "assistant", "content": bad}]})
        elif kind == 2:
            turn = [{"role": "user", "content": q}]
            rows.append({"chosen": turn + [{"role": "assistant", "content": good}],
                         "rejected": turn + [{"role": "assistant", "content": bad}]})
        else:
            rows.append({"chosen": f"\n\nHuman: {q}\n\nAssistant: {good}",
                         "rejected": f"\n\nHuman: {q}\n\nAssistant: {bad}"})
    return rows


@pytest.fixture(scope="session")
def preference_setup(tmp_path_factory, data_tokenizers):
    """Dict: ``policy`` / ``reference`` model folders (tiny llama, seeds 0 and 1), ``cfg``
    (data.format preference over 8 pairs), ``data`` (prepared pairs), ``batch`` (numpy, all
    8 pairs, one per row), and the same 8 pairs packed: ``packed_rows`` (8 rows of pair
    indices as the packer fills rows of 2 * seq_len, then empty rows), ``packed`` (their
    batch) and ``packed_slot`` (each pair's slot in the packed batch's ``[N, 2]`` values)."""
    from jaxtune.data.preference import (
        PreferenceBatchIterator,
        pair_batch,
        pair_slots,
        prepare_pairs,
    )
    from jaxtune.data.tokenizer import load_tokenizer
    from tests.fixtures_data import make_data_config, write_jsonl
    from tests.fixtures_models import make_tiny_hf_model

    root = tmp_path_factory.mktemp("preference")
    policy = make_tiny_hf_model("llama", root / "policy", seed=0)
    reference = make_tiny_hf_model("llama", root / "reference", seed=1)
    path = write_jsonl(root / "pairs.jsonl", preference_rows(8))
    cfg = make_data_config(root, data_tokenizers["chatml"], [path], eval_sources=[path],
                           batch=8, format="preference", packing=False, shuffle=False,
                           seq_len=40)
    cfg.model.path = str(policy)
    tokenizer = load_tokenizer(cfg)
    data = prepare_pairs(cfg, tokenizer)
    assert len(data.docs) == 8
    batch = pair_batch(data, [[d] for d in range(8)], cfg.data.seq_len, data.pad_id)
    # Packed into rows of 2 * 100 positions (the sides stay cut at 40), so rows hold 2-3 pairs.
    packer = PreferenceBatchIterator(data, seq_len=100, global_batch_size=8, shuffle=False,
                                     train=False, packing=True, pad_id=data.pad_id)
    packed_rows = packer.plan(0)[:]
    assert max(len(r) for r in packed_rows) >= 3 and len(packed_rows) <= 4, packed_rows
    packed_rows += [[] for _ in range(8 - len(packed_rows))]
    packed = pair_batch(data, packed_rows, 100, data.pad_id, packed=True)
    slot = np.zeros(8, np.int64)
    for r, pairs in enumerate(packed_rows):
        for k, d in enumerate(pairs):
            slot[d] = r * pair_slots(100) + k
    return {"policy": policy, "reference": reference, "cfg": cfg, "data": data,
            "batch": batch, "packed_rows": packed_rows, "packed": packed, "packed_slot": slot,
            "tokenizer": tokenizer, "pairs_path": path, "root": root,
            "rows": preference_rows(8), "np": np}
