"""Generation speed on SmolLM2-135M-Instruct: jaxtune vs transformers + PyTorch, side by side.

    python scripts/bench_generate.py                      # batch 1 and 8, as in docs/benchmarks.md
    python scripts/bench_generate.py --batches 8 --new 32 # a quick look

For each batch size the same chat prompts (different lengths) are answered greedily with a
fixed number of new tokens (no stop ids, so both do the same work) in float32: jaxtune
(``jaxtune.generation``: one prefill, then the on-device decode loop; compilation is timed
apart and not counted) and transformers ``generate`` (its dynamic KV cache, left-padded batch,
PyTorch on all cores). Prefill tokens/s counts the prompts' real tokens; decode tokens/s the
new tokens after the first of every row. Each measurement is the best of ``--repeats``.
Prints ``ratio decode:`` (jaxtune / transformers) per batch size.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.",
             "Explain gravity to a child in two sentences.", "List three fruits.",
             "How do I boil an egg?", "Why is the sky blue? Answer briefly.",
             "Give me a name for a grey cat.", "Translate 'good morning' into French."]


def model_dir() -> Path:
    import subprocess

    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_smollm2.py")],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip().splitlines()[-1])


def bench_jaxtune(path: Path, prompts: list[list[int]], new: int, repeats: int):
    import jaxtune
    from jaxtune.generation.loop import Generator

    gen = Generator(jaxtune.from_pretrained(path, dtype="float32", scan_layers=True))
    gen.generate(prompts, max_new_tokens=new)  # compiles (not counted)
    best = None
    for _ in range(repeats):
        out = gen.generate(prompts, max_new_tokens=new)
        assert all(len(t) == new for t in out.tokens)
        if best is None or out.decode_s < best.decode_s:
            best = out
    return best.prefill_tokens_per_s, best.decode_tokens_per_s


def bench_torch(path: Path, prompts: list[list[int]], new: int, repeats: int, threads: int):
    import torch
    import transformers

    torch.set_num_threads(threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    real = sum(len(p) for p in prompts)
    kwargs = dict(attention_mask=mask, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kwargs)  # warm up
        prefill_s = decode_s = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
            one = time.perf_counter() - start
            start = time.perf_counter()
            out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, **kwargs)
            total = time.perf_counter() - start
            assert out.shape[1] == width + new
            prefill_s = min(prefill_s, one)
            decode_s = min(decode_s, max(total - one, 1e-9))
    return real / prefill_s, len(prompts) * (new - 1) / decode_s


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--new", type=int, default=64, help="new tokens per prompt")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1,
                   help="PyTorch threads (default: every core; on a shared, loaded machine 1 "
                        "can be faster, as its threads spin waiting for each other)")
    args = p.parse_args()
    from transformers import AutoTokenizer

    path = model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    chats = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                     add_generation_prompt=True) for q in QUESTIONS]
    encoded = [tok(c, add_special_tokens=False)["input_ids"] for c in chats]
    print(f"SmolLM2-135M-Instruct, float32, {args.new} new tokens per prompt, greedy; "
          f"torch threads {args.torch_threads}, {os.cpu_count()} cores")
    print(f"{'batch':>5} {'':>12} {'prefill tok/s':>14} {'decode tok/s':>13}")
    for b in [int(x) for x in args.batches.split(",")]:
        prompts = [encoded[i % len(encoded)] for i in range(b)]
        jp, jd = bench_jaxtune(path, prompts, args.new, args.repeats)
        tp, td = bench_torch(path, prompts, args.new, args.repeats, args.torch_threads)
        print(f"{b:>5} {'jaxtune':>12} {jp:>14.1f} {jd:>13.1f}")
        print(f"{b:>5} {'transformers':>12} {tp:>14.1f} {td:>13.1f}")
        print(f"batch {b} ratio prefill: {jp / tp:.2f}")
        print(f"batch {b} ratio decode: {jd / td:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
