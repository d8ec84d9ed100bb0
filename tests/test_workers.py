"""Backfill worker pools: real worker processes, stopped when idle and started again on demand."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import active_children, get_context
from pathlib import Path

import pytest
from servers import wait_until

from featurepush_server import workers as workers_module
from featurepush_server.config import MAX_BACKFILL_WORKERS, ConfigError, ServerConfig, load_config
from featurepush_server.workers import MAX_WORKERS, BackfillWorkers, backfill_workers, worker_count


def _pool() -> ProcessPoolExecutor:
    return ProcessPoolExecutor(1, mp_context=get_context("spawn"))


def test_an_idle_pool_stops_its_processes_and_the_next_work_starts_them_again() -> None:
    workers = BackfillWorkers(_pool, idle_s=0.5)
    try:
        assert not workers.started
        first = workers.submit(os.getpid).result(timeout=60)
        assert first != os.getpid() and workers.started
        assert wait_until(lambda: not workers.started, 30)
        second = workers.submit(os.getpid).result(timeout=60)
        assert second not in (first, os.getpid())
    finally:
        workers.shutdown()
    assert not workers.started


def test_a_pool_with_work_in_flight_is_not_stopped() -> None:
    workers = BackfillWorkers(_pool, idle_s=0.2)
    try:
        # The work outlasts the idle time several times over; until it is done the pool stays.
        pending = workers.submit(_sleep_then_pid, 3.0)
        threading.Event().wait(1.0)
        assert not pending.done() and workers.started
        assert pending.result(timeout=60) != os.getpid()
    finally:
        workers.shutdown()


def _sleep_then_pid(seconds: float) -> int:
    import time

    time.sleep(seconds)
    return os.getpid()


def _three() -> ProcessPoolExecutor:
    return ProcessPoolExecutor(3, mp_context=get_context("spawn"))


def test_a_new_pool_starts_all_its_processes_with_the_first_work() -> None:
    workers = BackfillWorkers(_three, processes=3)
    try:
        before = {p.pid for p in active_children()}
        workers.submit(os.getpid).result(timeout=60)
        # One submit, yet every process of the pool is up: later chunks find them ready.
        assert wait_until(lambda: len({p.pid for p in active_children()} - before) == 3, 30)
    finally:
        workers.shutdown()


def test_started_workers_come_up_without_work_and_tell_when_one_is_ready() -> None:
    workers = BackfillWorkers(_three, processes=3)
    try:
        before = {p.pid for p in active_children()}
        assert not workers.ready and not workers.started
        workers.start()
        assert workers.started
        assert wait_until(lambda: workers.ready, 60)
        assert wait_until(lambda: len({p.pid for p in active_children()} - before) == 3, 30)
        workers.start()  # running already: nothing more starts
        assert len({p.pid for p in active_children()} - before) == 3
    finally:
        workers.shutdown()
    assert not workers.ready


def _die() -> None:
    os._exit(1)


def test_a_pool_whose_processes_died_before_taking_work_is_started_again() -> None:
    pools: list[ProcessPoolExecutor] = []

    def start() -> ProcessPoolExecutor:
        # The first pool's processes exit as they start (killed, out of memory); later ones work.
        initializer = _die if not pools else None
        pools.append(ProcessPoolExecutor(3, mp_context=get_context("spawn"), initializer=initializer))
        return pools[-1]

    workers = BackfillWorkers(start, processes=3)
    try:
        workers.start()
        # Nothing was submitted that would find the pool broken: readiness must not wait on it for ever.
        assert wait_until(lambda: len(pools) == 1 and not workers.ready and _all_failed(workers), 60)
        workers.start()
        assert len(pools) == 2 and wait_until(lambda: workers.ready, 60)
        assert workers.submit(os.getpid).result(timeout=60) != os.getpid()
    finally:
        workers.shutdown()


def _all_failed(workers: BackfillWorkers) -> bool:
    return all(f.done() and f.exception() is not None for f in workers._warming)


def test_a_front_runs_two_to_eight_backfill_workers_unless_told_how_many() -> None:
    assert worker_count(ServerConfig(processes=1)) == 2
    assert worker_count(ServerConfig(processes=3)) == 3
    assert worker_count(ServerConfig(processes=4)) == 4
    assert worker_count(ServerConfig(processes=16)) == MAX_WORKERS == 8
    assert worker_count(ServerConfig(processes=16, backfill_workers=12)) == 12
    assert worker_count(load_config(env={"FEATUREPUSH_BACKFILL_WORKERS": "6"})) == 6
    with pytest.raises(ConfigError, match="backfill_workers must not be negative"):
        ServerConfig(backfill_workers=-1)
    assert worker_count(ServerConfig(backfill_workers=MAX_BACKFILL_WORKERS)) == MAX_BACKFILL_WORKERS
    with pytest.raises(ConfigError, match=f"backfill_workers must be at most {MAX_BACKFILL_WORKERS}, not 65"):
        ServerConfig(backfill_workers=65)


def test_workers_start_afresh_where_the_fork_server_cannot_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse() -> None:
        raise OSError("no more processes")

    monkeypatch.setattr(workers_module.forkserver, "ensure_running", refuse)
    workers = backfill_workers(ServerConfig(processes=2), tmp_path)
    try:
        assert workers.submit(os.getpid).result(60) != os.getpid()
    finally:
        workers.shutdown()
    assert "fork server did not start (no more processes)" in caplog.text
