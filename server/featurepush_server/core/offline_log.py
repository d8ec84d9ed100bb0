"""The offline log: acknowledged records moved from the store's queue into Parquet files, exactly once.

Layout: `<root>/<source>/date=<YYYY-MM-DD>/<first seq>-<last seq>.parquet`, partitioned by the records'
event-time date (UTC). A flush round takes the oldest queue entries, writes one file per source and date,
each to a hidden temporary name, fsynced and then renamed, and only then deletes the entries. Every file
of a round is named by the round's sequence range, so after a crash between the renames and the delete
the next round finds the range from the file names, redoes it writing only the files that are missing,
and deletes the entries: nothing is lost and nothing is written twice.

A queue entry that cannot be read or written (it should never happen: entries are validated records)
is copied as-is to `<root>/.quarantine/<seq>.arrows`, logged and skipped, so that one bad entry never
stops the log, nor the server at start-up. Source names cannot start with a dot, so the folder is no
source's.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .ipc import READ_ERRORS, IpcLimits, arrow_ipc, read_stream
from .materialize import Origin, Staged
from .periodic import Periodic
from .stores.base import OfflineQueue, QueuedRecords

_LOGGER = logging.getLogger(__name__)

ROUND_BYTES = 64 * 1024 * 1024
# Schema metadata naming the event-time column of a queued table, which decides its date partition.
TIMESTAMP_FIELD_KEY = b"featurepush.timestamp_field"
QUARANTINE_DIR = ".quarantine"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_name(first: int, last: int) -> str:
    return f"{first:020d}-{last:020d}.parquet"


class OfflineLogWriter:
    """Stages a push's records for the offline log when its source logs offline; backfills never are.

    The entry rides in the same atomic write as the rows: acknowledged means queued for the log. It is
    the records as an Arrow IPC stream whose schema metadata names the event-time column.
    """

    def stage(self, staged: Staged) -> None:
        """Set the staged offline-log entry."""
        spec = staged.source.spec
        if staged.origin is Origin.PUSH and spec.log_offline and not staged.dry_run:
            tagged = staged.table.replace_schema_metadata({TIMESTAMP_FIELD_KEY: spec.timestamp_field})
            staged.offline = arrow_ipc(tagged)


class OfflineLog:
    """Moves queued records into Parquet under `root`; a background thread flushes every `interval_s`.

    `flush()` may also be called directly; rounds are serialized by a lock, so it is thread-safe.
    """

    def __init__(
        self, store: OfflineQueue, root: Path, *, interval_s: float = 1.0, round_bytes: int = ROUND_BYTES
    ):
        self.root = root
        self._store = store
        self._round_bytes = round_bytes
        self._lock = threading.Lock()
        # Queue entries moved to the quarantine folder by this process.
        self.quarantined = 0
        # Background flushes that failed (they are retried), and when the queue was last seen empty:
        # the oldest queued record is at most that old, which is what the operator watches as lag.
        self.flush_errors = 0
        self._empty_at = time.monotonic()
        # Records stay queued in RocksDB until flushed, so a failed round is simply retried.
        self._flusher = Periodic("featurepush-offline-log", interval_s, self._flush_in_background)
        # Where servers take turns draining into what may be one shared folder, a temporary file may be
        # another server's running round: only files unmodified this long are leftovers (see below).
        lease = store.drain_lease_s
        self._stale_temporary_s = None if lease is None else 2 * lease
        root.mkdir(parents=True, exist_ok=True)
        self._remove_temporary_files()
        # A drainer killed just before this start left files too young to remove yet; one more pass once
        # they are old enough removes them, rather than leaving them until the next server starts.
        stale = self._stale_temporary_s
        self._sweep_again_at = None if stale is None else time.monotonic() + stale

    def _remove_temporary_files(self) -> None:
        """Delete the temporary files of interrupted rounds (records still queued) that no drainer may own."""
        # A process that drains alone removes them all. Where servers take turns, only files unmodified for
        # two leases go: a drainer renews its lease as a round starts and writes the round's files after,
        # so a file unmodified for one lease was written under a lease that has run out, by a drainer that
        # died or stalled past it (the lease is no fence then anyway: the stalled drainer's rename fails and
        # it retries the round, its records still queued). The second lease covers the clocks of this
        # server and of a shared folder's file server being apart.
        now = time.time()
        leftovers = [*self.root.glob("*/date=*/.*.tmp"), *(self.root / QUARANTINE_DIR).glob(".*.tmp")]
        for temp in leftovers:
            if self._stale_temporary_s is not None:
                try:
                    modified = temp.stat().st_mtime
                except FileNotFoundError:
                    continue  # renamed by its drainer meanwhile
                if now - modified < self._stale_temporary_s:
                    continue
            _LOGGER.info("removing the unfinished offline-log file %s", temp)
            temp.unlink(missing_ok=True)

    def source_dir(self, source: str) -> Path:
        """The folder holding one source's log files."""
        return self.root / source

    def start(self) -> None:
        """Start the background flusher."""
        self._flusher.start()

    def close(self) -> None:
        """Stop the background flusher and flush what is queued."""
        self._flusher.stop()
        self.flush()

    def _flush_in_background(self) -> int:
        try:
            return self.flush()
        except Exception:
            self.flush_errors += 1
            raise

    def lag_seconds(self) -> float:
        """At least the age of the oldest record not yet flushed: the time since the queue was last empty."""
        if not self._store.queued_offline(1):
            return 0.0
        return time.monotonic() - self._empty_at

    def flush(self) -> int:
        """Flush every queued record to Parquet; return how many records were written."""
        written = 0
        with self._lock:
            if self._sweep_again_at is not None and time.monotonic() >= self._sweep_again_at:
                self._sweep_again_at = None
                self._remove_temporary_files()
            while True:
                try:
                    n = self._flush_round(self._round_bytes)
                except _Regroup:
                    # Entries that read fine alone may still not combine (say a column's type changed
                    # between pushes): one entry per round, and one that still fails is quarantined.
                    n = self._flush_round(0)
                if n is None:
                    self._empty_at = time.monotonic()
                    return written
                written += n

    def _flush_round(self, max_bytes: int) -> int | None:
        head = self._store.queued_offline(1)
        if not head:
            return None
        first = head[0].seq
        # A crashed round left files named by its range; finishing that range keeps the files unique.
        crashed = sorted(self.root.glob(f"*/date=*/{first:020d}-*.parquet"))
        last_seq = int(crashed[0].stem.split("-")[1]) if crashed else None
        entries = self._store.queued_offline(max_bytes, last_seq)
        last = entries[-1].seq if last_seq is None else last_seq
        loaded: list[tuple[str, pa.Table]] = []
        for entry in entries:
            table = self._load(entry)
            if table is not None:
                loaded.append((entry.source, table))
        created: list[Path] = []
        try:
            rows = self._write(self._group(loaded), first, last, created)
        except _LeaseLost:
            # The files renamed so far are whole and named by this range: the lease's new holder finishes
            # the range from them (as a crashed round's), so the records are written once.
            _LOGGER.info("offline log: another server took the drain lease during a round; it goes on")
            return None
        except OSError:
            raise  # the disk, not the data: the round is retried
        except READ_ERRORS as e:
            # The files already written carry this round's range and would be taken for a crashed round's.
            for path in created:
                path.unlink(missing_ok=True)
            if len(entries) > 1:
                raise _Regroup from None
            self._quarantine(entries[0], f"its records cannot be written ({type(e).__name__})")
            rows = 0
        # Quarantined entries go with the round's range, so a crash before this leaves the range whole.
        self._store.delete_offline(first, last)
        _LOGGER.debug("offline log: flushed queue entries %d..%d (%d records)", first, last, rows)
        return rows

    def _write(
        self, groups: dict[tuple[str, str], pa.Table], first: int, last: int, created: list[Path]
    ) -> int:
        """One file per source and date, named by the round's range, listed in `created`; return the rows."""
        rows = 0
        for (source, date), table in groups.items():
            folder = self.source_dir(source) / f"date={date}"
            target = folder / _file_name(first, last)
            rows += table.num_rows
            if target.exists():
                continue
            folder.mkdir(parents=True, exist_ok=True)
            # A name of its own: a drainer that stalled past its lease may write this round's file too.
            temp = folder / f".{target.name}.{uuid.uuid4().hex[:12]}.tmp"
            created.append(temp)
            try:
                with open(temp, "wb") as fh:
                    pq.write_table(table, fh)
                    fh.flush()
                    os.fsync(fh.fileno())
            except BaseException:
                # A full disk fails here; the records stay queued and the next round writes them again.
                temp.unlink(missing_ok=True)
                raise
            # A round slower than the lease (a large one on a slow volume) keeps it here, and one whose
            # lease another server took meanwhile (this one stalled) stops before a file that server
            # writes too: the rest of its range would be written twice otherwise.
            if not self._store.hold_drain():
                temp.unlink(missing_ok=True)
                raise _LeaseLost
            os.replace(temp, target)
            created.append(target)
            _fsync_dir(folder)
            _fsync_dir(folder.parent)
        return rows

    def _load(self, entry: QueuedRecords) -> pa.Table | None:
        """An entry's records, fully validated, or None once the entry is quarantined."""
        # Entries hold uncompressed records, so their decoded size is about their own.
        limits = IpcLimits(
            max_rows=2**62,
            max_decoded_bytes=2 * len(entry.arrow_ipc) + 2**20,
            max_batches=2**20,
            max_columns=2**20,
            max_nesting=256,
        )
        try:
            table = read_stream(entry.arrow_ipc, limits)
            ts_field = _timestamp_column(table)
            if not pa.types.is_timestamp(table.schema.field(ts_field).type):
                raise ValueError("the timestamp field is not a timestamp column")
        except (*READ_ERRORS, KeyError) as e:
            self._quarantine(entry, f"its records cannot be read ({type(e).__name__}: {e})")
            return None
        return table

    def _quarantine(self, entry: QueuedRecords, why: str) -> None:
        """Copy an entry as-is to the quarantine folder, durably, and log it without its records."""
        folder = self.root / QUARANTINE_DIR
        target = folder / f"{entry.seq:020d}.arrows"
        if target.exists():
            return  # already quarantined by an earlier try of this round
        folder.mkdir(parents=True, exist_ok=True)
        temp = folder / f".{target.name}.{uuid.uuid4().hex[:12]}.tmp"
        with open(temp, "wb") as fh:
            fh.write(entry.arrow_ipc)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp, target)
        _fsync_dir(folder)
        self.quarantined += 1
        _LOGGER.error(
            "offline log: queue entry %d of source %s is quarantined in %s and skipped: %s",
            entry.seq,
            entry.source,
            target,
            why,
        )

    @staticmethod
    def _group(loaded: list[tuple[str, pa.Table]]) -> dict[tuple[str, str], pa.Table]:
        """The entries' records grouped by source and event-time date, in sequence order."""
        parts: dict[str, list[pa.Table]] = defaultdict(list)
        for source, table in loaded:
            parts[source].append(table)
        out: dict[tuple[str, str], pa.Table] = {}
        for source, tables in parts.items():
            # A compatible schema change (a new nullable field) between pushes leaves those earlier rows null.
            table = pa.concat_tables(tables, promote_options="default")
            ts_field = _timestamp_column(table)
            dates = pc.strftime(table.column(ts_field), format="%Y-%m-%d").to_numpy(zero_copy_only=False)
            for date in np.unique(dates):
                out[(source, str(date))] = table.filter(pa.array(dates == date))
        return out


class _LeaseLost(Exception):
    """Another server took the drain lease during this round; it finishes the round's range."""


class _Regroup(Exception):
    """A round's entries, each readable, cannot be written together; they are retried one by one."""


def _timestamp_column(table: pa.Table) -> str:
    """The name of the record's event-time column, kept in the schema metadata of logged tables."""
    meta = table.schema.metadata or {}
    name = meta.get(TIMESTAMP_FIELD_KEY)
    if name is None:
        raise ValueError("a logged table lacks its timestamp field metadata")
    return bytes(name).decode()
