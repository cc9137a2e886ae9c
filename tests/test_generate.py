"""Generation with the KV cache against transformers: greedy tokens for a batch of prompts of
different lengths, cached logits against full-sequence logits, sampling filters, stop ids,
the real SmolLM2's chat answers, and the CLI's errors."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import jaxtune
from jaxtune.cli import main
from jaxtune.config import config_from_dict, save_config
from jaxtune.generation.api import default_stop_ids
from jaxtune.generation.loop import DONE, Generator
from jaxtune.generation.sampling import Sampling, filter_logits, token_logps
from tests.fixtures_models import TINY_VARIANTS

NEW = 32
LENGTHS = (5, 11, 2)


def prompts_for(seed: int = 0, vocab: int = 389) -> list[list[int]]:
    rs = np.random.RandomState(seed)
    return [rs.randint(3, vocab, n).tolist() for n in LENGTHS]


def hf_greedy(path, prompts, new=NEW, **load) -> list[list[int]]:
    """transformers' greedy answers, one prompt at a time (no padding), cut after EOS."""
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(path, **load).eval()
    eos = hf.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    out = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only contend (25x slower on 2 cores)
    try:
        for p in prompts:
            with torch.no_grad():
                ids = hf.generate(torch.tensor([p]), max_new_tokens=new, do_sample=False,
                                  pad_token_id=0)[0, len(p):].tolist()
            ends = [i for i, t in enumerate(ids) if t in eos]
            out.append(ids[:ends[0] + 1] if ends else ids)
    finally:
        torch.set_num_threads(threads)
    return out, eos


def test_greedy_matches_transformers(tiny_hf_model):
    """Every variant (sliding windows, qk-norm, biases, RoPE scalings, tied embeddings), the
    three prompts in one batch, scanned and unrolled layers: token for token."""
    prompts = prompts_for()
    for name in TINY_VARIANTS:
        path = tiny_hf_model(name)
        ref, eos = hf_greedy(path, prompts)
        assert any(len(r) > 8 for r in ref)
        scans = (False, True) if name in ("llama", "mistral", "qwen2_sliding") else (True,)
        for scan in scans:
            gen = Generator(jaxtune.from_pretrained(path, scan_layers=scan))
            out = gen.generate(prompts, max_new_tokens=NEW, stop_ids=eos)
            assert out.tokens == ref, f"{name} scan_layers={scan}"


@pytest.mark.parametrize("fixture,name,scan", [
    ("tiny_gemma_model", "gemma2", True),  # attention and final soft-caps, windows of 5
    ("tiny_gemma_model", "gemma3_scaled", False),  # local / global RoPE, q/k norms, scaling
    ("moe_hf_model", "qwen2_moe_mixed", False),  # dense + sparse layers, shared experts
    ("moe_hf_model", "mixtral", True),
])
def test_other_families_generate_like_transformers(request, fixture, name, scan):
    """Gemma and MoE generate through the same cache contract, token for token."""
    path = request.getfixturevalue(fixture)(name)
    model = jaxtune.from_pretrained(path, scan_layers=scan)
    prompts = prompts_for(2, vocab=model.config.vocab_size)
    # MoE: transformers' eager expert loop (its grouped_mm needs 16-byte aligned strides,
    # which odd tiny sizes don't have).
    load = {"experts_implementation": "eager"} if fixture == "moe_hf_model" else {}
    ref, eos = hf_greedy(path, prompts, **load)
    assert any(len(r) > 8 for r in ref)
    out = Generator(model).generate(prompts, max_new_tokens=NEW, stop_ids=eos)
    assert out.tokens == ref, f"{name} scan_layers={scan}"


@pytest.mark.parametrize("name,scan", [("qwen2_sliding", True), ("mistral", False)])
def test_cached_decode_equals_full_sequence(tiny_hf_model, name, scan):
    """Prefill + decode logits at every step equal one no-cache pass over the whole text."""
    model = jaxtune.from_pretrained(tiny_hf_model(name), scan_layers=scan)
    assert_cached_logits_equal_full(model, prompts_for(1), NEW, atol=1e-5)


def assert_cached_logits_equal_full(model, prompts, new_tokens: int, *, atol: float) -> None:
    """Greedy prefill + decode of ``new_tokens`` (the last one's logits only): the logits of
    every step equal one no-cache pass over the whole text, within ``atol``."""
    gen = Generator(model)
    ids, positions, segs, nxt = gen.layout_prompts(prompts)
    cache = gen.new_cache(ids.shape[0], ids.shape[1] + new_tokens)
    logits, cache = gen.prefill(ids, positions, segs, cache)
    steps, tokens = [np.asarray(logits)], []
    for step in range(new_tokens - 1):
        token = np.argmax(steps[-1], axis=-1)
        tokens.append(token)
        logits, cache = gen.decode(token, nxt + step, cache)
        steps.append(np.asarray(logits))
    full_fn = jax.jit(lambda m, x: m(x))
    for row, prompt in enumerate(prompts):
        text = np.array([prompt + [int(t[row]) for t in tokens]])
        full = np.asarray(full_fn(model, text))[0]
        for step, logits in enumerate(steps):
            np.testing.assert_allclose(logits[row], full[len(prompt) - 1 + step], atol=atol,
                                       rtol=0, err_msg=f"row {row} step {step}")


def test_sampling_is_seeded_and_filters_like_transformers(tiny_hf_model):
    import torch
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = np.random.RandomState(0).randn(4, 389).astype(np.float32) * 3
    for s in (Sampling(1.0, top_k=7), Sampling(1.0, top_p=0.8), Sampling(0.5, top_p=0.3),
              Sampling(0.7, min_p=0.05), Sampling(1.3, top_k=50, top_p=0.9, min_p=0.1)):
        ours = np.isfinite(np.asarray(filter_logits(jax.numpy.asarray(logits), s)))
        ref = torch.tensor(logits) / s.temperature
        if s.top_k:
            ref = TopKLogitsWarper(s.top_k)(None, ref)
        if s.top_p < 1:
            ref = TopPLogitsWarper(s.top_p)(None, ref)
        if s.min_p:
            ref = MinPLogitsWarper(s.min_p)(None, ref)
        np.testing.assert_array_equal(ours, np.isfinite(ref.numpy()), err_msg=str(s))
        # the log-prob RL compares with the trainer's: the whole vocabulary, before any filter
        token = jax.numpy.asarray([3, 50, 7, 388])
        want = jax.nn.log_softmax(jax.numpy.asarray(logits) / s.temperature)[
            np.arange(4), np.asarray(token)]
        np.testing.assert_allclose(token_logps(jax.numpy.asarray(logits), token, s), want,
                                   rtol=1e-6, atol=1e-6)

    gen = Generator(jaxtune.from_pretrained(tiny_hf_model("llama"), scan_layers=True))
    prompts = prompts_for()
    s = Sampling(temperature=1.0, top_p=0.9)
    a = gen.generate(prompts, max_new_tokens=16, sampling=s, seed=3).tokens
    assert a == gen.generate(prompts, max_new_tokens=16, sampling=s, seed=3).tokens
    assert a != gen.generate(prompts, max_new_tokens=16, sampling=s, seed=4).tokens
    greedy = gen.generate(prompts, max_new_tokens=16).tokens
    assert gen.generate(prompts, max_new_tokens=16, sampling=Sampling(1.0, top_k=1),
                        seed=5).tokens == greedy
    # A stop id ends its row there (the id included); the other rows go on.
    stop = greedy[1][4]
    stopped = gen.generate(prompts, max_new_tokens=16, stop_ids=[stop]).tokens
    for row, ref in zip(stopped, greedy, strict=True):
        assert row == (ref[:ref.index(stop) + 1] if stop in ref else ref)
    # Streaming (the host loop) gives the greedy tokens too, step by step.
    seen = []
    streamed = gen.generate(prompts, max_new_tokens=16, stream=lambda i, t: seen.append(t))
    assert streamed.tokens == greedy and len(seen) == 16
    assert all(t == DONE or t >= 0 for step in seen for t in step)


def test_token_id_prompts_need_no_tokenizer(tiny_hf_model):
    """Token ids in, token ids out, as transformers' ``generate(input_ids=...)``: one list of
    ints, a list of them, or a 2-D array, with ``tokenizer=None``; greedy tokens equal
    transformers'. Text without a tokenizer names the tokenizer, not a chat."""
    import torch
    import transformers

    from jaxtune.generation.errors import GenerateError

    path = tiny_hf_model("llama")
    model = jaxtune.from_pretrained(path, scan_layers=True)
    gen = Generator(model)
    prompts = prompts_for(5)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    eos = hf.generation_config.eos_token_id
    gc = {"eos_token_id": eos}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            ref = [hf.generate(input_ids=torch.tensor([p]), max_new_tokens=NEW, do_sample=False,
                               pad_token_id=0)[0, len(p):].tolist() for p in prompts]
            same_len = np.array([prompts[0], prompts_for(6)[0]])
            ref_2d = hf.generate(input_ids=torch.tensor(same_len), max_new_tokens=NEW,
                                 do_sample=False, pad_token_id=0)[:, same_len.shape[1]:]
    finally:
        torch.set_num_threads(threads)
    ref = [r[:r.index(eos) + 1] if eos in r else r for r in ref]
    assert any(len(r) > 8 for r in ref)

    answers = jaxtune.generate(model, None, prompts, max_new_tokens=NEW, generation_config=gc,
                               generator=gen)
    assert answers == ref
    one = jaxtune.generate(model, None, prompts[0], max_new_tokens=NEW, generation_config=gc,
                           generator=gen)
    assert one == ref[:1]
    # A 2-D array (numpy; a torch tensor too) is one prompt per row, as transformers' batch.
    rows = jaxtune.generate(model, None, torch.tensor(same_len), max_new_tokens=NEW,
                            generation_config=gc, generator=gen)
    assert rows == [r[:r.index(eos) + 1] if eos in r else r for r in ref_2d.tolist()]
    details = jaxtune.generate(model, None, [np.int64(t) for t in prompts[1]],
                               max_new_tokens=NEW, generation_config=gc, generator=gen,
                               details=True)
    assert details.texts is None and details.tokens == ref[1:2]
    assert details.prompt_ids == [prompts[1]]

    with pytest.raises(GenerateError, match="needs a tokenizer.*token ids") as e:
        jaxtune.generate(model, None, "hello", generator=gen)
    assert "chat" not in str(e.value)
    with pytest.raises(GenerateError, match="outside the vocabulary"):
        jaxtune.generate(model, None, [1, 2, 10_000], generator=gen)
    with pytest.raises(GenerateError, match="one form"):
        jaxtune.generate(model, None, [prompts[0], "hello"], generator=gen)


@pytest.mark.slow
def test_smollm2_chat_answers_match_transformers(smollm2_dir):
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    gc = json.loads((smollm2_dir / "generation_config.json").read_text())
    questions = ["What is the capital of France?", "Write a haiku about the sea.",
                 "Explain gravity to a child.", "List three fruits.", "How do I boil an egg?"]
    model = jaxtune.from_pretrained(smollm2_dir, scan_layers=True)
    answers = jaxtune.generate(model, tok, questions, max_new_tokens=64, generation_config=gc,
                               details=True)
    assert "Paris" in answers.texts[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    stops = default_stop_ids(tok, gc)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core machine two threads mostly wait
    try:
        for q, ids, tokens in zip(questions, answers.prompt_ids, answers.tokens, strict=True):
            chat = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                           add_generation_prompt=True)
            assert ids == tok(chat, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                ref = hf.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False,
                                  eos_token_id=stops)[0, len(ids):].tolist()
            assert tokens == ref, q
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------- the CLI


def _fails(capsys, *argv: str) -> str:
    capsys.readouterr()
    assert main(["generate", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and "Traceback" not in captured.err
    return " ".join(captured.err.split())


def test_cli_errors_are_one_line(tmp_path, capsys, tiny_hf_model):
    msg = _fails(capsys, str(tmp_path / "nowhere"), "--prompt", "hi")
    assert "does not exist" in msg
    run = tmp_path / "run"
    save_config(config_from_dict({"run": {"output_dir": str(run)}}), run / "config.yaml")
    assert "holds no complete checkpoint" in _fails(capsys, str(run), "--prompt", "hi")
    empty = tmp_path / "prompts.jsonl"
    empty.write_text("\n")
    msg = _fails(capsys, str(tiny_hf_model("llama")), "--prompts", str(empty))
    assert "holds no prompts" in msg
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"x": 1}\n')
    assert "line 2" in _fails(capsys, str(tiny_hf_model("llama")), "--prompts", str(bad))
