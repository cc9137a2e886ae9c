"""``--verify``: load the export with transformers (PyTorch, CPU) and compare its logits with
jaxtune's, and check that the exported tokenizer renders the chat template and stops where
training did.

The jaxtune side is the trained model computed in float32. For a full-weight export its
parameters are first rounded to the exported dtype, so the comparison checks the written
values exactly whatever the dtype (tolerance :data:`EXACT_TOLERANCE`). When the export
rounds (float32 training, bfloat16 export) the trained model itself must also agree, within
:data:`ROUNDED_TOLERANCE`. A merged LoRA export is checked the same way: exactly against the
merged weights, and against the adapter-applied model, unmerged.

The transformers logits are computed first and that model dropped; then each jaxtune model is
built, run and dropped in turn, so one model is in memory at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jaxtune.export.errors import ExportError
from jaxtune.export.hf_folder import probe_chat, stop_token_ids

#: max |logit difference| allowed, as a fraction of max(1, max |logit|), when both sides hold
#: the same parameter values in float32: only the order of float32 operations differs.
EXACT_TOLERANCE = 1e-4
#: the same between the trained model and an export that rounded its weights to bfloat16 /
#: float16: rounding every weight once moves tiny random models' logits by ~3% of their
#: largest, a layout bug (a transpose, a swapped layer) by ~100%.
ROUNDED_TOLERANCE = 1e-1

Logits = Callable[[np.ndarray], np.ndarray]


def sample_inputs(vocab_size: int, tokenizer=None, n: int = 2, length: int = 16,
                  seed: int = 0) -> list[np.ndarray]:
    """A few ``[1, T]`` id sequences: random tokens, and the probe chat when there is one."""
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(0, vocab_size, (n, length)).astype(np.int32)]
    probe = probe_chat(tokenizer) if tokenizer is not None else None
    if probe is not None:
        ids = tokenizer(probe[1], add_special_tokens=False)["input_ids"][:128]
        seqs.append(np.asarray([ids], np.int32))
    return seqs


def transformers_logits(out_dir: Path) -> Logits:
    """A function ids -> float32 logits of the export loaded with transformers in float32."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(out_dir), dtype=torch.float32, trust_remote_code=False).eval()

    def run(ids: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.as_tensor(ids, dtype=torch.long)).logits.float().numpy()

    return run


def peft_logits(base_dir: Path, adapter_dir: Path) -> Logits:
    """ids -> logits of the base (transformers, float32) with the PEFT adapter applied."""
    import torch
    import transformers
    from peft import PeftModel

    base = transformers.AutoModelForCausalLM.from_pretrained(
        str(base_dir), dtype=torch.float32, trust_remote_code=False)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()

    def run(ids: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.as_tensor(ids, dtype=torch.long)).logits.float().numpy()

    return run


def jaxtune_logits(model) -> Logits:
    def run(ids: np.ndarray) -> np.ndarray:
        return np.asarray(model(ids), np.float32)

    return run


def check_tokenizer(out_dir: Path, trained_tokenizer, generation: bool = True) -> list[str]:
    """Problems with the exported tokenizer / generation config (empty when all is well)."""
    import json

    from transformers import AutoTokenizer

    problems = []
    exported = AutoTokenizer.from_pretrained(str(out_dir), trust_remote_code=False)
    if exported.eos_token_id != trained_tokenizer.eos_token_id:
        problems.append(f"EOS id {exported.eos_token_id} != training's "
                        f"{trained_tokenizer.eos_token_id}")
    want, got = probe_chat(trained_tokenizer), probe_chat(exported)
    if (want and want[1]) != (got and got[1]):
        problems.append("the chat template renders differently from training's")
    if not generation:  # a PEFT adapter folder has no generation config
        return problems
    gen_file = out_dir / "generation_config.json"
    gen = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
    eos = gen.get("eos_token_id")
    eos = set(eos if isinstance(eos, list) else [eos])
    missing = [i for i in stop_token_ids(trained_tokenizer) if i not in eos]
    if missing:
        problems.append(f"generation_config.json eos_token_id {sorted(eos, key=str)} lacks "
                        f"the training stop ids {missing}")
    return problems


@dataclass(frozen=True)
class Check:
    """One comparison: ``make()`` builds a model and returns its logits function; it is
    called, used and dropped before the next check, so only one model is held at a time."""

    label: str
    make: Callable[[], Logits]
    tolerance: float = EXACT_TOLERANCE


def verify(out_dir: Path, checks: list[Check], *, vocab_size: int, tokenizer=None,
           hf: Callable[[], Logits] | None = None, check_generation: bool = True,
           echo: Callable[[str], Any] = print) -> dict[str, float]:
    """Compare the export's logits (``hf()``, default: the folder loaded with
    ``AutoModelForCausalLM``) with each check's; raise past a check's tolerance, taken as a
    fraction of max(1, max |logit|). Returns {label: max |difference|}."""
    inputs = sample_inputs(vocab_size, tokenizer)
    run = (hf or (lambda: transformers_logits(out_dir)))()
    want = [run(ids) for ids in inputs]
    del run
    n = sum(x.shape[0] for x in inputs)
    problems = []
    report: dict[str, float] = {}
    for check in checks:
        run = check.make()
        got = [run(ids) for ids in inputs]
        del run
        diff = max(float(np.max(np.abs(g - w))) for g, w in zip(got, want, strict=True))
        scale = max(float(np.max(np.abs(g))) for g in got)
        limit = check.tolerance * max(1.0, scale)
        report[check.label] = diff
        echo(f"verify: max |logit difference| transformers vs {check.label} = {diff:.3g} "
             f"(limit {limit:.3g} = {check.tolerance:g} x max(1, max |logit| {scale:.3g})) "
             f"over {n} sequences")
        if not diff <= limit:
            problems.append(f"logits differ from {check.label}'s by {diff:.3g} > {limit:.3g}")
    if tokenizer is not None:
        problems += check_tokenizer(out_dir, tokenizer, check_generation)
    if problems:
        raise ExportError(f"--verify failed: {'; '.join(problems)}. Nothing was written; "
                          "report this as a bug with the run's config.yaml.")
    echo("verify: tokenizer, chat template and EOS ids match training")
    return report
