"""Timestamps and Durations outside what the server keeps: refused where they arrive, by field path."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import AD_IMPRESSIONS, Running, features, rich_error, rows_request, source_from_json, start
from google.protobuf import duration_pb2, timestamp_pb2
from views_helpers import stub, view

from featurepush.v1 import backfill_service_pb2 as bpb
from featurepush.v1 import backfill_service_pb2_grpc
from featurepush.v1 import feature_view_service_pb2 as fvs_pb2
from featurepush.v1 import registry_service_pb2 as pb
from featurepush_server.core.times import MAX_DURATION_SECONDS, MAX_SECONDS, MIN_SECONDS

# Seconds and nanos of Timestamps no protobuf runtime writes as JSON, nor the server keeps.
BAD_STAMPS = [
    (2**62, 0),
    (-(2**62), 0),
    (2**40, 0),
    (-(2**40), 0),
    (MAX_SECONDS + 1, 0),
    (MIN_SECONDS - 1, 0),
    (0, -1),
    (0, 2_000_000_000),
]
# Durations outside protobuf's range: too long, nanos out of range or of the other sign.
BAD_DURATIONS = [
    (2**62, 0),
    (MAX_DURATION_SECONDS + 1, 0),
    (61, -1_000_000),
    (60, 1_000_000_000),
    (-(2**62), 0),
]


def refused(call: Any, path: str) -> str:
    """Run `call`, which must fail INVALID_ARGUMENT with one violation at `path`; its description."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    code, violations, _ = rich_error(info.value)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert [p for p, _ in violations] == [path]
    return violations[0][1]


@pytest.mark.parametrize(("seconds", "nanos"), BAD_DURATIONS)
def test_a_source_ttl_outside_protobufs_range_is_refused(running: Running, seconds: int, nanos: int) -> None:
    doc = dict(AD_IMPRESSIONS, name="far")
    source = source_from_json(doc)
    source.online_ttl.CopyFrom(duration_pb2.Duration(seconds=seconds, nanos=nanos))
    refused(lambda: running.registry.ApplySource(pb.ApplySourceRequest(source=source)), "source.online_ttl")
    with pytest.raises(grpc.RpcError) as info:
        running.registry.GetSource(pb.GetSourceRequest(name="far"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_the_longest_ttl_kept_reads_and_lists(running: Running) -> None:
    """A ttl of 10,000 years passes protobuf but spans more than the years kept; the span itself is fine."""
    source = source_from_json(AD_IMPRESSIONS)
    source.online_ttl.seconds = MAX_DURATION_SECONDS
    description = refused(
        lambda: running.registry.ApplySource(pb.ApplySourceRequest(source=source)), "source.online_ttl"
    )
    assert "at most 315,537,897,599 seconds" in description
    source.online_ttl.seconds = MAX_SECONDS - MIN_SECONDS - 1
    running.registry.ApplySource(pb.ApplySourceRequest(source=source))
    running.ingest.Push(
        rows_request(
            {"ad_impressions": [{"user_id": "u", "timestamp": "0001-01-01T00:00:00Z", "clicked": 1}]}
        )
    )
    [result] = features(running, "ad_impressions", {"user_id": "u"})
    assert result["status"] == "FEATURE_STATUS_PRESENT"
    listed = running.registry.ListSources(pb.ListSourcesRequest()).sources
    assert listed[0].online_ttl.seconds == MAX_SECONDS - MIN_SECONDS - 1


def _view_with(where: str, duration: duration_pb2.Duration) -> tuple[Any, str]:
    """The test view with `duration` as its interval or its second window, and that field's path."""
    proto = view().to_proto()
    if where == "interval":
        proto.aggregation_interval.CopyFrom(duration)
        return proto, "view.aggregation_interval"
    proto.aggregations[1].time_window.CopyFrom(duration)
    return proto, "view.aggregations[1].time_window"


@pytest.mark.parametrize(("seconds", "nanos"), BAD_DURATIONS)
@pytest.mark.parametrize("where", ["interval", "window"])
def test_view_durations_outside_protobufs_range_are_refused(
    running: Running, seconds: int, nanos: int, where: str
) -> None:
    proto, path = _view_with(where, duration_pb2.Duration(seconds=seconds, nanos=nanos))
    request = fvs_pb2.ApplyFeatureViewRequest(view=proto)
    with pytest.raises(grpc.RpcError) as info:
        stub(running).ApplyFeatureView(request)
    code, violations, _ = rich_error(info.value)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert path in [p for p, _ in violations]


@pytest.mark.parametrize(
    ("where", "seconds", "nanos"),
    [("interval", 60, 1), ("interval", 60, 999), ("window", 600, 999), ("window", 3600, 1)],
)
def test_view_durations_with_a_fraction_of_a_microsecond_are_refused(
    running: Running, where: str, seconds: int, nanos: int
) -> None:
    proto, path = _view_with(where, duration_pb2.Duration(seconds=seconds, nanos=nanos))
    # Kept in microseconds, the fraction was dropped: the stored definition said one thing, the tiles
    # and windows another.
    for validate_only in (False, True):
        request = fvs_pb2.ApplyFeatureViewRequest(view=proto, validate_only=validate_only)
        with pytest.raises(grpc.RpcError) as info:
            stub(running).ApplyFeatureView(request)
        code, violations, _ = rich_error(info.value)
        assert (code, [p for p, _ in violations]) == (grpc.StatusCode.INVALID_ARGUMENT, [path])


def test_a_view_stored_with_a_fraction_of_a_microsecond_is_still_read(running: Running) -> None:
    proto = view().to_proto()
    proto.aggregation_interval.nanos = 1
    proto.aggregations[1].time_window.nanos = 999
    # As a server that took such durations stored it.
    running.server.store.put_view(proto.name, proto.SerializeToString(), invalidate=False)
    got = stub(running).GetFeatureView(fvs_pb2.GetFeatureViewRequest(name=proto.name)).view
    assert got.aggregation_interval.nanos == 1
    running.ingest.Push(
        rows_request(
            {"ad_impressions": [{"user_id": "u", "timestamp": "2026-01-01T00:00:00Z", "clicked": 1}]}
        )
    )
    read = fvs_pb2.GetViewFeaturesRequest(feature_view=proto.name, keys=[{"user_id": "u"}])
    assert len(stub(running).GetViewFeatures(read).results) == 1


@pytest.mark.parametrize(("seconds", "nanos"), [*BAD_STAMPS, (MIN_SECONDS + 86_399, 0)])
def test_view_reads_refuse_an_as_of_outside_the_years_kept(
    running: Running, seconds: int, nanos: int
) -> None:
    stub(running).ApplyFeatureView(fvs_pb2.ApplyFeatureViewRequest(view=view().to_proto()))
    request = fvs_pb2.GetViewFeaturesRequest(feature_view="clicks", keys=[{"user_id": "u"}])
    request.as_of.CopyFrom(timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos))
    refused(lambda: stub(running).GetViewFeatures(request), "as_of")


@pytest.mark.parametrize("seconds", [MIN_SECONDS + 86_400, MAX_SECONDS])
def test_view_reads_at_the_ends_of_the_years_kept(running: Running, seconds: int) -> None:
    stub(running).ApplyFeatureView(fvs_pb2.ApplyFeatureViewRequest(view=view().to_proto()))
    request = fvs_pb2.GetViewFeaturesRequest(feature_view="clicks", keys=[{"user_id": "u"}])
    request.as_of.CopyFrom(timestamp_pb2.Timestamp(seconds=seconds, nanos=999_999_999))
    response = stub(running).GetViewFeatures(request)
    assert len(response.results) == 1


@pytest.fixture
def batch_server(tmp_path: Path) -> Iterator[Running]:
    """A server whose ad_impressions source reads a Parquet file with nanosecond event times."""
    table = pa.table(
        {
            "user_id": ["u1", "u2"],
            "timestamp": pa.array(
                [dt.datetime(2024, 5, 1, tzinfo=dt.UTC), dt.datetime(2200, 5, 1, tzinfo=dt.UTC)],
                pa.timestamp("ns", "UTC"),
            ),
            "clicked": pa.array([1, 2], pa.int64()),
        }
    )
    pq.write_table(table, tmp_path / "history.parquet")
    running = start(tmp_path / "data", batch_roots=(tmp_path,))
    try:
        uri = str(tmp_path / "history.parquet")
        running.apply(dict(AD_IMPRESSIONS, batchConfig={"uri": uri, "fileFormat": "FILE_FORMAT_PARQUET"}))
        yield running
    finally:
        running.close()


def _calls(running: Running) -> dict[str, Any]:
    backfill = backfill_service_pb2_grpc.BackfillServiceStub(running.channel)
    return {
        "read": lambda **kw: list(
            backfill.ReadBatchSource(bpb.ReadBatchSourceRequest(source="ad_impressions", **kw))
        ),
        "backfill": lambda **kw: list(backfill.Backfill(bpb.BackfillRequest(source="ad_impressions", **kw))),
    }


@pytest.mark.parametrize(("seconds", "nanos"), BAD_STAMPS)
@pytest.mark.parametrize("field", ["start_time", "end_time"])
@pytest.mark.parametrize("call", ["read", "backfill"])
def test_batch_ranges_refuse_timestamps_outside_the_years_kept(
    batch_server: Running, seconds: int, nanos: int, field: str, call: str
) -> None:
    stamp = timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)
    refused(lambda: _calls(batch_server)[call](**{field: stamp}), field)


def test_batch_ranges_past_the_years_nanoseconds_reach(batch_server: Running) -> None:
    """Bounds in years 0001 and 9999 filter a nanosecond column as any other bound does."""
    read = _calls(batch_server)["read"]

    def users(**bounds: timestamp_pb2.Timestamp) -> list[str]:
        messages = read(**bounds)
        stream = b"".join(m.arrow_schema or m.arrow_record_batch for m in messages)
        return list(pa.ipc.open_stream(stream).read_all().column("user_id").to_pylist())

    first = timestamp_pb2.Timestamp(seconds=MIN_SECONDS)
    last = timestamp_pb2.Timestamp(seconds=MAX_SECONDS, nanos=999_999_999)
    assert users(start_time=first, end_time=last) == ["u1", "u2"]
    assert users(start_time=last) == []
    assert users(end_time=first) == []
    [*_, done] = _calls(batch_server)["backfill"](start_time=first, end_time=last)
    assert done.rows_written == 2
