"""One lm_eval run over an :class:`~jaxtune.evaluation.engine.Engine`, on any number of hosts.

:func:`run_harness` is what ``jaxtune eval`` and the training hook call on every process:
process 0 builds the tasks and runs ``lm_eval.simple_evaluate`` on a
:class:`~jaxtune.evaluation.lm.JaxtuneLM` whose model calls go to every process
(:class:`~jaxtune.evaluation.follow.Leader`); the others follow until it is done. Scores come
from lm_eval's own task code. Returns lm_eval's results dict on process 0, None elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import jax

from jaxtune.evaluation.errors import EvalError


@dataclass
class HarnessOptions:
    """What to evaluate and how; the names follow lm_eval's ``simple_evaluate``."""

    tasks: list[str]
    num_fewshot: int | None = None  # None: each task's own default
    limit: float | None = None  # examples per task (a fraction when below 1); None: all
    include_path: list[str] = field(default_factory=list)  # folders of task YAML files
    apply_chat_template: bool = False
    system_instruction: str | None = None
    fewshot_as_multiturn: bool = False
    gen_kwargs: str | None = None  # "temperature=0.7,top_p=0.9" overrides the tasks'
    log_samples: bool = False  # keep each request's inputs and answers in the results
    bootstrap_iters: int = 100000  # lm_eval's stderr bootstrap; 0 skips stderrs
    seed: int = 0  # lm_eval's python / numpy / few-shot seeds
    lm_args: dict[str, Any] = field(default_factory=dict)  # JaxtuneLM keyword arguments

    def check(self) -> None:
        """Reject options that cannot run, naming the flag and the fix."""
        if not self.tasks:
            raise EvalError("no tasks: give --tasks NAME[,NAME...], e.g. --tasks "
                            "nimbrel_support_mc (jaxtune's offline tasks need no network).")
        if self.limit is not None and self.limit <= 0:
            raise EvalError(f"--limit {self.limit:g} evaluates nothing: give a positive number "
                            "of examples per task (or a fraction below 1 of each task), or "
                            "leave --limit out to evaluate every example.")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise EvalError(f"--num-fewshot {self.num_fewshot} must be 0 or more.")


def prepare_tasks(options: HarnessOptions) -> tuple[Any, list[Any]]:
    """Process 0's task manager and loaded tasks (raises EvalError before any model work)."""
    from jaxtune.evaluation.tasks import load_tasks, task_manager

    manager = task_manager(options.tasks, options.include_path)
    return manager, load_tasks(manager, options.tasks)


def run_harness(engine: Any, options: HarnessOptions, *,
                prepared: tuple[Any, list[Any]] | None = None,
                leader: Any = None) -> dict[str, Any] | None:
    """Evaluate ``engine``'s model on the tasks, every process taking part (see module doc).

    ``prepared`` is :func:`prepare_tasks`' result when process 0 made it earlier; ``leader``
    process 0's :class:`~jaxtune.evaluation.follow.Leader` when it made one earlier.
    """
    from jaxtune.evaluation.follow import Leader, follow

    if jax.process_index() != 0:
        follow(engine)
        return None
    leader = leader or Leader(engine)
    try:
        manager, tasks = prepared or prepare_tasks(options)
        import lm_eval

        from jaxtune.evaluation.lm import JaxtuneLM

        lm = JaxtuneLM(engine=engine, leader=leader, **options.lm_args)
        results = lm_eval.simple_evaluate(
            model=lm, tasks=tasks, task_manager=manager, num_fewshot=options.num_fewshot,
            limit=options.limit, log_samples=options.log_samples,
            bootstrap_iters=options.bootstrap_iters,
            apply_chat_template=options.apply_chat_template,
            system_instruction=options.system_instruction,
            fewshot_as_multiturn=options.fewshot_as_multiturn, gen_kwargs=options.gen_kwargs,
            random_seed=options.seed, numpy_random_seed=options.seed,
            torch_random_seed=None, fewshot_random_seed=options.seed)
    except BaseException as e:
        leader.stop(error=f"{type(e).__name__}: {e}")
        raise
    leader.stop()
    return results


def scores(results: dict[str, Any]) -> dict[str, float]:
    """Flat ``{task/metric: value}`` of lm_eval's results (groups too; stderrs left out)."""
    out: dict[str, float] = {}
    for section in ("results", "groups"):
        for task, metrics in (results.get(section) or {}).items():
            for key, value in metrics.items():
                if key == "alias" or "_stderr" in key or not isinstance(value, (int, float)):
                    continue
                metric, _, filt = key.partition(",")
                name = metric if filt in ("", "none") else f"{metric}_{filt}"
                out[f"{task}/{name}"] = float(value)
    return out


def table(results: dict[str, Any]) -> str:
    """lm_eval's own results table (and its groups table when there are groups)."""
    from lm_eval.utils import make_table

    text = make_table(results)
    if results.get("groups"):
        text += "\n" + make_table(results, "groups")
    return text
