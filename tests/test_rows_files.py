"""Rows files: a large batch's rows built into an SST file elsewhere and ingested whole by the store.

Whatever the file, the store must end as a write of the same rows through its write batch would leave
it: the same rows kept, the same counts, the latest-event index as exact, and nothing half written.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from featurepush_server.core.framing import HEADER_BYTES
from featurepush_server.core.stores import rocksdb
from featurepush_server.core.stores.base import (
    ROWS_FILES_DEFERRED,
    ROWS_FILES_INGESTED,
    BinaryColumn,
    RowBatch,
)
from featurepush_server.core.stores.rocksdb import ROWS_FOLDER, RocksDBStore, row_prefix, write_rows_file

_KEYS = [row_prefix(1) + b"e%d" % i for i in range(8)]
# A batch: (entity index, event time, payload) per row; few entities and times, so duplicates and ties.
_ROW = st.tuples(st.integers(0, 7), st.integers(0, 6), st.binary(max_size=5))
_ROWS = st.lists(_ROW, min_size=1, max_size=14)


def _rows(rows: list[tuple[int, int, bytes]]) -> tuple[list[bytes], list[bytes]]:
    keys = [_KEYS[i] for i, _, _ in rows]
    values = [t.to_bytes(HEADER_BYTES, "big") + payload for _, t, payload in rows]
    return keys, values


def _store(path: Path) -> RocksDBStore:
    return RocksDBStore(path, fsync=False)


def _with_file(
    store: RocksDBStore, keys: list[bytes], values: list[bytes], lazy: bool = False, **fields: object
) -> RowBatch:
    name = write_rows_file(store.rows_folder, keys, values)
    # As the store owner receives them: values left in Arrow until they are read.
    sent: Sequence[bytes] = BinaryColumn(pa.array(values, pa.binary())) if lazy else values
    return RowBatch("s", keys, sent, source_id=1, rows_file=name, **fields)  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(batches=st.lists(_ROWS, min_size=1, max_size=5), small_index=st.booleans(), lazy=st.booleans())
def test_an_ingested_file_leaves_the_store_as_writing_its_rows_would(
    batches: list[list[tuple[int, int, bytes]]], small_index: bool, lazy: bool
) -> None:
    # A one-entry index starts over on most writes, so the file's rows are also compared with stored ones
    # read back from RocksDB rather than known from memory.
    entries = 1 if small_index else 1_000
    with tempfile.TemporaryDirectory() as tmp:
        written = RocksDBStore(Path(tmp) / "rows", fsync=False, latest_cache_entries=entries)
        ingested = RocksDBStore(Path(tmp) / "files", fsync=False, latest_cache_entries=entries)
        try:
            takes = 0
            for rows in batches:
                keys, values = _rows(rows)
                expected = written.write_latest([RowBatch("s", keys, values, source_id=1)])
                got = ingested.write_latest([_with_file(ingested, keys, values, lazy)])
                assert got == expected
                counts = expected.counts["s"]
                # Every kept row newer than its stored one: the file was taken whole, else written row by row.
                takes += counts.written == len(set(keys))
                assert ingested.statistic(ROWS_FILES_INGESTED) == takes
                assert written.read(_KEYS) == ingested.read(_KEYS)
                assert not list(ingested.rows_folder.iterdir())
            # The index the ingested rows left answers later writes as the written rows' index does.
            later = [(i, 3, b"late") for i in range(8)]
            assert ingested.write_latest([RowBatch("s", *_rows(later), source_id=1)]) == written.write_latest(
                [RowBatch("s", *_rows(later), source_id=1)]
            )
            assert written.read(_KEYS) == ingested.read(_KEYS)
        finally:
            written.close()
            ingested.close()


def test_a_binary_column_reads_its_items_and_their_heads_whole() -> None:
    # Headers end in zero bytes often (a whole second in microseconds); none may be dropped.
    values = [bytes(8), b"\x80" + bytes(7) + b"payload", b"\x01\x02\x03\x04\x05\x06\x07\x00tail"]
    column = BinaryColumn(pa.array(values, pa.binary()).slice(0, 3))
    assert column.prefixes(HEADER_BYTES) == [v[:HEADER_BYTES] for v in values]
    assert (len(column), list(column), column[1], column[1:]) == (3, values, values[1], values[1:])
    shifted = BinaryColumn(pa.array([b"x" * 9, *values], pa.binary()).slice(1))
    assert shifted.prefixes(HEADER_BYTES) == [v[:HEADER_BYTES] for v in values]
    # An item shorter than the prefix is never read into the next one's bytes.
    short = BinaryColumn(pa.array([b"abc", *values], pa.binary()))
    assert short.prefix_items(HEADER_BYTES) is None
    assert short.prefixes(HEADER_BYTES) == [b"abc", *(v[:HEADER_BYTES] for v in values)]
    assert BinaryColumn(pa.array([], pa.binary())).prefixes(HEADER_BYTES) == []


def test_a_file_gone_before_its_write_costs_a_write_batch_not_the_write(tmp_path: Path) -> None:
    store = _store(tmp_path / "db")
    try:
        keys, values = _rows([(0, 1, b"a"), (1, 2, b"b")])
        batch = _with_file(store, keys, values)
        # What a restart of the store between the file and its write leaves: the name, no file.
        (store.rows_folder / batch.rows_file).unlink()
        result = store.write_latest([batch])
        assert result.counts["s"].written == 2
        assert store.read(keys) == values
        assert store.statistic(ROWS_FILES_INGESTED) == 0
        assert store.writable
    finally:
        store.close()


def test_a_file_wins_over_older_rows_of_its_keys_still_in_the_memtable(tmp_path: Path) -> None:
    # Pushes to the source during its backfill: RocksDB flushes them first, so the file's rows come after.
    store = _store(tmp_path / "db")
    try:
        store.write_latest([RowBatch("s", *_rows([(3, 1, b"pushed"), (4, 9, b"later")]), source_id=1)])
        keys, values = _rows([(0, 2, b"a"), (3, 2, b"b"), (5, 2, b"c")])
        assert store.write_latest([_with_file(store, keys, values)]).counts["s"].written == 3
        assert (store.statistic(ROWS_FILES_INGESTED), store.statistic(ROWS_FILES_DEFERRED)) == (1, 0)
        later = _rows([(4, 9, b"later")])[1][0]
        assert store.read(_KEYS[:6]) == [values[0], None, None, values[1], later, values[2]]
    finally:
        store.close()


def test_a_file_waits_for_no_compaction_its_rows_are_written_instead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # RocksDB never slows an ingestion for a level 0 it has not compacted yet; its write batches it does.
    store = _store(tmp_path / "db")
    try:
        keys, values = _rows([(0, 1, b"a"), (1, 2, b"b")])
        store.write_latest([_with_file(store, keys, values)])
        assert store.statistic(ROWS_FILES_INGESTED) == 1
        # As if level 0 held too many files already: any count is as many as allowed.
        monkeypatch.setattr(rocksdb, "_INGEST_MAX_LEVEL0_FILES", 0)
        keys, values = _rows([(0, 3, b"c"), (2, 2, b"d")])
        assert store.write_latest([_with_file(store, keys, values)]).counts["s"].written == 2
        assert store.statistic(ROWS_FILES_INGESTED) == 1
        assert store.statistic(ROWS_FILES_DEFERRED) == 1
        assert store.read(keys) == values
        assert not list(store.rows_folder.iterdir())
    finally:
        store.close()


@pytest.mark.parametrize("what", ["request id", "dry run", "offline entry", "second batch"])
def test_a_file_is_taken_only_for_a_write_of_its_rows_alone(tmp_path: Path, what: str) -> None:
    # Anything else in the write must land atomically with the rows, which one write batch does.
    store = _store(tmp_path / "db")
    try:
        keys, values = _rows([(0, 1, b"a"), (1, 2, b"b")])
        batch = _with_file(store, keys, values, offline=b"entry" if what == "offline entry" else b"")
        batches = [batch]
        if what == "second batch":
            other = RowBatch("t", [row_prefix(2) + b"x"], [(5).to_bytes(HEADER_BYTES, "big")], source_id=2)
            batches.append(other)
        result = store.write_latest(
            batches, request_id="r1" if what == "request id" else "", dry_run=what == "dry run"
        )
        assert result.counts["s"].written == 2
        assert store.statistic(ROWS_FILES_INGESTED) == 0
        assert store.read(keys) == ([None, None] if what == "dry run" else values)
        # Not taken, and dropped all the same.
        assert not list(store.rows_folder.iterdir())
    finally:
        store.close()


def test_a_name_outside_the_rows_folder_is_neither_taken_nor_deleted(tmp_path: Path) -> None:
    store = _store(tmp_path / "db")
    try:
        keys, values = _rows([(0, 1, b"a")])
        name = write_rows_file(store.rows_folder, keys, values)
        outside = tmp_path / name
        (store.rows_folder / name).rename(outside)
        for bad in (f"../../{name}", str(outside), "x.sst"):
            result = store.write_latest([RowBatch("s", keys, values, source_id=1, rows_file=bad)])
            assert result.counts["s"].written == 1
        assert store.statistic(ROWS_FILES_INGESTED) == 0
        assert outside.exists()
    finally:
        store.close()


def test_files_left_by_a_crash_are_removed_when_the_store_opens(tmp_path: Path) -> None:
    store = _store(tmp_path / "db")
    name = write_rows_file(store.rows_folder, *_rows([(0, 1, b"a")]))
    store.close()
    assert (tmp_path / "db" / ROWS_FOLDER / name).exists()
    store = _store(tmp_path / "db")
    try:
        assert not list(store.rows_folder.iterdir())
    finally:
        store.close()


_INGEST_THEN_DIE = """
import os, sys
from featurepush_server.core.stores.base import RowBatch
from featurepush_server.core.stores.rocksdb import RocksDBStore, row_prefix, write_rows_file
store = RocksDBStore(sys.argv[1], fsync=False)
keys = [row_prefix(1) + b"k%d" % i for i in range(20_000)]
values = [(7).to_bytes(8, "big") + b"v%d" % i for i in range(20_000)]
name = write_rows_file(store.rows_folder, keys, values)
store.write_latest([RowBatch("s", keys, values, source_id=1, rows_file=name)])
assert store.statistic("featurepush.rows-files-ingested") == 1
print("acknowledged", flush=True)
os._exit(0)  # no close, no sync: as a kill -9 right after the write returned
"""


def test_ingested_rows_survive_the_process_dying_right_after_the_write(tmp_path: Path) -> None:
    command = [sys.executable, "-c", _INGEST_THEN_DIE, str(tmp_path / "db")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert "acknowledged" in done.stdout, done.stderr
    store = _store(tmp_path / "db")
    try:
        keys = [row_prefix(1) + b"k%d" % i for i in (0, 9_999, 19_999)]
        assert store.read(keys) == [(7).to_bytes(8, "big") + b"v%d" % i for i in (0, 9_999, 19_999)]
    finally:
        store.close()
