"""What an operator asks of a server: version, uptime, storage, offline-log lag and rows per source."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from .errors import Cancelled
from .offline_log import OfflineLog
from .stores.base import Store

# Rows counted per source unless an exact count is asked for: RocksDB only estimates the keys of the
# whole database, so rows are counted by reading keys, and this bound keeps a status call quick however
# large a source grows.
ROW_COUNT_LIMIT = 100_000
# The store statistics whose sum is its size: table files on disk, and memory tables not yet flushed.
SIZE_STATISTICS = ("rocksdb.total-sst-files-size", "rocksdb.size-all-mem-tables")


@dataclass(frozen=True)
class SourceRows:
    """One source's online rows: `rows` is a lower bound unless `exact`."""

    name: str
    rows: int
    exact: bool


@dataclass(frozen=True)
class ServerStatus:
    """A snapshot of the server's state; `store_bytes` is 0 where the backend does not report its size."""

    version: str
    uptime_s: float
    writes_accepted: bool
    store_bytes: int
    offline_lag_s: float
    offline_queued: int
    sources: list[SourceRows]
    store_warnings: list[str]


class StatusReporter:
    """Builds ServerStatus snapshots from the store and the offline log; thread-safe, as they are."""

    def __init__(self, version: str, store: Store, offline_log: OfflineLog | None):
        self._version = version
        self._store = store
        self._offline_log = offline_log
        self._started = time.monotonic()

    def report(self, *, exact: bool = False, stop: Callable[[], bool] = lambda: False) -> ServerStatus:
        """The state now; rows are counted up to ROW_COUNT_LIMIT per source unless `exact`."""
        limit = None if exact else ROW_COUNT_LIMIT
        sources = []
        for name, source_id, _ in self._store.list_sources():
            # An exact count may read millions of keys per source: a caller that gave up stops it here.
            if stop():
                raise Cancelled("the status call ended before every source's rows were counted")
            rows = self._store.count_rows(source_id, None if limit is None else limit + 1)
            at_limit = limit is not None and rows > limit
            sources.append(SourceRows(name, min(rows, limit) if limit is not None else rows, not at_limit))
        sizes = [self._store.statistic(name) for name in SIZE_STATISTICS]
        log = self._offline_log
        return ServerStatus(
            version=self._version,
            uptime_s=time.monotonic() - self._started,
            writes_accepted=self._store.writable,
            store_bytes=sum(s for s in sizes if s is not None),
            offline_lag_s=log.lag_seconds() if log is not None else 0.0,
            offline_queued=self._store.count_offline(limit),
            sources=sources,
            store_warnings=self._store.setup_warnings(),
        )
