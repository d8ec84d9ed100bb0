"""Tests for the Client's request building and response decoding against scripted in-process services."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import pyarrow as pa
import pytest
from google.protobuf import json_format, struct_pb2

import featurepush
from featurepush import Client, FeatureStatus, Field, Int64, SourceCounts, StreamSource, String, Timestamp
from featurepush.payload import SMALL_PUSH_ROWS
from featurepush.v1 import (
    ingest_service_pb2,
    ingest_service_pb2_grpc,
    online_service_pb2,
    online_service_pb2_grpc,
    registry_service_pb2,
    registry_service_pb2_grpc,
)

SOURCE = StreamSource(
    name="clicks",
    schema=[Field("user_id", String), Field("ts", Timestamp), Field("count", Int64, nullable=True)],
    entity_keys=["user_id"],
    timestamp_field="ts",
)


@dataclass
class _Recorder:
    """What the scripted services saw."""

    get_source_calls: int = 0
    pushes: list[ingest_service_pb2.PushRequest] = field(default_factory=list)
    feature_requests: list[online_service_pb2.GetFeaturesRequest] = field(default_factory=list)


class _Registry(registry_service_pb2_grpc.RegistryServiceServicer):
    def __init__(self, seen: _Recorder) -> None:
        self._seen = seen

    def ApplySource(
        self, request: registry_service_pb2.ApplySourceRequest, context: grpc.ServicerContext
    ) -> registry_service_pb2.ApplySourceResponse:
        return registry_service_pb2.ApplySourceResponse(source=request.source, changed=True, created=False)

    def GetSource(
        self, request: registry_service_pb2.GetSourceRequest, context: grpc.ServicerContext
    ) -> registry_service_pb2.GetSourceResponse:
        self._seen.get_source_calls += 1
        return registry_service_pb2.GetSourceResponse(source=SOURCE.to_proto())

    def ListSources(
        self, request: registry_service_pb2.ListSourcesRequest, context: grpc.ServicerContext
    ) -> registry_service_pb2.ListSourcesResponse:
        # Five sources named s0..s4, paged by an index token.
        start = int(request.page_token or 0)
        end = min(start + request.page_size, 5)
        sources = [
            StreamSource(f"s{i}", SOURCE.schema, SOURCE.entity_keys, "ts").to_proto()
            for i in range(start, end)
        ]
        return registry_service_pb2.ListSourcesResponse(
            sources=sources, next_page_token=str(end) if end < 5 else ""
        )

    def DeleteSource(
        self, request: registry_service_pb2.DeleteSourceRequest, context: grpc.ServicerContext
    ) -> registry_service_pb2.DeleteSourceResponse:
        return registry_service_pb2.DeleteSourceResponse(rows_deleted=12)


class _Ingest(ingest_service_pb2_grpc.IngestServiceServicer):
    def __init__(self, seen: _Recorder) -> None:
        self._seen = seen

    def Push(
        self, request: ingest_service_pb2.PushRequest, context: grpc.ServicerContext
    ) -> ingest_service_pb2.PushResponse:
        self._seen.pushes.append(request)
        sizes = {
            name: len(r.rows) or _arrow_rows(r.arrow_ipc).num_rows for name, r in request.records.items()
        }
        counts = {
            name: ingest_service_pb2.SourceCounts(accepted=n, written=n - 1, superseded=1)
            for name, n in sizes.items()
        }
        return ingest_service_pb2.PushResponse(counts=counts, dry_run=request.dry_run)


def _arrow_rows(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(data).read_all()


class _Online(online_service_pb2_grpc.OnlineServiceServicer):
    def __init__(self, seen: _Recorder) -> None:
        self._seen = seen

    def GetFeatures(
        self, request: online_service_pb2.GetFeaturesRequest, context: grpc.ServicerContext
    ) -> online_service_pb2.GetFeaturesResponse:
        self._seen.feature_requests.append(request)
        present = online_service_pb2.FeatureVector(
            status=online_service_pb2.FEATURE_STATUS_PRESENT,
            features=json_format.ParseDict(
                {"user_id": "u1", "ts": "2026-11-25T10:00:00.120Z", "count": "9007199254740993"},
                struct_pb2.Struct(),
            ),
        )
        present.event_time.FromDatetime(dt.datetime(2026, 11, 25, 10, 0, 0, 120000, tzinfo=dt.UTC))
        expired = online_service_pb2.FeatureVector(status=online_service_pb2.FEATURE_STATUS_EXPIRED)
        expired.event_time.FromDatetime(dt.datetime(2020, 1, 1, tzinfo=dt.UTC))
        missing = online_service_pb2.FeatureVector(status=online_service_pb2.FEATURE_STATUS_MISSING)
        # A vector per key, as a server answers: the first three keys' are these, any more are missing.
        vectors = [present, expired, missing, *[missing] * max(0, len(request.keys) - 3)]
        return online_service_pb2.GetFeaturesResponse(results=vectors[: len(request.keys)])


@pytest.fixture
def seen() -> _Recorder:
    return _Recorder()


@pytest.fixture
def client(seen: _Recorder) -> Iterator[Client]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    registry_service_pb2_grpc.add_RegistryServiceServicer_to_server(_Registry(seen), server)
    ingest_service_pb2_grpc.add_IngestServiceServicer_to_server(_Ingest(seen), server)
    online_service_pb2_grpc.add_OnlineServiceServicer_to_server(_Online(seen), server)
    port = server.add_insecure_port("localhost:0")
    server.start()
    try:
        with Client(f"localhost:{port}", timeout=5.0) as client:
            yield client
    finally:
        server.stop(None).wait()


def test_push_sends_rows_and_returns_counts(client: Client, seen: _Recorder) -> None:
    ts = dt.datetime(2026, 11, 25, 10, tzinfo=dt.UTC)
    result = client.push(
        "clicks",
        ({"user_id": f"u{i}", "ts": ts, "count": i} for i in range(3)),
        dry_run=True,
        request_id="r1",
    )
    assert result == featurepush.PushResult({"clicks": SourceCounts(3, 2, 1)}, dry_run=True, replayed=False)
    request = seen.pushes[0]
    assert request.request_id == "r1" and request.dry_run
    # A few records travel as Structs, cheaper than an Arrow batch for the client and the server alike.
    assert not request.records["clicks"].arrow_ipc
    assert json_format.MessageToDict(request.records["clicks"].rows[2]) == {
        "user_id": "u2",
        "ts": "2026-11-25T10:00:00Z",
        "count": 2.0,
    }


def test_push_sends_more_than_a_few_records_as_one_arrow_batch(client: Client, seen: _Recorder) -> None:
    ts = dt.datetime(2026, 11, 25, 10, tzinfo=dt.UTC)
    records = [{"user_id": f"u{i}", "ts": ts, "count": i} for i in range(SMALL_PUSH_ROWS + 1)]
    client.push("clicks", records)
    # The schema is known and every value fits it, so the records travel as one Arrow batch.
    request = seen.pushes[0]
    assert not request.records["clicks"].rows
    assert _arrow_rows(request.records["clicks"].arrow_ipc).to_pylist() == records
    # As many go as Structs, in the same request as another source's few.
    client.push_many({"clicks": records[:SMALL_PUSH_ROWS], "b": records[:1]})
    assert len(seen.pushes[1].records["clicks"].rows) == SMALL_PUSH_ROWS


def test_push_sends_structs_when_a_value_does_not_fit_the_schema(client: Client, seen: _Recorder) -> None:
    client.push("clicks", [{"user_id": "u1", "ts": dt.datetime(2026, 1, 1, tzinfo=dt.UTC), "count": 3.5}])
    assert json_format.MessageToDict(seen.pushes[0].records["clicks"].rows[0])["count"] == 3.5


def test_push_many_carries_several_sources(client: Client, seen: _Recorder) -> None:
    result = client.push_many({"a": [{"x": 1}], "b": [{"x": 2}, {"x": 3}]})
    assert set(result.counts) == {"a", "b"}
    assert seen.pushes[0].request_id == ""
    assert len(seen.pushes[0].records["b"].rows) == 2


def test_push_names_the_record_that_cannot_be_encoded(client: Client, seen: _Recorder) -> None:
    with pytest.raises(ValueError, match=r'^records\["clicks"\]\[1\]\.ts: datetime .* is naive'):
        client.push("clicks", [{"ts": dt.datetime.now(dt.UTC)}, {"ts": dt.datetime(2026, 1, 1)}])
    assert seen.pushes == []


def test_get_features_decodes_by_the_cached_schema(client: Client, seen: _Recorder) -> None:
    results = client.get_features("clicks", ["u1", ("u2",), {"user_id": "u3"}])
    assert [r.status for r in results] == [
        FeatureStatus.PRESENT,
        FeatureStatus.EXPIRED,
        FeatureStatus.MISSING,
    ]
    assert results[0].features == {
        "user_id": "u1",
        "ts": dt.datetime(2026, 11, 25, 10, 0, 0, 120000, tzinfo=dt.UTC),
        "count": 2**53 + 1,
    }
    assert results[0].event_time == dt.datetime(2026, 11, 25, 10, 0, 0, 120000, tzinfo=dt.UTC)
    assert results[1].features is None and results[1].event_time == dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    assert results[2].features is None and results[2].event_time is None
    assert results[0].status == "PRESENT"
    keys = [json_format.MessageToDict(k) for k in seen.feature_requests[0].keys]
    assert keys == [{"user_id": "u1"}, {"user_id": "u2"}, {"user_id": "u3"}]

    client.get_features("clicks", ["u1"])
    assert seen.get_source_calls == 1
    client.apply(SOURCE)
    client.get_features("clicks", ["u1"])
    assert seen.get_source_calls == 2


def test_list_sources_follows_page_tokens(client: Client) -> None:
    assert [s.name for s in client.list_sources(page_size=2)] == ["s0", "s1", "s2", "s3", "s4"]


def test_apply_get_and_delete(client: Client) -> None:
    [applied] = client.apply(SOURCE, validate_only=True)
    assert applied == featurepush.ApplyResult("clicks", created=False, changed=True, source=SOURCE)
    assert client.get_source("clicks") == SOURCE
    assert client.delete_source("clicks") == 12


def test_from_channel_leaves_the_channel_open(client: Client) -> None:
    borrowed = Client.from_channel(client.channel, timeout=None)
    borrowed.close()
    assert client.get_source("clicks").name == "clicks"
