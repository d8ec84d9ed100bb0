"""The latest-event index stays within its byte bound whatever the length of callers' entity keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from featurepush_server.core.errors import StorageFull
from featurepush_server.core.stores.base import RowBatch
from featurepush_server.core.stores.rocksdb import RocksDBStore, row_prefix


def _head(t: int) -> bytes:
    return t.to_bytes(8, "big")


def test_long_keys_keep_the_index_under_its_byte_bound_and_writes_stay_latest(tmp_path: Path) -> None:
    store = RocksDBStore(tmp_path / "db", fsync=False, latest_cache_bytes=200_000)
    try:
        prefix = row_prefix(1)
        keys = [prefix + (b"%05d" % i) * 2000 for i in range(200)]  # 10 KB keys
        for round_ in range(3):
            for start in range(0, len(keys), 10):
                part = keys[start : start + 10]
                store.write_latest([RowBatch("s", part, [_head(10 + round_) + b"v"] * len(part), b"")])
                # Bounded: at most the bound plus one batch's keys, never the 2 MB of all keys.
                assert store._latest_bytes <= 200_000 + 10 * (20_000 + 200)
                assert sum(map(len, store._latest)) <= 200_000 + 10 * 20_000
        # After the index started over, an older event still loses to the stored newer one.
        result = store.write_latest([RowBatch("s", keys[:5], [_head(5) + b"old"] * 5, b"")])
        assert result.counts["s"].written == 0 and result.counts["s"].superseded == 5
        assert store.read(keys[:1]) == [_head(12) + b"v"]
    finally:
        store.close()


def test_keys_the_index_lacks_are_read_unless_it_holds_every_row_of_their_source(tmp_path: Path) -> None:
    prefix = row_prefix(7)
    keys = [prefix + b"e%d" % i for i in range(50)]
    store = RocksDBStore(tmp_path / "db", fsync=False, latest_cache_entries=20)
    try:
        # An empty source: every row is written through this store, so none needs reading.
        first = store.write_latest([RowBatch("s", keys, [_head(10) + b"a"] * 50, b"", 7, 0)])
        assert first.counts["s"].written == 50
        # The index started over (past 20 entries), so the stored rows are read again: older events lose.
        older = store.write_latest([RowBatch("s", keys[:30], [_head(5) + b"b"] * 30, b"", 7, 0)])
        assert (older.counts["s"].written, older.counts["s"].superseded) == (0, 30)
        newer = store.write_latest([RowBatch("s", keys[40:], [_head(20) + b"c"] * 10, b"", 7, 0)])
        assert newer.counts["s"].written == 10
    finally:
        store.close()
    # Rows stored before this process opened the database are read, never assumed absent.
    again = RocksDBStore(tmp_path / "db", fsync=False)
    try:
        result = again.write_latest([RowBatch("s", keys, [_head(15) + b"d"] * 50, b"", 7, 0)])
        assert (result.counts["s"].written, result.counts["s"].superseded) == (40, 10)
        assert again.read([keys[0], keys[45]]) == [_head(15) + b"d", _head(20) + b"c"]
        # Deleted rows are absent again: an old event lands.
        assert again.delete_expired(7, 16 - (1 << 63)) == 40  # _head is the raw header, not a time
        late = again.write_latest([RowBatch("s", keys[:2], [_head(1) + b"e"] * 2, b"", 7, 0)])
        assert late.counts["s"].written == 2
    finally:
        again.close()


class _RefusingDb:
    """The store's database with writes that fail, as a full disk makes them; everything else passes."""

    def __init__(self, db: object):
        self._db = db

    def write(self, wb: object) -> None:
        raise OSError(28, "No space left on device")

    def __getattr__(self, name: str) -> object:
        return getattr(self._db, name)


def test_a_write_that_did_not_land_leaves_no_event_time_in_the_index(tmp_path: Path) -> None:
    keys = [row_prefix(3) + b"e%d" % i for i in range(5)]
    store = RocksDBStore(tmp_path / "db", fsync=False)
    real = store._db
    try:
        store.write_latest([RowBatch("s", keys, [_head(10) + b"a"] * 5, b"", 3, 0)])
        store._db = _RefusingDb(real)
        with pytest.raises(StorageFull):
            store.write_latest([RowBatch("s", keys, [_head(30) + b"b"] * 5, b"", 3, 0)])
        store._db = real
        store._write_error = None
        # Time 30 never landed: an event at 20 is newer than what is stored and is written.
        result = store.write_latest([RowBatch("s", keys, [_head(20) + b"c"] * 5, b"", 3, 0)])
        assert (result.counts["s"].written, result.counts["s"].superseded) == (5, 0)
        assert store.read(keys[:1]) == [_head(20) + b"c"]
    finally:
        store._db = real
        store.close()


def test_a_dry_run_leaves_no_event_time_in_the_index(tmp_path: Path) -> None:
    keys = [row_prefix(4) + b"e%d" % i for i in range(3)]
    store = RocksDBStore(tmp_path / "db", fsync=False)
    try:
        dry = store.write_latest([RowBatch("s", keys, [_head(30) + b"a"] * 3, b"", 4, 0)], dry_run=True)
        assert dry.counts["s"].written == 3
        result = store.write_latest([RowBatch("s", keys, [_head(20) + b"b"] * 3, b"", 4, 0)])
        assert result.counts["s"].written == 3
        assert store.read(keys[:1]) == [_head(20) + b"b"]
    finally:
        store.close()
