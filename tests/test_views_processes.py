"""Stream feature views under serve --processes: every front sees every change, the owner checks view
generations, and kill -9 of a front or the owner mid-push loses and double-counts nothing."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import grpc
import pyarrow as pa
import pytest
from conftest import AD_IMPRESSIONS, rich_error, rows_request, source_from_json, start
from servers import ServedProcess, wait_until
from test_processes import Connection, _pids, _room_for_racing_writers  # noqa: F401 - an autouse fixture
from views_helpers import HOUR, MINUTE, apply, iso, push, read, stub, view

from featurepush.definitions import Aggregate, FeatureService
from featurepush.v1 import feature_view_service_pb2 as fvs_pb2
from featurepush.v1 import feature_view_service_pb2_grpc as fvs_grpc
from featurepush.v1 import registry_service_pb2
from featurepush_server.core.errors import Aborted
from featurepush_server.core.stores.base import RowBatch
from featurepush_server.core.tiles import build_tiles

M = 60_000_000


def now_minute() -> int:
    return time.time_ns() // 1000 // M * M


def _values(names: list[str], row: list[tuple[str, object]]) -> dict[str, object]:
    return {name: value for name, (_, value) in zip(names, row, strict=True)}


def test_every_front_sees_view_and_service_changes_at_once(tmp_path: Path) -> None:
    r = start(tmp_path / "data", fronts=2)
    try:
        a, b = r.fronts
        a.apply(AD_IMPRESSIONS)
        short = [Aggregate("clicked", "sum", 10 * MINUTE)]
        apply(a, view(aggregations=short))
        t = now_minute() - 5 * M
        # Front b learns of the view from the store, and its push merges tiles that front a reads.
        assert push(b, [("u", t, 2), ("u", t + 1, 3)]).counts["ad_impressions"].written == 1
        assert read(a, ["u"]) == (["clicked_sum_10m"], [[("PRESENT", "5")]])
        # A compatible change through b: a reads the new feature at once, and its pushes still count.
        longer = [*short, Aggregate("clicked", "count", HOUR)]
        assert apply(b, view(aggregations=longer)).changed
        push(a, [("u", t + 2, 4)])
        names, [row] = read(a, ["u"])
        assert _values(names, row) == {"clicked_sum_10m": "9", "clicked_count_1h": "3"}
        with pytest.raises(grpc.RpcError) as caught:
            apply(a, view(aggregations=longer, interval=2 * MINUTE))
        assert rich_error(caught.value)[2] == "INCOMPATIBLE_VIEW_CHANGE"
        service = FeatureService(name="ranking", features=[view(aggregations=longer)]).to_proto()
        stub(b).ApplyFeatureService(fvs_pb2.ApplyFeatureServiceRequest(service=service))
        names, [row] = read(a, ["u"], service="ranking")
        assert _values(names, row) == {"clicks.clicked_sum_10m": "9", "clicks.clicked_count_1h": "3"}
        with pytest.raises(grpc.RpcError) as caught:
            stub(b).DeleteFeatureView(fvs_pb2.DeleteFeatureViewRequest(name="clicks"))
        assert rich_error(caught.value)[2] == "VIEW_IN_USE"
        stub(a).DeleteFeatureService(fvs_pb2.DeleteFeatureServiceRequest(name="ranking"))
        assert not stub(b).ListFeatureServices(fvs_pb2.ListFeatureServicesRequest()).services
        assert stub(b).DeleteFeatureView(fvs_pb2.DeleteFeatureViewRequest(name="clicks")).tiles_deleted == 1
        with pytest.raises(grpc.RpcError) as caught:
            read(a, ["u"])
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        # Front a no longer computes tiles for the deleted view: its pushes go on as plain writes.
        assert push(a, [("u", t + 3, 1)]).counts["ad_impressions"].written == 1
        assert not stub(a).ListFeatureViews(fvs_pb2.ListFeatureViewsRequest()).views
    finally:
        r.close()


def test_tiles_of_a_view_changed_since_they_were_computed_are_refused_whole(tmp_path: Path) -> None:
    r = start(tmp_path / "data", fronts=2)
    try:
        a, b = r.fronts
        a.apply(AD_IMPRESSIONS)
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
        # An incompatible change (allowed while no tile exists) through the other front.
        assert apply(b, view(interval=2 * MINUTE)).changed
        with pytest.raises(Aborted) as caught:
            a.server.store.write_latest([RowBatch("ad_impressions", [], [], tiles=[update])])
        assert caught.value.reason == "VIEW_CHANGED"
        assert not b.server.store.has_tiles(clicks.id)
    finally:
        r.close()


class ViewPushers:
    """Threads pushing events of one user each, sending a refused request again with its id until it is
    acknowledged: whether a refused one had landed or not, each request's events count once."""

    def __init__(self, port: int, base: int, threads: int = 4):
        self.acknowledged = [0] * threads
        self.retried = 0
        self._base = base
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._push, args=(Connection(port), t), daemon=True)
            for t in range(threads)
        ]
        for t in self._threads:
            t.start()

    def _push(self, conn: Connection, worker: int) -> None:
        n = 0
        while not self._stop.is_set():
            rows = [
                {"user_id": f"w{worker}", "timestamp": iso(self._base - (2 + i) * M - n), "clicked": 1}
                for i in range(10)
            ]
            request = rows_request({"clicks": rows}, requestId=f"w{worker}-{n}")
            while True:
                try:
                    conn.ingest.Push(request, timeout=30)
                    break
                except grpc.RpcError as e:
                    # A killed front drops its connections; a killed owner makes fronts refuse until it is
                    # back, and a view read from an earlier owner is refused whole (ABORTED).
                    assert e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED), e
                    with self._lock:
                        self.retried += 1
                    time.sleep(0.05)
            with self._lock:
                self.acknowledged[worker] += 1
            n += 1
        conn.channel.close()

    def count(self) -> int:
        with self._lock:
            return sum(self.acknowledged)

    def stop(self) -> list[int]:
        self._stop.set()
        for t in self._threads:
            t.join(120)
        return list(self.acknowledged)


def _counts(port: int, users: int, as_of: int) -> list[tuple[str, str]]:
    """Per user, the count and the sum of the totals view read at `as_of` through a new connection."""
    conn = Connection(port)
    try:
        _, rows = read(conn, [f"w{w}" for w in range(users)], as_of, view_name="totals")  # type: ignore[arg-type]
    finally:
        conn.channel.close()
    return [(str(count), str(total)) for (_, count), (_, total) in rows]


def test_killed_front_and_owner_with_views_lose_and_double_count_nothing(tmp_path: Path) -> None:
    served = ServedProcess(tmp_path / "data", "--processes", "2")
    try:
        doc = dict(AD_IMPRESSIONS, name="clicks")
        served.registry.ApplySource(registry_service_pb2.ApplySourceRequest(source=source_from_json(doc)))
        totals = view(
            "totals",
            source="clicks",
            aggregations=[Aggregate("clicked", "count", HOUR), Aggregate("clicked", "sum", HOUR)],
        )
        fvs_grpc.FeatureViewServiceStub(served.channel).ApplyFeatureView(
            fvs_pb2.ApplyFeatureViewRequest(view=totals.to_proto())
        )
        base = now_minute()
        pushers = ViewPushers(served.port, base)
        try:
            assert wait_until(lambda: pushers.count() > 100)
            os.kill(_pids(served, r"front \d+")[1], signal.SIGKILL)
            assert wait_until(lambda: "front 1 (pid" in served.log)
            done = pushers.count()
            assert wait_until(lambda: pushers.count() > done + 100)
            os.kill(_pids(served, "the store owner")[0], signal.SIGKILL)
            assert wait_until(lambda: len(_pids(served, "the store owner")) == 2), served.log
            done = pushers.count()
            assert wait_until(lambda: pushers.count() > done + 100, timeout_s=60)
        finally:
            acknowledged = pushers.stop()
        assert pushers.retried > 0
        # Every acknowledged request's ten events count once in the view, no more.
        want = [(str(10 * n), str(10 * n)) for n in acknowledged]
        assert _counts(served.port, len(acknowledged), base + 1) == want
        served.signal(signal.SIGTERM)
        assert served.wait() == 0, served.log
    finally:
        served.finish()
    again = ServedProcess(tmp_path / "data", "--processes", "1")
    try:
        assert _counts(again.port, len(acknowledged), base + 1) == want
    finally:
        again.signal()
        assert again.wait() == 0


def test_the_owner_sweeps_tiles_outside_every_window(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEATUREPUSH_EXPIRED_SWEEP_INTERVAL_S", "0.2")
    served = ServedProcess(tmp_path / "data", "--processes", "2")
    try:
        served.registry.ApplySource(
            registry_service_pb2.ApplySourceRequest(source=source_from_json(AD_IMPRESSIONS))
        )
        # A sketch keeps one tile per block, so the block leaves every window with its one tile.
        minute = [
            Aggregate("clicked", "count", MINUTE),
            Aggregate("clicked", "approx_count_distinct", MINUTE),
        ]
        stub(served).ApplyFeatureView(
            fvs_pb2.ApplyFeatureViewRequest(view=view(aggregations=minute).to_proto())
        )
        while True:
            # The oldest tile a one-minute window reads now; it leaves every window at the next minute.
            start_of = now_minute() - M
            if not push(served, [("u", start_of, 1)]).counts["ad_impressions"].late_skipped:
                break
        _, [row] = read(served, ["u"], start_of + M + 1)
        # Unless the minute already turned, the tile is there before the sweep reaches it.
        assert row == [("PRESENT", "1")] * 2 or now_minute() > start_of + M
        swept = [[("MISSING", None)] * 2]
        assert wait_until(lambda: read(served, ["u"], start_of + M + 1)[1] == swept, 150)  # type: ignore[arg-type]
        served.signal(signal.SIGTERM)
        assert served.wait() == 0, served.log
    finally:
        served.finish()
