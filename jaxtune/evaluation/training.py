"""lm_eval scores during training: ``trainer.eval_harness``.

Every ``every`` steps (and at the last step) the model being trained is scored on the tasks,
on the training mesh, by every process (process 0 drives lm_eval, the others follow). The
scores go to the metrics (stdout, ``metrics.jsonl``, TensorBoard, W&B) as
``harness/<task>/<metric>``, and lm_eval's table to TensorBoard as text. Task names are
checked when the trainer is built, so a misspelt one fails before step 1; datasets are read
at each evaluation (on process 0; jaxtune's offline tasks read local files).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("jaxtune")


class TrainingHarness:
    """Scores ``trainer.eval_harness.tasks`` with the current parameters when due."""

    def __init__(self, cfg: Any, tokenizer: Any, mesh: Any, rules: Any):
        from jaxtune.evaluation import require_lm_eval
        from jaxtune.evaluation.harness import HarnessOptions
        from jaxtune.evaluation.tasks import task_manager
        from jaxtune.export.writer import read_generation_config
        from jaxtune.generation.api import default_stop_ids
        from jaxtune.locate import resolve_model_dir

        require_lm_eval()
        h = cfg.trainer.eval_harness
        self.every = h.every
        self.tokenizer, self.mesh, self.rules = tokenizer, mesh, rules
        limit = None if not h.limit else (h.limit if h.limit < 1 else int(h.limit))
        stops = default_stop_ids(tokenizer, read_generation_config(
            resolve_model_dir(cfg.model.path)))
        self.options = HarnessOptions(
            tasks=list(h.tasks), num_fewshot=None if h.num_fewshot < 0 else h.num_fewshot,
            limit=limit, include_path=list(h.include_path),
            apply_chat_template=h.apply_chat_template,
            system_instruction=h.system_instruction or None, bootstrap_iters=0,
            seed=cfg.run.seed, lm_args=dict(batch_size=h.batch_size, stop_ids=stops,
                                            seed=cfg.run.seed, description=cfg.run.name))
        self.options.check()
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
        task_manager(self.options.tasks, self.options.include_path)  # names known, or fail now

    def due(self, step: int, last: int) -> bool:
        return step == last or bool(self.every) and step % self.every == 0

    def __call__(self, step: int, model: Any, writer: Any = None) -> dict[str, float] | None:
        """Score ``model`` (every process calls this); process 0 logs and returns the
        ``harness/<task>/<metric>`` values, the others None."""
        from jaxtune.evaluation.engine import Engine
        from jaxtune.evaluation.harness import run_harness, scores, table

        # Parameters change from call to call, shapes do not: the compiled programs are reused.
        engine = Engine(model, self.tokenizer, mesh=self.mesh, rules=self.rules)
        results = run_harness(engine, self.options)
        if results is None:
            return None
        values = {f"harness/{k}": v for k, v in scores(results).items()}
        log.info("step %d: lm_eval\n%s", step, table(results))
        if writer is not None:
            writer.write(step, values)
            writer.text(step, "harness", table(results))
        return values
