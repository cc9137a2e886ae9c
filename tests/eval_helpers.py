"""Shared by the evaluation tests: run lm_eval with a backend, and compare two runs request by
request (log-likelihoods, greedy flags, generations) and score by score."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

#: Per-request log-likelihoods: float32 sums of a few hundred tokens are ~1e3, whose float32
#: spacing is ~6e-5, so the bound is relative beyond 1e-4 (1e-6 of the value).
LL_ATOL, LL_RTOL = 1e-4, 1e-6

STOP_TASK = """\
task: tiny_stops
custom_dataset: !function utils.load
test_split: test
output_type: generate_until
doc_to_text: "{{prompt}}"
doc_to_target: "{{target}}"
generation_kwargs:
  until: [" at at", "ystem", "\\n"]
  max_gen_toks: 40
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

STOP_UTILS = """\
import datasets

PROMPTS = ["the quick brown fox", "hello world model", "user assistant system",
           "what is the answer", "seven eleven numbers", "a river and a mountain",
           "thank you for the data", "how are you"]


def load(**_kwargs):
    rows = [{"prompt": p, "target": p.split()[-1]} for p in PROMPTS]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
"""


def write_stop_task(folder: Path) -> Path:
    """A user's task folder (``--include-path``): generation with multi-token stop strings."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "stops.yaml").write_text(STOP_TASK)
    (folder / "utils.py").write_text(STOP_UTILS)
    return folder


def evaluate(backend: str, model_dir: Path, tasks: list[str], *, limit, include=(),
             batch_size: int = 4, model_args: dict | None = None, **kwargs) -> dict:
    """lm_eval's ``simple_evaluate`` with every request logged."""
    import lm_eval

    import jaxtune.evaluation  # noqa: F401 -- registers "jaxtune"
    from jaxtune.evaluation.tasks import task_manager

    args = {"pretrained": str(model_dir), **(model_args or {})}
    if backend == "hf":
        args.update(device="cpu", dtype="float32")
    return lm_eval.simple_evaluate(
        model=backend, model_args=args, tasks=tasks,
        task_manager=task_manager(tasks, [str(p) for p in include]), limit=limit,
        batch_size=batch_size, log_samples=True, bootstrap_iters=0, torch_random_seed=None,
        **kwargs)


def responses(results: dict) -> dict[str, list[list]]:
    """Each task's requests' raw responses, in document order."""
    out = {}
    for task, samples in results["samples"].items():
        samples = sorted(samples, key=lambda s: s["doc_id"])
        out[task] = [[r[0] for r in s["resps"]] for s in samples]
    return out


def from_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def compare(ours: dict, ref: dict, *, ll_rtol: float = LL_RTOL,
            score_rtol: float = 1e-5) -> dict[str, int]:
    """Assert both runs answered every request alike and scored alike (accuracies exactly;
    perplexities, which exponentiate the log-likelihood, to ``score_rtol``); counts of what
    was compared, by kind."""
    seen = {"loglikelihood": 0, "greedy": 0, "rolling": 0, "generation": 0}
    a, b = responses(ours), responses(ref)
    assert sorted(a) == sorted(b)
    worst = 0.0
    for task in a:
        assert len(a[task]) == len(b[task]), task
        for doc_a, doc_b in zip(a[task], b[task], strict=True):
            for x, y in zip(doc_a, doc_b, strict=True):
                if isinstance(y, str):
                    assert x == y, (task, x, y)
                    seen["generation"] += 1
                    continue
                if isinstance(y, (list, tuple)):  # (log-likelihood, is greedy)
                    assert bool(x[1]) == bool(y[1]), (task, x, y)
                    seen["greedy"] += bool(y[1])
                    x, y = x[0], y[0]
                    seen["loglikelihood"] += 1
                else:
                    seen["rolling"] += 1
                worst = max(worst, abs(x - y) / max(1.0, abs(y)))
                assert abs(x - y) <= LL_ATOL + ll_rtol * abs(y), (task, x, y)
    print("worst relative log-likelihood difference:", worst, seen)
    for task, metrics in ref["results"].items():
        for key, value in metrics.items():
            if key == "alias" or "stderr" in key:
                continue
            if "perplexity" in key or "bits_per_byte" in key:
                np.testing.assert_allclose(ours["results"][task][key], value, rtol=score_rtol,
                                           err_msg=f"{task} {key}")
            else:  # accuracies, fact counts: computed from equal answers, so equal
                assert ours["results"][task][key] == value, (task, key)
    return seen
