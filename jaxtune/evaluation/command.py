"""``jaxtune eval MODEL_OR_RUN --tasks t1,t2 [...]``: lm-evaluation-harness on a jaxtune model.

MODEL_OR_RUN is a Hugging Face model folder (an export too), a cached hub id, or a run
directory (its latest complete checkpoint, or ``--step``; LoRA adapters applied unmerged).
Prints lm_eval's table and writes the results as JSON: in a run directory under
``RUN/eval/``, else under ``./eval/`` (or at ``--output``).

On many hosts every process runs the same command (``--coordinator-address``,
``--num-processes``, ``--process-id``, or detected on TPU / SLURM as ``jaxtune train``
does); the model is sharded over all devices, process 0 drives lm_eval and the others follow.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from jaxtune.evaluation.errors import EvalError

EPILOG = """\
Tasks: jaxtune's offline tasks (nimbrel_support_qa, nimbrel_support_mc, nimbrel_support_ppl;
tag nimbrel_support) need no network; lm_eval's own tasks (hellaswag, arc_easy, gsm8k, ...)
download their datasets from the Hugging Face hub the first time; your own task YAML files
go in a folder given with --include-path. See docs/eval.md.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jaxtune eval", epilog=EPILOG, formatter_class=argparse.RawTextHelpFormatter,
        description="Evaluate a model folder, export or run directory with "
                    "lm-evaluation-harness tasks.")
    p.add_argument("model", help="HF model folder (or export), cached hub id, or run directory")
    p.add_argument("--tasks", required=True, help="comma-separated task, group or tag names")
    p.add_argument("--step", type=int, default=None,
                   help="run directory: checkpoint step (default: the latest complete)")
    p.add_argument("--num-fewshot", type=int, default=None,
                   help="few-shot examples (default: each task's own)")
    p.add_argument("--limit", type=float, default=None,
                   help="examples per task (below 1: a fraction of each task)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="rows per forward pass (several requests packed in each), prompts "
                        "per generation batch (default 8)")
    p.add_argument("--include-path", action="append", default=[],
                   help="a folder of your own task YAML files (repeatable)")
    p.add_argument("--apply-chat-template", action="store_true",
                   help="render prompts with the tokenizer's chat template")
    p.add_argument("--system-instruction", default=None, help="system prompt for every request")
    p.add_argument("--fewshot-as-multiturn", action="store_true",
                   help="with the chat template: few-shot examples as earlier turns")
    p.add_argument("--gen-kwargs", default=None,
                   help="generation settings over the tasks', e.g. temperature=0.7,do_sample=true")
    p.add_argument("--max-length", type=int, default=None,
                   help="context length (default: the model's max_position_embeddings)")
    p.add_argument("--max-gen-toks", type=int, default=256,
                   help="answer length for tasks that set none (default 256)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="model folders: parameter and compute dtype (runs: float32)")
    p.add_argument("--output", default=None, help="results JSON path (default: see above)")
    p.add_argument("--log-samples", action="store_true",
                   help="keep every request's prompt and answer in the results JSON")
    p.add_argument("--bootstrap-iters", type=int, default=100000,
                   help="lm_eval's stderr bootstrap iterations (0 skips stderrs)")
    p.add_argument("--seed", type=int, default=0, help="few-shot sampling and sampling seed")
    p.add_argument("--fsdp", type=int, default=1, help="mesh: fully-sharded axis size")
    p.add_argument("--tensor", type=int, default=1, help="mesh: tensor-parallel axis size")
    p.add_argument("--coordinator-address", default="",
                   help="many hosts: host:port of process 0 (else TPU / SLURM detection)")
    p.add_argument("--num-processes", type=int, default=1, help="many hosts: process count")
    p.add_argument("--process-id", type=int, default=0, help="many hosts: this process's index")
    p.add_argument("--verbose", action="store_true", help="show lm_eval's own log")
    return p


def _options(args: argparse.Namespace) -> Any:
    from jaxtune.evaluation.harness import HarnessOptions
    from jaxtune.evaluation.tasks import split_names

    limit = args.limit
    if limit is not None and limit >= 1:
        if limit != int(limit):
            raise EvalError(f"--limit {limit:g}: give a whole number of examples, or a "
                            "fraction below 1.")
        limit = int(limit)
    return HarnessOptions(
        tasks=split_names(args.tasks), num_fewshot=args.num_fewshot, limit=limit,
        include_path=list(args.include_path), apply_chat_template=args.apply_chat_template,
        system_instruction=args.system_instruction,
        fewshot_as_multiturn=args.fewshot_as_multiturn, gen_kwargs=args.gen_kwargs,
        log_samples=args.log_samples, bootstrap_iters=args.bootstrap_iters, seed=args.seed,
        lm_args=dict(batch_size=args.batch_size, max_length=args.max_length,
                     max_gen_toks=args.max_gen_toks, seed=args.seed))


def _distributed(args: argparse.Namespace) -> None:
    from jaxtune import distributed
    from jaxtune.config import DistributedConfig

    if args.coordinator_address:
        cfg = DistributedConfig(initialize="explicit",
                                coordinator_address=args.coordinator_address,
                                num_processes=args.num_processes, process_id=args.process_id)
    else:
        cfg = DistributedConfig()  # auto: TPU / SLURM / GKE, else one process
    distributed.initialize(cfg)


def default_output(model: str, step: int | None) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    from jaxtune.generation.source import is_run_dir

    if is_run_dir(model):
        return Path(model) / "eval" / f"results-step{step}-{stamp}.json"
    return Path("eval") / f"{Path(model).name}-{stamp}.json"


def write_results(results: dict[str, Any], path: Path, about: dict[str, Any]) -> Path:
    """lm_eval's results (with what was evaluated) as JSON, written atomically."""
    from lm_eval.utils import handle_non_serializable

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"jaxtune": about, **results}, indent=2,
                              default=handle_non_serializable) + "\n")
    tmp.replace(path)
    return path


def eval_main(argv: list[str]) -> int:
    """Run ``jaxtune eval``; returns the exit status (errors raise JaxtuneError)."""
    args = build_parser().parse_args(argv)
    from jaxtune.evaluation import require_lm_eval

    require_lm_eval()
    options = _options(args)
    options.check()
    if not args.verbose:
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
    _distributed(args)
    import jax

    from jaxtune import distributed
    from jaxtune.evaluation.follow import Leader, LeaderStopped

    if jax.process_index() == 0:
        leader = Leader(None)
        try:
            return _lead(args, argv, options, leader)
        except BaseException as e:
            # The others are loading the model or waiting for a request: tell them (a no-op
            # once they were told, or with one process).
            leader.stop(error=str(e) if isinstance(e, EvalError) else
                        f"{type(e).__name__}: {e}")
            raise
    try:
        _model_engine(args)  # then follow process 0's requests
        return 0
    except LeaderStopped:
        raise
    except BaseException as e:  # process 0 is waiting in a collective: stop it too
        distributed.fail_fast(e)
        raise


def _model_engine(args: argparse.Namespace, options: Any = None, prepared: Any = None,
                  leader: Any = None) -> tuple[Any, Any, dict[str, Any] | None]:
    """Load the model on the mesh over every device and run the harness (process 0 leads
    with ``leader``, the others follow): ``(loaded, engine, results or None)``."""
    from jaxtune.config import MeshConfig
    from jaxtune.evaluation.engine import Engine
    from jaxtune.evaluation.harness import run_harness
    from jaxtune.generation.api import default_stop_ids
    from jaxtune.generation.source import is_run_dir, load
    from jaxtune.mesh import make_mesh
    from jaxtune.sharding import make_rules

    if args.step is not None and not is_run_dir(args.model):
        raise EvalError(f"--step {args.step} needs a run directory (with config.yaml); "
                        f"{args.model} is a model folder or hub id.")
    mesh = make_mesh(MeshConfig(fsdp=args.fsdp, tensor=args.tensor))
    rules = make_rules()
    loaded = load(args.model, step=args.step, dtype=args.dtype, mesh=mesh, rules=rules)
    engine = Engine(loaded.model, loaded.tokenizer, mesh=mesh, rules=rules)
    if leader is None:
        from jaxtune.evaluation.follow import follow

        follow(engine)
        return loaded, engine, None
    print(f"model: {loaded.description}", file=sys.stderr)
    leader.engine = engine
    options.lm_args.update(description=loaded.description,
                           stop_ids=default_stop_ids(loaded.tokenizer, loaded.generation_config))
    return loaded, engine, run_harness(engine, options, prepared=prepared, leader=leader)


def _lead(args: argparse.Namespace, argv: list[str], options: Any, leader: Any) -> int:
    """Process 0: tasks first (a misspelt name or an offline dataset fails before the model
    is read), then the model, lm_eval, the table and the JSON."""
    import jax

    from jaxtune.evaluation.harness import prepare_tasks, table

    prepared = prepare_tasks(options)
    start = time.perf_counter()
    loaded, _, results = _model_engine(args, options, prepared, leader)
    print(table(results))
    step = _step_of(args.model, args.step)
    about = {"model": loaded.description, "model_path": args.model, "step": step,
             "tasks": options.tasks, "processes": jax.process_count(),
             "devices": jax.device_count(), "seconds": round(time.perf_counter() - start, 2),
             "argv": ["jaxtune", "eval", *argv]}
    path = write_results(results, Path(args.output) if args.output
                         else default_output(args.model, step), about)
    print(f"results: {path}", file=sys.stderr)
    return 0


def _step_of(model: str, step: int | None) -> int | None:
    from jaxtune.generation.source import is_run_dir

    if not is_run_dir(model):
        return None
    if step is not None:
        return step
    from jaxtune.run_dir import open_run

    return open_run(model).step
