"""``--verify``: load the export with transformers (PyTorch, CPU) and compare its logits with
jaxtune's, and check that the exported tokenizer renders the chat template and stops where
training did.

The jaxtune side is the trained model computed in float32. For a full-weight export its
parameters are first rounded to the exported dtype, so the comparison checks the written
values exactly whatever the dtype (tolerance :data:`EXACT_TOLERANCE`). When the export
rounds (float32 training, bfloat16 export) the trained model itself must also agree, within
:data:`ROUNDED_TOLERANCE`. A merged LoRA export is checked the same way: exactly against the
merged weights, and against the adapter-applied model, unmerged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from jaxtune.export.errors import ExportError
from jaxtune.export.hf_folder import probe_chat, stop_token_ids

log = logging.getLogger("jaxtune")

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


def max_difference(a: Logits, b: Logits, inputs: list[np.ndarray]) -> tuple[float, float]:
    """(max |a - b|, max |a|) over every input."""
    diff, scale = 0.0, 0.0
    for ids in inputs:
        la, lb = a(ids), b(ids)
        diff = max(diff, float(np.max(np.abs(la - lb))))
        scale = max(scale, float(np.max(np.abs(la))))
    return diff, scale


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


def verify(out_dir: Path, reference: Logits, *, vocab_size: int, tokenizer=None,
           tolerance: float = EXACT_TOLERANCE, hf: Logits | None = None,
           what: str = "jaxtune", untouched: Logits | None = None,
           untouched_tolerance: float = ROUNDED_TOLERANCE,
           untouched_name: str = "the unrounded model", check_generation: bool = True,
           echo: Callable[[str], Any] = print) -> dict[str, float]:
    """Compare the export in transformers (``hf``, default: the folder loaded with
    ``AutoModelForCausalLM``) with ``reference``; raise past ``tolerance``.

    ``untouched`` (optional) is the trained model before its weights were rounded or merged;
    it must agree within ``untouched_tolerance``. Returns the figures printed.
    """
    inputs = sample_inputs(vocab_size, tokenizer)
    hf = hf or transformers_logits(out_dir)
    n = sum(x.shape[0] for x in inputs)
    problems = []
    report: dict[str, float] = {}
    checks = [("max_abs_diff", what, reference, tolerance)]
    if untouched is not None:
        checks.append(("untouched_diff", untouched_name, untouched, untouched_tolerance))
    for name, label, logits, tol in checks:
        diff, scale = max_difference(logits, hf, inputs)
        limit = tol * max(1.0, scale)
        report[name] = diff
        echo(f"verify: max |logit difference| transformers vs {label} = {diff:.3g} (limit "
             f"{limit:.3g} = {tol:g} x max(1, max |logit| {scale:.3g})) over {n} sequences")
        if not diff <= limit:
            problems.append(f"logits differ from {label}'s by {diff:.3g} > {limit:.3g}")
    if tokenizer is not None:
        problems += check_tokenizer(out_dir, tokenizer, check_generation)
    if problems:
        raise ExportError(f"--verify failed: {'; '.join(problems)}. Nothing was written; "
                          "report this as a bug with the run's config.yaml.")
    echo("verify: tokenizer, chat template and EOS ids match training")
    return report
