#!/usr/bin/env python
"""Build the distillation quickstart's student: SmolLM2-135M-Instruct with every second layer.

    python scripts/make_smollm2_half.py          # prints the folder; builds it on first use
    python scripts/make_smollm2_half.py --force  # rebuild

The student keeps layers 0, 2, ..., 28 of the 30 (15 layers, 81M parameters against 135M),
the embeddings, the final norm and the tokenizer of the base SmolLM2-135M-Instruct fixture
(``scripts/make_smollm2.py``, built first when missing), so it shares the teacher's
vocabulary: the SFT quickstart's export is SmolLM2-135M fine-tuned, and the Gemma 3 270M
fixture's vocabulary (262k) is not SmolLM2's (49k). Layers are renumbered in the safetensors
keys (``model.layers.2i.*`` -> ``model.layers.i.*``), nothing else changes. The folder is
``$JAXTUNE_CACHE/smollm2-135m-instruct-half`` (default ``~/.cache/jaxtune``), outside git.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.make_smollm2 import DONE, build_once, default_dir  # noqa: E402
from scripts.make_smollm2 import ensure as ensure_base  # noqa: E402

KEEP_EVERY = 2
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")


def student_dir() -> Path:
    return default_dir().with_name(default_dir().name + "-half")


def build(base: Path, out: Path) -> None:
    from safetensors.numpy import load_file, save_file

    config = json.loads((base / "config.json").read_text())
    layers = config["num_hidden_layers"]
    kept = list(range(0, layers, KEEP_EVERY))
    new_index = {old: new for new, old in enumerate(kept)}
    tensors = {}
    for file in sorted(base.glob("*.safetensors")):
        for key, value in load_file(str(file)).items():
            m = _LAYER.match(key)
            if m is None:
                tensors[key] = value
            elif int(m.group(1)) in new_index:
                tensors[f"model.layers.{new_index[int(m.group(1))]}.{m.group(2)}"] = value
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config["num_hidden_layers"] = len(kept)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for file in base.iterdir():  # tokenizer, chat template, generation config
        if file.name not in ("config.json", DONE) and file.suffix != ".safetensors":
            shutil.copy2(file, out / file.name)


def ensure(out: Path, force: bool = False) -> Path:
    if (out / DONE).is_file() and not force:
        return out
    base = ensure_base(default_dir())
    return build_once(out, lambda tmp: build(base, tmp),
                      f"layers 0, {KEEP_EVERY}, ... of {base}\n", force=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="folder (default: the cache)")
    p.add_argument("--force", action="store_true", help="rebuild even if present")
    args = p.parse_args()
    print(ensure(args.out or student_dir(), args.force))


if __name__ == "__main__":
    main()
