"""Stream feature views: apply, push, read over windows with as_of, backfill, expiry and failures."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import pyarrow as pa
import pytest
from conftest import (
    AD_IMPRESSIONS,
    ONE_AND_MANY_PROCESSES,
    VIEW_STORES,
    Running,
    rich_error,
    rows_request,
    scalar,
    source_from_json,
    start,
)
from redis_servers import RedisCluster
from views_helpers import MINUTE, apply, brute, iso, opened_store, push, read, same, stub, view

from featurepush.types import Int64
from featurepush.v1 import feature_view_service_pb2 as fvs_pb2
from featurepush.v1 import online_service_pb2, registry_service_pb2

M = 60_000_000


def now_minute() -> int:
    return time.time_ns() // 1000 // M * M


@VIEW_STORES
def test_every_function_matches_the_raw_events_at_every_as_of(running: Running) -> None:
    apply(running, view())
    base = now_minute() - 50 * M
    events = [("u1", base + i * 7_000_000 + (i % 5) * M, (i * 37) % 11) for i in range(60)]
    events += [("u2", base + 3 * M, 4)]
    push(running, events)
    v = view()
    for as_of in (base, base + 4 * M + 1, base + 11 * M, base + 30 * M, now_minute() + M):
        names, rows = read(running, ["u1", "u2", "nobody"], as_of)
        assert names == [a.name for a in v.aggregations]
        for user, row in zip(["u1", "u2", "nobody"], rows, strict=True):
            values = [(t, c) for u, t, c in events if u == user]
            for agg, (status, got) in zip(v.aggregations, row, strict=True):
                want = brute(agg, values, as_of, M)
                if want is None:
                    assert status == "MISSING" and got is None, (agg.name, as_of)
                else:
                    assert status == "PRESENT" and same(got, want), (user, agg.name, as_of, got, want)


@VIEW_STORES
def test_tile_boundaries_and_the_window_edge(running: Running) -> None:
    apply(running, view())
    end = now_minute()
    # The first event lies on the window's first microsecond, the last just before its end.
    push(running, [("u", end - 10 * M, 1), ("u", end - 1, 2), ("u", end, 100), ("u", end - 10 * M - 1, 1000)])
    _, [row] = read(running, ["u"], end + 5)
    by_name = {a.name: value for a, (_, value) in zip(view().aggregations, row, strict=True)}
    assert by_name["clicked_sum_10m"] == "3"
    assert by_name["clicked_sum_1h"] == "1003"


@VIEW_STORES
def test_replays_change_nothing_and_late_events_are_counted(running: Running) -> None:
    apply(running, view())
    t = now_minute() - 5 * M
    first = push(running, [("u", t, 1), ("u", t + 1, 2)], request_id="r1")
    again = push(running, [("u", t, 1), ("u", t + 1, 2)], request_id="r1")
    assert again.replayed and again.counts["ad_impressions"] == first.counts["ad_impressions"]
    late = push(running, [("u", t - 2 * 60 * M, 5), ("u", t, 3)])
    assert late.counts["ad_impressions"].late_skipped == 1
    _, [row] = read(running, ["u"], now_minute() + 1)
    assert dict(zip(view().feature_names, [v for _, v in row], strict=True))["clicked_sum_1h"] == "6"


@VIEW_STORES
def test_a_failing_transformation_writes_nothing(running: Running, tmp_path: object) -> None:
    server = running.server
    assert server.batch_sources is not None
    server.batch_sources.allow_post_processors("views_helpers")
    apply(running, view(transformation="views_helpers:broken"))
    with pytest.raises(grpc.RpcError) as caught:
        push(running, [("u", now_minute() - M, 1)])
    code, _, reason = rich_error(caught.value)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and reason == "TRANSFORMATION_FAILED"
    assert "clicks" in caught.value.details() and "push batch" in caught.value.details()
    assert not server.store.has_rows(server.registry.get("ad_impressions").id)


@VIEW_STORES
def test_an_incompatible_change_is_refused_while_tiles_exist(running: Running) -> None:
    apply(running, view())
    assert not apply(running, view()).changed
    assert apply(running, view(interval=2 * MINUTE)).changed  # no tiles yet
    push(running, [("u", now_minute() - M, 1)])
    with pytest.raises(grpc.RpcError) as caught:
        apply(running, view(interval=MINUTE))
    assert rich_error(caught.value)[2] == "INCOMPATIBLE_VIEW_CHANGE"
    assert apply(running, view(interval=2 * MINUTE, description="compatible")).changed
    s = stub(running)
    assert [v.name for v in s.ListFeatureViews(fvs_pb2.ListFeatureViewsRequest()).views] == ["clicks"]
    assert s.DeleteFeatureView(fvs_pb2.DeleteFeatureViewRequest(name="clicks")).tiles_deleted == 1
    assert not s.ListFeatureViews(fvs_pb2.ListFeatureViewsRequest()).views
    # A page token is a name this server handed out; one the decoder would read as none is refused.
    with pytest.raises(grpc.RpcError) as caught:
        s.ListFeatureViews(fvs_pb2.ListFeatureViewsRequest(page_token="!!!!"))
    assert [v[0] for v in rich_error(caught.value)[1]] == ["page_token"]
    with pytest.raises(grpc.RpcError) as caught:
        s.ListFeatureServices(fvs_pb2.ListFeatureServicesRequest(page_token="!!!!"))
    assert [v[0] for v in rich_error(caught.value)[1]] == ["page_token"]


@ONE_AND_MANY_PROCESSES
def test_a_window_longer_than_the_ttl_keeps_its_events(running: Running) -> None:
    from conftest import AD_IMPRESSIONS

    running.apply({**AD_IMPRESSIONS, "onlineTtl": "60s"})
    apply(running, view())
    t = now_minute() - 30 * M
    push(running, [("u", t, 7)])
    assert (
        running.server.store.delete_expired(running.server.registry.get("ad_impressions").id, now_minute())
        == 1
    )
    _, [row] = read(running, ["u"])
    assert dict(zip(view().feature_names, [v for _, v in row], strict=True))["clicked_sum_1h"] == "7"


@VIEW_STORES
def test_expiry_deletes_tiles_outside_every_window(running: Running) -> None:
    from featurepush_server.core.tiles import sweep_tiles

    apply(running, view())
    push(running, [("u", now_minute() - 30 * M, 1)])
    server = running.server
    assert sweep_tiles(server.store) == 0
    assert sweep_tiles(server.store, now_minute() + 31 * M) == 1
    _, [row] = read(running, ["u"], now_minute() - 10 * M)
    assert all(status == "MISSING" for status, _ in row)


def test_a_store_without_views_refuses_one_clearly_and_pushes_go_on(
    tmp_path: Path, redis_cluster: RedisCluster
) -> None:
    r = start(tmp_path / "data", store=redis_cluster.url, redis_namespace="noviews")
    try:
        r.apply(AD_IMPRESSIONS)
        with pytest.raises(grpc.RpcError) as caught:
            apply(r, view())
        code, _, reason = rich_error(caught.value)
        assert code == grpc.StatusCode.FAILED_PRECONDITION and reason == "VIEWS_NOT_SUPPORTED"
        assert "Redis Cluster does not hold them" in (caught.value.details() or "")
        response = push(r, [("u1", now_minute() - M, 3)])
        assert response.counts["ad_impressions"].written == 1
    finally:
        r.close()


MOMENTS = ("count", "sum", "mean", "min", "max", "stddev")


def test_blocks_of_tiles_read_alike_by_key_and_by_scan(running: Running) -> None:
    from featurepush.definitions import Aggregate, FeatureService

    # Moments alone: 64 one-minute tiles per block. The 10-hour window spans more blocks than a read
    # names by key, so reading the whole view scans; the service's 10-minute features are read by key.
    aggs = [Aggregate("clicked", fn, w) for w in (10 * MINUTE, 10 * 60 * MINUTE) for fn in MOMENTS]
    v = view("blocks", aggregations=aggs)
    apply(running, v)
    short = FeatureService(name="short", features=[(v, [a.name for a in aggs[:6]])])
    stub(running).ApplyFeatureService(fvs_pb2.ApplyFeatureServiceRequest(service=short.to_proto()))
    base = now_minute() - 9 * 60 * M
    # Events every 7 minutes and some seconds over 9 hours, two in some tiles, on both sides of block edges.
    events = [("u1", base + i * 7 * M + (i % 3) * 1_000_000, (i * 13) % 17 - 4) for i in range(78)]
    events += [("u1", base + i * 7 * M + 30_000_000, i) for i in range(0, 78, 5)]
    events += [("u2", base + 64 * M - 1, 9), ("u2", base + 64 * M, -3)]
    push(running, events)
    moments = list(aggs)
    for as_of in (now_minute() + M, now_minute() - 123 * M + 7, base + 64 * M + 1, base + 5 * M):
        for target, wanted in (("view", moments), ("service", moments[:6])):
            if target == "view":
                names, rows = read(running, ["u1", "u2", "nobody"], as_of, view_name="blocks")
            else:
                names, rows = read(running, ["u1", "u2", "nobody"], as_of, service="short")
                names = [n.split(".", 1)[1] for n in names]
            assert names == [a.name for a in wanted]
            for user, row in zip(["u1", "u2", "nobody"], rows, strict=True):
                values = [(t, c) for u, t, c in events if u == user]
                for agg, (status, got) in zip(wanted, row, strict=True):
                    want = brute(agg, values, as_of, M)
                    if want is None:
                        assert status == "MISSING" and got is None, (target, agg.name, as_of)
                    else:
                        assert status == "PRESENT" and same(got, want), (target, user, agg.name, as_of, got)
    s = stub(running)
    s.DeleteFeatureService(fvs_pb2.DeleteFeatureServiceRequest(name="short"))
    tiles = {(u, t // M) for u, t, _ in events}
    assert s.DeleteFeatureView(fvs_pb2.DeleteFeatureViewRequest(name="blocks")).tiles_deleted == len(tiles)


def test_expiry_deletes_a_block_once_all_its_tiles_are_outside_every_window(running: Running) -> None:
    from featurepush.definitions import Aggregate
    from featurepush_server.core.tiles import sweep_tiles

    v = view(aggregations=[Aggregate("clicked", fn, 60 * MINUTE) for fn in MOMENTS])
    apply(running, v)
    span = 64 * M
    t = now_minute() - 30 * M
    if (t + M) % span == 0:
        # Both tiles in one block.
        t -= M
    push(running, [("u", t, 1), ("u", t + M, 2)])
    server = running.server
    assert server.views is not None
    block = t // span * span
    # The tiles leave the 60-minute window read at `block + span + 60 minutes`; one earlier, one stays.
    assert sweep_tiles(server.store, block + span + 60 * M - 2 * M) == 0
    _, [row] = read(running, ["u"], t + 2 * M)
    assert row[0] == ("PRESENT", "2") and v.aggregations[0].function == "count"
    assert sweep_tiles(server.store, block + span + 60 * M) == 2
    _, [row] = read(running, ["u"], t + 2 * M)
    assert all(status == "MISSING" for status, _ in row)


def test_a_tile_update_without_block_numbers_merges_alike(running: Running) -> None:
    import dataclasses

    import pyarrow as pa

    from featurepush.definitions import Aggregate
    from featurepush_server.core.tiles import build_tiles

    # A store that gets tile updates as bytes may leave the block numbers out: the keys say the same.
    apply(running, view(aggregations=[Aggregate("clicked", fn, 60 * MINUTE) for fn in MOMENTS]))
    t = now_minute() - 50 * M
    push(running, [("u1", t, 1), ("u2", t + 3 * M, 2)])
    server = running.server
    assert server.views is not None
    events = [("u1", t + i * 5 * M, i) for i in range(10)] + [("u2", t + 7 * M, 4), ("u3", t, 5)]
    table = pa.table(
        {
            "user_id": [u for u, _, _ in events],
            "timestamp": pa.array([ts for _, ts, _ in events], pa.timestamp("us", "UTC")),
            "clicked": pa.array([c for _, _, c in events], pa.int64()),
        }
    )
    update = build_tiles(server.views.get("clicks"), server.store, table, "timestamp", "a test batch")
    numbered = update.merge(None, server.store.read_tiles)
    from_keys = dataclasses.replace(update, blocks=None).merge(None, server.store.read_tiles)
    # One block per entity, or two where its tiles cross a block edge.
    assert len(set(numbered.keys)) == len(numbered.keys) >= 3
    assert (numbered.keys, numbered.values) == (from_keys.keys, from_keys.values)


def test_a_view_this_server_may_not_import_refuses_pushes_to_its_own_source_only(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = start(data, post_processor_modules=("views_helpers",))
    try:
        first.apply(AD_IMPRESSIONS)
        apply(first, view(transformation="views_helpers:broken"))
    finally:
        first.close()
    # The same data, served without the module the view's transformation lives in.
    running = start(data)
    try:
        running.apply({**AD_IMPRESSIONS, "name": "other"})
        other = running.ingest.Push(
            rows_request({"other": [{"user_id": "u", "timestamp": "2026-01-01T00:00:00Z", "clicked": 1}]})
        )
        assert other.counts["other"].written == 1
        with pytest.raises(grpc.RpcError) as caught:
            push(running, [("u", now_minute() - M, 1)])
        code, _, reason = rich_error(caught.value)
        assert code == grpc.StatusCode.FAILED_PRECONDITION and reason == "TRANSFORMATION_NOT_ALLOWED"
        details = caught.value.details()
        assert "clicks" in details and "post_processor_modules" in details
        assert "transformation_modules" not in details
    finally:
        running.close()


def test_count_of_a_string_column_counts_its_values(running: Running) -> None:
    from featurepush.definitions import Aggregate
    from featurepush.types import Field, String

    label = {"name": "label", "type": scalar("STRING"), "nullable": True}
    fields = [*AD_IMPRESSIONS["schema"]["fields"], label]  # type: ignore[index]
    running.apply({**AD_IMPRESSIONS, "name": "labelled", "schema": {"fields": fields}})
    counts = [Aggregate("label", "count", 10 * MINUTE), Aggregate("clicked", "count", 10 * MINUTE)]
    schema = [Field("clicked", Int64), Field("label", String)]
    apply(running, view("labels", source="labelled", schema=schema, aggregations=counts))
    t = now_minute() - 2 * M
    labels = ["a", None, "not a number", "b"]
    rows: list[dict[str, object]] = [
        {"user_id": "u", "timestamp": iso(t + i), "clicked": i, "label": x} for i, x in enumerate(labels)
    ]
    # Every push to the source used to fail: the label was cast to a number for its count.
    assert running.ingest.Push(rows_request({"labelled": rows})).counts["labelled"].written == 1
    _, [row] = read(running, ["u"], now_minute() + 1, view_name="labels")
    assert row == [("PRESENT", "3"), ("PRESENT", "4")]


@VIEW_STORES
def test_a_nan_counts_and_makes_every_numeric_aggregate_of_its_windows_nan(running: Running) -> None:
    from featurepush.definitions import Aggregate
    from featurepush.types import Field, Float64

    score = {"name": "score", "type": scalar("FLOAT64"), "nullable": True}
    fields = [*AD_IMPRESSIONS["schema"]["fields"], score]  # type: ignore[index]
    running.apply({**AD_IMPRESSIONS, "name": "scored", "schema": {"fields": fields}})
    functions = ("count", "sum", "mean", "min", "max", "stddev")
    aggs = [Aggregate("score", fn, 10 * MINUTE) for fn in functions]
    apply(running, view("scores", source="scored", schema=[Field("score", Float64)], aggregations=aggs))
    t = now_minute() - 2 * M
    rows: list[dict[str, object]] = [
        {"user_id": "u", "timestamp": iso(t + i), "clicked": i, "score": x}
        for i, x in enumerate([1.0, "NaN", 3.0])
    ]
    # Two pushes, so that the NaN also meets values of another push where tiles merge.
    running.ingest.Push(rows_request({"scored": rows[:2]}))
    running.ingest.Push(rows_request({"scored": rows[2:]}))
    _, [row] = read(running, ["u"], now_minute() + 1, view_name="scores")
    # As in IEEE arithmetic: NaN spreads to every result it takes part in, min and max included.
    assert row == [("PRESENT", "3"), *[("PRESENT", "NaN")] * 5]


@VIEW_STORES
def test_integers_past_2_53_are_taken_and_int64_features_stay_in_the_int64_range(running: Running) -> None:
    from featurepush.definitions import Aggregate

    functions = ("sum", "min", "max", "count")
    apply(running, view(aggregations=[Aggregate("clicked", fn, 10 * MINUTE) for fn in functions]))
    t = now_minute() - 2 * M
    top, bottom = 2**63 - 1, -(2**63)
    values = {"high": [top, top], "low": [bottom, bottom], "past": [2**53 + 1]}
    # Ten more entities, so that the Struct form of a read of every one is written by the array path.
    values.update({f"small{i}": [i] for i in range(10)})
    rows: list[dict[str, object]] = [
        {"user_id": user, "timestamp": iso(t + i), "clicked": str(c)}
        for user, cs in values.items()
        for i, c in enumerate(cs)
    ]
    # The tiles' cast to float64 used to refuse every push of such an integer to the source.
    assert running.ingest.Push(rows_request({"ad_impressions": rows})).counts["ad_impressions"].written
    at = now_minute() + 1
    want = {
        # Two Int64 maxima sum past the range: the sum takes the range's end, as do the extremes (2^63
        # as float64).
        "high": [str(top), str(top), str(top), "2"],
        "low": [str(bottom), str(bottom), str(bottom), "2"],
        # Past 2^53, the nearest float64.
        "past": [str(2**53)] * 3 + ["1"],
    }
    for users in (list(values), ["high"], ["low"]):
        _, got = read(running, users, at)
        for user, row in zip(users, got, strict=True):
            if user in want:
                assert row == [("PRESENT", v) for v in want[user]], user
        request = fvs_pb2.GetViewFeaturesRequest(
            feature_view="clicks",
            keys=[{"user_id": u} for u in users],
            response_format=online_service_pb2.RESPONSE_FORMAT_ARROW,
        )
        request.as_of.FromMicroseconds(at)
        table = pa.ipc.open_stream(stub(running).GetViewFeatures(request).arrow_ipc).read_all()
        for i, user in enumerate(users):
            if user in want:
                arrow = [table.column(f"clicked_{fn}_10m")[i].as_py() for fn in functions]
                assert arrow == [int(v) for v in want[user]], user


def _rekeyed() -> dict[str, object]:
    """ad_impressions keyed by a new field instead of user_id."""
    fields = [*AD_IMPRESSIONS["schema"]["fields"], {"name": "device", "type": scalar("STRING")}]  # type: ignore[index]
    return {**AD_IMPRESSIONS, "schema": {"fields": fields}, "entityKeys": ["device"]}


@VIEW_STORES
def test_a_source_change_its_views_could_not_follow_is_refused(running: Running) -> None:
    apply(running, view())
    # The source holds no rows, so nothing else refuses the change; applied, every push to the source,
    # every read of the view and its deletion failed INVALID_ARGUMENT naming view.entity_keys.
    for validate_only in (False, True):
        request = registry_service_pb2.ApplySourceRequest(
            source=source_from_json(_rekeyed()), validate_only=validate_only
        )
        with pytest.raises(grpc.RpcError) as info:
            running.registry.ApplySource(request)
        code, _, reason = rich_error(info.value)
        assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "SOURCE_IN_USE")
        assert "clicks" in str(info.value.details()) and "view.entity_keys" in str(info.value.details())
    got = running.registry.GetSource(registry_service_pb2.GetSourceRequest(name="ad_impressions")).source
    assert list(got.entity_keys) == ["user_id"]
    t = now_minute() - 2 * M
    push(running, [("u", t, 5)])
    _, [row] = read(running, ["u"], now_minute() + 1)
    assert row[0] == ("PRESENT", "1")
    # A change the view still matches is applied.
    fields = [
        *AD_IMPRESSIONS["schema"]["fields"],
        {"name": "note", "type": scalar("STRING"), "nullable": True},
    ]  # type: ignore[index]
    assert running.apply({**AD_IMPRESSIONS, "schema": {"fields": fields}}).changed


def test_a_view_its_source_no_longer_matches_can_be_deleted(tmp_path: Path) -> None:
    data = tmp_path / "data"
    running = start(data)
    running.apply(AD_IMPRESSIONS)
    apply(running, view())
    running.close()
    # As a server without the check above left a store: the source keyed otherwise under the view.
    with opened_store(data, {}) as store:
        found = store.get_source("ad_impressions")
        assert found is not None
        store.put_source("ad_impressions", source_from_json(_rekeyed()).SerializeToString(), found[0])
    running = start(data)
    try:
        deleted = stub(running).DeleteFeatureView(fvs_pb2.DeleteFeatureViewRequest(name="clicks"))
        assert deleted.tiles_deleted == 0
        with pytest.raises(grpc.RpcError) as info:
            stub(running).GetFeatureView(fvs_pb2.GetFeatureViewRequest(name="clicks"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        running.close()


def test_a_view_whose_column_its_source_can_never_fill_is_refused(running: Running) -> None:
    from featurepush.definitions import Aggregate
    from featurepush.types import Field, String

    counts = [Aggregate("clicked", "count", 10 * MINUTE)]
    typed = view("typed", schema=[Field("clicked", String)], aggregations=counts)
    # Without a transformation the view reads the source's Int64 clicked as a String: applied, every push
    # to the source failed TRANSFORMATION_FAILED.
    with pytest.raises(grpc.RpcError) as info:
        apply(running, typed)
    code, violations, _ = rich_error(info.value)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert [path for path, _ in violations] == ["view.schema.fields[0]"]
    # Nor may the source (holding no rows yet) change its clicked so that a view can no longer read it.
    apply(running, view("counted", aggregations=counts))
    fields = [f for f in AD_IMPRESSIONS["schema"]["fields"] if f["name"] != "clicked"]  # type: ignore[index]
    bools = {**AD_IMPRESSIONS, "schema": {"fields": [*fields, {"name": "clicked", "type": scalar("BOOL")}]}}
    with pytest.raises(grpc.RpcError) as info:
        running.apply(bools)
    code, _, reason = rich_error(info.value)
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "SOURCE_IN_USE")
    push(running, [("u", now_minute() - M, 1)])
    _, [row] = read(running, ["u"], now_minute() + 1, view_name="counted")
    assert row == [("PRESENT", "1")]


def test_sources_and_views_applied_at_once_never_deadlock(running: Running) -> None:
    apply(running, view())
    done = {"source": 0, "view": 0}
    stop = time.monotonic() + 3

    def sources() -> None:
        while time.monotonic() < stop:
            running.apply({**AD_IMPRESSIONS, "description": f"d{done['source']}"})
            done["source"] += 1

    def views() -> None:
        while time.monotonic() < stop:
            changed = view().to_proto()
            changed.description = f"v{done['view']}"
            stub(running).ApplyFeatureView(fvs_pb2.ApplyFeatureViewRequest(view=changed), timeout=10)
            done["view"] += 1

    # A view apply held the store's lock and waited for the registry's, which a source apply held while
    # it waited for the store's: both hung, and every push with them.
    threads = [threading.Thread(target=f, daemon=True) for f in (sources, views, sources, views)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert not any(t.is_alive() for t in threads), done
    assert done["source"] > 10 and done["view"] > 10
    push(running, [("u", now_minute() - M, 1)])


def test_a_source_deleted_while_a_view_of_it_is_applied_leaves_no_view_behind(
    running: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    views = running.server.views
    assert views is not None
    get_view = views._store.get_view
    deleted: list[object] = []

    def delete_the_source_first(name: str) -> object:
        # The view is compiled against the source; the source goes before the view takes the locks.
        if not deleted:
            request = registry_service_pb2.DeleteSourceRequest(name="ad_impressions")
            deleted.append(running.registry.DeleteSource(request))
        return get_view(name)

    monkeypatch.setattr(views._store, "get_view", delete_the_source_first)
    with pytest.raises(grpc.RpcError) as caught:
        apply(running, view())
    monkeypatch.undo()
    assert deleted
    code, _, reason = rich_error(caught.value)
    assert (code, reason) == (grpc.StatusCode.ABORTED, "SOURCE_CHANGED")
    assert not stub(running).ListFeatureViews(fvs_pb2.ListFeatureViewsRequest()).views
