"""``jaxtune export RUN_DIR [--step N] [--out DIR] [...]``: argument parsing for the CLI."""

from __future__ import annotations

import argparse

EPILOG = """\
Options left out come from the run's `export:` config section. The output folder must be new
or empty (or pass --overwrite); it is written under a temporary name and renamed when complete.
With --lora both, the merged model goes to --out and the PEFT adapter to <out>-adapter.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jaxtune export", epilog=EPILOG, formatter_class=argparse.RawTextHelpFormatter,
        description="Write a run's checkpoint as a Hugging Face folder (safetensors, config, "
                    "generation config, tokenizer) or a PEFT adapter.")
    p.add_argument("run_dir", help="the run directory (run.output_dir) holding config.yaml")
    p.add_argument("--step", type=int, default=None,
                   help="checkpoint step to export (default: the latest complete one)")
    p.add_argument("--out", default=None, help="output folder (default: export.out_dir, "
                                               "else RUN_DIR/hf)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default=None,
                   help="dtype of the written weights (auto: the original model's)")
    p.add_argument("--lora", choices=("merged", "adapter", "both"), default=None,
                   help="LoRA runs: merged weights, a PEFT adapter, or both")
    p.add_argument("--max-shard-size", default=None,
                   help="largest safetensors file, e.g. 5GB or 500MB (default 5GB)")
    p.add_argument("--verify", action="store_true", default=None,
                   help="load the export in transformers and compare logits with jaxtune's")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty output folder")
    return p


def export_main(argv: list[str]) -> int:
    """Run ``jaxtune export``; returns the exit status (errors raise JaxtuneError)."""
    args = build_parser().parse_args(argv)
    from jaxtune.export.api import export_run

    export_run(args.run_dir, args.out, step=args.step, dtype=args.dtype, lora=args.lora,
               max_shard_size=args.max_shard_size, verify=args.verify, overwrite=args.overwrite)
    return 0
