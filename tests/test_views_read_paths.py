"""The view read's shortcuts: tile keys of short entity keys, per-view layouts, reads of every block,
windows reduced over runs of the tiles read, and blocks stored in the format before."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from conftest import Running
from hypothesis import given, settings
from hypothesis import strategies as st
from views_helpers import HOUR, MINUTE, apply, brute, push, read, same, view

from featurepush.definitions import Aggregate
from featurepush_server.core.aggregates import _Window
from featurepush_server.core.stores.rocksdb import RocksDBStore
from featurepush_server.core.tiles import Codec, merge_spec

M = 60_000_000


def now_minute() -> int:
    return time.time_ns() // 1000 // M * M


def test_tile_keys_of_short_and_long_entity_keys_are_each_tile_key(tmp_path: Path) -> None:
    store = RocksDBStore(tmp_path / "db")
    try:
        short = [b"", b"u", b"x" * 127]
        long = [*short, b"y" * 128, b"z" * 300]
        for entities in (short, long):
            starts = np.array([-(2**40), 0, 7 * M, 2**50, 3 * M][: len(entities)], dtype=np.int64)
            keys = store.tile_keys(9, entities, starts)
            assert keys == [
                store.tile_key(9, e, int(s)) for e, s in zip(entities, starts.tolist(), strict=True)
            ]
    finally:
        store.close()


def _check(
    running: Running, v: object, users: list[str], events: list[tuple[str, int, int]], as_of: int
) -> None:
    """A read of `users` matches the raw events feature by feature."""
    aggregations = v.aggregations  # type: ignore[attr-defined]
    names, rows = read(running, users, as_of)
    assert names == [a.name for a in aggregations]
    for user, row in zip(users, rows, strict=True):
        values = [(t, c) for u, t, c in events if u == user]
        for agg, (status, got) in zip(aggregations, row, strict=True):
            want = brute(agg, values, as_of, M)
            if want is None:
                assert status == "MISSING" and got is None, (user, agg.name)
            else:
                assert status == "PRESENT" and same(got, want), (user, agg.name, got, want)


def test_a_changed_view_is_read_with_its_new_features(running: Running) -> None:
    # Tiles outside every window at push time are never written: the first view's windows hold them all.
    first = view(
        aggregations=[Aggregate("clicked", fn, w) for fn, w in (("count", 10 * MINUTE), ("sum", HOUR))]
    )
    apply(running, first)
    base = now_minute() - 30 * M
    # An entity key too long for a one-byte length, one with every block, and one without tiles.
    long_user = "L" * 200
    events = [(u, base + i * 3 * M + 5, (i * 7) % 5 - 1) for i in range(10) for u in ("u1", long_user)]
    push(running, events)
    as_of = now_minute() + M
    users = ["u1", long_user, "nobody"]
    _check(running, first, users, events, as_of)
    _check(running, first, ["u1"], events, as_of)
    # Same tile layout, other features in another order and windows: the read follows the new definition.
    changed = view(
        aggregations=[
            Aggregate("clicked", fn, w)
            for fn, w in (("max", HOUR), ("count", 10 * MINUTE), ("mean", 20 * MINUTE))
        ]
    )
    apply(running, changed)
    _check(running, changed, users, events, as_of)
    _check(running, changed, ["u1"] * 12, events, as_of)


@settings(max_examples=300, deadline=None)
@given(runs=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 12)), max_size=8), data=st.data())
def test_a_window_reduces_each_entity_run_as_the_run_alone(
    runs: list[tuple[int, int]], data: st.DataObject
) -> None:
    # Each entity's run of tiles, after a gap of tiles outside the window; some runs are empty.
    start, stop, at = [], [], 0
    for gap, length in runs:
        start.append(at + gap)
        stop.append(at + gap + length)
        at += gap + length
    at += data.draw(st.integers(0, 2))
    width = 1 + 5 * 2
    # Of sizes no sum of a few overflows; signed zeros, whose sign depends on the order of the operations.
    values = st.floats(-1e6, 1e6) | st.sampled_from([0.0, -0.0, 5e-324, -1.5e-300])
    rows = data.draw(st.lists(st.lists(values, min_size=width, max_size=width), min_size=at, max_size=at))
    # The tiles as they are decoded: a column of a structured array, each row beside its start.
    records = np.zeros(at, dtype=[("start", "<i8"), ("fixed", "<f8", (width,))])
    records["fixed"] = np.array(rows, dtype=np.float64).reshape((at, width))
    tiles = records["fixed"]
    window = _Window(tiles, np.array(start, dtype=np.int64), np.array(stop, dtype=np.int64))
    found = window.sources(["totals", "mins", "maxes"])
    for e, (a, b) in enumerate(zip(start, stop, strict=True)):
        run = np.ascontiguousarray(tiles[a:b])
        wanted = [np.zeros(width), np.full(2, np.inf), np.full(2, -np.inf)]
        if b > a:
            wanted = [
                np.add.reduceat(run, [0], axis=0)[0],
                np.minimum.reduceat(run[:, 4::5], [0], axis=0)[0],
                np.maximum.reduceat(run[:, 5::5], [0], axis=0)[0],
            ]
        for got, want in zip(found, wanted, strict=True):
            assert got[e].tobytes() == want.tobytes()


def test_a_block_of_sums_of_squares_reads_as_squared_deviations() -> None:
    codec = Codec(merge_spec("v", M, 60 * M, ("clicked",), (), ()))
    # A tile of 3, 5 and 10 as store format 3 kept it: the record count, then the column's count, sum,
    # sum of squares, minimum and maximum.
    tile = np.array([(0, [3.0, 3.0, 18.0, 134.0, 3.0, 10.0])], dtype=codec.record)
    decoded = codec.decode([(1).to_bytes(4, "big") + tile.tobytes()])
    assert decoded.fixed.tolist() == [[3.0, 3.0, 18.0, 26.0, 3.0, 10.0]]
    # Written again, it is stored the new way (negated) and reads back the same.
    again = codec.decode(codec.encode([1], decoded.starts, decoded.fixed, []))
    assert again.fixed.tobytes() == decoded.fixed.tobytes()
    # A tile of 7 alone merged in: 3, 5, 7 and 10 deviate from their mean 6.25 by 26.75 squared in all.
    block = np.zeros(2, dtype=np.int64)
    fixed = np.concatenate([decoded.fixed, [[1.0, 1.0, 7.0, 0.0, 7.0, 7.0]]])
    _, _, merged, _ = codec.merge(block, np.zeros(2, dtype=np.int64), fixed, [])
    assert merged.tolist() == [[4.0, 4.0, 25.0, 26.75, 3.0, 10.0]]
