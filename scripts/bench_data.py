"""Data pipeline throughput on one CPU core, chat format: can it keep up with training?

Synthetic multi-turn chats (system prompt, 1-4 turns, replies of 30-250 words) are written to
a temporary jsonl file and run through the real pipeline with the SmolLM2 tokenizer (ChatML
template, 49k vocabulary) when ``scripts/make_smollm2.py`` has built it, else the test suite's
tiny tokenizer (or ``--tokenizer DIR``). Stages, each timed on its own:

* format + tokenize: render every chat with the template, diff prefixes for the loss mask,
  tokenize, write the cache (done once per data file, tokenizer and settings);
* cache load: the same with the cache warm (every later run);
* pack: compute one epoch's packing plan (once per epoch);
* batches: build host batches from the cache (every step: this must keep up with training);
* streaming: the whole pipeline on the fly (``data.streaming: true``), per step.

    python scripts/bench_data.py                       # as recorded in docs/benchmarks.md
    python scripts/bench_data.py --examples 500 --batches 50   # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

# One core, no tokenizer thread pool: the numbers are per core.
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["RAYON_NUM_THREADS"] = "1"
if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORDS = (
    "the model learns to answer questions about data and code while keeping its replies short "
    "clear and correct so users can follow each step of the reasoning in plain language with "
    "examples numbers 42 3.14 2026 and names like Paris Tokyo JAX Python when they help"
).split()


def sentence(rng: random.Random, n: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n)]
    return words[0].capitalize() + " " + " ".join(words[1:]) + rng.choice([".", "?", "!"])


def paragraph(rng: random.Random, n_words: int) -> str:
    out, left = [], n_words
    while left > 0:
        k = min(left, rng.randint(6, 20))
        out.append(sentence(rng, k))
        left -= k
    return " ".join(out)


def write_chats(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            msgs = []
            if rng.random() < 0.5:
                msgs.append({"role": "system", "content": paragraph(rng, rng.randint(8, 30))})
            for _ in range(rng.randint(1, 4)):
                msgs.append({"role": "user", "content": paragraph(rng, rng.randint(10, 80))})
                msgs.append({"role": "assistant",
                             "content": paragraph(rng, rng.randint(30, 250))})
            f.write(json.dumps({"messages": msgs}) + "\n")


def tokenizer_dir(arg: str | None, tmp: Path) -> tuple[str, str]:
    if arg:
        return arg, arg
    smol = Path(os.environ.get("JAXTUNE_CACHE", "~/.cache/jaxtune")).expanduser() / \
        "smollm2-135m-instruct"
    if (smol / ".complete").is_file():
        return str(smol), "SmolLM2-135M-Instruct (49,152 vocab, ChatML)"
    from tests.fixtures_data import build_tokenizer

    out = tmp / "tiny-tokenizer"
    build_tokenizer("chatml").save_pretrained(str(out))
    return str(out), "test-suite tiny BPE (389 vocab, ChatML); run make_smollm2.py for real"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokenizer", help="tokenizer folder (default: SmolLM2 if built)")
    p.add_argument("--examples", type=int, default=3000, help="chats to generate")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8, help="global batch size (rows)")
    p.add_argument("--batches", type=int, default=200, help="batches to time")
    args = p.parse_args()

    from jaxtune.config import config_from_dict
    from jaxtune.data import load_tokenizer, make_batch_iterator
    from jaxtune.data.loader import BatchIterator
    from jaxtune.data.prepare import prepare

    tmp = Path(tempfile.mkdtemp(prefix="bench-data-"))
    tok_path, tok_name = tokenizer_dir(args.tokenizer, tmp)
    data = tmp / "chats.jsonl"
    write_chats(data, args.examples)

    def config(**extra):
        return config_from_dict({
            "model": {"tokenizer": tok_path},
            "trainer": {"global_batch_size": args.batch},
            "data": {"sources": [{"path": str(data)}], "seq_len": args.seq_len,
                     "cache_dir": str(tmp / "cache"), **extra},
        })

    cfg = config()
    tok = load_tokenizer(cfg)
    results = []

    t0 = time.perf_counter()
    prepared = prepare(cfg, tok)
    cold = time.perf_counter() - t0
    all_tokens = int(prepared.tokenized[0].offsets[-1])
    results.append(("format + tokenize (cold cache)", all_tokens, cold))

    t0 = time.perf_counter()
    prepared = prepare(cfg, tok)
    results.append(("cache load (warm)", all_tokens, time.perf_counter() - t0))

    it = BatchIterator(prepared, seq_len=args.seq_len, global_batch_size=args.batch,
                       pad_id=prepared.pad_id)
    t0 = time.perf_counter()
    plan = it.plan(0)
    results.append(("pack one epoch (plan)", prepared.stats["tokens"], time.perf_counter() - t0))

    n = min(args.batches, len(plan) // args.batch)
    t0 = time.perf_counter()
    for _ in range(n):
        next(it)
    dt = time.perf_counter() - t0
    results.append(("batches from cache", n * args.batch * args.seq_len, dt))

    stream = make_batch_iterator(config(streaming=True, shuffle_buffer=1000), tok,
                                 process_index=0, process_count=1)
    t0 = time.perf_counter()
    for _ in range(n):
        next(stream)
    dt = time.perf_counter() - t0
    results.append(("streaming, end to end", n * args.batch * args.seq_len, dt))

    s = it.stats
    print(f"tokenizer: {tok_name}")
    print(f"data: {args.examples:,} chats, {all_tokens:,} tokens "
          f"({all_tokens / args.examples:,.0f} per chat), {s['trained_tokens']:,} trained; "
          f"seq_len {args.seq_len}, packing efficiency {100 * s['packing_efficiency']:.1f}%, "
          f"{s['truncated']} truncated")
    print(f"one core ({os.cpu_count()} on the machine), {n} batches of {args.batch} rows\n")
    print("| stage | tokens | seconds | tokens/s |")
    print("|---|---:|---:|---:|")
    for name, tokens, sec in results:
        print(f"| {name} | {tokens:,} | {sec:.3f} | {tokens / sec:,.0f} |")


if __name__ == "__main__":
    main()
