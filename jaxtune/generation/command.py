"""``jaxtune generate MODEL [--prompt TEXT | --prompts FILE.jsonl] [...]``: the CLI.

MODEL is a Hugging Face model folder, a hub id in the local cache, or a run directory (its
latest checkpoint, or ``--step``). Prompts are put through the tokenizer's chat template
(``--system`` adds a system message, ``--raw`` skips the template). Prints each answer, then
the prefill and decode tokens/s (compilation timed apart).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from jaxtune.generation.errors import GenerateError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jaxtune generate",
        description="Generate answers from a model folder, hub id or run directory.")
    p.add_argument("model", help="HF model folder, cached hub id, or run directory")
    p.add_argument("--step", type=int, default=None, help="run directory: checkpoint step "
                                                          "(default: the latest complete)")
    p.add_argument("--prompt", action="append", default=[],
                   help="a user message (repeat for a batch)")
    p.add_argument("--prompts", default=None,
                   help="jsonl file: each line a chat ({\"messages\": [...]} or a list of "
                        "messages) or {\"prompt\": text}")
    p.add_argument("--system", default=None, help="system message for every prompt")
    p.add_argument("--raw", action="store_true", help="no chat template: the text as it is")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stream", action="store_true", help="print tokens as they come "
                                                         "(one prompt at a time)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="model folders: parameter and compute dtype")
    return p


def read_prompts(file: str) -> list[Any]:
    """Prompts of a jsonl file: chats (message lists) or texts; names the bad line."""
    path = Path(file)
    if not path.is_file():
        raise GenerateError(f"prompt file {file} does not exist.")
    prompts: list[Any] = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise GenerateError(f"{file} line {n} is not JSON ({e.msg}).") from None
        if isinstance(row, dict) and "messages" in row:
            row = row["messages"]
        elif isinstance(row, dict) and "prompt" in row:
            row = row["prompt"]
        ok = isinstance(row, str) or (isinstance(row, list) and row and all(
            isinstance(m, dict) and "role" in m and "content" in m for m in row))
        if not ok:
            raise GenerateError(f"{file} line {n}: expected {{\"messages\": [{{\"role\": ..., "
                                "\"content\": ...}, ...]}, a list of messages or "
                                "{\"prompt\": text}.")
        prompts.append(row)
    if not prompts:
        raise GenerateError(f"prompt file {file} holds no prompts: write one chat per line, "
                            "e.g. {\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}]}.")
    return prompts


def generate_main(argv: list[str]) -> int:
    """Run ``jaxtune generate``; returns the exit status (errors raise JaxtuneError)."""
    args = build_parser().parse_args(argv)
    prompts: list[Any] = list(args.prompt)
    if args.prompts:
        prompts += read_prompts(args.prompts)
    if not prompts:
        raise GenerateError("no prompts: give --prompt TEXT or --prompts FILE.jsonl.")
    from jaxtune.generation.api import generate
    from jaxtune.generation.loop import DONE, Generator
    from jaxtune.generation.source import load

    loaded = load(args.model, step=args.step, dtype=args.dtype)
    print(f"model: {loaded.description}", file=sys.stderr)
    gen = Generator(loaded.model)
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, seed=args.seed, system=args.system,
                   raw=args.raw, generation_config=loaded.generation_config, generator=gen,
                   details=True)
    results = []
    if args.stream:
        for i, prompt in enumerate(prompts):
            print(f"--- answer {i + 1}", flush=True)
            shown: list[int] = []
            printed = ""

            def show(step: int, tokens: list[int], shown=shown) -> None:
                nonlocal printed
                if tokens[0] != DONE:
                    shown.append(tokens[0])
                    text = loaded.tokenizer.decode(shown, skip_special_tokens=True)
                    print(text[len(printed):], end="", flush=True)
                    printed = text

            results.append(generate(loaded.model, loaded.tokenizer, [prompt], stream=show,
                                    **options))
            print(flush=True)
    else:
        results.append(generate(loaded.model, loaded.tokenizer, prompts, **options))
        for i, text in enumerate(results[0].texts):
            print(f"--- answer {i + 1}\n{text}", flush=True)
    prompt_tokens = sum(r.stats.prompt_tokens for r in results)
    new = sum(r.stats.new_tokens for r in results)
    prefill_s = sum(r.stats.prefill_s for r in results)
    decode_s = sum(r.stats.decode_s for r in results)
    print(f"prefill: {prompt_tokens} tokens, {prompt_tokens / max(prefill_s, 1e-9):.1f} "
          f"tokens/s; decode: {new} tokens, {new / max(decode_s, 1e-9):.1f} tokens/s "
          f"(compile {gen.compile_s:.1f} s, not counted)", file=sys.stderr)
    return 0
