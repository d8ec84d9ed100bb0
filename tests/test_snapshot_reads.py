"""A front's read-only snapshots of the owner's database: current or silent, never behind an ack."""

from __future__ import annotations

import logging
import resource
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from servers import wait_until

from featurepush_server.core.stores import snapshots
from featurepush_server.core.stores.remote import SharedCounter
from featurepush_server.core.stores.rocksdb import SERVICE, RocksDBStore
from featurepush_server.core.stores.snapshots import SnapshotReader

NAMES = [f"service{i}" for i in range(20)]
# The raw keys of those services: the reader reads any key the owner wrote, rows and tiles alike.
KEYS = [SERVICE + name.encode() for name in NAMES]


def _owner(path: Path, writes: SharedCounter) -> RocksDBStore:
    """A store as the owner process opens it: each write that lands moves the counter."""
    store = RocksDBStore(path, fsync=False)
    store.watch_writes(writes.bump)
    writes.bump()
    return store


def _put_all(store: RocksDBStore, value: bytes) -> None:
    for name in NAMES:
        store.put_service(name, value)


def _caught_up(reader: SnapshotReader, expected: list[bytes | None]) -> bool:
    return reader.read(KEYS) == expected


def _started(tmp_path: Path, value: bytes) -> tuple[SharedCounter, RocksDBStore, SnapshotReader]:
    """An owner's store holding `value` under every key, and a reader that has a snapshot of it."""
    writes = SharedCounter(tmp_path / "writes")
    store = _owner(tmp_path / "db", writes)
    _put_all(store, value)
    reader = SnapshotReader(tmp_path / "db", writes, quiet_s=0.01)
    assert wait_until(lambda: _caught_up(reader, [value] * len(KEYS)))
    return writes, store, reader


def test_a_reader_answers_only_while_it_holds_every_counted_write(tmp_path: Path) -> None:
    _, store, reader = _started(tmp_path, b"one")
    try:
        assert reader.local_reads > 0 and reader.openings >= 1
        # A write that landed moves the counter: the very next read is left to the owner.
        store.put_service(NAMES[0], b"two")
        assert reader.read(KEYS) is None
        assert reader.owner_reads > 0
        assert wait_until(lambda: _caught_up(reader, [b"two"] + [b"one"] * (len(KEYS) - 1)))
        store.delete_service(NAMES[1])
        assert reader.read(KEYS) is None
        assert wait_until(lambda: _caught_up(reader, [b"two", None] + [b"one"] * (len(KEYS) - 2)))
    finally:
        reader.close()
        store.close()
    assert reader.read(KEYS) is None


def test_reads_racing_writes_never_see_a_value_older_than_the_last_acknowledged(tmp_path: Path) -> None:
    writes = SharedCounter(tmp_path / "writes")
    store = _owner(tmp_path / "db", writes)
    _put_all(store, (0).to_bytes(4, "big"))
    reader = SnapshotReader(tmp_path / "db", writes, quiet_s=0.002)
    acknowledged = 0
    done = threading.Event()
    stale: list[tuple[int, int]] = []

    def write() -> None:
        nonlocal acknowledged
        for version in range(1, 400):
            _put_all(store, version.to_bytes(4, "big"))
            acknowledged = version
            if version % 40 == 0:
                done.wait(0.2)  # pauses, so the reader catches up between bursts
        done.set()

    writer = threading.Thread(target=write)
    writer.start()
    local = 0
    try:
        while not done.is_set():
            floor = acknowledged
            values = reader.read(KEYS)
            if values is None:
                continue
            local += 1
            oldest = min(int.from_bytes(v or b"", "big") for v in values)
            if oldest < floor:
                stale.append((oldest, floor))
    finally:
        writer.join()
        reader.close()
        store.close()
    assert not stale
    assert local > 0


def test_a_reader_follows_an_owner_that_reopened_flushed_and_compacted_the_database(tmp_path: Path) -> None:
    writes, store, reader = _started(tmp_path, b"before")
    try:
        store.close()
        # The next owner recovers the log, replaces the files the last snapshot read and counts its start.
        store = _owner(tmp_path / "db", writes)
        store._db.flush()
        _put_all(store, b"after")
        store._db.flush()
        store._db.compact_range(None, None)
        assert wait_until(lambda: _caught_up(reader, [b"after"] * len(KEYS)))
    finally:
        reader.close()
        store.close()


def test_an_opening_during_which_the_owner_flushed_is_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The owner's flush lands while the first opening runs: the log it deleted may have held rows the
    # opening had not replayed yet, so that snapshot must never answer.
    writes = SharedCounter(tmp_path / "writes")
    store = _owner(tmp_path / "db", writes)
    _put_all(store, b"one")
    real = snapshots.rocksdict.Rdict
    openings: list[object] = []

    def opening(*args: object, **kwargs: object) -> object:
        db = real(*args, **kwargs)
        if not openings:
            store._db.flush()
        openings.append(db)
        return db

    monkeypatch.setattr(snapshots.rocksdict, "Rdict", opening)
    reader = SnapshotReader(tmp_path / "db", writes, quiet_s=0.01)
    try:
        assert wait_until(lambda: _caught_up(reader, [b"one"] * len(KEYS)))
        assert reader.discarded == 1 and reader.openings == 1 and len(openings) == 2
        assert reader._snapshot is not None and reader._snapshot[0] is openings[1]
    finally:
        reader.close()
        store.close()


def test_a_reader_that_cannot_open_the_database_leaves_every_read_to_the_owner(tmp_path: Path) -> None:
    writes = SharedCounter(tmp_path / "writes")
    writes.bump()
    reader = SnapshotReader(tmp_path / "missing", writes, quiet_s=0.01)
    try:
        assert not wait_until(lambda: reader.read(KEYS) is not None, timeout_s=0.5)
        assert reader.openings == 0 and reader.local_reads == 0
    finally:
        reader.close()


def test_a_snapshot_that_fails_a_read_is_dropped_and_the_owner_answers(tmp_path: Path) -> None:
    _, store, reader = _started(tmp_path, b"kept")
    try:
        snapshot = reader._snapshot
        assert snapshot is not None
        snapshot[0].close()  # any failure of the handle, as a file RocksDB could no longer read
        owner_reads = reader.owner_reads
        assert reader.read(KEYS) is None
        assert reader.owner_reads == owner_reads + 1
        # The next snapshot answers again.
        assert wait_until(lambda: _caught_up(reader, [b"kept"] * len(KEYS)))
    finally:
        reader.close()
        store.close()


def test_a_server_raises_its_open_files_limit_to_what_the_system_allows() -> None:
    code = (
        "import resource\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
        "from featurepush_server.app import _raise_open_files_limit\n"
        "_raise_open_files_limit()\n"
        "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard)\n"
    )
    soft, hard = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout.split()
    assert int(soft) == (1 << 20 if int(hard) == resource.RLIM_INFINITY else int(hard))


def test_a_reader_that_cannot_open_says_so_once_and_again_when_it_can(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="featurepush_server.core.stores.snapshots")
    writes = SharedCounter(tmp_path / "writes")
    reader = SnapshotReader(tmp_path / "db", writes, quiet_s=0.01)
    try:
        assert wait_until(lambda: "cannot open" in caplog.text, timeout_s=5)
        # The next owner creates the database; within a retry the front reads from it.
        store = _owner(tmp_path / "db", writes)
        _put_all(store, b"late")
        try:
            assert wait_until(lambda: _caught_up(reader, [b"late"] * len(KEYS)))
        finally:
            store.close()
    finally:
        reader.close()
    assert caplog.text.count("cannot open") == 1
    assert "opened read-only again" in caplog.text


class _ClosingCounter(SharedCounter):
    """The owner's write counter, closing `reader` as the reader takes its second look before an opening."""

    reader: SnapshotReader | None = None
    looks = 0

    def read(self) -> int:
        self.looks += 1
        if self.looks == 2 and self.reader is not None:
            # What close() does, between the reader's quiet wait and its clearing of the wake-up.
            self.reader._closed.set()
            self.reader._wanted.set()
        return super().read()


def test_a_close_that_comes_while_an_opening_begins_still_ends_the_reader(tmp_path: Path) -> None:
    writes = _ClosingCounter(tmp_path / "writes")
    store = _owner(tmp_path / "db", writes)
    try:
        reader = SnapshotReader.__new__(SnapshotReader)
        writes.reader, writes.looks = reader, 0
        SnapshotReader.__init__(reader, tmp_path / "db", writes, quiet_s=0.01)
        reader._thread.join(30)
        # Before, the opening cleared the close's wake-up and the thread waited for another for ever.
        assert not reader._thread.is_alive()
        reader.close()
    finally:
        store.close()
