"""The one error type of the export package."""

from __future__ import annotations

from jaxtune.errors import JaxtuneError


class ExportError(JaxtuneError):
    """An export cannot run or did not check out; the message names the path and the fix."""
