"""gradtel.logonce: one line per key and owner, however often and from however many threads it is asked for."""

from __future__ import annotations

import logging
import threading

import pytest

from gradtel.logonce import LogOnce

log = logging.getLogger("gradtel")


def test_each_key_is_logged_once_per_owner(caplog: pytest.LogCaptureFixture) -> None:
    first, second = LogOnce(), LogOnce()
    with caplog.at_level(logging.INFO, logger="gradtel"):
        said = []
        for what in ("reading", "writing"):
            said.append(first(log, logging.WARNING, "gradtel: %s failed", what))
        assert said == [True, False]  # the key is the format string: one line per call site
        assert first(log, logging.WARNING, "gradtel: metric %r dropped", "a", key="a")
        assert first(log, logging.WARNING, "gradtel: metric %r dropped", "b", key="b")
        assert not first(log, logging.WARNING, "gradtel: metric %r dropped", "a", key="a")
        assert second(log, logging.INFO, "gradtel: %s failed", "later")  # another owner, its own once
    assert caplog.messages == [
        "gradtel: reading failed",
        "gradtel: metric 'a' dropped",
        "gradtel: metric 'b' dropped",
        "gradtel: later failed",
    ]
    assert [r.levelno for r in caplog.records] == [logging.WARNING] * 3 + [logging.INFO]
    assert {r.funcName for r in caplog.records} == {"test_each_key_is_logged_once_per_owner"}  # the caller's line


def test_the_exception_is_attached(caplog: pytest.LogCaptureFixture) -> None:
    once = LogOnce()
    with caplog.at_level(logging.WARNING, logger="gradtel"):
        for _ in range(3):
            try:
                raise RuntimeError("boom")
            except RuntimeError:
                once(log, logging.WARNING, "gradtel: a collection failed (logged once).", exc_info=True)
    assert len(caplog.records) == 1
    assert caplog.records[0].exc_info[0] is RuntimeError and "RuntimeError: boom" in caplog.text


def test_concurrent_callers_log_one_line(caplog: pytest.LogCaptureFixture) -> None:
    once, start = LogOnce(), threading.Barrier(8)

    def call() -> None:
        start.wait()
        for _ in range(200):
            once(log, logging.WARNING, "gradtel: overflow")

    with caplog.at_level(logging.WARNING, logger="gradtel"):
        threads = [threading.Thread(target=call) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert caplog.messages == ["gradtel: overflow"]
