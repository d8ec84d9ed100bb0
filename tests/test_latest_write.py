"""Latest-by-event-time writes against a model of them, whatever the latest-event index holds."""

from __future__ import annotations

import tempfile
from pathlib import Path
from unittest import mock

import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from featurepush_server.core.framing import HEADER_BYTES
from featurepush_server.core.stores import rocksdb
from featurepush_server.core.stores.base import BinaryColumn, RowBatch
from featurepush_server.core.stores.rocksdb import RocksDBStore, row_prefix

_KEYS = [row_prefix(1) + b"e%d" % i for i in range(6)]
# A batch: (entity index, event-time header as a number, payload) per row.
_ROWS = st.lists(
    st.tuples(st.integers(0, 5), st.integers(0, (1 << 64) - 1), st.binary(max_size=6)), max_size=12
)


def _batch(rows: list[tuple[int, int, bytes]], column: bool = False) -> RowBatch:
    """The rows as a write; with `column`, their values in Arrow as the store owner receives them."""
    keys = [_KEYS[i] for i, _, _ in rows]
    values = [t.to_bytes(HEADER_BYTES, "big") + payload for _, t, payload in rows]
    return RowBatch("s", keys, BinaryColumn(pa.array(values, pa.binary())) if column else values, b"", 1, 0)


def _model(batches: list[list[tuple[int, int, bytes]]]) -> dict[bytes, bytes]:
    """The latest row per entity: a newer or equal event time replaces, in the order written."""
    latest: dict[bytes, tuple[int, bytes]] = {}
    for rows in batches:
        for i, t, payload in rows:
            old = latest.get(_KEYS[i])
            if old is None or t >= old[0]:
                latest[_KEYS[i]] = (t, payload)
    return {k: t.to_bytes(HEADER_BYTES, "big") + p for k, (t, p) in latest.items()}


@settings(max_examples=80, deadline=None)
@given(
    batches=st.lists(_ROWS, max_size=5),
    cache=st.sampled_from([2, 1_000]),
    evicted_room=st.sampled_from([None, 3]),
    dry_runs=st.lists(st.tuples(st.integers(0, 5), _ROWS), max_size=2),
    retire_step=st.sampled_from([1, 65_536]),
    column=st.booleans(),
)
def test_every_entity_keeps_its_latest_row_whatever_the_index_holds(
    batches: list[list[tuple[int, int, bytes]]],
    cache: int,
    evicted_room: int | None,
    dry_runs: list[tuple[int, list[tuple[int, int, bytes]]]],
    retire_step: int,
    column: bool,
) -> None:
    # A two-entry index starts over within most writes, its keys kept in the evicted-key filter, which
    # with room for three fills and starts over too; a large index keeps every key.
    # A retired index whose keys move into the filter one a write is still read from meanwhile.
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(rocksdb, "_RETIRE_STEP", retire_step):
        store = RocksDBStore(Path(tmp) / "db", fsync=False, latest_cache_entries=cache)
        if evicted_room is not None:
            store._evicted.capacity = evicted_room
        try:
            for n, rows in enumerate(batches):
                for at, dry in dry_runs:
                    if at == n:
                        # What a write would do now, and nothing done: the model's state stays.
                        counted = store.write_latest([_batch(dry, column)], dry_run=True).counts["s"]
                        current = _model(batches[:n])
                        stored = [current.get(_KEYS[i], b"")[:HEADER_BYTES] for i, _, _ in dry]
                        heads = [t.to_bytes(HEADER_BYTES, "big") for _, t, _ in dry]
                        if len({i for i, _, _ in dry}) == len(dry):
                            assert counted.written == sum(map(bytes.__ge__, heads, stored))
                result = store.write_latest([_batch(rows, column)])
                before, after = _model(batches[:n]), _model(batches[: n + 1])
                changed = sum(1 for k in after if after[k] != before.get(k))
                assert result.counts["s"].accepted == len(rows)
                assert result.counts["s"].written >= changed
            expected = _model(batches)
            assert dict(zip(_KEYS, store.read(_KEYS), strict=True)) == {k: expected.get(k) for k in _KEYS}
        finally:
            store.close()
