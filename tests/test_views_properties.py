"""Property tests of stream feature views: pushed and backfilled events give the same features, equal to
a brute-force computation over the raw events for every window and as_of; replays change nothing."""

from __future__ import annotations

import itertools
import math
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import AD_IMPRESSIONS, Running, start
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis_servers import RedisServer
from views_helpers import HOUR, MINUTE, apply, brute, iso, read, same, view

from featurepush.batch import backfill
from featurepush.definitions import Aggregate
from featurepush.v1 import ingest_service_pb2

M = 60_000_000
_names = itertools.count()


@pytest.fixture(scope="module", params=["one-process", "processes", "redis"])
def server(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[tuple[Running, Path]]:
    """A one-process server, a store owner with two fronts, or a server on Redis."""
    root = tmp_path_factory.mktemp("views")
    settings: dict[str, object] = {"batch_roots": (root,)}
    if request.param == "processes":
        # The last front, which the backfills go through, loads their chunks in worker processes.
        settings.update(fronts=2, backfill_workers=True)
    elif request.param == "redis":
        redis_server: RedisServer = request.getfixturevalue("redis_server")
        settings.update(store=redis_server.url, redis_namespace=f"views{uuid.uuid4().hex[:8]}")
    r = start(root / "data", **settings)
    try:
        yield r, root
    finally:
        r.close()


def _push(r: Running, source: str, events: list[tuple[str, int, int]], request_id: str = "") -> int:
    doc = {
        "records": {
            source: {"rows": [{"user_id": u, "timestamp": iso(t), "clicked": c} for u, t, c in events]}
        }
    }
    from google.protobuf import json_format

    request = json_format.ParseDict(doc, ingest_service_pb2.PushRequest(request_id=request_id))
    response = r.ingest.Push(request)
    return int(response.counts[source].late_skipped)


def _parquet(root: Path, name: str, events: list[tuple[str, int, int]]) -> str:
    table = pa.table(
        {
            "user_id": [u for u, _, _ in events],
            "timestamp": pa.array([t for _, t, _ in events], pa.timestamp("us", "UTC")),
            "clicked": pa.array([c for _, _, c in events], pa.int64()),
        }
    )
    path = root / f"{name}.parquet"
    pq.write_table(table, path)
    return str(path)


event = st.tuples(
    st.sampled_from(["a", "b", "c"]),
    # Seconds before the current minute: within the hour, or past the longest window (late).
    st.one_of(st.integers(1, 55 * 60), st.integers(3 * 3600, 4 * 3600)),
    st.integers(-5, 20),
)


# The tiles are stored in blocks whose size depends on what the view keeps: one tile per block with
# sketches, 8 with lists, 64 with moments alone; reads span several blocks and cross their edges.
_EVERY = view().aggregations
LAYOUTS = {
    "sketches": list(_EVERY),
    "lists": [a for a in _EVERY if a.function != "approx_count_distinct"],
    "moments": [a for a in _EVERY if not a.function.endswith(("_n", "distinct"))],
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    raw=st.lists(event, min_size=1, max_size=40),
    duplicates=st.lists(st.integers(0, 39), max_size=5),
    chunk=st.integers(1, 12),
    data=st.data(),
)
def test_pushed_and_backfilled_views_equal_the_raw_events(
    server: tuple[Running, Path],
    layout: str,
    raw: list[tuple[str, int, int]],
    duplicates: list[int],
    chunk: int,
    data: st.DataObject,
) -> None:
    r, root = server
    n = next(_names)
    minute = time.time_ns() // 1000 // M * M
    events = [(u, minute - s * 1_000_000 - n % 7, c) for u, s, c in raw]
    events += [events[i % len(events)] for i in duplicates]
    pushed_order = data.draw(st.permutations(events))
    pushed, filled = f"pushed{n}", f"filled{n}"
    r.apply({**AD_IMPRESSIONS, "name": pushed})
    uri = _parquet(root, filled, events)
    r.apply(
        {**AD_IMPRESSIONS, "name": filled, "batchConfig": {"uri": uri, "fileFormat": "FILE_FORMAT_PARQUET"}}
    )
    aggregations = LAYOUTS[layout]
    apply(r, view(f"v_{pushed}", source=pushed, aggregations=aggregations))
    apply(r, view(f"v_{filled}", source=filled, aggregations=aggregations))
    late = 0
    for i in range(0, len(pushed_order), chunk):
        part = list(pushed_order[i : i + chunk])
        # With several fronts, pushes and their replays go through each in turn.
        late += _push(r.fronts[i % len(r.fronts)], pushed, part, request_id=f"{pushed}-{i}")
        # The same request again is answered from its record and adds nothing.
        _push(r.fronts[(i + 1) % len(r.fronts)], pushed, part, request_id=f"{pushed}-{i}")
    backfill(r.fronts[-1].channel, filled)
    counted = [(u, t, c) for u, t, c in events if t >= minute - 60 * M]
    assert late == len(events) - len(counted)
    spec = view(aggregations=aggregations)
    for as_of in (minute + 1, minute - 7 * M, minute - 30 * M + 5):
        names, got_pushed = read(r, ["a", "b", "c"], as_of, view_name=f"v_{pushed}")
        _, got_filled = read(r, ["a", "b", "c"], as_of, view_name=f"v_{filled}")
        for user, row_p, row_f in zip("abc", got_pushed, got_filled, strict=True):
            values = [(t, c) for u, t, c in counted if u == user]
            for agg, (sp, vp), (sf, vf) in zip(spec.aggregations, row_p, row_f, strict=True):
                want = brute(agg, values, as_of, M)
                assert sp == sf and same(vp, vf), (agg.name, vp, vf)
                if want is None:
                    assert sp == "MISSING", (agg.name, as_of)
                else:
                    assert same(vp, want), (user, agg.name, as_of, vp, want)


def test_a_backfill_over_pushed_events_adds_nothing_twice(server: tuple[Running, Path]) -> None:
    r, root = server
    n = next(_names)
    name = f"both{n}"
    minute = time.time_ns() // 1000 // M * M
    history = [("a", minute - 40 * M + i * M, i) for i in range(10)]
    live = [("a", minute - 20 * M + i * M, 100 + i) for i in range(10)]
    # The batch source holds every event, the pushed ones included.
    uri = _parquet(root, name, history + live)
    r.apply(
        {**AD_IMPRESSIONS, "name": name, "batchConfig": {"uri": uri, "fileFormat": "FILE_FORMAT_PARQUET"}}
    )
    apply(r, view(f"v_{name}", source=name))
    assert _push(r, name, live) == 0
    backfill(r.channel, name)
    backfill(r.channel, name)
    # After a backfill the watermark is fixed: an older pushed event is the batch source's to hold.
    assert _push(r, name, [("a", minute - 30 * M, 1000)]) == 1
    spec = view()
    _, [row] = read(r, ["a"], minute + 1, view_name=f"v_{name}")
    values = [(t, c) for _, t, c in history + live]
    for agg, (_, got) in zip(spec.aggregations, row, strict=True):
        assert same(got, brute(agg, values, minute + 1, M)), agg.name


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    raw=st.lists(
        st.tuples(st.sampled_from(["a", "b"]), st.integers(1, 55 * 60), st.integers(-9, 9)), min_size=1
    ),
    offset=st.sampled_from([0, 10**6, 10**9, -(10**12)]),
    chunk=st.integers(1, 8),
)
def test_stddev_and_mean_of_values_far_from_zero_equal_the_raw_events(
    server: tuple[Running, Path], raw: list[tuple[str, int, int]], offset: int, chunk: int
) -> None:
    r, _ = server
    n = next(_names)
    minute = time.time_ns() // 1000 // M * M
    events = [(u, minute - s * 1_000_000, offset + c) for u, s, c in raw]
    name = f"spread{n}"
    r.apply({**AD_IMPRESSIONS, "name": name})
    aggregations = [
        Aggregate("clicked", fn, w) for w in (10 * MINUTE, HOUR) for fn in ("stddev", "mean", "sum", "count")
    ]
    apply(r, view(f"v_{name}", source=name, aggregations=aggregations))
    # Pushed a few at a time, each tile is the merge of several pushes' partial aggregates.
    for i in range(0, len(events), chunk):
        _push(r.fronts[i % len(r.fronts)], name, events[i : i + chunk])
    for as_of in (minute + 1, minute - 7 * M):
        _, rows = read(r, ["a", "b"], as_of, view_name=f"v_{name}")
        for user, row in zip("ab", rows, strict=True):
            values = [(t, c) for u, t, c in events if u == user]
            for agg, (_, got) in zip(aggregations, row, strict=True):
                want = brute(agg, values, as_of, M)
                if agg.function == "stddev" and want is not None:
                    # A spread of a few units around a large mean, which a sum of squares loses entirely;
                    # float64 means of values near 1e12 still lose what lies below their last bit (1e-4).
                    close = math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-9 + 1e-14 * abs(offset))
                    assert close, (user, agg.name, got, want)
                else:
                    assert got == want or same(got, want), (user, agg.name, got, want)
