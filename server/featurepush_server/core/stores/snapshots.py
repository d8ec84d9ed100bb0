"""A front's own reads of the owner's RocksDB database, from read-only snapshots of it.

Under `serve --processes` one owner process writes the database. Sending every read there too makes
the owner the ceiling of reads as well as writes, so each front opens the database read-only (RocksDB
allows that beside its one writer) and answers reads from that snapshot while no write has landed since.
An opening sees every write that landed before it, unless a flush or compaction ended while it ran: the
owner may then delete a log the opening listed but had not replayed yet, and the rows only that log held
are missing from the snapshot without an error. Such an opening is dropped, told by the MANIFEST file,
which every flush and compaction appends to before deleting what it replaced.

Whether one has is told by a counter the owner increases after every write lands (`SharedCounter`, a
file mapped into memory). A front opens a new snapshot only once the counter has stood still for a
moment, and pairs it with the counter's value read before the opening began. A read is answered from
the snapshot only while the counter still holds that value: every write acknowledged before the read
began was counted before then, so it landed before the snapshot was opened. Otherwise the read goes to
the owner, as it always could. So a read never misses an acknowledged write, whatever front it reaches.

An opening replays the owner's unflushed log, about a third of a microsecond per row, so a front opens
snapshots at most at a rate that keeps that work under a twentieth of its time; while writes go on, the
owner answers the reads. RocksDB's secondary instances, which follow a writer's files instead of
reopening them, were tried and left: once the owner flushed, their point lookups returned values the
flush had replaced.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import rocksdict

from .remote import SharedCounter
from .rocksdb import db_options

_LOGGER = logging.getLogger(__name__)

# How long the owner's write counter must stand still before a front opens a new snapshot: the opening
# is wasted if more writes follow at once.
QUIET_S = 0.02
# An opening's cost times this is the least time between two, so openings take at most 1/20 of a front.
_COST_FACTOR = 20.0
# Each front's cache of data blocks, shared by its snapshots; the owner keeps the large one.
CACHE_BYTES = 64 * 1024 * 1024
# How long a front waits before trying again after RocksDB refused to open the database.
_RETRY_S = 1.0


class SnapshotReader:
    """Reads of the database at `db_path` from read-only snapshots, while they are current; thread-safe."""

    def __init__(self, db_path: Path, writes: SharedCounter, *, quiet_s: float = QUIET_S):
        self._db_path = db_path
        self._writes = writes
        self._quiet_s = quiet_s
        self._cache = rocksdict.Cache(CACHE_BYTES)
        # The open snapshot and the write counter's value read before it was opened, swapped as one.
        self._snapshot: tuple[Any, int] | None = None
        self.local_reads = 0
        self.owner_reads = 0
        self.openings = 0
        # Openings dropped because the owner changed the database's files while they ran.
        self.discarded = 0
        self._wanted = threading.Event()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="featurepush-snapshots", daemon=True)
        self._wanted.set()
        self._thread.start()

    def read(self, keys: list[bytes]) -> list[bytes | None] | None:
        """The stored values of the keys, or None when a write landed since the snapshot (ask the owner)."""
        snapshot = self._snapshot
        if snapshot is None or self._writes.read() != snapshot[1]:
            self.owner_reads += 1
            self._wanted.set()
            return None
        try:
            values: list[bytes | None] = snapshot[0].get(keys)
        except Exception as e:  # noqa: BLE001 - the owner can still answer
            _LOGGER.warning("a read from the front's snapshot failed, the owner answers it: %s", e)
            self._snapshot = None
            self.owner_reads += 1
            self._wanted.set()
            return None
        self.local_reads += 1
        return values

    def close(self) -> None:
        """Stop opening snapshots and drop the last; reads go to the owner from now on."""
        self._closed.set()
        self._wanted.set()
        self._thread.join()
        self._snapshot = None

    def _follow(self) -> None:
        """Open a snapshot whenever a read found the last one behind and the owner's writes have paused."""
        next_opening = 0.0
        failing = False
        while True:
            # Checked before waiting: a close that came while an opening ran may have had its wake-up
            # cleared below, and would wait for this thread for ever.
            if self._closed.is_set():
                return
            self._wanted.wait()
            seen = self._writes.read()
            if self._closed.wait(max(self._quiet_s, next_opening - time.monotonic())):
                return
            now = self._writes.read()
            if now != seen:
                continue  # writes go on: the owner answers reads meanwhile
            self._wanted.clear()
            began = time.monotonic()
            files = _manifest(self._db_path)
            try:
                options = db_options(self._cache)
                # Every table file is opened now, so the owner's compactions cannot take one away later.
                options.set_max_open_files(-1)
                access = rocksdict.AccessType.read_only()
                db = rocksdict.Rdict(str(self._db_path), options, access_type=access)
            except Exception as e:  # noqa: BLE001 - reads go to the owner until an opening works
                if not failing:
                    # Once per run of failures: the front tries again every second meanwhile.
                    _LOGGER.warning("cannot open the database read-only, the owner answers reads: %s", e)
                failing = True
                self._wanted.set()
                next_opening = time.monotonic() + _RETRY_S
                continue
            if files is None or _manifest(self._db_path) != files:
                # A flush or compaction the owner finished meanwhile may have deleted a log this opening
                # had yet to replay, after this opening read the file list that still needed it: its
                # rows would be silently missing. The next opening, once the owner pauses again, is whole.
                db.close()
                self.discarded += 1
                self._wanted.set()
                next_opening = began + (time.monotonic() - began) * _COST_FACTOR
                continue
            if failing:
                _LOGGER.info("the store's database opened read-only again: this front answers reads")
                failing = False
            self._snapshot = (db, now)
            self.openings += 1
            next_opening = began + (time.monotonic() - began) * _COST_FACTOR


def _manifest(db_path: Path) -> tuple[str, int] | None:
    """The database's current MANIFEST file and its size, or None if unreadable.

    Every flush and compaction appends to it before the owner deletes the logs and tables it replaced, so
    an opening between two equal readings saw one consistent set of files.
    """
    try:
        # Plain system calls: each gives up the interpreter lock, which a busy front is slow to hand back.
        fd = os.open(db_path / "CURRENT", os.O_RDONLY)
        try:
            name = os.read(fd, 256).decode().strip()
        finally:
            os.close(fd)
        return name, os.stat(db_path / name).st_size
    except (OSError, UnicodeDecodeError):
        return None
