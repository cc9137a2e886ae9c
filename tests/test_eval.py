"""``jaxtune eval`` against lm_eval's own ``hf`` backend (transformers) on a tiny random model:
the same per-request log-likelihoods, greedy flags and generations, so the same scores, on a
multiple-choice, a rolling-log-likelihood and two generation tasks (one with multi-token stop
strings, from a user's task folder); packing changes nothing; the command's output and its
errors. The real SmolLM2 and two processes are in test_eval_smollm2.py / test_eval_multihost.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from jaxtune.cli import main as cli_main
from tests.eval_helpers import compare, evaluate, responses, write_stop_task

TASKS = ["nimbrel_support_mc", "nimbrel_support_ppl", "nimbrel_support_qa", "tiny_stops"]


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory, tiny_hf_model, data_tokenizers) -> Path:
    """The tiny llama with the ChatML tokenizer in its folder (what lm_eval's hf loads)."""
    out = tmp_path_factory.mktemp("eval_tiny") / "model"
    shutil.copytree(tiny_hf_model("llama"), out)
    for f in Path(data_tokenizers["chatml"]).iterdir():
        shutil.copy(f, out)
    return out


@pytest.fixture(scope="module")
def stop_tasks(tmp_path_factory) -> Path:
    return write_stop_task(tmp_path_factory.mktemp("user_tasks"))


@pytest.fixture(scope="module")
def both(tiny_lm, stop_tasks):
    """The same tasks through jaxtune's backend and lm_eval's hf backend."""
    # Answers of at most 32 tokens (the stop strings still cut some earlier): quicker tests.
    options = dict(limit=6, include=[stop_tasks], gen_kwargs="max_gen_toks=32")
    return evaluate("jaxtune", tiny_lm, TASKS, **options), evaluate("hf", tiny_lm, TASKS,
                                                                     **options)


def test_same_requests_same_numbers_as_the_hf_backend(both, tiny_lm):
    from transformers import AutoTokenizer

    ours, ref = both
    seen = compare(ours, ref)
    assert seen["loglikelihood"] == 24 and seen["rolling"] == 6 and seen["generation"] == 12
    assert set(ours["results"]) == set(TASKS)
    # Some documents are longer than the tiny model's 256 positions: several windows.
    docs = [s["arguments"][0][0] for s in ours["samples"]["nimbrel_support_ppl"]]
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)
    assert sum(len(tokenizer(d)["input_ids"]) > 256 for d in docs) >= 2


def test_stop_strings_cut_answers_as_the_hf_backend(both, tiny_lm):
    """At least one answer ended at a multi-token stop string (the rest of it was generated
    in the same on-device chunk and cut on the host), equal to hf's."""
    from lm_eval.api.instance import Instance

    from jaxtune.evaluation.lm import JaxtuneLM

    ours, _ = both
    cut = responses(ours)["tiny_stops"]
    lm = JaxtuneLM(pretrained=str(tiny_lm), batch_size=4)
    prompts = [s["arguments"][0][0] for s in
               sorted(ours["samples"]["tiny_stops"], key=lambda s: s["doc_id"])]
    free = lm.generate_until([Instance("generate_until", {}, (p, {"until": [], "max_gen_toks": 32,
                                                                  "do_sample": False}), i)
                              for i, p in enumerate(prompts)], disable_tqdm=True)
    stops = [" at at", "ystem", "\n"]
    stopped = [i for i, (c, f) in enumerate(zip(cut, free, strict=True))
               if any(s in f for s in stops)]
    assert stopped, free
    for i in stopped:
        first = min(f.index(s) for s in stops if s in (f := free[i]))
        assert cut[i][0] == free[i][:first]


def test_is_greedy_agrees_with_the_hf_backend(tiny_lm):
    """A continuation that is the model's own greedy answer scores is_greedy=True in both
    backends, a changed one False (token-level requests, so no re-tokenisation)."""
    from lm_eval.models.huggingface import HFLM

    from jaxtune.evaluation.generation import GenerationRequest
    from jaxtune.evaluation.lm import JaxtuneLM
    from jaxtune.generation.sampling import Sampling

    lm = JaxtuneLM(pretrained=str(tiny_lm), batch_size=2)
    hf = HFLM(pretrained=str(tiny_lm), device="cpu", dtype="float32", batch_size=2)
    rs = np.random.RandomState(3)
    contexts = [rs.randint(3, 389, n).tolist() for n in (5, 17, 9, 30)]
    greedy = lm.engine.generate(GenerationRequest(tuple(map(tuple, contexts)), 6, Sampling(), 0,
                                                  (), ()))
    requests = [(None, c, g) for c, g in zip(contexts, greedy, strict=True)]
    requests += [(None, c, g[:-1] + [(g[-1] + 1) % 389]) for c, g in zip(contexts, greedy,
                                                                            strict=True)]
    ours = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    ref = hf._loglikelihood_tokens(requests, disable_tqdm=True)
    assert [g for _, g in ours] == [g for _, g in ref] == [True] * 4 + [False] * 4
    np.testing.assert_allclose([v for v, _ in ours], [v for v, _ in ref], rtol=1e-6, atol=1e-4)


def test_packed_and_shared_contexts_equal_one_request_per_row(tiny_lm):
    """Many requests per row (segment ids), and requests that share a context (the context
    run once into a KV cache, each continuation against its own copy), give each request's
    log-prob and greedy flags as one request per row does; so does a vocabulary projected in
    small slabs."""
    from jaxtune.evaluation.engine import Engine
    from jaxtune.evaluation.packing import Request, pack, pack_shared, split_shared
    from jaxtune.generation.source import load

    loaded = load(str(tiny_lm))
    rs = np.random.RandomState(0)
    requests = [Request.from_tokens(rs.randint(3, 389, rs.randint(1, 60)).tolist(),
                                    rs.randint(3, 389, rs.randint(1, 12)).tolist(), 256)
                for _ in range(23)]
    for _ in range(5):  # multiple choice: 2-5 continuations (1 to 9 tokens) of one context
        context = rs.randint(3, 389, rs.randint(20, 70)).tolist()
        requests += [Request.from_tokens(context, rs.randint(3, 389, rs.randint(1, 10)).tolist(),
                                         256) for _ in range(rs.randint(2, 6))]

    def scores(engine, batches, operation="score"):
        out = {}
        for batch in batches:
            out.update({i: (lp, g) for i, lp, g in
                        batch.read(*getattr(engine, operation)(batch.arrays()))})
        return out

    engine = Engine(loaded.model, loaded.tokenizer)
    batches = pack(requests, 3, min_len=64)
    single = pack(requests, 3, min_len=64, one_per_row=True)
    alone = scores(engine, single)
    packed = scores(engine, batches)
    slabs = scores(Engine(loaded.model, loaded.tokenizer, chunk_size=8), batches)
    groups, rest = split_shared(requests)
    assert len(groups) == 5 and len(rest) == 23
    # Long continuations of a short context are cheaper packed: no group then.
    long_tails = [Request.from_tokens(list(range(3, 13)), list(range(20, 40)), 256)] * 3
    assert split_shared(long_tails) == ({}, [0, 1, 2])
    shared = scores(engine, pack_shared(requests, groups, 2), "score_shared")
    assert len(batches) < len(single)  # it did pack: fewer forward passes
    assert any(len([p for p in b.placements if p.row == 0]) > 2 for b in batches)
    for got in (packed, slabs, shared):
        keys = sorted(got)
        assert keys == sorted(alone) if got is not shared else set(keys) < set(alone)
        np.testing.assert_allclose([got[i][0] for i in keys], [alone[i][0] for i in keys],
                                   rtol=1e-6, atol=2e-5)
        assert [got[i][1] for i in keys] == [alone[i][1] for i in keys]


# --------------------------------------------------------------------------- the command


def test_eval_command_prints_the_table_and_writes_json(tiny_lm, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert cli_main(["eval", str(tiny_lm), "--tasks", "nimbrel_support_mc", "--limit", "3",
                     "--batch-size", "2", "--output", str(out)]) == 0
    printed = capsys.readouterr()
    assert "|nimbrel_support_mc|" in printed.out and "acc" in printed.out
    saved = json.loads(out.read_text())
    assert saved["jaxtune"]["tasks"] == ["nimbrel_support_mc"]
    assert 0.0 <= saved["results"]["nimbrel_support_mc"]["acc,none"] <= 1.0
    assert "samples" not in saved


def _fails(capsys, *argv) -> str:
    capsys.readouterr()
    assert cli_main(["eval", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    message = err.strip().splitlines()[-1]
    assert message.startswith("error: ")
    return message


def test_bad_input_is_one_paragraph(tiny_lm, tmp_path, capsys, monkeypatch):
    model = str(tiny_lm)
    msg = _fails(capsys, model, "--tasks", "nimbrel_support_mcq")
    assert "Unknown lm_eval task 'nimbrel_support_mcq'" in msg and "nimbrel_support_mc" in msg
    msg = _fails(capsys, model, "--tasks", "hellaswagg")
    assert "Closest names: hellaswag" in msg
    msg = _fails(capsys, model, "--tasks", "nimbrel_support_mc", "--limit", "0")
    assert "--limit 0 evaluates nothing" in msg
    # A standard task whose dataset is on the hub: offline here, and said so.
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    msg = _fails(capsys, model, "--tasks", "arc_easy")
    assert "reads its dataset from the Hugging Face hub" in msg and "Nothing was downloaded" \
        in msg and "--include-path" in msg
    run = tmp_path / "run"
    from jaxtune.config import config_from_dict, save_config

    save_config(config_from_dict({"model": {"path": model}, "run": {"output_dir": str(run)}}),
                run / "config.yaml")
    msg = _fails(capsys, str(run), "--tasks", "nimbrel_support_mc")
    assert "holds no complete checkpoint" in msg and "Train first" in msg
    msg = _fails(capsys, model, "--tasks", "nimbrel_support_mc", "--step", "3")
    assert "--step 3 needs a run directory" in msg
    msg = _fails(capsys, model, "--tasks", "x", "--include-path", str(tmp_path / "nope"))
    assert "is not a folder" in msg


def test_sampled_generation_is_seeded_and_unsupported_settings_are_named(tiny_lm, tmp_path,
                                                                         capsys):
    """A task (or --gen-kwargs) asking for sampling samples, the same with the same seed and
    differently with another; beam search is refused by name, before any answer."""
    def answers(seed: int, extra: str = "") -> list[str]:
        out = tmp_path / f"s{seed}{extra}.json"
        assert cli_main(["eval", str(tiny_lm), "--tasks", "nimbrel_support_qa", "--limit", "3",
                         "--gen-kwargs", f"do_sample=true,temperature=1.0,max_gen_toks=12{extra}",
                         "--seed", str(seed), "--log-samples", "--output", str(out)]) == 0
        samples = json.loads(out.read_text())["samples"]["nimbrel_support_qa"]
        return [s["resps"][0][0] for s in sorted(samples, key=lambda s: s["doc_id"])]

    first, again, other = answers(1), answers(1), answers(2)
    assert first == again and first != other
    greedy = answers(1, ",do_sample=false")
    assert greedy != first
    capsys.readouterr()
    assert cli_main(["eval", str(tiny_lm), "--tasks", "nimbrel_support_qa", "--limit", "1",
                     "--gen-kwargs", "num_beams=2"]) == 2
    err = capsys.readouterr().err
    assert "'num_beams': 2" in err and "not supported" in err and "Traceback" not in err
