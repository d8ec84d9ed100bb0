"""The embedded online store: RocksDB (through rocksdict, raw bytes) holding sources and latest rows.

Key space, by first byte:
  s<name>                         a source: 4-byte source id, then the serialized PushSource
  r<source id><entity key>        a row: 8-byte event-time header, then the record's payload
  q<request id>                   an idempotency record: 8-byte time in ms, then the JSON counts
  o<sequence>                     an offline-log queue entry: 8-byte big-endian sequence number; the
                                  value is a 2-byte name length, the source name, then an Arrow IPC stream
  m<name>                         store metadata such as the next source id
  mlate_fields<source id>         the names, one per line, of fields added to a source holding rows
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import rocksdict

from .errors import Aborted

_LOGGER = logging.getLogger(__name__)

SOURCE = b"s"
ROW = b"r"
REQUEST = b"q"
META = b"m"
OFFLINE = b"o"
_NEXT_ID = META + b"next_source_id"
_NEXT_OFFLINE_SEQ = META + b"next_offline_seq"
_LATE_FIELDS = META + b"late_fields"


def row_prefix(source_id: int) -> bytes:
    """The key prefix of every row of one source."""
    return ROW + source_id.to_bytes(4, "big")


def _prefix_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key starting with `prefix`."""
    return prefix[:-1] + bytes([prefix[-1] + 1]) if prefix[-1] < 0xFF else _prefix_end(prefix[:-1]) + b"\x00"


def offline_key(seq: int) -> bytes:
    """The key of the offline-log queue entry with sequence number `seq`."""
    return OFFLINE + seq.to_bytes(8, "big")


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


@dataclass(frozen=True)
class WriteResult:
    """Counts per source; `replayed` when the request id was seen and nothing was written."""

    counts: dict[str, BatchCounts]
    replayed: bool = False


# What one latest-event index entry costs beyond its key's bytes: the dict slot, the key and header objects.
_INDEX_ENTRY_OVERHEAD = 120


class OnlineStore:
    """Sources and the latest row per entity in one RocksDB database.

    Thread-safe: writes hold one lock for their read-compare-write, so concurrent pushes to one entity
    never lose the newer value; the WAL sync happens after the lock is released so that concurrent
    writers share fsyncs. With `fsync=True` (the default) a write returns only once it is on disk; with
    False it survives a crash of the process but not of the machine.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        fsync: bool = True,
        idempotency_window_s: float = 600.0,
        latest_cache_entries: int = 1_000_000,
        latest_cache_bytes: int = 256 * 1024 * 1024,
    ):
        Path(path).mkdir(parents=True, exist_ok=True)
        options = rocksdict.Options(raw_mode=True)
        options.create_if_missing(True)
        options.set_max_background_jobs(2)
        # Bloom filters let a write's read of an entity never seen before skip the data blocks; a
        # block cache keeps hot rows' blocks in memory for reads.
        table = rocksdict.BlockBasedOptions()
        table.set_bloom_filter(10, False)
        table.set_block_cache(rocksdict.Cache(256 * 1024 * 1024))
        table.set_cache_index_and_filter_blocks(True)
        table.set_pin_l0_filter_and_index_blocks_in_cache(True)
        options.set_block_based_table_factory(table)
        # Raw mode reads and writes bytes only; the stubs describe the pickling mode, so keep this untyped.
        self._db: Any = rocksdict.Rdict(str(path), options)
        self._fsync = fsync
        self._window_ms = int(idempotency_window_s * 1000)
        self._lock = threading.RLock()
        self._writes_since_purge = 0
        # Entity key -> event-time header of its stored row ("" when absent), for keys this process has
        # read or written; every row write goes through write_latest under the lock, so it stays exact.
        # At most `latest_cache_entries` (about 150 bytes each); past that it starts over.
        self._latest: dict[bytes, bytes] = {}
        self._latest_max = latest_cache_entries
        # Keys are as long as callers make them, so the index is bounded by an estimate of its bytes too.
        self._latest_max_bytes = latest_cache_bytes
        self._latest_bytes = 0
        self._staged: dict[bytes, bytes] = {}
        # Source id -> how many times its definition was written by this process (-1: deleted).
        self._generations: dict[int, int] = {}
        raw_seq = self._db.get(_NEXT_OFFLINE_SEQ)
        self._next_offline_seq = int.from_bytes(raw_seq, "big") if raw_seq else 1
        self.path = Path(path)

    def close(self) -> None:
        """Flush and close the database."""
        with self._lock:
            self._db.flush_wal(True)
            self._db.close()

    def _sync(self) -> None:
        if self._fsync:
            self._db.flush_wal(True)

    # --- sources -------------------------------------------------------------------------------

    def get_source(self, name: str) -> tuple[int, bytes] | None:
        """The id and serialized definition of a source, or None."""
        raw = self._db.get(SOURCE + name.encode())
        if raw is None:
            return None
        return int.from_bytes(raw[:4], "big"), raw[4:]

    def list_sources(self, after: str = "", limit: int | None = None) -> Iterator[tuple[str, int, bytes]]:
        """Sources in name order, starting after `after`."""
        start = SOURCE + after.encode() + (b"\x00" if after else b"")
        n = 0
        for key, raw in self._db.items(from_key=start):
            if not key.startswith(SOURCE) or (limit is not None and n >= limit):
                return
            n += 1
            yield key[1:].decode(), int.from_bytes(raw[:4], "big"), raw[4:]

    def put_source(
        self,
        name: str,
        definition: bytes,
        source_id: int | None = None,
        *,
        invalidate: bool = True,
        late_fields: Sequence[str] = (),
    ) -> int:
        """Store a definition, allocating a new id when none is given; return the id.

        `invalidate` starts a new generation, so rows validated against the old definition are refused.
        `late_fields` replaces the source's fields that rows stored before them may lack.
        """
        with self._lock:
            wb = rocksdict.WriteBatch(raw_mode=True)
            if source_id is None:
                raw = self._db.get(_NEXT_ID)
                source_id = int.from_bytes(raw, "big") if raw else 1
                wb.put(_NEXT_ID, (source_id + 1).to_bytes(4, "big"))
            wb.put(SOURCE + name.encode(), source_id.to_bytes(4, "big") + definition)
            late_key = _LATE_FIELDS + source_id.to_bytes(4, "big")
            if late_fields:
                wb.put(late_key, "\n".join(late_fields).encode())
            else:
                wb.delete(late_key)
            self._db.write(wb)
            if invalidate:
                self._generations[source_id] = self._generations.get(source_id, 0) + 1
        self._sync()
        return source_id

    def late_fields(self, source_id: int) -> tuple[str, ...]:
        """The fields added to a source while it held rows, which rows stored before may lack."""
        raw = self._db.get(_LATE_FIELDS + source_id.to_bytes(4, "big"))
        return tuple(raw.decode().split("\n")) if raw else ()

    def exclusive(self) -> AbstractContextManager[bool]:
        """Hold off every row write, so a check of stored rows and a definition change are one step."""
        return self._lock

    def generation(self, source_id: int) -> int:
        """How many times this process has written the source's definition; -1 once it is deleted."""
        return self._generations.get(source_id, 0)

    def delete_source(self, name: str, source_id: int) -> int:
        """Delete a source and its rows; return how many rows there were."""
        prefix = row_prefix(source_id)
        with self._lock:
            rows = sum(1 for _ in self._keys_with_prefix(prefix))
            wb = rocksdict.WriteBatch(raw_mode=True)
            wb.delete(SOURCE + name.encode())
            wb.delete(_LATE_FIELDS + source_id.to_bytes(4, "big"))
            wb.delete_range(prefix, _prefix_end(prefix))
            self._db.write(wb)
            self._latest.clear()
            self._generations[source_id] = -1
        self._sync()
        return rows

    def _keys_with_prefix(self, prefix: bytes) -> Iterator[bytes]:
        for key in self._db.keys(from_key=prefix):
            if not key.startswith(prefix):
                return
            yield key

    def has_rows(self, source_id: int) -> bool:
        """Whether a source holds any online row."""
        return next(self._keys_with_prefix(row_prefix(source_id)), None) is not None

    def delete_expired(self, source_id: int, cutoff_micros: int, chunk: int = 10_000) -> int:
        """Delete the source's rows whose event time is before `cutoff_micros`; return how many."""
        prefix = row_prefix(source_id)
        cutoff = (cutoff_micros + (1 << 63)).to_bytes(8, "big")
        deleted = 0
        candidates: list[bytes] = []
        for key, value in self._db.items(from_key=prefix):
            if not key.startswith(prefix):
                break
            if value[:8] < cutoff:
                candidates.append(key)
                if len(candidates) >= chunk:
                    deleted += self._delete_if_older(candidates, cutoff)
                    candidates = []
        if candidates:
            deleted += self._delete_if_older(candidates, cutoff)
        return deleted

    def _delete_if_older(self, keys: list[bytes], cutoff: bytes) -> int:
        """Delete those of `keys` whose stored row is still older than `cutoff`, under the write lock."""
        with self._lock:
            # Read again under the lock: a newer event may have landed since the scan saw the row.
            stale = [
                k for k, v in zip(keys, self._db.get(keys), strict=True) if v is not None and v[:8] < cutoff
            ]
            if stale:
                wb = rocksdict.WriteBatch(raw_mode=True)
                for key in stale:
                    wb.delete(key)
                    self._latest[key] = b""
                self._db.write(wb)
        return len(stale)

    # --- rows ----------------------------------------------------------------------------------

    def read(self, keys: list[bytes]) -> list[bytes | None]:
        """Stored values of the keys, None where absent."""
        if not keys:
            return []
        values: list[bytes | None] = self._db.get(keys)
        return values

    def write_latest(
        self, batches: Sequence[RowBatch], *, request_id: str = "", dry_run: bool = False
    ) -> WriteResult:
        """Write each row unless a newer event of its entity is stored or later in the batch; atomically."""
        with self._lock:
            for batch in batches:
                # Checked under the lock that orders definition writes and row writes.
                if batch.source_id is not None and self.generation(batch.source_id) != batch.generation:
                    raise Aborted(
                        f"push source {batch.source!r} was changed or deleted while these records were "
                        "validated; nothing was written, send them again",
                        reason="SOURCE_CHANGED",
                        metadata={"source": batch.source},
                    )
            seen = self._seen_request(request_id) if request_id else None
            if seen is None:
                wb = rocksdict.WriteBatch(raw_mode=True)
                counts = {batch.source: self._stage_latest(batch, wb) for batch in batches}
                if not dry_run:
                    self._stage_offline(batches, wb)
                if request_id and not dry_run:
                    record = {s: [c.accepted, c.written, c.superseded] for s, c in counts.items()}
                    now_ms = int(time.time() * 1000).to_bytes(8, "big")
                    wb.put(REQUEST + request_id.encode(), now_ms + json.dumps(record).encode())
                    self._writes_since_purge += 1
                try:
                    if not dry_run and not wb.is_empty():
                        self._db.write(wb)
                        self._latest.update(self._staged)
                finally:
                    self._staged.clear()
                if self._writes_since_purge >= 1000:
                    self._purge_requests()
        if seen is not None:
            # The first request may still be syncing; the replay must not be acknowledged before it.
            self._sync()
            return WriteResult(seen, replayed=True)
        if not dry_run:
            self._sync()
        return WriteResult(counts)

    def _stage_latest(self, batch: RowBatch, wb: rocksdict.WriteBatch) -> BatchCounts:
        keys, values = batch.keys, batch.values
        accepted = len(keys)
        heads = [v[:8] for v in values]
        if len(set(keys)) != len(keys):
            # Several events for one entity in a batch: keep the newest, the later one on a tie.
            best: dict[bytes, int] = {}
            for i, key in enumerate(keys):
                j = best.get(key)
                if j is None or heads[i] >= heads[j]:
                    best[key] = i
            order = sorted(best.values())
            keys = [keys[i] for i in order]
            values = [values[i] for i in order]
            heads = [heads[i] for i in order]
        # Event-time headers of stored rows come from memory when this process has seen the key.
        cache = self._latest
        if len(cache) > self._latest_max or self._latest_bytes > self._latest_max_bytes:
            cache.clear()
            self._latest_bytes = 0
        misses = [key for key in keys if key not in cache]
        if misses:
            found = [b"" if old is None else old[:8] for old in self._db.get(misses)]
            cache.update(zip(misses, found, strict=True))
            self._latest_bytes += sum(map(len, misses)) + len(misses) * _INDEX_ENTRY_OVERHEAD
        # Headers order like event times; an equal time replaces, so a correction can land.
        newer = [i for i, (head, key) in enumerate(zip(heads, keys, strict=True)) if head >= cache[key]]
        put = wb.put
        for i in newer:
            put(keys[i], values[i])
        self._staged.update((keys[i], heads[i]) for i in newer)
        return BatchCounts(accepted, len(newer), accepted - len(newer))

    def _stage_offline(self, batches: Sequence[RowBatch], wb: rocksdict.WriteBatch) -> None:
        """Queue the batches' offline records; called under the lock, so sequence numbers only grow."""
        staged = False
        for batch in batches:
            if batch.offline:
                name = batch.source.encode()
                entry = len(name).to_bytes(2, "big") + name + batch.offline
                wb.put(offline_key(self._next_offline_seq), entry)
                self._next_offline_seq += 1
                staged = True
        if staged:
            # Persisted with the entries so that a sequence number, which names log files, is never reused.
            wb.put(_NEXT_OFFLINE_SEQ, self._next_offline_seq.to_bytes(8, "big"))

    # --- offline-log queue ---------------------------------------------------------------------

    def queued_offline(self, max_bytes: int, last_seq: int | None = None) -> list[QueuedRecords]:
        """Queue entries from the oldest, up to about `max_bytes` (at least one) or through `last_seq`."""
        out: list[QueuedRecords] = []
        total = 0
        for key, raw in self._db.items(from_key=OFFLINE):
            # Raw mode yields bytes; the checks narrow rocksdict's wider annotation.
            if not isinstance(key, bytes) or not isinstance(raw, bytes) or not key.startswith(OFFLINE):
                break
            seq = int.from_bytes(key[1:], "big")
            if last_seq is not None and seq > last_seq:
                break
            if last_seq is None and out and total + len(raw) > max_bytes:
                break
            n = int.from_bytes(raw[:2], "big")
            out.append(QueuedRecords(seq, raw[2 : 2 + n].decode(), raw[2 + n :]))
            total += len(raw)
        return out

    def delete_offline(self, first_seq: int, last_seq: int) -> None:
        """Drop the queue entries from `first_seq` through `last_seq`, durably."""
        wb = rocksdict.WriteBatch(raw_mode=True)
        wb.delete_range(offline_key(first_seq), offline_key(last_seq + 1))
        with self._lock:
            self._db.write(wb)
        self._sync()

    def _seen_request(self, request_id: str) -> dict[str, BatchCounts] | None:
        raw = self._db.get(REQUEST + request_id.encode())
        if raw is None:
            return None
        if int(time.time() * 1000) - int.from_bytes(raw[:8], "big") > self._window_ms:
            return None
        return {s: BatchCounts(*c) for s, c in json.loads(raw[8:]).items()}

    def _purge_requests(self) -> None:
        """Drop idempotency records older than the window; called under the lock."""
        cutoff = int(time.time() * 1000) - self._window_ms
        wb = rocksdict.WriteBatch(raw_mode=True)
        for key, raw in self._db.items(from_key=REQUEST):
            if not key.startswith(REQUEST):
                break
            if int.from_bytes(raw[:8], "big") < cutoff:
                wb.delete(key)
        if not wb.is_empty():
            self._db.write(wb)
        self._writes_since_purge = 0
