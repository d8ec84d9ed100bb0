"""Deleting online rows whose event time is older than their source's ttl, in the background."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from featurepush.v1 import source_pb2

from .periodic import Periodic
from .stores.base import Store
from .times import duration_micros

_LOGGER = logging.getLogger(__name__)


class ExpirySweeper:
    """Every `interval_s` seconds, deletes the rows that reads would report EXPIRED.

    Until a sweep reaches them such rows read as EXPIRED; after it, as MISSING. A row that a newer event
    replaced while the sweep ran is kept: the store re-reads each candidate under its write lock.
    """

    def __init__(self, store: Store, interval_s: float, tile_sweep: Callable[[], int] | None = None):
        self._store = store
        # Deletes the feature views' tiles outside every window (tiles.sweep_tiles).
        self._tile_sweep = tile_sweep
        # Rows deleted by this process's sweeps, for the operator.
        self.deleted = 0
        # Expired rows stay readable as EXPIRED, so a failed sweep only waits for the next one.
        self._sweeper = Periodic("featurepush-expiry", interval_s, self.sweep)

    def start(self) -> None:
        """Start sweeping in a background thread; an interval of zero never sweeps."""
        self._sweeper.start()

    def close(self) -> None:
        """Stop the background thread; a sweep in progress stops after the source it is on."""
        self._sweeper.stop()

    def sweep(self) -> int:
        """Delete every source's expired rows now; return how many were deleted."""
        deleted = 0
        now = time.time_ns() // 1000
        for name, source_id, raw in self._store.list_sources():
            if self._sweeper.stopping:
                break
            ttl = source_pb2.PushSource.FromString(raw).online_ttl
            ttl_micros = duration_micros(ttl)
            if ttl_micros > 0:
                n = self._store.delete_expired(source_id, now - ttl_micros)
                if n:
                    _LOGGER.info("deleted %d expired rows of %s", n, name)
                    self.deleted += n
                deleted += n
        if self._tile_sweep is not None and not self._sweeper.stopping:
            tiles = self._tile_sweep()
            if tiles:
                _LOGGER.info("deleted %d feature view tiles outside every window", tiles)
        return deleted
