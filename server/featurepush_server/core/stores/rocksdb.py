"""The embedded store: RocksDB (through rocksdict, raw bytes) holding sources, latest rows, idempotency
records and the offline-log queue. This module alone knows the key layout.

Key space, by first byte:
  s<name>                         a source: 4-byte source id, then the serialized PushSource
  r<source id><entity key>        a row: its stored value, framed as `framing.py` says
  q<request id>                   an idempotency record: 8-byte time in ms, then the JSON counts per
                                  source and, under "#", the fingerprint of the request's records
  t<time><request id>             the same record's entry in the expiry index: 8-byte time in ms (the
                                  record's), empty value; purges walk it oldest first
  o<sequence>                     an offline-log queue entry: 8-byte big-endian sequence number; the
                                  value is a 2-byte name length, the source name, then an Arrow IPC stream
  m<name>                         store metadata such as the next source id and the format version
  mlate_fields<source id>         the names, one per line, of fields added to a source holding rows
  v<name>                         a stream feature view: 4-byte view id, then the StreamFeatureView
  w<name>                         a feature service: the serialized FeatureService
  a<view id><entity><start>       a block of a view's tiles: 4-byte view id, the entity key with a varint
                                  length before it, the block's start in microseconds plus 2^63 as 8
                                  bytes big-endian; the value is the block's tile count (4 bytes
                                  big-endian), then its tiles' partial aggregates (core/tiles.py Codec)
  mview_state<view id>            a view's state: its watermark and backfilled ranges (core/tiles.py)

The format version (`m` + "format_version", 4 bytes big-endian) is written when the database is
created. A database holding another version is refused at open with StoreFormatError. A database with
data but no version was written before the version existed, in format 1 (UNVERSIONED_FORMAT).
Format 2 added the row's columns to every stored value (`framing.py`); format 3 keeps a view's tiles in
blocks of consecutive intervals instead of one key per tile; format 4 keeps each tile's squared deviations
from its mean, negated, where format 3 kept the sum of squares (core/tiles.py Codec reads both), and adds
the records' fingerprint to idempotency records (records without one read as before). This build refuses
format 1, and format 2 where it holds view tiles; it stamps format 2 without tiles and format 3 as format
4, so that an older build refuses the directory from then on.
"""

from __future__ import annotations

import errno
import itertools
import json
import logging
import os
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from itertools import compress
from operator import is_, is_not, itemgetter, methodcaller, not_
from pathlib import Path
from typing import Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import rocksdict

from ...machine import cpu_count
from ..errors import Aborted, CoreError, StorageFull, Unavailable
from ..framing import HEADER_BYTES, time_header
from ..gate import UsageGate
from .base import (
    ROWS_FILES_DEFERRED,
    ROWS_FILES_INGESTED,
    BatchCounts,
    BinaryColumn,
    QueuedRecords,
    RowBatch,
    StoreFormatError,
    StoreInUse,
    TileUpdate,
    WriteResult,
    block_tile_count,
)
from .key_filter import KeyFilter

_LOGGER = logging.getLogger(__name__)

SOURCE = b"s"
ROW = b"r"
REQUEST = b"q"
REQUEST_EXPIRY = b"t"
META = b"m"
OFFLINE = b"o"
_NEXT_ID = META + b"next_source_id"
_NEXT_OFFLINE_SEQ = META + b"next_offline_seq"
_REQUEST_INDEX_BUILT = META + b"request_expiry_index"
FORMAT_KEY = META + b"format_version"
# The layout described above; bump it with any change a build reading the old one would misread.
FORMAT_VERSION = 4
# The format of a database with data but no version key, written before the key existed.
UNVERSIONED_FORMAT = 1
# The format before view tiles were kept in blocks; it differs from this one only where tiles are stored.
_BEFORE_BLOCKS = 2
# The format whose tiles held sums of squares and whose idempotency records held no fingerprint; this
# build reads both.
_BEFORE_DEVIATIONS = 3
# A file written next to the database to learn whether the disk has room again; removed at start too.
SPACE_PROBE = ".space-probe.tmp"
_PROBE_BYTES = 256 * 1024
# Idempotency records a purge deletes per hold of the write lock, and at most per purge.
_PURGE_CHUNK = 128
_PURGE_MAX = 8192
_LATE_FIELDS = META + b"late_fields"
# The pid of the process holding the database open, beside RocksDB's LOCK file; removed at close.
PID_FILE = "featurepush.pid"
# Where writers leave sorted files of rows (`write_rows_file`) for the store to ingest, inside the database's
# folder so that RocksDB takes them by a hard link; emptied at open of what a crash left.
ROWS_FOLDER = "featurepush-rows"
_LEVEL0_FILES = "rocksdb.num-files-at-level0"
_ROWS_FILE_NAME = re.compile(r"[0-9a-f]{32}\.sst\Z")
# RocksDB slows writes from 20 level-0 files and stops them at 36, but never holds back an ingested file:
# 60 files ingested at once left 59 in level 0 and every write stopped. Past this many, a rows file's rows
# go through the write batch instead, whose writes RocksDB slows while compactions catch up.
_INGEST_MAX_LEVEL0_FILES = 12
_INGEST_OPTIONS = rocksdict.IngestExternalFileOptions()
# A hard link, not a copy (RocksDB copies where it cannot link).
_INGEST_OPTIONS.set_move_files(True)
# A file whose keys span rows still in the memtable (pushes to the source during its backfill) waits for a
# flush of the memtable first, holding the write lock and the GIL: about 30 ms for 6 MiB on the development
# machine, against 130 ms of the lock for writing a 65,536-row chunk through the write batch.
# Small memtables: each row a write inserts walks a skiplist, and a small one stays in the CPU's caches.
# Writing 1,000-row batches of the bench's rows took 1.2 us per row with RocksDB's default 64 MiB tables
# and 0.67 us with 8 MiB ones; 2 and 4 MiB ones flushed faster than two background jobs could compact.
# Eight of them hold as much as the default's two at most, so a burst waits on a flush no sooner.
_WRITE_BUFFER_BYTES = 8 * 1024 * 1024
_WRITE_BUFFERS = 8
# Small memtables make more and smaller level-0 files; flushing and compacting them runs on background
# threads that do not hold the GIL, so a machine with cores to spare gives them more: half the cores this
# process may use (a container's, not its host's).
_BACKGROUND_JOBS = min(8, max(2, cpu_count() // 2))
VIEW = b"v"
SERVICE = b"w"
TILE = b"a"
_VIEW_STATE = META + b"view_state"
_NEXT_VIEW_ID = META + b"next_view_id"
# Tile starts are signed microseconds; the offset makes their big-endian bytes sort like the numbers.
_START_OFFSET = 1 << 63


def _put_newer(
    wb: rocksdict.WriteBatch, keys: Sequence[bytes], values: Sequence[bytes], newer: list[bool]
) -> int:
    """Stage the rows that are newer than what is stored; return how many."""
    # Handed to RocksDB by C loops (map, compress), not one Python step per row.
    written = newer.count(True)
    if written == len(newer):
        deque(map(wb.put, keys, values), maxlen=0)
    else:
        deque(map(wb.put, compress(keys, newer), compress(values, newer)), maxlen=0)
    return written


def write_rows_file(folder: Path, keys: Sequence[bytes], values: Sequence[bytes]) -> str:
    """Write rows as an SST file in `folder` for `RocksDBStore.write_latest` to ingest; return its name.

    It holds one row per key, the one the write keeps (the newest event time, the later row on a tie), in
    RocksDB's key order. Sorting and choosing run in Arrow's C++ code, on the keys and the event-time
    headers only; the chosen rows' own bytes objects go to RocksDB's writer, never copied.
    """
    n = len(keys)
    # Event-time headers compare as big-endian numbers, as write_latest compares them.
    heads = np.frombuffer(b"".join(map(_HEAD, values)), dtype=">u8", count=n).astype("<u8")
    key_array = pa.array(keys, pa.binary())
    order = pc.sort_indices(
        pa.table({"key": key_array, "head": heads, "at": np.arange(n)}),
        sort_keys=[("key", "ascending"), ("head", "descending"), ("at", "descending")],
    )
    ordered = key_array.take(order)
    first = np.ones(n, dtype=bool)
    if n > 1:
        first[1:] = pc.not_equal(ordered.slice(1), ordered.slice(0, n - 1)).to_numpy(zero_copy_only=False)
    chosen: list[int] = order.to_numpy()[first].tolist()
    name = f"{uuid.uuid4().hex}.sst"
    path = folder / name
    writer = rocksdict.SstFileWriter(_file_options())
    try:
        writer.open(str(path))
        deque(map(writer.__setitem__, map(keys.__getitem__, chosen), map(values.__getitem__, chosen)), 0)
        writer.finish()
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return name


_HEAD = itemgetter(slice(0, HEADER_BYTES))


def _file_options() -> Any:
    """The options of a rows file: the database's table format (its Bloom filters), a token block cache."""
    return db_options(rocksdict.Cache(1 << 20))


def _put_rows(
    wb: rocksdict.WriteBatch,
    keys: Sequence[bytes],
    values: Sequence[bytes],
    newer: list[bool],
    taken: list[tuple[Sequence[bytes], Sequence[bytes]]] | None,
) -> int:
    """Stage the newer rows (or, every row newer and a rows file to take, keep them); return how many."""
    if taken is not None and all(newer):
        taken.append((keys, values))
        return len(newer)
    return _put_newer(wb, keys, values, newer)


def _whole_file_batch(batches: Sequence[RowBatch], request_id: str, dry_run: bool) -> RowBatch | None:
    """The batch whose rows file a write may ingest: its only one, with nothing else to write atomically."""
    if dry_run or request_id or len(batches) != 1:
        return None
    batch = batches[0]
    if batch.offline or batch.tiles or not _ROWS_FILE_NAME.match(batch.rows_file):
        return None
    return batch


def _request_record(counts: dict[str, BatchCounts], fingerprint: str) -> str:
    """An idempotency record's JSON: each source's counts, and under "#" the records' fingerprint if any."""
    record: dict[str, object] = {
        s: [c.accepted, c.written, c.superseded, c.late_skipped] for s, c in counts.items()
    }
    if fingerprint:
        # No source name can be "#", so it never meets a source's counts.
        record["#"] = fingerprint
    return json.dumps(record)


def _read_request_record(raw: bytes) -> tuple[dict[str, BatchCounts], str]:
    """The counts and the records' fingerprint ("" where none was recorded) of an idempotency record."""
    record = json.loads(raw)
    fingerprint = record.pop("#", "")
    return {s: BatchCounts(*c) for s, c in record.items()}, fingerprint


def row_prefix(source_id: int) -> bytes:
    """The key prefix of every row of one source."""
    return ROW + source_id.to_bytes(4, "big")


def tile_prefix(view_id: int) -> bytes:
    """The key prefix of every tile of one view."""
    return TILE + view_id.to_bytes(4, "big")


# The one-byte varint of each length below 128, the length of nearly every entity key.
_SHORT_LENGTHS = [bytes((n,)) for n in range(0x80)]


def _entity_part(entity: bytes) -> bytes:
    """An entity key with its length before it, so no entity's tiles sort among another's."""
    n = len(entity)
    if n < 0x80:
        return _SHORT_LENGTHS[n] + entity
    head = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        head.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(head) + entity


def _prefix_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key starting with `prefix`."""
    return prefix[:-1] + bytes([prefix[-1] + 1]) if prefix[-1] < 0xFF else _prefix_end(prefix[:-1]) + b"\x00"


def offline_key(seq: int) -> bytes:
    """The key of the offline-log queue entry with sequence number `seq`."""
    return OFFLINE + seq.to_bytes(8, "big")


def _count(keys: Iterator[bytes], limit: int | None) -> int:
    """How many keys there are, stopping at `limit`."""
    return sum(1 for _ in (keys if limit is None else itertools.islice(keys, limit)))


# The index's header of an entity with no stored row: below every event time's header.
_ABSENT = bytes(HEADER_BYTES)
# What one latest-event index entry costs beyond its key's bytes: the dict slot, the key and header objects.
_INDEX_ENTRY_OVERHEAD = 120
# Keys of a retired index moved into the evicted-key filter per write: about 11 ms of the write lock.
_RETIRE_STEP = 65_536


def _newer(
    heads: list[bytes], stored: list[bytes], numbers: np.ndarray | None = None
) -> tuple[list[bool], list[bool] | None]:
    """Whether each row's header is at least its stored row's, and whether it is later (None: none is).

    At least: the row is written (an equal time replaces, so that a correction lands). Later: the index
    changes; where the times are equal it already holds these very bytes. Whole 8-byte headers compare
    as big-endian numbers, all at once; `numbers` are the headers as such numbers where the caller has them.
    """
    old = b"".join(stored)
    if len(old) == HEADER_BYTES * len(stored):
        if numbers is None:
            new = b"".join(heads)
            if len(new) == len(old):
                numbers = np.frombuffer(new, dtype=">u8")
        if numbers is not None:
            prior = np.frombuffer(old, dtype=">u8")
            later = numbers > prior
            return (numbers >= prior).tolist(), later.tolist() if later.any() else None
    pairs = list(zip(heads, stored, strict=True))
    return [head >= prior for head, prior in pairs], [head > prior for head, prior in pairs]


def storage_error(error: Exception) -> CoreError | None:
    """The core error of a failed disk write: a full disk, another I/O error, or None for anything else."""
    text = str(error)
    if (isinstance(error, OSError) and error.errno == errno.ENOSPC) or "No space left" in text:
        return StorageFull(
            "the server's disk is full, so writes are refused until space is freed; reads still work. "
            "Send the records again later",
            metadata={"error": text[:200]},
        )
    if isinstance(error, OSError) or text.startswith("IO error"):
        return Unavailable(
            "the server cannot write to its disk (I/O error); it retries by itself, send the records again "
            "later",
            reason="STORAGE_ERROR",
            metadata={"error": text[:200]},
        )
    return None


def db_options(cache: rocksdict.Cache | None = None) -> Any:
    """The options every opening of a store's database uses, the owner's and a front's read-only ones."""
    options = rocksdict.Options(raw_mode=True)
    # Bloom filters let a write's read of an entity never seen before skip the data blocks; a
    # block cache keeps hot rows' blocks in memory for reads.
    table = rocksdict.BlockBasedOptions()
    table.set_bloom_filter(10, False)
    table.set_block_cache(rocksdict.Cache(256 * 1024 * 1024) if cache is None else cache)
    table.set_cache_index_and_filter_blocks(True)
    table.set_pin_l0_filter_and_index_blocks_in_cache(True)
    options.set_block_based_table_factory(table)
    # Raw mode reads and writes bytes only; the stubs describe the pickling mode, so keep this untyped.
    return options


def _open_db(path: Path) -> Any:
    options = db_options()
    options.create_if_missing(True)
    options.set_max_background_jobs(_BACKGROUND_JOBS)
    options.set_write_buffer_size(_WRITE_BUFFER_BYTES)
    options.set_max_write_buffer_number(_WRITE_BUFFERS)
    return rocksdict.Rdict(str(path), options)


def _locked_by_another(error: Exception) -> bool:
    """Whether opening failed because another process (or this one) holds the database's LOCK file."""
    text = str(error)
    return text.startswith("IO error") and "/LOCK:" in text


def _holder(path: Path) -> int | None:
    """The pid written by the process that has the database at `path` open, if that process still runs."""
    try:
        pid = int((path / PID_FILE).read_text().strip())
        os.kill(pid, 0)
    except PermissionError:
        return pid  # alive, though another user's
    except (OSError, ValueError):
        return None
    return pid


def _check_format(db: Any, path: Path) -> None:
    """Refuse a database written in another store format; stamp a new or unversioned one with this one's."""
    raw = db.get(FORMAT_KEY)
    if raw is not None:
        found = int.from_bytes(raw, "big")
    elif next(iter(db.keys()), None) is None:
        found = FORMAT_VERSION
    else:
        found = UNVERSIONED_FORMAT
    if found == _BEFORE_BLOCKS and next(iter(db.keys(from_key=TILE)), b"")[:1] != TILE:
        # Format 3 changed only how view tiles are laid out: a format 2 store without tiles reads alike.
        _LOGGER.info(
            "data directory %s holds no view tiles: its store format 2 is stamped as %d", path, FORMAT_VERSION
        )
        db.put(FORMAT_KEY, FORMAT_VERSION.to_bytes(4, "big"))
    elif found == _BEFORE_DEVIATIONS:
        # Its tiles' sums of squares are told apart from squared deviations by their sign, and read alike;
        # its idempotency records without a fingerprint are answered as before.
        _LOGGER.info("data directory %s: its store format 3 is stamped as %d", path, FORMAT_VERSION)
        db.put(FORMAT_KEY, FORMAT_VERSION.to_bytes(4, "big"))
    elif found == FORMAT_VERSION and raw is None:
        db.put(FORMAT_KEY, FORMAT_VERSION.to_bytes(4, "big"))
    elif found != FORMAT_VERSION:
        action = (
            "upgrade featurepush"
            if found > FORMAT_VERSION
            else "export its sources with the featurepush that wrote it"
        )
        raise StoreFormatError(
            f"data directory {path} was written in store format {found}; this featurepush reads format "
            f"{FORMAT_VERSION}: {action}, or start on a new data directory",
            metadata={"found": str(found), "supported": str(FORMAT_VERSION)},
        )


class RocksDBStore:
    """The Store protocol on one RocksDB database: sources, the latest row per entity, and the rest.

    Thread-safe: writes hold one lock for their read-compare-write, so concurrent pushes to one entity
    never lose the newer value; the WAL sync happens after the lock is released, as a group commit:
    writers that finish while a sync runs wait for it, then share the next. With `fsync=True` (the
    default) a write returns only once it is on disk; with False it survives a crash of the process but
    not of the machine.

    Every call holds a usage gate, so `close()` waits for calls in progress and later ones raise
    ShuttingDown. A failed disk write (full disk, I/O error) makes writes fail fast with StorageFull or
    Unavailable while reads go on; `recover()` reopens the database once the disk takes writes again.
    """

    # The one process that opens the database drains its offline log alone, with no lease.
    drain_lease_s: float | None = None

    def __init__(
        self,
        path: str | Path,
        *,
        fsync: bool = True,
        idempotency_window_s: float = 600.0,
        latest_cache_entries: int = 1_000_000,
        latest_cache_bytes: int = 256 * 1024 * 1024,
    ):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        # A crash while probing for space leaves the probe behind.
        (self.path / SPACE_PROBE).unlink(missing_ok=True)
        try:
            self._db: Any = _open_db(self.path)
        except Exception as e:
            if not _locked_by_another(e):
                raise
            raise StoreInUse(self.path, _holder(self.path)) from None
        try:
            _check_format(self._db, self.path)
        except BaseException:
            self._db.close()
            raise
        # Names this process to a second one that finds the database locked; RocksDB's lock does not.
        (self.path / PID_FILE).write_text(f"{os.getpid()}\n")
        self.rows_folder = self.path / ROWS_FOLDER
        self.rows_folder.mkdir(exist_ok=True)
        for left in self.rows_folder.glob("*.sst"):
            # Written for a write that never came (a writer or this store was killed); none is running.
            left.unlink(missing_ok=True)
        self._rows_files_ingested = 0
        self._rows_files_deferred = 0  # written row by row while level 0 held too many files
        self._gate = UsageGate()
        self._fsync = fsync
        self._window_ms = int(idempotency_window_s * 1000)
        self._lock = threading.RLock()
        # Group commit: syncs run one at a time and are numbered; a writer waits for the first that began
        # after its write, and fails with the last sync error unless a sync since succeeded.
        self._sync_done = threading.Condition(threading.Lock())
        self._syncs_begun = 0
        self._syncs_finished = 0
        self._last_good_sync = 0
        self._sync_error: Exception | None = None
        self._writes_since_purge = 0
        self._purging = threading.Lock()
        # Set by a failed disk write and cleared by recover(); while set, writes fail with it at once.
        self._write_error: CoreError | None = None
        self._watchers: list[Callable[[bool], None]] = []
        self._write_watchers: list[Callable[[], object]] = []
        # Entity key -> event-time header of its stored row (_ABSENT if none), for keys this process has
        # read or written; every row write goes through write_latest under the lock, so it stays exact.
        # At most `latest_cache_entries` (about 150 bytes each); past that it starts over.
        self._latest: dict[bytes, bytes] = {}
        self._latest_max = latest_cache_entries
        # Keys are as long as callers make them, so the index is bounded by an estimate of its bytes too.
        self._latest_max_bytes = latest_cache_bytes
        self._latest_bytes = 0
        # Source id -> whether the index holds every stored row of it (see _indexes_every_row).
        self._indexed_sources: dict[int, bool] = {}
        # The keys the index held when it outgrew its bounds and started over (see _evict_latest), in a
        # sixteenth of the index's bytes: 16 MiB, about 11 million keys, for 256 MiB.
        self._evicted = KeyFilter(max(latest_cache_bytes // 16, 1 << 20))
        # The index as it was when it last started over, while its keys move into the filter a step per
        # write; its event times are still exact for keys the new index lacks.
        self._retired: dict[bytes, bytes] | None = None
        self._retiring: Iterator[bytes] = iter(())
        self._retire_left = 0  # keys of the retired index not in the filter yet
        # How many times the index started over with what it knew of whole sources (_forget_latest).
        self._forgotten = 0
        # Source id -> how many times its definition was written by this process (-1: deleted).
        self._generations: dict[int, int] = {}
        self._view_generations: dict[int, int] = {}
        raw_seq = self._db.get(_NEXT_OFFLINE_SEQ)
        self._next_offline_seq = int.from_bytes(raw_seq, "big") if raw_seq else 1
        if self._db.get(_REQUEST_INDEX_BUILT) is None:
            self._index_request_records()

    def setup_warnings(self) -> list[str]:
        """None: the embedded store has no setting that could lose acknowledged writes."""
        return []

    def statistic(self, name: str) -> int | None:
        """A RocksDB integer property (such as rocksdb.total-sst-files-size), or None when unknown.

        `ROWS_FILES_INGESTED` and `ROWS_FILES_DEFERRED` are the store's own: how many rows files this
        process ingested, and of how many it wrote the rows instead (see `_ingest`).
        """
        if name == ROWS_FILES_INGESTED:
            return self._rows_files_ingested
        if name == ROWS_FILES_DEFERRED:
            return self._rows_files_deferred
        if self._gate.closed:
            return None
        with self._gate.use():
            value = self._db.property_int_value(name)
        return None if value is None else int(value)

    def close(self, timeout_s: float = 10.0) -> bool:
        """Turn new calls away, wait up to `timeout_s` for running ones, then sync and close the database.

        Returns False when calls were still running: the database is then only synced, not closed, since
        closing it under them could crash the process; the write-ahead log makes exiting safe anyway.
        """
        if self._gate.closed:
            return True
        drained = self._gate.close(timeout_s)
        with self._lock:
            try:
                self._db.flush_wal(True)
            except Exception as e:  # noqa: BLE001 - a failed disk keeps what its WAL holds; say so and go on
                _LOGGER.warning("syncing the write-ahead log at close failed: %s", e)
            if not drained:
                _LOGGER.warning("store calls still running after %.1fs; leaving the database open", timeout_s)
                return False
            try:
                self._db.close()
            except Exception as e:  # noqa: BLE001 - closing after a disk error reports that error again
                _LOGGER.warning("closing the database reported: %s", e)
        if _holder(self.path) == os.getpid():
            (self.path / PID_FILE).unlink(missing_ok=True)
        return True

    def sync_now(self) -> None:
        """Sync the write-ahead log if the database is open and idle enough; for a last step before exit."""
        if self._gate.closed or not self._lock.acquire(timeout=0.5):
            return
        try:
            self._db.flush_wal(True)
        except Exception as e:  # noqa: BLE001 - best effort on the way out
            _LOGGER.warning("syncing the write-ahead log failed: %s", e)
        finally:
            self._lock.release()

    # --- disk errors ---------------------------------------------------------------------------

    @property
    def writable(self) -> bool:
        """Whether writes are accepted: False after a disk error until recover() succeeds."""
        return self._write_error is None

    def watch_writable(self, callback: Callable[[bool], None]) -> None:
        """Call `callback(writable)` whenever writes stop or start being accepted."""
        self._watchers.append(callback)

    def watch_writes(self, callback: Callable[[], object]) -> None:
        """Call `callback()` after every write that landed in the database, before the writer returns."""
        self._write_watchers.append(callback)

    def _failed(self, error: Exception) -> Exception:
        """The exception for a failed database write; a disk error also stops writes until recovery."""
        mapped = storage_error(error)
        if mapped is None:
            return error
        if self._write_error is None:
            _LOGGER.error("disk write failed, refusing writes until it works again: %s", error)
            self._write_error = mapped
            for watch in self._watchers:
                watch(False)
        return mapped

    def _write(self, wb: rocksdict.WriteBatch) -> None:
        """Apply a write batch; called under the lock."""
        if self._write_error is not None:
            raise self._write_error
        try:
            self._db.write(wb)
        except Exception as e:
            raise self._failed(e) from None
        for watch in self._write_watchers:
            watch()

    def _sync(self) -> None:
        """Return once every write this thread completed is on disk (with fsync), sharing syncs."""
        if not self._fsync:
            return
        with self._sync_done:
            # A sync running now may have begun before this thread's write: only the next one surely
            # covers it. Whoever finds none running begins it, for everyone waiting meanwhile.
            needed = self._syncs_begun + 1
            while self._syncs_finished < needed:
                if self._syncs_begun > self._syncs_finished:
                    self._sync_done.wait()
                    continue
                self._syncs_begun += 1
                number = self._syncs_begun
                self._sync_done.release()
                error: Exception | None = None
                try:
                    self._db.flush_wal(True)
                except Exception as e:
                    error = self._failed(e)
                finally:
                    self._sync_done.acquire()
                    self._syncs_finished = number
                    if error is None:
                        self._last_good_sync = number
                    else:
                        self._sync_error = error
                    self._sync_done.notify_all()
            if self._last_good_sync < needed:
                assert self._sync_error is not None
                raise self._sync_error

    def recover(self, timeout_s: float = 5.0) -> bool:
        """After a disk error, reopen the database once the disk takes writes again; return whether writable.

        RocksDB keeps refusing writes after a failed WAL write even once space is back; reopening it
        replays the WAL and clears that state. The reopen waits for running calls, so it is tried only
        when a probe file could be written and synced.
        """
        if self._write_error is None or self._gate.closed:
            return self._write_error is None
        probe = self.path / SPACE_PROBE
        try:
            with open(probe, "wb") as fh:
                fh.write(b"\0" * _PROBE_BYTES)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError:
            return False
        finally:
            probe.unlink(missing_ok=True)
        with self._gate.exclusive(timeout_s) as alone, self._lock:
            if not alone:
                return False
            try:
                self._db.close()
            except Exception as e:  # noqa: BLE001 - closing reports the write error it is recovering from
                _LOGGER.info("closing the database after a disk error reported: %s", e)
            try:
                self._db = _open_db(self.path)
            except Exception as e:  # noqa: BLE001 - retried by the next call; reads fail meanwhile
                _LOGGER.warning("reopening the database failed: %s", e)
                return False
            # Writes that failed may have left entries in the cache of stored event times.
            self._forget_latest()
            self._write_error = None
        _LOGGER.info("the disk takes writes again; writes resumed")
        for watch in self._watchers:
            watch(True)
        return True

    # --- sources -------------------------------------------------------------------------------

    def row_prefix(self, source_id: int) -> bytes:
        """The key prefix of every row of one source."""
        return row_prefix(source_id)

    def get_source(self, name: str) -> tuple[int, bytes] | None:
        """The id and serialized definition of a source, or None."""
        with self._gate.use():
            raw = self._db.get(SOURCE + name.encode())
        if raw is None:
            return None
        return int.from_bytes(raw[:4], "big"), raw[4:]

    def list_sources(self, after: str = "", limit: int | None = None) -> Iterator[tuple[str, int, bytes]]:
        """Sources in name order, starting after `after`."""
        start = SOURCE + after.encode() + (b"\x00" if after else b"")
        found: list[tuple[str, int, bytes]] = []
        # Read whole under the gate: a caller may work between items, and a close must not wait on it.
        with self._gate.use():
            for key, raw in self._db.items(from_key=start):
                if not key.startswith(SOURCE) or (limit is not None and len(found) >= limit):
                    break
                found.append((key[1:].decode(), int.from_bytes(raw[:4], "big"), raw[4:]))
        return iter(found)

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
        with self._gate.use():
            with self._lock:
                wb = rocksdict.WriteBatch(raw_mode=True)
                if source_id is None:
                    source_id = self._allocate_id(_NEXT_ID, wb)
                wb.put(SOURCE + name.encode(), source_id.to_bytes(4, "big") + definition)
                late_key = _LATE_FIELDS + source_id.to_bytes(4, "big")
                if late_fields:
                    wb.put(late_key, "\n".join(late_fields).encode())
                else:
                    wb.delete(late_key)
                self._write(wb)
                if invalidate:
                    self._generations[source_id] = self._generations.get(source_id, 0) + 1
            self._sync()
        return source_id

    def late_fields(self, source_id: int) -> tuple[str, ...]:
        """The fields added to a source while it held rows, which rows stored before may lack."""
        with self._gate.use():
            raw = self._db.get(_LATE_FIELDS + source_id.to_bytes(4, "big"))
        return tuple(raw.decode().split("\n")) if raw else ()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold off every row write, so a check of stored rows and a definition change are one step."""
        # The gate before the lock, in the order every call takes them.
        with self._gate.use(), self._lock:
            yield

    def generation(self, source_id: int) -> int:
        """How many times this process has written the source's definition; -1 once it is deleted."""
        return self._generations.get(source_id, 0)

    def delete_source(self, name: str, source_id: int) -> int:
        """Delete a source and its rows; return how many rows there were."""
        prefix = row_prefix(source_id)
        with self._gate.use():
            with self._lock:
                rows = sum(1 for _ in self._keys_with_prefix(prefix))
                wb = rocksdict.WriteBatch(raw_mode=True)
                wb.delete(SOURCE + name.encode())
                wb.delete(_LATE_FIELDS + source_id.to_bytes(4, "big"))
                wb.delete_range(prefix, _prefix_end(prefix))
                self._write(wb)
                self._forget_latest()
                self._generations[source_id] = -1
            self._sync()
        return rows

    def _items_with_prefix(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        for key, value in self._db.items(from_key=prefix):
            if not key.startswith(prefix):
                return
            yield key, value

    def _keys_with_prefix(self, prefix: bytes) -> Iterator[bytes]:
        for key in self._db.keys(from_key=prefix):
            if not key.startswith(prefix):
                return
            yield key

    def has_rows(self, source_id: int) -> bool:
        """Whether a source holds any online row."""
        with self._gate.use():
            return next(self._keys_with_prefix(row_prefix(source_id)), None) is not None

    def count_rows(self, source_id: int, limit: int | None = None) -> int:
        """How many rows a source holds, counting no further than `limit` (None: every row).

        Exact by walking the keys: RocksDB's own key estimate covers the whole database, not one prefix.
        """
        with self._gate.use():
            return _count(self._keys_with_prefix(row_prefix(source_id)), limit)

    def delete_expired(self, source_id: int, cutoff_micros: int, chunk: int = 10_000) -> int:
        """Delete the source's rows whose event time is before `cutoff_micros`; return how many.

        Ends early, leaving the rest to the next sweep, when a close or reopen of the database waits.
        """
        prefix = row_prefix(source_id)
        cutoff = time_header(cutoff_micros)
        deleted = 0
        candidates: list[bytes] = []
        with self._gate.use():
            for key, value in self._db.items(from_key=prefix):
                if not key.startswith(prefix) or self._gate.wanted:
                    break
                if value[:HEADER_BYTES] < cutoff:
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
                k
                for k, v in zip(keys, self._db.get(keys), strict=True)
                if v is not None and v[:HEADER_BYTES] < cutoff
            ]
            if stale:
                wb = rocksdict.WriteBatch(raw_mode=True)
                for key in stale:
                    wb.delete(key)
                    self._latest[key] = _ABSENT
                self._write(wb)
        return len(stale)

    # --- rows ----------------------------------------------------------------------------------

    def rows_file(self, keys: Sequence[bytes], values: Sequence[bytes]) -> str:
        """No file: in the writing process, building a file of the rows costs about what writing them does.

        The files pay where another process encodes the rows (`serve --processes`: RemoteStore builds them
        with `write_rows_file` in the fronts and backfill workers) and this store's process only writes;
        `write_latest` ingests them.
        """
        return ""

    def read(self, keys: list[bytes]) -> list[bytes | None]:
        """Stored values of the keys, None where absent."""
        if not keys:
            return []
        with self._gate.use():
            values: list[bytes | None] = self._db.get(keys)
        return values

    def write_latest(
        self,
        batches: Sequence[RowBatch],
        *,
        request_id: str = "",
        fingerprint: str = "",
        dry_run: bool = False,
        replace: str = "",
    ) -> WriteResult:
        """Write each row unless a newer event of its entity is stored or later in the batch; atomically."""
        try:
            with self._gate.use():
                result = self._write_latest(batches, request_id, fingerprint, dry_run, replace)
        finally:
            for batch in batches:
                if _ROWS_FILE_NAME.match(batch.rows_file):
                    # Ingested (RocksDB linked it) or not taken: the name in this folder is ours to drop.
                    (self.rows_folder / batch.rows_file).unlink(missing_ok=True)
        if self._writes_since_purge >= 1000 and self._purging.acquire(blocking=False):
            # Outside the write lock, and by one writer at a time; the others go on writing meanwhile.
            try:
                self.purge_requests()
            except CoreError as e:
                # The write itself succeeded; expired records wait for the next purge.
                _LOGGER.debug("purging idempotency records stopped: %s", e)
            finally:
                self._purging.release()
        return result

    def _write_latest(
        self, batches: Sequence[RowBatch], request_id: str, fingerprint: str, dry_run: bool, replace: str
    ) -> WriteResult:
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
            if not dry_run and self._write_error is not None:
                raise self._write_error
            for batch in batches:
                for update in batch.tiles:
                    if self.view_generation(update.view_id) != update.generation:
                        raise Aborted(
                            f"feature view {update.view!r} was changed or deleted while these records were "
                            "validated; nothing was written, send them again",
                            reason="VIEW_CHANGED",
                            metadata={"view": update.view},
                        )
            seen = self._seen(request_id) if request_id else None
            if seen is not None and replace and seen[1] == replace:
                seen = None
            if seen is None:
                try:
                    counts = self._stage_and_write(batches, request_id, fingerprint, dry_run)
                except BaseException:
                    # The index took the staged rows' event times as they were staged; a write that did
                    # not land leaves it ahead of the database, so it starts over.
                    if not dry_run:
                        self._forget_latest()
                    raise
        if seen is not None:
            # The first request may still be syncing; the replay must not be acknowledged before it.
            self._sync()
            return WriteResult(seen[0], replayed=True, fingerprint=seen[1])
        if not dry_run:
            self._sync()
        return WriteResult(counts)

    def _stage_and_write(
        self, batches: Sequence[RowBatch], request_id: str, fingerprint: str, dry_run: bool
    ) -> dict[str, BatchCounts]:
        """Stage every batch, its tiles, offline entry and request record in one write batch; write it."""
        # Once per write, before staging: past its bounds the index starts over.
        if len(self._latest) > self._latest_max or self._latest_bytes > self._latest_max_bytes:
            self._evict_latest()
        elif self._retired is not None:
            self._retire_step()
        wb = rocksdict.WriteBatch(raw_mode=True)
        whole = _whole_file_batch(batches, request_id, dry_run)
        taken: list[tuple[Sequence[bytes], Sequence[bytes]]] = []
        counts = {
            batch.source: self._stage_latest(batch, wb, dry_run, taken if batch is whole else None)
            for batch in batches
        }
        for batch in batches:
            if batch.tiles:
                skipped = self._stage_tiles(batch.tiles, wb)
                c = counts[batch.source]
                counts[batch.source] = BatchCounts(c.accepted, c.written, c.superseded, skipped)
        if not dry_run:
            self._stage_offline(batches, wb)
        if request_id and not dry_run:
            now_ms = int(time.time() * 1000).to_bytes(8, "big")
            wb.put(REQUEST + request_id.encode(), now_ms + _request_record(counts, fingerprint).encode())
            wb.put(REQUEST_EXPIRY + now_ms + request_id.encode(), b"")
            self._writes_since_purge += 1
        if not dry_run and not wb.is_empty():
            self._write(wb)
        if whole is not None and taken:
            self._ingest(whole.rows_file, *taken[0])
        return counts

    def _ingest(self, name: str, keys: Sequence[bytes], values: Sequence[bytes]) -> None:
        """Ingest a rows file whole, under the lock; where RocksDB will not take it, write its rows instead.

        The file holds exactly `keys` and `values` (one row per key, as staged). Its rows are written
        instead, and counted as deferred, while compactions are behind. A file that is gone (this store
        restarted since it was written) or unreadable costs a write batch too, not the write: the batch is
        also what tells a failing disk.
        """
        if self._write_error is not None:
            raise self._write_error
        ingested = False
        try:
            if self._db.property_int_value(_LEVEL0_FILES) >= _INGEST_MAX_LEVEL0_FILES:
                self._rows_files_deferred += 1
            else:
                self._db.ingest_external_file([str(self.rows_folder / name)], _INGEST_OPTIONS)
                ingested = True
        except Exception as e:  # noqa: BLE001 - any refusal falls back to writing the same rows
            _LOGGER.warning("ingesting rows file %s failed, writing its %d rows: %s", name, len(keys), e)
        if not ingested:
            wb = rocksdict.WriteBatch(raw_mode=True)
            deque(map(wb.put, keys, values), maxlen=0)
            self._write(wb)
            return
        self._rows_files_ingested += 1
        for watch in self._write_watchers:
            watch()

    def _stage_latest(
        self,
        batch: RowBatch,
        wb: rocksdict.WriteBatch,
        dry_run: bool,
        taken: list[tuple[Sequence[bytes], Sequence[bytes]]] | None = None,
    ) -> BatchCounts:
        """Stage the rows of one batch that are newer than what is stored; called under the lock.

        With `taken` (the batch's rows file may be ingested) and every row newer, the rows are not put in
        the write batch but appended to `taken`, as kept: the file holds exactly those.
        """
        keys, values = batch.keys, batch.values
        accepted = len(keys)
        width = HEADER_BYTES
        # The headers as big-endian numbers too, where they come from an Arrow column whole.
        items = values.prefix_items(width) if isinstance(values, BinaryColumn) else None
        numbers: np.ndarray | None = None
        if items is None:
            heads = list(map(_HEAD, values))
        else:
            heads = items.tolist()
            numbers = items.view(">u8")
        if len(set(keys)) != len(keys):
            # Several events for one entity in a batch: keep the newest, the later one on a tie.
            best: dict[bytes, int] = {}
            for i, key in enumerate(keys):
                j = best.get(key)
                if j is None or heads[i] >= heads[j]:
                    best[key] = i
            order = sorted(best.values())
            listed = list(values)
            keys = [keys[i] for i in order]
            values = [listed[i] for i in order]
            heads = [heads[i] for i in order]
            numbers = None if numbers is None else numbers[order]
        cache = self._latest
        if not dry_run and self._indexes_every_row(batch.source_id):
            return self._stage_indexed(keys, values, heads, numbers, accepted, wb, taken)
        # Event-time headers of stored rows come from memory when this process has seen the key.
        stored = list(map(cache.get, keys))
        if None in stored:
            # Every key is new to the index (a new source, a backfill) more often than not.
            every = stored.count(None) == len(stored)
            at = [] if every else [i for i, old in enumerate(stored) if old is None]
            misses = list(keys) if every else [keys[i] for i in at]
            if self._indexes_every_row(batch.source_id):
                # A dry run: a key the index lacks has no stored row unless it was evicted from it.
                found = [_ABSENT] * len(misses)
                for i, head in self._evicted_heads(misses).items():
                    found[i] = head
            else:
                found = [_ABSENT if old is None else old[:width] for old in self._db.get(misses)]
                cache.update(zip(misses, found, strict=True))
            if every:
                stored[:] = found
            else:
                for i, head in zip(at, found, strict=True):
                    stored[i] = head
            self._latest_bytes += sum(map(len, misses)) + len(misses) * _INDEX_ENTRY_OVERHEAD
        newer, later = _newer(heads, cast(list[bytes], stored), numbers)  # every None was filled in above
        written = _put_rows(wb, keys, values, newer, taken)
        if not dry_run and later is not None:
            # Ahead of the write; _write_latest starts the index over if the write does not land.
            cache.update(zip(compress(keys, later), compress(heads, later), strict=True))
        return BatchCounts(accepted, written, accepted - written)

    def _stage_indexed(
        self,
        keys: Sequence[bytes],
        values: Sequence[bytes],
        heads: list[bytes],
        numbers: np.ndarray | None,
        accepted: int,
        wb: rocksdict.WriteBatch,
        taken: list[tuple[Sequence[bytes], Sequence[bytes]]] | None,
    ) -> BatchCounts:
        """Stage distinct keys of a source whose every stored row is in the index; called under the lock.

        A key the index lacks has no stored row (unless it was evicted from the index: those are read),
        so its row is newer than anything stored: `setdefault` looks each key up and enters a missing one
        with its new header in one dict operation, where a lookup and a later insert would take two (a
        backfill's keys are mostly new to a large index).
        """
        cache = self._latest
        size = len(cache)
        stored = list(map(cache.setdefault, keys, heads))
        if added := len(cache) - size:
            self._latest_bytes += added * (sum(map(len, keys)) // len(keys) + _INDEX_ENTRY_OVERHEAD)
            if self._evicted.count or self._retired is not None:
                self._read_evicted(keys, heads, stored)
        newer, later = _newer(heads, stored, numbers)
        written = _put_rows(wb, keys, values, newer, taken)
        # A key entered just now got its own header back, equal and so not later; the later ones go in here.
        if later is not None:
            cache.update(zip(compress(keys, later), compress(heads, later), strict=True))
        return BatchCounts(accepted, written, accepted - written)

    def _read_evicted(self, keys: Sequence[bytes], heads: list[bytes], stored: list[bytes]) -> None:
        """Find the stored headers of keys just entered into the index that may have been evicted from it.

        `stored` holds each key's entered header itself (the very object) where the key was just entered;
        where one of those has a stored row, its header replaces it there and in the index.
        """
        entered = list(compress(range(len(keys)), map(is_, stored, heads)))
        cache = self._latest
        for at, head in self._evicted_heads([keys[i] for i in entered]).items():
            i = entered[at]
            stored[i] = cache[keys[i]] = head

    def _evicted_heads(self, keys: list[bytes]) -> dict[int, bytes]:
        """The stored headers of keys missing from the index of a source it holds whole, by position.

        Called under the lock. A key evicted from the index is in the retired one, whose times are exact,
        or in the filter of evicted keys, and then its row (if any) is read; any other key has no row.
        """
        found: dict[int, bytes] = {}
        unknown = list(range(len(keys)))
        if self._retired is not None:
            known = cast(list[bytes], list(map(self._retired.get, keys)))  # None where absent, left out below
            present = list(map(is_not, known, itertools.repeat(None)))
            found.update(zip(compress(unknown, present), compress(known, present), strict=True))
            unknown = list(compress(unknown, map(not_, present)))
        held = list(compress(unknown, self._evicted.might_hold([keys[i] for i in unknown])))
        if held:
            for i, row in zip(held, self._db.get([keys[i] for i in held]), strict=True):
                if row is not None:
                    found[i] = row[:HEADER_BYTES]
        return found

    def _indexes_every_row(self, source_id: int | None) -> bool:
        """Whether every stored row of the source is in the latest-event index; called under the lock.

        True for a source that had no rows when the index started (checked with one seek, once per index):
        every row written since went through write_latest, which adds it to the index. "In the index"
        includes the keys evicted from it since (see _evict_latest): those are read when written again.
        """
        if source_id is None:
            return False
        known = self._indexed_sources.get(source_id)
        if known is None:
            known = next(self._keys_with_prefix(row_prefix(source_id)), None) is None
            self._indexed_sources[source_id] = known
        return known

    def _evict_latest(self) -> None:
        """Start the index over, its keys kept in the evicted-key filter; called under the lock.

        Without the filter a key missing from the new index could have a stored row, so every source would
        lose what _indexes_every_row says of it and each new entity's write would read first (a backfill
        of more entities than the index holds ran at half speed). With it, a key in neither surely has
        none. Once the filter is full, everything starts over as it would without it. The old index's
        keys move into the filter _RETIRE_STEP per write: all at once, a memory-sized index of millions of
        keys would hold every write up for seconds (about 0.17 us a key).
        """
        if self._retired is not None:
            self._retire_step(everything=True)  # refilled before the last one had moved on: rare
        if not self._evicted.has_room(len(self._latest)):
            self._forget_latest()
            return
        self._retired, self._latest = self._latest, {}
        self._retiring = iter(self._retired)  # the retired dict is never changed, so this stays valid
        self._retire_left = len(self._retired)
        self._latest_bytes = 0

    def _retire_step(self, everything: bool = False) -> None:
        """Move the next keys of the retired index into the evicted-key filter; called under the lock."""
        step = list(itertools.islice(self._retiring, None if everything else _RETIRE_STEP))
        self._evicted.add(step)
        # Counted apart from the filter's count, which the walk of stored keys raises meanwhile too.
        self._retire_left -= len(step)
        if self._retire_left <= 0:
            self._retired = None
            self._retiring = iter(())

    def _forget_latest(self) -> None:
        """Start the latest-event index over, the evicted keys and which sources it holds whole too."""
        self._latest.clear()
        self._latest_bytes = 0
        self._indexed_sources.clear()
        self._evicted.clear()
        self._retired = None
        self._retiring = iter(())
        self._retire_left = 0
        self._forgotten += 1

    def track_stored_rows(self) -> list[int]:
        """Put the stored row keys of sources the index does not hold whole into the evicted-key filter.

        A source that held rows when this process opened the database is read for every key its index
        lacks, new entities included (1,000-row writes of new entities cost the writing thread 1.9 to 3.9
        us a row against 1.0 to 2.1 for a source it holds whole). Once its keys are in the filter, a key
        in neither has no row, as for a source written from empty. Meant for a background thread after
        opening: it walks the keys outside the write lock, in steps under it, and ends early for a close,
        a reopen or a full filter. Returns the ids of the sources it made whole.
        """
        made: list[int] = []
        for _, source_id, _ in self.list_sources():
            with self._gate.use():
                if self._gate.wanted or not self._track_source(source_id):
                    break
                made.append(source_id)
        return made

    def _track_source(self, source_id: int) -> bool:
        """Walk one source's row keys into the filter (see track_stored_rows); False to stop walking."""
        prefix = row_prefix(source_id)
        with self._lock:
            if self._indexes_every_row(source_id):
                return True
            forgotten = self._forgotten
            # Begun under the lock, between writes: each row is in the walk or was written since, and
            # every key a write stages is entered in the index.
            keys = self._db.keys(from_key=prefix)
            first = next(keys, None)
        started = () if first is None else (first,)
        walk = itertools.takewhile(methodcaller("startswith", prefix), itertools.chain(started, keys))
        while True:
            step = list(itertools.islice(walk, _RETIRE_STEP))
            with self._lock:
                if self._forgotten != forgotten or not self._evicted.has_room(len(step)):
                    return False
                self._evicted.add(step)
                if len(step) < _RETIRE_STEP:
                    self._indexed_sources[source_id] = True
                    return True
            if self._gate.wanted:
                return False

    def _stage_tiles(self, updates: Sequence[TileUpdate], wb: rocksdict.WriteBatch) -> int:
        """Merge the updates into the stored tiles, called under the lock; the most records a view skipped."""
        skipped = 0
        for update in updates:
            state_key = _VIEW_STATE + update.view_id.to_bytes(4, "big")
            state = self._db.get(state_key)
            merged = update.merge(state, self._db.get)
            put = wb.put
            for key, value in zip(merged.keys, merged.values, strict=True):
                put(key, value)
            if merged.state != state and merged.state is not None:
                wb.put(state_key, merged.state)
            skipped = max(skipped, merged.skipped)
        return skipped

    # --- feature views and tiles ---------------------------------------------------------------

    def get_view(self, name: str) -> tuple[int, bytes] | None:
        """The id and serialized definition of a view, or None."""
        with self._gate.use():
            raw = self._db.get(VIEW + name.encode())
        return None if raw is None else (int.from_bytes(raw[:4], "big"), raw[4:])

    def list_views(self, after: str = "", limit: int | None = None) -> Iterator[tuple[str, int, bytes]]:
        """Views in name order, starting after `after`."""
        return iter(
            [(name, int.from_bytes(raw[:4], "big"), raw[4:]) for name, raw in self._list(VIEW, after, limit)]
        )

    def _list(self, prefix: bytes, after: str, limit: int | None) -> list[tuple[str, bytes]]:
        start = prefix + after.encode() + (b"\x00" if after else b"")
        found: list[tuple[str, bytes]] = []
        with self._gate.use():
            for key, raw in self._db.items(from_key=start):
                if not key.startswith(prefix) or (limit is not None and len(found) >= limit):
                    break
                found.append((key[1:].decode(), raw))
        return found

    def _allocate_id(self, counter: bytes, wb: rocksdict.WriteBatch) -> int:
        """The next id of the counter at key `counter`, its increment staged in `wb`; under the lock."""
        raw = self._db.get(counter)
        allocated = int.from_bytes(raw, "big") if raw else 1
        wb.put(counter, (allocated + 1).to_bytes(4, "big"))
        return allocated

    def put_view(self, name: str, definition: bytes, view_id: int | None = None, *, invalidate: bool) -> int:
        """Store a view definition under its id, or a new one; return the id."""
        with self._gate.use():
            with self._lock:
                wb = rocksdict.WriteBatch(raw_mode=True)
                if view_id is None:
                    view_id = self._allocate_id(_NEXT_VIEW_ID, wb)
                wb.put(VIEW + name.encode(), view_id.to_bytes(4, "big") + definition)
                self._write(wb)
                if invalidate:
                    self._view_generations[view_id] = self._view_generations.get(view_id, 0) + 1
            self._sync()
        return view_id

    def delete_view(self, name: str, view_id: int) -> int:
        """Delete a view, its state and its tiles; return how many tiles there were."""
        prefix = tile_prefix(view_id)
        with self._gate.use():
            with self._lock:
                tiles = sum(block_tile_count(v) for _, v in self._items_with_prefix(prefix))
                wb = rocksdict.WriteBatch(raw_mode=True)
                wb.delete(VIEW + name.encode())
                wb.delete(_VIEW_STATE + view_id.to_bytes(4, "big"))
                wb.delete_range(prefix, _prefix_end(prefix))
                self._write(wb)
                self._view_generations[view_id] = -1
            self._sync()
        return tiles

    def view_generation(self, view_id: int) -> int:
        """How many times this process has written the view's definition incompatibly; -1 once deleted."""
        return self._view_generations.get(view_id, 0)

    def has_tiles(self, view_id: int) -> bool:
        """Whether a view holds any tile."""
        with self._gate.use():
            return next(self._keys_with_prefix(tile_prefix(view_id)), None) is not None

    def get_service(self, name: str) -> bytes | None:
        """The serialized definition of a feature service, or None."""
        with self._gate.use():
            raw: bytes | None = self._db.get(SERVICE + name.encode())
        return raw

    def list_services(self, after: str = "", limit: int | None = None) -> Iterator[tuple[str, bytes]]:
        """Feature services in name order, starting after `after`."""
        return iter(self._list(SERVICE, after, limit))

    def put_service(self, name: str, definition: bytes) -> None:
        """Store a feature service definition."""
        with self._gate.use():
            wb = rocksdict.WriteBatch(raw_mode=True)
            wb.put(SERVICE + name.encode(), definition)
            with self._lock:
                self._write(wb)
            self._sync()

    def delete_service(self, name: str) -> None:
        """Delete a feature service definition."""
        with self._gate.use():
            wb = rocksdict.WriteBatch(raw_mode=True)
            wb.delete(SERVICE + name.encode())
            with self._lock:
                self._write(wb)
            self._sync()

    def tile_key(self, view_id: int, entity: bytes, start_micros: int) -> bytes:
        """The key of one entity's block of tiles starting at `start_micros`."""
        return tile_prefix(view_id) + _entity_part(entity) + (start_micros + _START_OFFSET).to_bytes(8, "big")

    def tile_keys(self, view_id: int, entities: Sequence[bytes], starts: np.ndarray) -> list[bytes]:
        """The keys of each entity's block starting at the matching start (int64 microseconds)."""
        prefix = tile_prefix(view_id)
        shifted = starts.astype(np.int64).view(np.uint64) + np.uint64(_START_OFFSET)
        tails = shifted.astype(">u8").tobytes()
        if entities and max(map(len, entities)) < 0x80:
            # Without a call per key: a read builds a key per entity and block.
            lengths = _SHORT_LENGTHS
            return [prefix + lengths[len(e)] + e + tails[8 * i : 8 * i + 8] for i, e in enumerate(entities)]
        return [prefix + _entity_part(e) + tails[8 * i : 8 * i + 8] for i, e in enumerate(entities)]

    def read_tiles(self, keys: list[bytes]) -> list[bytes | None]:
        """Stored blocks of the keys, None where absent."""
        return self.read(keys)

    def scan_tiles(
        self, view_id: int, entities: Sequence[bytes], first_micros: int, last_micros: int
    ) -> tuple[list[int], np.ndarray, list[bytes]]:
        """Each entity's blocks with starts in [first_micros, last_micros], entity by entity, by start.

        Returns how many blocks each entity has, their starts (int64) and their values.
        """
        counts: list[int] = []
        lengths: list[int] = []
        keys: list[bytes] = []
        values: list[bytes] = []
        prefix = tile_prefix(view_id)
        low = (first_micros + _START_OFFSET).to_bytes(8, "big")
        high = (last_micros + _START_OFFSET).to_bytes(8, "big")
        with self._gate.use():
            # One seek per entity: its blocks are adjacent, and a scan beats a multi-get of many absent keys.
            it = self._db.iter()
            for entity in entities:
                head = prefix + _entity_part(entity)
                end = head + high
                it.seek(head + low)
                found = 0
                while it.valid():
                    key = it.key()
                    if key > end:
                        break
                    keys.append(key)
                    values.append(it.value())
                    found += 1
                    it.next()
                counts.append(found)
                lengths.append(len(end))
            del it
        if not keys:
            return counts, np.zeros(0, dtype=np.int64), values
        # Every key ends in its start's 8 bytes: gather them from the joined keys at once.
        raw = np.frombuffer(b"".join(keys), dtype=np.uint8)
        ends = np.cumsum(np.repeat(np.array(lengths, dtype=np.int64), counts))
        tails = raw[ends[:, None] - 8 + np.arange(8)]
        offset = np.frombuffer(tails.tobytes(), dtype=">u8").astype(np.uint64)
        starts = (offset - np.uint64(_START_OFFSET)).view(np.int64)
        return counts, starts, values

    def view_state(self, view_id: int) -> bytes | None:
        """The view's stored state (its watermark and backfilled ranges), or None."""
        with self._gate.use():
            raw: bytes | None = self._db.get(_VIEW_STATE + view_id.to_bytes(4, "big"))
        return raw

    def update_view_state(self, view_id: int, change: Callable[[bytes | None], bytes | None]) -> bytes | None:
        """Replace the view's state by `change(state)` under the write lock; return the new state."""
        key = _VIEW_STATE + view_id.to_bytes(4, "big")
        with self._gate.use():
            with self._lock:
                new = change(self._db.get(key))
                if new is not None:
                    wb = rocksdict.WriteBatch(raw_mode=True)
                    wb.put(key, new)
                    self._write(wb)
            self._sync()
        return new

    def delete_tiles_before(self, view_id: int, start_micros: int) -> int:
        """Delete the view's blocks that start before `start_micros`; return how many tiles they held."""
        prefix = tile_prefix(view_id)
        cutoff = (start_micros + _START_OFFSET).to_bytes(8, "big")
        deleted = 0
        with self._gate.use():
            stale = [(k, block_tile_count(v)) for k, v in self._items_with_prefix(prefix) if k[-8:] < cutoff]
            for i in range(0, len(stale), 10_000):
                wb = rocksdict.WriteBatch(raw_mode=True)
                for key, _ in stale[i : i + 10_000]:
                    wb.delete(key)
                with self._lock:
                    self._write(wb)
                deleted += sum(n for _, n in stale[i : i + 10_000])
        return deleted

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

    def hold_drain(self) -> bool:
        """Always True: this store's offline log has one drainer."""
        return True

    def queued_offline(self, max_bytes: int, last_seq: int | None = None) -> list[QueuedRecords]:
        """Queue entries from the oldest, up to about `max_bytes` (at least one) or through `last_seq`."""
        out: list[QueuedRecords] = []
        total = 0
        with self._gate.use():
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
        with self._gate.use():
            with self._lock:
                self._write(wb)
            self._sync()

    def count_offline(self, limit: int | None = None) -> int:
        """How many entries are queued, counting no further than `limit` (None: every entry)."""
        with self._gate.use():
            return _count(self._keys_with_prefix(OFFLINE), limit)

    # --- idempotency records -------------------------------------------------------------------

    def seen_request(self, request_id: str) -> dict[str, BatchCounts] | None:
        """The counts recorded for a request id still within the window, or None."""
        seen = self._seen(request_id)
        return None if seen is None else seen[0]

    def _seen(self, request_id: str) -> tuple[dict[str, BatchCounts], str] | None:
        """The counts and records' fingerprint recorded for a request id still within the window, or None."""
        raw = self._db.get(REQUEST + request_id.encode())
        if raw is None:
            return None
        if int(time.time() * 1000) - int.from_bytes(raw[:8], "big") > self._window_ms:
            return None
        return _read_request_record(raw[8:])

    def purge_requests(self) -> int:
        """Drop idempotency records older than the window, oldest first; return how many.

        The expiry index is read outside the write lock, and each small chunk is deleted under it, so
        writers wait for one chunk at most, never for a scan of every request id.
        """
        cutoff = int(time.time() * 1000) - self._window_ms
        end = REQUEST_EXPIRY + max(cutoff, 0).to_bytes(8, "big")
        purged = walked = 0
        self._writes_since_purge = 0
        start = REQUEST_EXPIRY
        with self._gate.use():
            while walked < _PURGE_MAX and not self._gate.wanted:
                chunk: list[bytes] = []
                # From after the last chunk: the entries before it are deleted, and skipping their
                # tombstones again would make each chunk slower than the last.
                for key in self._db.keys(from_key=start):
                    if key >= end or len(chunk) >= _PURGE_CHUNK:
                        break
                    chunk.append(key)
                if not chunk:
                    break
                walked += len(chunk)
                purged += self._purge_chunk(chunk)
                start = chunk[-1] + b"\x00"
        return purged

    def _purge_chunk(self, index_keys: list[bytes]) -> int:
        """Delete expired index entries and the records they name, unless a record was written anew since."""
        ids = [REQUEST + key[9:] for key in index_keys]
        with self._lock:
            wb = rocksdict.WriteBatch(raw_mode=True)
            deleted = 0
            for index_key, id_key, raw in zip(index_keys, ids, self._db.get(ids), strict=True):
                wb.delete(index_key)
                # A request id sent again after its window holds a newer time and its own index entry.
                if raw is not None and raw[:8] == index_key[1:9]:
                    wb.delete(id_key)
                    deleted += 1
            self._write(wb)
        return deleted

    def _index_request_records(self) -> None:
        """Index the idempotency records of a database written before the expiry index existed; once."""
        wb = rocksdict.WriteBatch(raw_mode=True)
        for key, raw in self._db.items(from_key=REQUEST):
            if not key.startswith(REQUEST):
                break
            wb.put(REQUEST_EXPIRY + raw[:8] + key[1:], b"")
        wb.put(_REQUEST_INDEX_BUILT, b"1")
        self._db.write(wb)
