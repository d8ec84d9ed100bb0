"""The periodic background worker: it repeats, survives a failing round, stops, and can be turned off."""

from __future__ import annotations

import threading

import pytest

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
