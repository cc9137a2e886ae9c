"""The error evaluation raises for user-fixable problems (tasks, model, options)."""

from jaxtune.errors import JaxtuneError


class EvalError(JaxtuneError, ValueError):
    """A task, model, run directory or option the harness cannot use; says what to do."""
