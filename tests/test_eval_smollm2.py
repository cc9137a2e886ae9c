"""``jaxtune eval`` on the real SmolLM2-135M-Instruct against lm_eval's own ``hf`` backend
(transformers, float32): per-token log-probabilities of packed requests within 1e-4 of
transformers', and through lm_eval the same per-request log-likelihoods, greedy flags and
generations on the offline multiple-choice, perplexity and question-answering tasks (rendered
with the model's chat template and a system prompt) and a task with stop strings, so equal
scores."""

from __future__ import annotations

import time

import numpy as np
import pytest

from tests.eval_helpers import compare, evaluate, write_stop_task

TASKS = ["nimbrel_support_mc", "nimbrel_support_ppl", "nimbrel_support_qa", "tiny_stops"]
SYSTEM = "You are the support assistant for Nimbrel Sync."
#: A 30-layer float32 model: transformers' and XLA's matmuls round differently, so logits
#: differ by up to ~1e-4 and per-token log-probs by ~4e-5, the same sign more often than not,
#: so a request's sum over ~100 tokens drifts by up to ~5e-4 (a few 1e-6 of the sum), and a
#: word perplexity (the exponential of a sum per word) by ~1e-5 of itself.
SUM_RTOL = 1e-5


@pytest.mark.slow
def test_packed_token_logprobs_within_1e4_of_transformers(smollm2_dir):
    import torch
    import transformers

    from jaxtune.evaluation.engine import Engine
    from jaxtune.evaluation.packing import Request, pack
    from jaxtune.generation.source import load

    loaded = load(str(smollm2_dir))
    rs = np.random.RandomState(0)
    docs = [rs.randint(100, 49000, n).tolist() for n in (40, 95, 23, 61, 130, 12, 77)]
    requests = [Request.from_tokens(d[:len(d) // 3], d[len(d) // 3:], 2048) for d in docs]
    batches = pack(requests, 2, min_len=128)
    assert any(len({p.row for p in b.placements}) < len(b.placements) for b in batches)
    engine = Engine(loaded.model, loaded.tokenizer)
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir,
                                                           dtype=torch.float32).eval()
    worst = 0.0
    for batch in batches:
        logp_BC, _ = engine.score(batch.arrays())
        for p in batch.placements:
            doc = docs[p.request]
            with torch.no_grad():
                ref = torch.log_softmax(hf(torch.tensor([doc[:-1]])).logits[0], -1).numpy()
            k = p.length
            want = ref[np.arange(len(doc) - 1 - k, len(doc) - 1), doc[-k:]]
            got = logp_BC[p.row, p.scored:p.scored + k]
            worst = max(worst, float(np.max(np.abs(got - want))))
    print("worst per-token log-prob difference:", worst)
    assert worst < 1e-4


@pytest.mark.slow
def test_smollm2_scores_like_the_hf_backend(smollm2_dir, tmp_path):
    include = [write_stop_task(tmp_path / "tasks")]
    options = dict(limit=3, include=include, apply_chat_template=True,
                   system_instruction=SYSTEM)
    start = time.perf_counter()
    ours = evaluate("jaxtune", smollm2_dir, TASKS, **options)
    mid = time.perf_counter()
    ref = evaluate("hf", smollm2_dir, TASKS, **options)
    print(f"jaxtune {mid - start:.1f} s (compiles included), hf {time.perf_counter() - mid:.1f} s")
    seen = compare(ours, ref, ll_rtol=SUM_RTOL, score_rtol=10 * SUM_RTOL)
    assert seen["loglikelihood"] == 12 and seen["rolling"] == 3 and seen["generation"] == 6
    # The chat template was applied: the model's own turn markers are in the prompts.
    prompt = ours["samples"]["nimbrel_support_qa"][0]["arguments"][0][0]
    assert prompt.startswith("<|im_start|>system\n" + SYSTEM) and prompt.endswith(
        "<|im_start|>assistant\n")
