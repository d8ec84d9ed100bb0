"""Stream feature views on one Redis shared by two servers: racing pushes merge every event once, a view
changed through one server refuses the other's stale tiles, and each sees the other's changes."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pyarrow as pa
import pytest
from conftest import AD_IMPRESSIONS, Running, start
from redis_servers import RedisServer
from servers import wait_until
from views_helpers import HOUR, MINUTE, apply, push, read, stub, view

from featurepush.definitions import Aggregate
from featurepush.v1 import feature_view_service_pb2 as fvs_pb2
from featurepush_server.core.errors import Aborted
from featurepush_server.core.stores.base import RowBatch
from featurepush_server.core.tiles import build_tiles

M = 60_000_000
TOTALS = [Aggregate("clicked", "count", HOUR), Aggregate("clicked", "sum", HOUR)]


def now_minute() -> int:
    return time.time_ns() // 1000 // M * M


@pytest.fixture
def pair(tmp_path: Path, redis_server: RedisServer) -> Iterator[tuple[Running, Running]]:
    """Two servers on one Redis namespace, with ad_impressions applied."""
    settings = {
        "store": redis_server.url,
        "redis_namespace": f"pair{uuid.uuid4().hex[:8]}",
        "redis_registry_refresh_s": 0.05,
    }
    a = start(tmp_path / "a", **settings)
    b = start(tmp_path / "b", **settings)
    try:
        a.apply(AD_IMPRESSIONS)
        yield a, b
    finally:
        a.close()
        b.close()


def test_racing_pushes_through_two_servers_count_every_event_once(pair: tuple[Running, Running]) -> None:
    a, b = pair
    apply(a, view(aggregations=TOTALS))
    t = now_minute() - 5 * M
    failures: list[BaseException] = []

    def pushes(server: Running, worker: int) -> None:
        try:
            for n in range(15):
                # Every push lands in the same entity's same tile, and is sent twice with its request id.
                events = [("u", t + worker * 1000 + n, 1), ("u", t + worker * 1000 + n + 500, 2)]
                push(server, events, request_id=f"w{worker}-{n}")
                push(server, events, request_id=f"w{worker}-{n}")
        except BaseException as e:  # noqa: BLE001 - reported by the test below
            failures.append(e)

    threads = [threading.Thread(target=pushes, args=((a, b)[w % 2], w)) for w in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not failures, failures
    for server in (a, b):
        _, [row] = read(server, ["u"])
        assert [value for _, value in row] == [str(6 * 15 * 2), str(6 * 15 * 3)]


def test_tiles_of_a_view_changed_through_another_server_are_refused(pair: tuple[Running, Running]) -> None:
    a, b = pair
    apply(a, view())
    assert a.server.views is not None
    clicks = a.server.views.get("clicks")
    events = pa.table(
        {
            "user_id": ["u"],
            "timestamp": pa.array([now_minute() - M], pa.timestamp("us", "UTC")),
            "clicked": pa.array([1], pa.int64()),
        }
    )
    update = build_tiles(clicks, a.server.store, events, "timestamp", "a test batch")
    assert apply(b, view(interval=2 * MINUTE)).changed
    with pytest.raises(Aborted) as caught:
        a.server.store.write_latest([RowBatch("ad_impressions", [], [], tiles=[update])])
    assert caught.value.reason == "VIEW_CHANGED"
    assert not b.server.store.has_tiles(clicks.id)


def test_each_server_sees_the_other_servers_view_changes(pair: tuple[Running, Running]) -> None:
    a, b = pair
    apply(a, view(aggregations=TOTALS[:1]))
    push(b, [("u", now_minute() - 5 * M, 4)])
    assert read(a, ["u"]) == (["clicked_count_1h"], [[("PRESENT", "1")]])
    apply(a, view(aggregations=TOTALS))
    assert wait_until(lambda: read(b, ["u"])[0] == ["clicked_count_1h", "clicked_sum_1h"])
    assert read(b, ["u"])[1] == [[("PRESENT", "1"), ("PRESENT", "4")]]
    assert stub(b).DeleteFeatureView(fvs_pb2.DeleteFeatureViewRequest(name="clicks")).tiles_deleted == 1

    def gone() -> bool:
        try:
            read(a, ["u"])
        except grpc.RpcError as e:
            return e.code() == grpc.StatusCode.NOT_FOUND
        return False

    assert wait_until(gone)
    assert push(a, [("u", now_minute() - 5 * M, 1)]).counts["ad_impressions"].written == 1


def test_pushes_go_on_when_the_registry_refresh_ends_while_a_source_s_views_load(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    # A refresh period this short ends between any two looks at the caches: loading a source's views
    # dropped the cache being filled, and the push failed (INVALID_ARGUMENT, encoding failed).
    settings = {"store": redis_server.url, "redis_namespace": f"refresh{uuid.uuid4().hex[:8]}"}
    r = start(tmp_path / "data", redis_registry_refresh_s=1e-9, **settings)
    try:
        r.apply(AD_IMPRESSIONS)
        apply(r, view(aggregations=TOTALS))
        t = now_minute() - 5 * M
        for n in range(3):
            assert push(r, [("u", t + n, 2)]).counts["ad_impressions"].written == 1
        _, [row] = read(r, ["u"], now_minute() + 1)
        assert row == [("PRESENT", "3"), ("PRESENT", "6")]
    finally:
        r.close()
