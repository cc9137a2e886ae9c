"""A failed checkpoint read, as the user sees it: the file and the array named in one line,
and no tracebacks from the reads Orbax abandoned.

Orbax restores every array of a state at once: TensorStore reads awaited together on a fresh
asyncio event loop. When one read fails (an array file cut short or deleted), Orbax raises
at once and closes that loop while the other reads still run in TensorStore's threads. Each
of them, when it ends, calls the closed loop's ``call_soon_threadsafe`` from its native
thread, which raises ``RuntimeError: Event loop is closed``; Python prints every one as an
unraisable exception, dozens of tracebacks before, after or in the middle of jaxtune's
one-paragraph error, at any moment until the process exits. The reads of the abandoned loop
that failed too are garbage collected later, and asyncio logs each (a task, a gathering
future) as "... exception was never retrieved" with its traceback. :func:`quiet_abandoned_reads`
drops exactly those two kinds (nothing waits for these reads: their results have no reader,
and the first failure is the one reported) and passes every other exception and log record
on.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from typing import Any

_installed = False


def quiet_abandoned_reads() -> None:
    """Keep the late ends of abandoned reads from printing tracebacks (idempotent).

    Three reports are dropped, each of an exception no code waits for:

    - ``RuntimeError: Event loop is closed`` raised by asyncio's ``call_soon_threadsafe``
      called straight from native code (no Python caller): a late TensorStore callback;
    - "Exception ignored in: <coroutine ...>" for an exception that went through Orbax's code
      (a suspended read closed when it is garbage collected);
    - asyncio's "... exception was never retrieved" log for a task or future that failed in
      Orbax's code or awaiting a TensorStore future.

    They arrive through ``sys.unraisablehook`` and the ``asyncio`` logger (and the first could
    reach ``sys.excepthook``, where native code calls ``PyErr_Print``); each is wrapped, and
    everything else goes on to the hook that was there before. Orbax abandons a read only
    after another one failed, and raises that failure, which jaxtune reports.
    """
    global _installed
    if _installed:
        return
    previous_unraisable, previous_except = sys.unraisablehook, sys.excepthook

    def unraisable(info: Any) -> None:
        if not _abandoned(info.exc_value, info.exc_traceback):
            previous_unraisable(info)

    def excepthook(exc_type: Any, exc: BaseException, tb: Any) -> None:
        if not _late_callback(exc, tb):  # a real uncaught error always prints
            previous_except(exc_type, exc, tb)

    sys.unraisablehook, sys.excepthook = unraisable, excepthook
    logging.getLogger("asyncio").addFilter(_not_an_unretrieved_orbax_failure)
    _installed = True


def _abandoned(exc: BaseException | None, tb: Any) -> bool:
    """Whether an unraisable exception is the late end of an abandoned Orbax read."""
    return _late_callback(exc, tb) or _checkpoint_io(exc)


def _late_callback(exc: BaseException | None, tb: Any) -> bool:
    """Whether ``exc`` is a closed loop's ``call_soon_threadsafe`` called from native code."""
    if not isinstance(exc, RuntimeError) or str(exc) != "Event loop is closed" or tb is None:
        return False
    # The traceback's first frame is call_soon_threadsafe itself: it was called from native
    # code (a TensorStore thread), not from any Python function.
    code = tb.tb_frame.f_code
    return (code.co_name == "call_soon_threadsafe"
            and code.co_filename.endswith(os.path.join("asyncio", "base_events.py")))


def _not_an_unretrieved_orbax_failure(record: logging.LogRecord) -> bool:
    """The ``asyncio`` logger's filter: False (drop) for "... exception was never retrieved"
    of a task or future that failed in Orbax's code or awaiting a TensorStore future."""
    if "exception was never retrieved" not in str(record.msg).split("\n", 1)[0]:
        return True
    exc = record.exc_info[1] if record.exc_info else None
    return not (_checkpoint_io(exc) or _tensorstore_status(exc))


# absl status codes TensorStore's errors start with ("FAILED_PRECONDITION: Error reading ...")
_STATUS = re.compile(r"^(CANCELLED|UNKNOWN|INVALID_ARGUMENT|DEADLINE_EXCEEDED|NOT_FOUND|"
                     r"ALREADY_EXISTS|PERMISSION_DENIED|RESOURCE_EXHAUSTED|FAILED_PRECONDITION|"
                     r"ABORTED|OUT_OF_RANGE|UNIMPLEMENTED|INTERNAL|UNAVAILABLE|DATA_LOSS|"
                     r"UNAUTHENTICATED): ")


def _tensorstore_status(exc: BaseException | None) -> bool:
    """Whether ``exc`` is a TensorStore read's error set on a plain future from native code
    (no Python frame to recognise it by, only its absl status text)."""
    if exc is None or exc.__traceback__ is not None or not _STATUS.match(str(exc)):
        return False
    return any(word in str(exc) for word in ("Error reading", "Error opening", "OCDBT"))


def _checkpoint_io(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or an exception it came from) was raised in Orbax's code, or awaiting
    a TensorStore future that asyncio wrapped in a task (``asyncio.gather`` over the opens
    of every array)."""
    orbax = f"{os.sep}orbax{os.sep}checkpoint{os.sep}"
    for e in error_chain(exc) if exc is not None else []:
        tb = e.__traceback__
        while tb is not None:
            frame = tb.tb_frame
            if orbax in frame.f_code.co_filename:
                return True
            waited = frame.f_locals.get("awaitable") if "asyncio" in frame.f_code.co_filename \
                else None
            if type(waited).__module__.startswith("tensorstore"):
                return True
            tb = tb.tb_next
    return False


def error_chain(err: BaseException) -> list[BaseException]:
    """``err`` and the exceptions it was raised from or during, outermost first."""
    chain: list[BaseException] = []
    while err is not None and all(err is not e for e in chain):
        chain.append(err)
        err = err.__cause__ or err.__context__
    return chain


def describe_read_error(err: BaseException, step_dir: str) -> tuple[str, str]:
    """``(what failed under step_dir, a short reason)``; what failed is '' when the error names
    nothing there. TensorStore's errors name the file or the OCDBT database and the array,
    then dump their whole spec; the innermost error with a status code says why."""
    chain = error_chain(err)
    bad_json = next((e for e in chain if isinstance(e, json.JSONDecodeError)), None)
    if bad_json is not None:
        return "", (f"not valid JSON, cut short or overwritten: {bad_json.msg} "
                    f"(character {bad_json.pos})")
    texts = [str(e).split(" [tensorstore_spec=")[0] for e in chain]
    coded = [t for t in texts if re.match(r"[A-Z][A-Z_]+: ", t)]
    text = coded[-1] if coded else texts[0]
    prefix = step_dir.rstrip("/") + "/"
    quoted = re.findall(r"[\"']([^\"']+)[\"']", text)
    files = [q for q in quoted if q.startswith(prefix) and not q.endswith("/")]
    where = max(files, key=len)[len(prefix):] if files else ""
    keys = re.findall(r'Error (?:reading|opening|writing) "([^"]+)" in OCDBT database', text)
    keys += [q for q in quoted if q.endswith(("/.zarray", "/zarr.json"))
             and not q.startswith(prefix)]
    array = keys[0].rsplit("/", 1)[0] if keys else ""
    if not where and array and "in OCDBT database" in text:
        where = _cut_data_file(text, prefix) or "state"
    if where and array:
        where += f" (array {array})"
    code = re.match(r"([A-Z][A-Z_]+): ", text)
    tail = text.rsplit('": ', 1)[-1] if '": ' in text else text
    tail = " ".join(tail.replace(prefix, "").split())
    reason = f"{code.group(1)}: {tail}" if code and not tail.startswith(code.group(1)) else tail
    if not where and not code:
        reason = f"{type(chain[-1]).__name__}: {tail}"
    return where, reason if len(reason) <= 300 else reason[:297] + "..."


def _cut_data_file(text: str, prefix: str) -> str:
    """The one data file of the step's ``state`` whose size is the one TensorStore found
    short ("... not valid for value of size N"), relative to the step; '' if not exactly one."""
    size = re.search(r"not valid for value of size (\d+)", text)
    state = os.path.join(prefix, "state")
    if size is None or not os.path.isdir(state):
        return ""
    found = []
    for root, _, names in os.walk(state):
        if os.path.basename(root) == "d":
            found += [os.path.join(root, n) for n in names
                      if os.path.getsize(os.path.join(root, n)) == int(size.group(1))]
    return os.path.relpath(found[0], prefix) if len(found) == 1 else ""
