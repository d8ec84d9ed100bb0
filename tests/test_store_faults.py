"""The store's usage gate, idempotency-record expiry and start-up cleanup, on a real RocksDB."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from conftest import AD_IMPRESSIONS, start

from featurepush_server.core.errors import ShuttingDown, StorageFull, Unavailable
from featurepush_server.core.stores.base import RowBatch
from featurepush_server.core.stores.rocksdb import (
    REQUEST,
    REQUEST_EXPIRY,
    SPACE_PROBE,
    RocksDBStore,
    storage_error,
)


def _batch(key: bytes, value: bytes = b"\x80" + bytes(7) + b"v") -> RowBatch:
    return RowBatch("s", [key], [value])


def _count(store: RocksDBStore, prefix: bytes) -> int:
    return sum(1 for k in store._db.keys(from_key=prefix) if k.startswith(prefix))


def test_close_waits_for_a_running_call_and_later_calls_are_turned_away(tmp_path: Path) -> None:
    store = RocksDBStore(tmp_path)
    inside, release, finished = threading.Event(), threading.Event(), []

    def hold() -> None:
        with store.exclusive():
            inside.set()
            release.wait(10)
            store.write_latest([_batch(b"k")])
            finished.append(True)

    worker = threading.Thread(target=hold)
    worker.start()
    inside.wait(10)
    threading.Timer(0.2, release.set).start()
    assert store.close(10)
    assert finished == [True]
    worker.join()
    with pytest.raises(ShuttingDown, match="shutting down"):
        store.read([b"k"])
    assert store.close(1)  # a second close is a no-op


def test_expired_request_ids_are_purged_through_the_index(tmp_path: Path) -> None:
    store = RocksDBStore(tmp_path, idempotency_window_s=0.05)
    try:
        for i in range(600):
            store.write_latest([_batch(b"k%d" % i)], request_id=f"old-{i}")
        time.sleep(0.1)
        # Sent again after its window: written anew, and its fresh record must survive the purge.
        assert not store.write_latest([_batch(b"k0")], request_id="old-0").replayed
        store.write_latest([_batch(b"k-new")], request_id="new")
        store._window_ms = 60_000
        assert store.purge_requests() == 0  # nothing is older than a minute
        store._window_ms = 50
        time.sleep(0.06)
        store.write_latest([_batch(b"k-newest")], request_id="newest")
        assert store.purge_requests() == 601
        assert _count(store, REQUEST) == 1 and _count(store, REQUEST_EXPIRY) == 1
        assert store.write_latest([_batch(b"k-newest")], request_id="newest").replayed
    finally:
        store.close()


def test_records_of_a_database_without_the_index_are_indexed_once(tmp_path: Path) -> None:
    store = RocksDBStore(tmp_path, idempotency_window_s=0.05)
    store.write_latest([_batch(b"k")], request_id="r")
    # As a database written before the index existed holds them: records only.
    for key in list(store._db.keys(from_key=REQUEST_EXPIRY)):
        if key.startswith(REQUEST_EXPIRY):
            store._db.delete(key)
    store._db.delete(b"mrequest_expiry_index")
    store.close()
    again = RocksDBStore(tmp_path, idempotency_window_s=0.05)
    try:
        assert _count(again, REQUEST_EXPIRY) == 1
        time.sleep(0.06)
        assert again.purge_requests() == 1 and _count(again, REQUEST) == 0
    finally:
        again.close()


@pytest.mark.parametrize(
    ("error", "kind", "reason"),
    [
        (
            Exception("IO error: No space left on device: While appending to file: 4.log"),
            StorageFull,
            "DISK_FULL",
        ),
        (OSError(28, "No space left on device"), StorageFull, "DISK_FULL"),
        (Exception("IO error: Input/output error"), Unavailable, "STORAGE_ERROR"),
        (OSError(5, "Input/output error"), Unavailable, "STORAGE_ERROR"),
    ],
)
def test_disk_errors_are_told_apart(error: Exception, kind: type, reason: str) -> None:
    mapped = storage_error(error)
    assert isinstance(mapped, kind) and mapped.reason == reason


def test_other_errors_are_not_disk_errors() -> None:
    assert storage_error(Exception("Invalid argument: bad key")) is None


def test_leftover_temporary_files_are_removed_at_start(tmp_path: Path) -> None:
    day = tmp_path / "offline" / "ad_impressions" / "date=2026-11-25"
    day.mkdir(parents=True)
    leftover = day / ".00000000000000000001-00000000000000000002.parquet.tmp"
    leftover.write_bytes(b"half a file")
    kept = day / "00000000000000000001-00000000000000000002.parquet"
    kept.write_bytes(b"a finished file")
    # An entry's copy into the quarantine folder, cut short by a crash.
    quarantine = tmp_path / "offline" / ".quarantine"
    quarantine.mkdir()
    half_copied = quarantine / ".00000000000000000003.arrows.0123456789ab.tmp"
    half_copied.write_bytes(b"half an entry")
    (tmp_path / "online").mkdir()
    probe = tmp_path / "online" / SPACE_PROBE
    probe.write_bytes(b"\0")
    running = start(tmp_path)
    try:
        running.apply(AD_IMPRESSIONS)
        assert not leftover.exists() and not probe.exists() and kept.exists()
        assert not half_copied.exists()
    finally:
        running.close()
