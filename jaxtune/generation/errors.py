"""The error generation raises for user-fixable problems (bad model path, prompts, options)."""

from jaxtune.errors import JaxtuneError


class GenerateError(JaxtuneError, ValueError):
    """A model, prompt file or sampling option generation cannot use; says what to do."""
