"""Evaluation with lm-evaluation-harness: ``jaxtune eval``, the ``jaxtune`` lm_eval model and
benchmarks during training (``trainer.eval_harness``). Needs the ``eval`` extra
(``pip install 'jaxtune[eval]'``).

- ``lm.py``: :class:`JaxtuneLM`, registered in lm_eval as ``jaxtune``;
- ``packing.py`` / ``scoring.py``: log-likelihood requests packed into rows (or sharing their
  context through a KV cache), one forward pass per batch; ``generation.py``: generation
  until stop strings on the KV-cache generator;
- ``engine.py`` / ``follow.py``: what every process computes, and how process 0 hands its
  requests to the others;
- ``tasks.py``: task names, datasets and their errors; ``offline_tasks/``: tasks over local
  files (the Nimbrel Sync support set);
- ``harness.py``: one lm_eval run on any number of hosts; ``command.py``: ``jaxtune eval``;
  ``training.py``: the training hook.
"""

from __future__ import annotations

import importlib.util

from jaxtune.evaluation.errors import EvalError

EXTRA_HINT = ("jaxtune eval needs lm-evaluation-harness: pip install 'jaxtune[eval]' (or "
              "pip install 'lm-eval>=0.4.13').")


def require_lm_eval() -> None:
    """Raise :class:`EvalError` naming the ``eval`` extra when lm_eval is not installed."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise EvalError(f"{EXTRA_HINT} ({e})") from None


if importlib.util.find_spec("lm_eval") is not None:
    # Registers the "jaxtune" model with lm_eval. Without the eval extra, jaxtune eval and
    # trainer.eval_harness say which extra to install (require_lm_eval).
    from jaxtune.evaluation.lm import JaxtuneLM
else:
    JaxtuneLM = None  # type: ignore[assignment,misc]

__all__ = ["EvalError", "JaxtuneLM", "require_lm_eval"]
