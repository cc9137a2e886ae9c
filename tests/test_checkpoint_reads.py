"""Orbax's abandoned reads of a damaged checkpoint stay quiet (the error is reported once, by
the restore), while every other asyncio failure is still logged."""

import logging

from jaxtune.checkpoint_reads import _not_an_unretrieved_orbax_failure


def _record(exc: BaseException) -> logging.LogRecord:
    return logging.LogRecord("asyncio", logging.ERROR, __file__, 1,
                             "Future exception was never retrieved\nfuture: <Future>", None,
                             (type(exc), exc, exc.__traceback__))


def test_a_tensorstore_read_error_set_on_a_plain_future_is_dropped():
    # set_exception from TensorStore's native thread: no Python frame, an absl status text
    exc = ValueError('FAILED_PRECONDITION: Error reading "opt_state.1.nu/0.0" in OCDBT '
                     'database at local file "ckpt/6/state/": Truncated Zstd-compressed stream')
    assert not _not_an_unretrieved_orbax_failure(_record(exc))


def test_other_unretrieved_failures_are_still_logged():
    try:
        raise ValueError("FAILED_PRECONDITION: Error reading something of the user's")
    except ValueError as e:  # raised in Python (a traceback): not TensorStore's native error
        assert _not_an_unretrieved_orbax_failure(_record(e))
    assert _not_an_unretrieved_orbax_failure(_record(ValueError("a user's task failed")))
    other = logging.LogRecord("asyncio", logging.ERROR, __file__, 1, "Task was destroyed",
                              None, None)
    assert _not_an_unretrieved_orbax_failure(other)
