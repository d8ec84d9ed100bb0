"""What the core asks of a store: small protocols split by concern, and the values they exchange.

The core (registry, ingest, backfill, online reads, the offline log, the ttl sweep) types its store by
these protocols only. A backend implements them all in one module of this package and keeps its key
layout to itself; the stored value a row holds is framed by `framing.py`, whatever the backend.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, overload

import numpy as np
import pyarrow as pa

from ..errors import FailedPrecondition


class BinaryColumn(Sequence[bytes]):
    """Byte strings held in an Arrow binary array, made Python objects only when they are read.

    A rows file's values reach the store owner so: it reads their event-time headers (`prefixes`) and
    needs the values themselves only where it writes the rows instead of ingesting the file.
    """

    def __init__(self, array: pa.Array):
        self._array = array
        self._items: list[bytes] | None = None

    def __len__(self) -> int:
        return len(self._array)

    @overload
    def __getitem__(self, index: int) -> bytes: ...

    @overload
    def __getitem__(self, index: slice) -> list[bytes]: ...

    def __getitem__(self, index: int | slice) -> bytes | list[bytes]:
        return self.items()[index]

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.items())

    def items(self) -> list[bytes]:
        """Every byte string, made once in Arrow's C++ code."""
        if self._items is None:
            self._items = self._array.to_numpy(zero_copy_only=False).tolist()
        return self._items

    def prefix_items(self, n: int) -> np.ndarray | None:
        """The first `n` bytes (n >= 1) of each byte string as numpy items that wide; None if one is shorter.

        Read from the array's buffers in one numpy step, a window of `n` bytes at each start, where a slice
        per item cost the store owner three times as much.
        """
        array = self._array
        count = len(array)
        width = np.dtype(f"V{n}")
        if not count:
            return np.empty(0, dtype=width)
        buffers = array.buffers()
        starts = np.frombuffer(buffers[1], dtype="<i4", count=count + 1, offset=array.offset * 4)
        if int((starts[1:] - starts[:-1]).min()) < n:
            return None
        data = buffers[2]
        windows = np.ndarray((data.size - n + 1,), dtype=width, buffer=data, strides=(1,))
        items: np.ndarray = windows[starts[:-1]]
        return items

    def prefixes(self, n: int) -> list[bytes]:
        """The first `n` bytes of each byte string (all of it where one is shorter)."""
        items = self.prefix_items(n)
        # Fixed-width void items become bytes whole; numpy's bytes type would drop trailing zero bytes.
        found: list[bytes] = [item[:n] for item in self.items()] if items is None else items.tolist()
        return found


# A store's count of rows files (RowBatch.rows_file) it took whole, asked of `Store.statistic`.
ROWS_FILES_INGESTED = "featurepush.rows-files-ingested"
# ...and of those whose rows it wrote through its write batch instead, while compactions were behind.
ROWS_FILES_DEFERRED = "featurepush.rows-files-deferred"


@dataclass(frozen=True)
class RowBatch:
    """One source's encoded rows for a write: keys and values (event-time header, then payload).

    `offline` is the batch's records as an Arrow IPC stream when they also go to the offline log; it is
    queued in the same atomic write as the rows, so an acknowledged record is never missing from the log.
    """

    source: str
    keys: Sequence[bytes]
    values: Sequence[bytes]
    offline: bytes = b""
    # The source's id and the definition generation the rows were validated against; a write whose
    # source changed or went away since is refused whole. No id: not checked.
    source_id: int | None = None
    generation: int = 0
    # The stream feature views' tile updates of these records, merged in the same atomic write.
    tiles: Sequence[TileUpdate] = ()
    # The name of a file from the store's `rows_file` holding these rows, which the store may take whole
    # instead of writing them row by row; it is the store's to delete once the write is done either way.
    rows_file: str = ""


@dataclass(frozen=True)
class QueuedRecords:
    """One offline-log queue entry: its sequence number, source name and records as an Arrow IPC stream."""

    seq: int
    source: str
    arrow_ipc: bytes


@dataclass(frozen=True)
class BatchCounts:
    """What a write did with one source's rows."""

    accepted: int
    written: int
    superseded: int
    # The most records any one feature view of the source skipped: older than its longest window, or
    # before its backfill watermark.
    late_skipped: int = 0


@dataclass(frozen=True)
class WriteResult:
    """Counts per source; `replayed` when the request id was seen and nothing was written."""

    counts: dict[str, BatchCounts]
    replayed: bool = False
    # On a replay, the fingerprint of the records the request id was first written with ("" where the
    # record has none: written without one, or by a store format before fingerprints).
    fingerprint: str = ""


@dataclass(frozen=True)
class TileMerge:
    """What a tile update puts: tile keys and merged values, the view's new state, and records skipped."""

    keys: Sequence[bytes]
    values: Sequence[bytes]
    state: bytes | None
    skipped: int = 0


class TileUpdate(Protocol):
    """One feature view's partial aggregates of a batch, merged into the stored tiles by the store."""

    @property
    def view(self) -> str:
        """The view name, for errors."""

    @property
    def view_id(self) -> int:
        """The view's store id."""

    @property
    def generation(self) -> int:
        """The view definition generation the update was computed against."""

    def merge(self, state: bytes | None, read: Callable[[list[bytes]], list[bytes | None]]) -> TileMerge:
        """Merge into the stored tiles; `state` is the view's stored state, `read` reads stored blocks.

        Called under the store's write lock, so the read, the merge and the write are one step.
        """


def block_tile_count(block: bytes) -> int:
    """How many tiles a stored block of a view holds: its first four bytes say, big-endian."""
    return int.from_bytes(block[:4], "big")


class StoreFormatError(FailedPrecondition):
    """A data directory was written in a store format this build does not read; raised when opening it."""

    reason = "STORE_FORMAT"


class StoreInUse(FailedPrecondition):
    """Another process holds the store open; raised when opening it. `pid` is that process, if known."""

    reason = "DATA_DIR_IN_USE"

    def __init__(self, path: Path, pid: int | None):
        holder = f"pid {pid}" if pid is not None else "pid unknown"
        super().__init__(
            f"data directory {path} is in use by another featurepush process ({holder}); "
            "stop that one or serve another data directory",
            metadata={"path": str(path), "pid": str(pid or "")},
        )
        self.path = path
        self.pid = pid


class SourceCatalog(Protocol):
    """Source definitions by name, each with a store-assigned id and a per-process generation."""

    def get_source(self, name: str) -> tuple[int, bytes] | None:
        """The id and serialized definition of a source, or None."""

    def list_sources(self, after: str = "", limit: int | None = None) -> Iterator[tuple[str, int, bytes]]:
        """Sources in name order, starting after `after`."""

    def put_source(
        self,
        name: str,
        definition: bytes,
        source_id: int | None = None,
        *,
        invalidate: bool = True,
        late_fields: Sequence[str] = (),
    ) -> int:
        """Store a definition under its id, or a new one; return the id. `invalidate`: a new generation.

        `late_fields` replaces the source's fields that rows stored before them may lack (read as null).
        """

    def late_fields(self, source_id: int) -> tuple[str, ...]:
        """The fields added to a source while it held rows, which rows stored before may lack."""

    def delete_source(self, name: str, source_id: int) -> int:
        """Delete a source and its rows; return how many rows there were."""

    def generation(self, source_id: int) -> int:
        """How many times this process has written the source's definition; -1 once it is deleted."""

    def exclusive(self) -> AbstractContextManager[None]:
        """Hold off every row write, so a check of stored rows and a definition change are one step."""


class LatestRows(Protocol):
    """The latest row per entity, written atomically across sources with latest-by-event-time semantics."""

    def row_prefix(self, source_id: int) -> bytes:
        """The prefix of every row key of one source; a row's key is this, then its entity key bytes."""

    def write_latest(
        self,
        batches: Sequence[RowBatch],
        *,
        request_id: str = "",
        fingerprint: str = "",
        dry_run: bool = False,
        replace: str = "",
    ) -> WriteResult:
        """Write each row unless a newer event of its entity is stored or later in the batch; atomically.

        The same write queues the batches' offline records and, with a `request_id`, records the counts
        and the records' `fingerprint` so that the request sent again is answered from them without
        writing (see IdempotencyRecords); the answer carries the recorded fingerprint. A recorded request
        whose fingerprint is `replace` is written as if unseen, its record replaced, in the same step.
        """

    def rows_file(self, keys: Sequence[bytes], values: Sequence[bytes]) -> str:
        """Write a large batch's rows to a file `write_latest` may take whole; "" where the store takes none.

        Called by whoever encoded the rows, before the write, so that the sorting and the file's building
        run there (a backfill worker) and the write itself costs the store little per row.
        """

    def read(self, keys: list[bytes]) -> list[bytes | None]:
        """Stored values of the keys, None where absent."""

    def delete_expired(self, source_id: int, cutoff_micros: int) -> int:
        """Delete the source's rows whose event time is before `cutoff_micros`; return how many."""

    def has_rows(self, source_id: int) -> bool:
        """Whether a source holds any row."""

    def count_rows(self, source_id: int, limit: int | None = None) -> int:
        """How many rows a source holds, counting no further than `limit` (None: every row)."""


class IdempotencyRecords(Protocol):
    """Request ids seen within a window, with the counts of their write; recorded by `write_latest`."""

    def seen_request(self, request_id: str) -> dict[str, BatchCounts] | None:
        """The counts recorded for a request id still within the window, or None."""

    def purge_requests(self) -> int:
        """Drop the records older than the window; return how many."""


class OfflineQueue(Protocol):
    """Offline-log entries in sequence order, queued by `write_latest` and dropped once flushed."""

    @property
    def drain_lease_s(self) -> float | None:
        """How long a drainer's lease lasts where servers take turns draining; None where one process does."""

    def hold_drain(self) -> bool:
        """Renew this server's drain lease where servers take turns; False once another holds it."""

    def queued_offline(self, max_bytes: int, last_seq: int | None = None) -> list[QueuedRecords]:
        """Queue entries from the oldest, up to about `max_bytes` (at least one) or through `last_seq`."""

    def delete_offline(self, first_seq: int, last_seq: int) -> None:
        """Drop the queue entries from `first_seq` through `last_seq`, durably."""

    def count_offline(self, limit: int | None = None) -> int:
        """How many entries are queued, counting no further than `limit` (None: every entry)."""


class TileStore(Protocol):
    """Stream feature views, feature services and the views' time tiles, written by `write_latest`.

    Tiles are stored in blocks, an entity's tiles of consecutive intervals in one value (core/tiles.py
    Codec says which and how). A block's key is `tile_key(view id, entity key, block start)`; the blocks
    of one entity sort by start. A block's value begins with its tile count (4 bytes big-endian), which
    is all a backend reads of it: the counts that `delete_view` and `delete_tiles_before` return.
    """

    def get_view(self, name: str) -> tuple[int, bytes] | None:
        """The id and serialized definition of a view, or None."""

    def list_views(self, after: str = "", limit: int | None = None) -> Iterator[tuple[str, int, bytes]]:
        """Views in name order, starting after `after`."""

    def put_view(self, name: str, definition: bytes, view_id: int | None = None, *, invalidate: bool) -> int:
        """Store a view definition under its id, or a new one; return the id."""

    def delete_view(self, name: str, view_id: int) -> int:
        """Delete a view, its state and its tiles; return how many tiles there were."""

    def view_generation(self, view_id: int) -> int:
        """How many times this process has written the view's definition incompatibly; -1 once deleted."""

    def has_tiles(self, view_id: int) -> bool:
        """Whether a view holds any tile."""

    def get_service(self, name: str) -> bytes | None:
        """The serialized definition of a feature service, or None."""

    def list_services(self, after: str = "", limit: int | None = None) -> Iterator[tuple[str, bytes]]:
        """Feature services in name order, starting after `after`."""

    def put_service(self, name: str, definition: bytes) -> None:
        """Store a feature service definition."""

    def delete_service(self, name: str) -> None:
        """Delete a feature service definition."""

    def tile_key(self, view_id: int, entity: bytes, start_micros: int) -> bytes:
        """The key of one entity's block of tiles starting at `start_micros`."""

    def tile_keys(self, view_id: int, entities: Sequence[bytes], starts: np.ndarray) -> list[bytes]:
        """The keys of each entity's block starting at the matching start (int64 microseconds)."""

    def read_tiles(self, keys: list[bytes]) -> list[bytes | None]:
        """Stored blocks of the keys, None where absent."""

    def scan_tiles(
        self, view_id: int, entities: Sequence[bytes], first_micros: int, last_micros: int
    ) -> tuple[list[int], np.ndarray, list[bytes]]:
        """Each entity's blocks with starts in [first_micros, last_micros], entity by entity, by start.

        Returns how many blocks each entity has, their starts (int64) and their values.
        """

    def view_state(self, view_id: int) -> bytes | None:
        """The view's stored state (its watermark and backfilled ranges), or None."""

    def update_view_state(self, view_id: int, change: Callable[[bytes | None], bytes | None]) -> bytes | None:
        """Replace the view's state by `change(state)` atomically; return the new state.

        `change` may run more than once, on newer states, where the store compares and sets.
        """

    def delete_tiles_before(self, view_id: int, start_micros: int) -> int:
        """Delete the view's blocks that start before `start_micros`; return how many tiles they held."""


class Store(SourceCatalog, LatestRows, IdempotencyRecords, OfflineQueue, TileStore, Protocol):
    """A whole backend: the five concerns, plus disk-error recovery and a draining close."""

    @property
    def writable(self) -> bool:
        """Whether writes are accepted: False after a storage error until `recover()` succeeds."""

    def watch_writable(self, callback: Callable[[bool], None]) -> None:
        """Call `callback(writable)` whenever writes stop or start being accepted."""

    def recover(self, timeout_s: float = 5.0) -> bool:
        """After a storage error, try to take writes again; return whether writable."""

    def statistic(self, name: str) -> int | None:
        """A backend statistic by name (RocksDB's integer properties), or None where it has none."""

    def setup_warnings(self) -> list[str]:
        """What the operator should fix in the store's setup, as last found; empty when nothing."""

    def sync_now(self) -> None:
        """Make acknowledged writes durable now if that can be done at once; for a last step before exit."""

    def close(self, timeout_s: float = 10.0) -> bool:
        """Turn new calls away, wait up to `timeout_s` for running ones, then close; False if some ran on."""
