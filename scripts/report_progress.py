"""Progress of a report's slow phase, on stderr: a bar on a terminal, plain lines in a log.

A report asks two models dozens of questions and checks the answers, minutes of work with
nothing to print until the end. On a terminal a tqdm bar counts the work done (answers
generated and checked) and names the stage now running. Anywhere else (a CI log, a file) a bar
would write a carriage-return update per tick into the log, so each stage is one plain line
instead, with the count done so far and the time taken.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Counts ``total`` units of work over named stages, on ``stream`` (default stderr)."""

    def __init__(self, total: int, *, desc: str = "report", unit: str = "answer",
                 stream: TextIO | None = None):
        self.total, self.desc, self.done = total, desc, 0
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.interactive = bool(isatty and isatty())
        self._start = time.monotonic()
        self._bar = None
        if self.interactive:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream,
                             dynamic_ncols=True, leave=False)

    def stage(self, label: str) -> None:
        """The work starting now (shown beside the bar, or written as its own line)."""
        if self._bar is not None:
            self._bar.set_description_str(f"{self.desc}: {label}")
        else:
            self._line(label)

    def advance(self, n: int = 1) -> None:
        """``n`` more units done."""
        self.done += n
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        """Ends the bar (or writes the last line)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif not self.interactive:
            self._line("done")

    def _line(self, label: str) -> None:
        elapsed = int(time.monotonic() - self._start)
        self.stream.write(f"{self.desc} [{self.done}/{self.total}, {elapsed // 60}:"
                          f"{elapsed % 60:02d}]: {label}\n")
        self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
