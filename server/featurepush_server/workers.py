"""Backfill worker processes of a `serve --processes` front: they validate, encode and write chunks.

A front that runs a Backfill reads the batch source and hands each chunk to these processes, which
reach the store owner over its socket as the fronts do; so a backfill's Python work spreads over several
cores while the owner only writes. They are forked, on the first backfill, from a fork server the front
starts with itself, and stop with their front.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import forkserver, get_context
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from .config import ServerConfig
from .runtime import CATALOG, SOCKET, process_stat

_LOGGER = logging.getLogger(__name__)
_P = ParamSpec("_P")
_T = TypeVar("_T")


# The most backfill workers a front runs unless `backfill_workers` sets the number. With rows files the
# owner is no longer what bounds a backfill, the workers' encoding is: on 16 cores a later backfill ran
# at 720,000-758,000 rows/s with eight against 593,000-691,000 with four (the owner's Python then 0.8 of
# a core). More would hold memory, a chunk's worth each, on every front that backfills.
MAX_WORKERS = 8


def worker_count(config: ServerConfig) -> int:
    """How many backfill workers a front runs: `backfill_workers`, else one per process, 2 to MAX_WORKERS.

    A worker waits for the owner's write of its chunk before taking the next, so with one worker the
    encoding and the write would take turns; two or more keep the owner busy while they encode.
    """
    return config.backfill_workers or min(max(config.processes, 2), MAX_WORKERS)


# What a worker imports before it takes work (`_start_worker` and the chunk loader), loaded once by the
# front's fork server. rocksdict stays out: a worker imports it after the fork, so no RocksDB state is
# copied from one process to another.
_PRELOAD = [
    "featurepush_server.workers",
    "featurepush_server.logs",
    "featurepush_server.core.backfill",
    "featurepush_server.core.materialize",
    "featurepush_server.core.offline_log",
    "featurepush_server.core.registry",
    "featurepush_server.core.stores.remote",
    "featurepush_server.core.tiles",
    "featurepush_server.core.views",
]


def backfill_workers(config: ServerConfig, runtime: Path) -> BackfillWorkers:
    """Worker processes for the front's backfills (`worker_count`), started as the first chunks come.

    They are forked from a fork server that the front starts now and that imports pyarrow, numpy and the
    core while the front serves, so a backfill's workers are up in milliseconds, not most of a second.
    """
    allowed = sorted({*config.post_processor_modules, *(Path(p).stem for p in config.definitions)})
    front = (os.getpid(), _started(os.getpid()))
    args = (
        str(runtime / SOCKET),
        str(runtime / CATALOG),
        allowed,
        config.log_level,
        config.log_format,
        front,
    )
    count = worker_count(config)
    # Forking a front would copy its gRPC threads' state; the fork server is a fresh interpreter that
    # never runs gRPC, spawned once, and stops once its front and its workers are gone (they hold its pipe).
    context: BaseContext = get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    try:
        forkserver.ensure_running()
    except OSError as e:
        # Backfills still run, their workers a fraction of a second slower to start.
        _LOGGER.warning("the backfill workers' fork server did not start (%s); workers start afresh", e)
        context = get_context("spawn")
    return BackfillWorkers(
        lambda: ProcessPoolExecutor(
            count,
            mp_context=context,
            initializer=_start_worker,
            initargs=args,
        ),
        processes=count,
    )


# Seconds a pool may sit without work before its processes stop; the next backfill starts them again.
IDLE_S = 120.0


class BackfillWorkers(Executor):
    """A pool of worker processes, started anew when one of its processes died and stopped when idle.

    A pool that lost a process (killed, out of memory) fails the chunks it held and refuses all later
    work; the backfill that was running ends UNAVAILABLE, and the next one gets a new pool. Each front of
    a many-core machine has its own pool, so idle ones stop after `idle_s` rather than hold their
    memory for good.
    """

    def __init__(self, start: Callable[[], ProcessPoolExecutor], idle_s: float = IDLE_S, processes: int = 1):
        self._start = start
        self._processes = processes
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self._idle_s = idle_s
        self._running = 0
        self._last_used = time.monotonic()
        self._closed = threading.Event()
        self._warming: list[Future[int]] = []
        threading.Thread(target=self._stop_when_idle, name="featurepush-backfill-idle", daemon=True).start()

    def start(self) -> None:
        """Start the worker processes now unless they run; returns at once, they start meanwhile."""
        with self._lock:
            if self._pool is not None and self._warming and all(map(_failed, self._warming)):
                # Every process died before it took work: nothing was submitted since to find out.
                _LOGGER.warning("backfill worker processes died as they started; starting them again")
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None
            if self._pool is None:
                self._new_pool()
            self._last_used = time.monotonic()

    @property
    def ready(self) -> bool:
        """Whether a worker process is up and took work (a pool's processes take a fraction of a second)."""
        with self._lock:
            return self._pool is not None and any(f.done() and not _failed(f) for f in self._warming)

    def _new_pool(self) -> ProcessPoolExecutor:
        """Start a pool and all its processes; called under the lock."""
        self._pool = self._start()
        # A pool starts a process per submit while none is idle, so with one submit per chunk they would
        # start one chunk read apart; each takes a fraction of a second to start, all at once is sooner.
        # The first of these to finish tells that a process is up.
        self._warming = [self._pool.submit(os.getpid) for _ in range(self._processes)]
        return self._pool

    def submit(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> Future[_T]:
        """Run `fn` in a worker, on a new pool if there is none or the current one is broken."""
        with self._lock:
            pool = self._pool or self._new_pool()
            try:
                future = pool.submit(fn, *args, **kwargs)
            except BrokenProcessPool:
                _LOGGER.warning("a backfill worker process died; starting the workers again")
                pool.shutdown(wait=False, cancel_futures=True)
                future = self._new_pool().submit(fn, *args, **kwargs)
            self._running += 1
            self._last_used = time.monotonic()
        future.add_done_callback(self._done)
        return future

    def _done(self, future: Future[Any]) -> None:
        with self._lock:
            self._running -= 1
            self._last_used = time.monotonic()

    @property
    def started(self) -> bool:
        """Whether worker processes may be running now."""
        return self._pool is not None

    def _stop_when_idle(self) -> None:
        while not self._closed.wait(min(self._idle_s / 4, 10.0)):
            with self._lock:
                idle = self._running == 0 and time.monotonic() - self._last_used >= self._idle_s
                pool, self._pool = (self._pool, None) if idle else (None, self._pool)
            if pool is not None:
                pool.shutdown(wait=False)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop the workers."""
        self._closed.set()
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=wait, cancel_futures=cancel_futures)


def _failed(future: Future[Any]) -> bool:
    """Whether a future ended without a result: raised, or cancelled (asking a cancelled one raises)."""
    return future.done() and (future.cancelled() or future.exception() is not None)


def _started(pid: int) -> int | None:
    """When a running process started (clock ticks after boot), None if it is gone or a zombie."""
    stat = process_stat(pid)
    return None if stat is None or stat[0] == "Z" else stat[2]


def _watch_front(pid: int, started: int | None) -> None:
    """Stop this worker, as SIGTERM would, once its front is gone (even killed with SIGKILL).

    The worker's parent is the fork server, which lives while any of its workers does (they hold its
    pipe), so the front itself is watched: by pid and start time, which a reused pid does not share.
    """

    def watch() -> None:
        while _started(pid) == started:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="featurepush-front-watch", daemon=True).start()


def _start_worker(
    socket_path: str,
    catalog_path: str,
    allowed: list[str],
    level: str,
    form: str,
    front: tuple[int, int | None],
) -> None:
    """Build the worker's loader over the owner's store; the worker stops once its front is gone."""
    from .core.backfill import ChunkLoader, install_worker_loader
    from .core.materialize import LatestRowWriter, Materializer
    from .core.offline_log import OfflineLogWriter
    from .core.registry import Registry
    from .core.stores.remote import CatalogVersion, RemoteStore
    from .core.tiles import TileWriter
    from .core.views import Views
    from .logs import configure

    configure(level, form)
    # The front stops its workers itself; a signal meant for its group must not cut a write short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _watch_front(*front)
    store = RemoteStore(Path(socket_path), CatalogVersion(Path(catalog_path)))
    registry = Registry(store, catalog_version=store.catalog.read)
    views = Views(store, registry, allowed, catalog_version=store.catalog.read)
    materializer = Materializer(store, [LatestRowWriter(store), OfflineLogWriter(), TileWriter(views, store)])
    install_worker_loader(ChunkLoader(registry, materializer))
    _LOGGER.debug("backfill worker ready")
