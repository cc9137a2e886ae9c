"""The one exception base users see: a problem they can fix, printed without a traceback."""


class JaxtuneError(Exception):
    """A user-fixable problem. The message names the file, key, row or shape and the fix.

    The CLI prints these as ``error: <message>`` and exits with status 2; anything else is a
    bug and keeps its traceback.
    """


class ModelConfigError(JaxtuneError, ValueError):
    """A model's ``config.json`` describes something its family cannot build; says what.

    (``jaxtune.config.ConfigError`` is the other kind: a bad key or value in a run's YAML.)
    """
