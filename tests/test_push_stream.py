"""PushStream over a real server: ordered acks, failures kept to their batch, bounded read-ahead."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator

import pytest
from conftest import Running
from google.protobuf import struct_pb2
from google.rpc import code_pb2, error_details_pb2

from featurepush.v1 import ingest_service_pb2 as pb
from featurepush.v1 import online_service_pb2
from featurepush_server.servicers.ingest import IngestServicer


def batch(seq: int, users: list[str], clicked: object = 1, request_id: str = "") -> pb.PushStreamRequest:
    """One stream batch of ad_impressions rows."""
    request = pb.PushRequest(request_id=request_id)
    rows = request.records["ad_impressions"].rows
    for user in users:
        rows.add().update({"user_id": user, "timestamp": "2026-01-01T00:00:00Z", "clicked": clicked})
    return pb.PushStreamRequest(sequence_id=seq, request=request)


def stored(running: Running, users: list[str]) -> list[int]:
    """The status of each user's online row."""
    keys = [struct_pb2.Struct(fields={"user_id": struct_pb2.Value(string_value=u)}) for u in users]
    reply = running.online.GetFeatures(
        online_service_pb2.GetFeaturesRequest(source="ad_impressions", keys=keys)
    )
    return [v.status for v in reply.results]


def test_bad_batch_fails_alone_and_the_stream_goes_on(running: Running) -> None:
    requests = [batch(10, ["a", "b"]), batch(11, ["c"], clicked=3.9), batch(12, ["d", "e", "f"])]
    acks = list(running.ingest.PushStream(iter(requests)))
    assert [a.sequence_id for a in acks] == [10, 11, 12]
    assert [a.WhichOneof("result") for a in acks] == ["response", "error", "response"]
    assert acks[0].response.counts["ad_impressions"].written == 2
    assert acks[2].response.counts["ad_impressions"].written == 3
    error = acks[1].error
    assert error.code == code_pb2.INVALID_ARGUMENT
    bad = error_details_pb2.BadRequest()
    info = error_details_pb2.ErrorInfo()
    assert error.details[0].Unpack(bad) and error.details[1].Unpack(info)
    assert [v.field for v in bad.field_violations] == ['records["ad_impressions"][0].clicked']
    assert info.reason == "INVALID_RECORDS"
    present = online_service_pb2.FEATURE_STATUS_PRESENT
    missing = online_service_pb2.FEATURE_STATUS_MISSING
    assert stored(running, ["a", "b", "c", "d", "e", "f"]) == [
        present,
        present,
        missing,
        present,
        present,
        present,
    ]


def test_unknown_source_and_empty_batch_fail_alone(running: Running) -> None:
    unknown = pb.PushStreamRequest(sequence_id=2, request=pb.PushRequest())
    unknown.request.records["nope"].rows.add().update({"x": 1})
    requests = [unknown, pb.PushStreamRequest(sequence_id=3), batch(4, ["z"])]
    acks = list(running.ingest.PushStream(iter(requests)))
    assert [(a.sequence_id, a.WhichOneof("result")) for a in acks] == [
        (2, "error"),
        (3, "error"),
        (4, "response"),
    ]
    assert acks[0].error.code == code_pb2.NOT_FOUND
    assert acks[1].error.code == code_pb2.INVALID_ARGUMENT


def test_repeated_request_id_is_replayed_not_written_twice(running: Running) -> None:
    requests = [batch(1, ["a"], request_id="r-1"), batch(2, ["a"], request_id="r-1")]
    first, second = running.ingest.PushStream(iter(requests))
    assert not first.response.replayed and second.response.replayed
    assert second.response.counts["ad_impressions"] == first.response.counts["ad_impressions"]
    replay = running.ingest.Push(requests[0].request)
    assert replay.replayed and replay.counts["ad_impressions"].written == 1


def test_many_batches_are_acknowledged_in_order(running: Running) -> None:
    requests = (batch(i, [f"u{i}-{j}" for j in range(20)]) for i in range(200))
    acks = list(running.ingest.PushStream(requests))
    assert [a.sequence_id for a in acks] == list(range(200))
    assert all(a.response.counts["ad_impressions"].accepted == 20 for a in acks)


class _Context:
    """The little of a ServicerContext that PushStream uses."""

    def __init__(self) -> None:
        self.active = True

    def is_active(self) -> bool:
        return self.active


@pytest.mark.parametrize("read_ahead", [1, 3])
def test_read_ahead_is_bounded(running: Running, read_ahead: int) -> None:
    servicer = IngestServicer(running.server.ingestor, read_ahead=read_ahead)
    pulled = itertools.count()
    lock = threading.Lock()
    taken = [0]

    def endless() -> Iterator[pb.PushStreamRequest]:
        for i in pulled:
            with lock:
                taken[0] = i + 1
            yield batch(i, [f"k{i}"])

    context = _Context()
    acks = servicer.PushStream(endless(), context)  # type: ignore[arg-type]
    try:
        received = [next(acks).sequence_id for _ in range(5)]
        assert received == [0, 1, 2, 3, 4]
        with lock:
            # Acknowledged, queued, and the one the reader holds while waiting for room.
            assert taken[0] <= len(received) + read_ahead + 1
    finally:
        context.active = False
        acks.close()
