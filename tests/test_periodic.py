"""The periodic background worker: it repeats, survives a failing round, stops, and can be turned off."""

from __future__ import annotations

import threading

import pytest

from featurepush_server.core.errors import Unavailable
from featurepush_server.core.periodic import Periodic


def test_repeats_past_a_failing_round_until_stopped(caplog: pytest.LogCaptureFixture) -> None:
    rounds: list[int] = []
    third = threading.Event()

    def work() -> None:
        rounds.append(len(rounds))
        if len(rounds) == 1:
            raise RuntimeError("first round breaks")
        if len(rounds) >= 3:
            third.set()

    worker = Periodic("test-periodic", 0.001, work)
    worker.start()
    assert third.wait(30)
    worker.stop()
    assert worker.stopping
    assert len(rounds) >= 3
    assert "test-periodic failed; will retry" in caplog.text


def test_an_interval_of_zero_never_runs() -> None:
    ran = threading.Event()
    worker = Periodic("never", 0, ran.set)
    worker.start()
    assert not ran.wait(0.05)
    worker.stop()


def test_an_expected_failure_is_one_line_without_a_traceback_once_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rounds: list[int] = []
    fifth = threading.Event()

    def work() -> None:
        rounds.append(len(rounds))
        if len(rounds) >= 5:
            fifth.set()
        raise Unavailable("the server cannot reach its Redis store")

    worker = Periodic("test-periodic", 0.001, work)
    worker.start()
    assert fifth.wait(30)
    worker.stop()
    failures = [r for r in caplog.records if r.name == "featurepush_server.core.periodic"]
    assert [(r.levelname, r.getMessage(), r.exc_info) for r in failures] == [
        ("WARNING", "test-periodic failed: the server cannot reach its Redis store; will retry", None)
    ]
    assert "Traceback" not in caplog.text


def test_an_unexpected_failure_keeps_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    failed = threading.Event()

    def work() -> None:
        failed.set()
        raise RuntimeError("a bug")

    worker = Periodic("test-periodic", 0.001, work)
    worker.start()
    assert failed.wait(30)
    worker.stop()
    assert "Traceback" in caplog.text and "RuntimeError: a bug" in caplog.text
