"""A packed row's loss equals the sum of its documents' losses computed alone.

Packed rows go through jaxtune's model with the pipeline's ``positions`` and ``segment_ids``;
each document alone goes through transformers (PyTorch), an independent implementation that
knows nothing of packing. Equal losses mean no document attends to, or takes a target from,
another one in the same row.
"""

from __future__ import annotations

import numpy as np
import pytest

from jaxtune.data import make_batch_iterator
from jaxtune.data.tokenizer import load_tokenizer
from tests.fixtures_data import chat_rows, make_data_config, write_jsonl


def _nll(logits_TV: np.ndarray, targets_T: np.ndarray) -> np.ndarray:
    logits_TV = logits_TV.astype(np.float64)
    m = logits_TV.max(-1, keepdims=True)
    lse = (m[..., 0] + np.log(np.exp(logits_TV - m).sum(-1)))
    return lse - np.take_along_axis(logits_TV, targets_T[..., None], -1)[..., 0]


@pytest.mark.slow
def test_packed_row_loss_equals_documents_alone(tmp_path, data_tokenizers, tiny_hf_model):
    import jax.numpy as jnp
    import torch
    import transformers

    from jaxtune.loss import cross_entropy_loss
    from jaxtune.weights import from_pretrained

    model_dir = tiny_hf_model("llama")
    path = write_jsonl(tmp_path / "chat.jsonl", chat_rows(24, seed=11, turns=1, system=False))
    cfg = make_data_config(tmp_path, data_tokenizers["chatml"], [path], seq_len=160, batch=4)
    it = make_batch_iterator(cfg, load_tokenizer(cfg), process_index=0, process_count=1)
    batch = next(it)
    assert max(len(r) for r in it.last_examples) >= 3  # rows really hold several documents

    model = from_pretrained(str(model_dir), dtype="float32")
    logits = np.asarray(model(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["positions"]),
                              jnp.asarray(batch["segment_ids"])))
    packed = _nll(logits, batch["targets"]) * batch["loss_mask"]

    ref = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ref.eval()
    total = 0.0
    for r, docs in enumerate(it.last_examples):
        seg = batch["segment_ids"][r]
        row_alone = 0.0
        for k in range(1, len(docs) + 1):
            at = seg == k
            inputs, targets = batch["input_ids"][r, at], batch["targets"][r, at]
            with torch.no_grad():
                alone = ref(torch.as_tensor(inputs[None], dtype=torch.long)).logits[0].numpy()
            doc_loss = float((_nll(alone, targets) * batch["loss_mask"][r, at]).sum())
            assert float(packed[r, at].sum()) == pytest.approx(doc_loss, rel=1e-4, abs=1e-4)
            row_alone += doc_loss
        assert float(packed[r].sum()) == pytest.approx(row_alone, rel=1e-4)
        total += row_alone
    # the training engineer's loss over the packed batch agrees too
    _, aux = cross_entropy_loss(model, {k: jnp.asarray(v) for k, v in batch.items()})
    assert float(aux["nll_sum"]) == pytest.approx(total, rel=1e-4)
    assert float(aux["num_tokens"]) == batch["loss_mask"].sum()
