"""The latest-event index: within its bounds whatever callers' keys, exact after it starts over."""

from __future__ import annotations

from pathlib import Path

import pytest

from featurepush_server.core.errors import StorageFull
from featurepush_server.core.stores import rocksdb
from featurepush_server.core.stores.base import RowBatch
from featurepush_server.core.stores.rocksdb import RocksDBStore, row_prefix


def _entities(source_id: int, n: int) -> list[bytes]:
    """Row keys of n entities of a source."""
    return [row_prefix(source_id) + b"e%d" % i for i in range(n)]


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
    keys = _entities(7, 50)
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
    keys = _entities(3, 5)
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
    keys = _entities(4, 3)
    store = RocksDBStore(tmp_path / "db", fsync=False)
    try:
        dry = store.write_latest([RowBatch("s", keys, [_head(30) + b"a"] * 3, b"", 4, 0)], dry_run=True)
        assert dry.counts["s"].written == 3
        result = store.write_latest([RowBatch("s", keys, [_head(20) + b"b"] * 3, b"", 4, 0)])
        assert result.counts["s"].written == 3
        assert store.read(keys[:1]) == [_head(20) + b"b"]
    finally:
        store.close()


class _CountingDb:
    """The store's database, counting the keys its batch reads ask for; everything else passes."""

    def __init__(self, db: object):
        self._db = db
        self.read_keys = 0

    def get(self, key: object, *args: object) -> object:
        if isinstance(key, list):
            self.read_keys += len(key)
        return self._db.get(key, *args)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self._db, name)


def _count_reads(store: RocksDBStore) -> _CountingDb:
    """Count the keys the store reads from here on (closing it closes its database through the count)."""
    counting = store._db = _CountingDb(store._db)
    return counting


def test_a_source_written_from_empty_needs_no_reads_for_new_entities_after_the_index_starts_over(
    tmp_path: Path,
) -> None:
    prefix = row_prefix(9)
    keys = _entities(9, 1000)
    store = RocksDBStore(tmp_path / "db", fsync=False, latest_cache_entries=100)
    counting = _count_reads(store)
    try:
        # A backfill of ten times the entities the index holds: it starts over every other write, its
        # keys going to the evicted-key filter, and none of the new entities is read.
        for start in range(0, 1000, 50):
            part = keys[start : start + 50]
            result = store.write_latest([RowBatch("s", part, [_head(10) + b"a"] * 50, b"", 9, 0)])
            assert result.counts["s"].written == 50
        assert counting.read_keys == 0
        assert store._evicted.count + len(store._retired or {}) >= 850
        # Evicted entities are read again: older events lose to them in a batch with new entities.
        mixed = keys[:30] + [prefix + b"new%d" % i for i in range(20)]
        values = [_head(5) + b"b"] * 30 + [_head(5) + b"c"] * 20
        result = store.write_latest([RowBatch("s", mixed, values, b"", 9, 0)])
        assert (result.counts["s"].written, result.counts["s"].superseded) == (20, 30)
        assert 30 <= counting.read_keys <= 30 + 2  # a filter's rare false "may hold" reads a new one too
        assert store.read([keys[0], mixed[-1]]) == [_head(10) + b"a", _head(5) + b"c"]
        # A dry run reads them as well, and changes nothing.
        dry = store.write_latest(
            [RowBatch("s", keys[100:110], [_head(9) + b"d"] * 10, b"", 9, 0)], dry_run=True
        )
        assert (dry.counts["s"].written, dry.counts["s"].superseded) == (0, 10)
        # Newer events of evicted entities land, and the index holds them again.
        newer = store.write_latest([RowBatch("s", keys[100:110], [_head(20) + b"e"] * 10, b"", 9, 0)])
        assert newer.counts["s"].written == 10
        assert store.read(keys[100:101]) == [_head(20) + b"e"]
        assert store._latest[keys[100]] == _head(20)
    finally:
        store.close()


def test_keys_a_filter_wrongly_may_hold_are_read_and_written_when_absent(tmp_path: Path) -> None:
    prefix = row_prefix(9)
    store = RocksDBStore(tmp_path / "db", fsync=False, latest_cache_entries=10)
    try:
        old = [prefix + b"old%d" % i for i in range(30)]
        store.write_latest([RowBatch("s", old, [_head(10) + b"a"] * 30, b"", 9, 0)])
        store.write_latest([RowBatch("s", old[:1], [_head(11) + b"a"], b"", 9, 0)])  # evicts the 30
        assert store._retired is not None and len(store._retired) == 30 and store._evicted.count == 0
        store.write_latest([RowBatch("s", [prefix + b"x"], [_head(1) + b"x"], b"", 9, 0)])  # moves them
        assert store._retired is None and store._evicted.count == 30
        # As if every key were a false positive: new keys are read, found absent, and written.
        store._evicted.might_hold = lambda keys: [True] * len(keys)  # type: ignore[method-assign]
        new = [prefix + b"new%d" % i for i in range(5)]
        result = store.write_latest([RowBatch("s", new + old[5:10], [_head(7) + b"b"] * 10, b"", 9, 0)])
        assert (result.counts["s"].written, result.counts["s"].superseded) == (5, 5)
        assert store.read([new[0], old[5]]) == [_head(7) + b"b", _head(10) + b"a"]
        assert store._latest[old[5]] == _head(10)
    finally:
        store.close()


def test_a_full_evicted_key_filter_starts_everything_over_and_writes_stay_latest(tmp_path: Path) -> None:
    keys = _entities(9, 40)
    store = RocksDBStore(tmp_path / "db", fsync=False, latest_cache_entries=10)
    store._evicted.capacity = 15
    try:
        for start in range(0, 40, 10):
            store.write_latest([RowBatch("s", keys[start : start + 10], [_head(10) + b"a"] * 10, b"", 9, 0)])
        # The second eviction did not fit: the filter and what the store knew of the source started over.
        assert store._evicted.count <= 15 and store._indexed_sources.get(9) is not True
        result = store.write_latest([RowBatch("s", keys, [_head(5) + b"b"] * 40, b"", 9, 0)])
        assert (result.counts["s"].written, result.counts["s"].superseded) == (0, 40)
    finally:
        store.close()


def test_a_retired_index_answers_exactly_while_its_keys_move_into_the_filter_step_by_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rocksdb, "_RETIRE_STEP", 4)
    keys = _entities(9, 20)
    store = RocksDBStore(tmp_path / "db", fsync=False, latest_cache_entries=10)
    counting = _count_reads(store)
    try:
        store.write_latest([RowBatch("s", keys, [_head(10) + b"a"] * 20, b"", 9, 0)])
        store.write_latest([RowBatch("s", keys[:1], [_head(11) + b"a"], b"", 9, 0)])  # retires the 20
        moved = []
        for key in keys[1:5]:
            # One key a write: older events lose to the retired index's exact times, with no read.
            result = store.write_latest([RowBatch("s", [key], [_head(5) + b"b"], b"", 9, 0)])
            assert result.counts["s"].superseded == 1
            moved.append(store._evicted.count)
        assert moved == [4, 8, 12, 16] and store._retired is not None
        assert counting.read_keys == 0
        # The last step moves the rest before this write stages: the filter sends its key to RocksDB.
        result = store.write_latest([RowBatch("s", keys[5:7], [_head(5) + b"c"] * 2, b"", 9, 0)])
        assert store._retired is None and store._evicted.count == 20
        assert result.counts["s"].superseded == 2 and counting.read_keys == 2
    finally:
        store.close()


def _reopened_over(path: Path) -> tuple[RocksDBStore, list[bytes]]:
    """A store reopened over 40 rows of source 9 an earlier process wrote (not held whole), and their keys."""
    keys = _entities(9, 40)
    earlier = RocksDBStore(path, fsync=False)
    earlier.put_source("s", b"", 9)
    earlier.write_latest([RowBatch("s", keys, [_head(10) + b"a"] * len(keys), b"", 9, earlier.generation(9))])
    earlier.close()
    return RocksDBStore(path, fsync=False), keys


def test_a_source_stored_before_a_restart_is_held_whole_once_its_keys_are_walked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rocksdb, "_RETIRE_STEP", 7)  # several steps, writes landing between them
    prefix = row_prefix(9)
    store, keys = _reopened_over(tmp_path / "db")
    counting = _count_reads(store)
    try:
        # Reopened: new entities are read first, since any key might have a row.
        store.write_latest([RowBatch("s", [prefix + b"n0"], [_head(1) + b"n"], b"", 9, 0)])
        assert counting.read_keys == 1
        # Writes land between the walk's steps: a new entity and a newer event of a stored one.
        add = store._evicted.add
        during = iter(range(100))

        def add_then_write(step: list[bytes], chunk: int = 65_536) -> None:
            add(step, chunk)
            i = next(during)
            batch = [prefix + b"d%d" % i, keys[i]]
            store.write_latest([RowBatch("s", batch, [_head(20) + b"d"] * 2, b"", 9, 0)])

        store._evicted.add = add_then_write  # type: ignore[method-assign]
        assert store.track_stored_rows() == [9]
        store._evicted.add = add  # type: ignore[method-assign]
        assert store._indexed_sources[9] is True and store._evicted.count == 41  # 40 stored, n0
        # Start the index over: every key is now in the filter or nowhere.
        store._evict_latest()
        store._retire_step(everything=True)
        before = counting.read_keys
        new = [prefix + b"new%d" % i for i in range(10)]
        result = store.write_latest([RowBatch("s", new, [_head(1) + b"x"] * 10, b"", 9, 0)])
        assert result.counts["s"].written == 10 and counting.read_keys - before <= 1  # a false "may hold"
        # Every stored or since-written key still keeps its newer event.
        during_keys = [prefix + b"d%d" % i for i in range(6)]
        old = keys + during_keys + [prefix + b"n0"]
        result = store.write_latest([RowBatch("s", old, [_head(0) + b"o"] * len(old), b"", 9, 0)])
        assert (result.counts["s"].written, result.counts["s"].superseded) == (0, len(old))
        assert store.read([keys[0], keys[39], during_keys[0]]) == [
            _head(20) + b"d",
            _head(10) + b"a",
            _head(20) + b"d",
        ]
    finally:
        store.close()


def test_walking_stored_keys_stops_when_the_index_starts_over_or_the_filter_is_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rocksdb, "_RETIRE_STEP", 7)
    store, keys = _reopened_over(tmp_path / "db")
    try:
        add = store._evicted.add

        def add_then_forget(step: list[bytes], chunk: int = 65_536) -> None:
            add(step, chunk)
            store._forget_latest()  # as a failed write or a deleted source does

        store._evicted.add = add_then_forget  # type: ignore[method-assign]
        assert store.track_stored_rows() == []
        store._evicted.add = add  # type: ignore[method-assign]
        assert store._indexed_sources.get(9) is not True
        store._evicted.capacity = 10
        assert store.track_stored_rows() == []
        assert store._indexed_sources.get(9) is not True
        # Not held whole, its keys are read: an older event loses.
        result = store.write_latest([RowBatch("s", keys, [_head(5) + b"o"] * 40, b"", 9, 0)])
        assert result.counts["s"].superseded == 40
        store._evicted.capacity = 1000
        assert store.track_stored_rows() == [9]
    finally:
        store.close()


def test_a_retirement_ends_though_the_walk_of_stored_keys_fills_the_filter_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rocksdb, "_RETIRE_STEP", 4)
    store, _ = _reopened_over(tmp_path / "db")
    store._latest_max = 10
    new = _entities(8, 20)
    try:
        store.write_latest([RowBatch("t", new, [_head(10) + b"a"] * 20, b"", 8, 0)])
        store.write_latest([RowBatch("t", new[:1], [_head(11) + b"a"], b"", 8, 0)])  # retires the index
        assert store._retired is not None
        # The walk of source 9's stored keys adds to the filter while the retired keys move into it.
        assert store.track_stored_rows() == [9]
        for i in range(1, 8):
            store.write_latest([RowBatch("t", new[i : i + 1], [_head(12) + b"a"], b"", 8, 0)])
        assert store._retired is None
        # Every retired key is in the filter: older events of them still lose.
        store._latest.clear()
        result = store.write_latest([RowBatch("t", new, [_head(5) + b"b"] * 20, b"", 8, 0)])
        assert result.counts["t"].superseded == 20
    finally:
        store.close()
