"""The edge of every call, tried as an attacker would: undecodable bytes, huge names, floods, idle streams."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from conftest import AD_IMPRESSIONS, Running, start
from google.protobuf import struct_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from featurepush import Client
from featurepush.errors import ResourceExhaustedError, from_rpc_error
from featurepush.v1 import (
    backfill_service_pb2,
    feature_view_service_pb2,
    ingest_service_pb2,
    ingest_service_pb2_grpc,
    online_service_pb2,
    registry_service_pb2,
)
from featurepush_server.admission import Admission, Gate, Limit, Overloaded
from featurepush_server.edge import METHOD_CLASSES

SERVICES = [
    m.DESCRIPTOR.services_by_name[name]
    for m, name in (
        (registry_service_pb2, "RegistryService"),
        (ingest_service_pb2, "IngestService"),
        (online_service_pb2, "OnlineService"),
        (backfill_service_pb2, "BackfillService"),
        (feature_view_service_pb2, "FeatureViewService"),
    )
]
METHODS = [
    (f"/{s.full_name}/{m.name}", m.client_streaming, m.server_streaming) for s in SERVICES for m in s.methods
]
INPUTS = {f"/{s.full_name}/{m.name}": m.input_type for s in SERVICES for m in s.methods}


def _invalid_utf8(method: str) -> bytes | None:
    """A request whose first string field, at whatever depth, holds bytes that are not UTF-8; None if none."""

    def build(message: Descriptor, depth: int) -> bytes | None:
        for f in message.fields:
            tag = _varint(f.number << 3 | 2)
            if f.type == FieldDescriptor.TYPE_STRING:
                return tag + b"\x02\xc3\x28"
            if f.type == FieldDescriptor.TYPE_MESSAGE and depth < 3:
                inner = build(f.message_type, depth + 1)
                if inner is not None:
                    return tag + _varint(len(inner)) + inner
        return None

    return build(INPUTS[method], 0)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Running]:
    r = start(tmp_path / "data", max_push_streams=4, stream_idle_timeout_s=30)
    try:
        r.apply(AD_IMPRESSIONS)
        yield r
    finally:
        r.close()


def _raw_call(
    channel: grpc.Channel, method: str, client_streaming: bool, server_streaming: bool, body: bytes
) -> grpc.RpcError:
    """Send `body` as the request of `method` and return the error the server answers."""
    with pytest.raises(grpc.RpcError) as caught:
        if client_streaming:
            list(channel.stream_stream(method)(iter([body]), timeout=10))
        elif server_streaming:
            list(channel.unary_stream(method)(body, timeout=10))
        else:
            channel.unary_unary(method)(body, timeout=10)
    return caught.value


def _nested_struct(depth: int) -> bytes:
    """A Struct nested `depth` levels deep, encoded by hand since protobuf refuses to build it."""
    inner = b""
    for _ in range(depth):
        value = b"\x2a" + _varint(len(inner)) + inner  # Value.struct_value (field 5)
        entry = b"\x0a\x01k" + b"\x12" + _varint(len(value)) + value  # FieldsEntry key=1, value=2
        inner = b"\x0a" + _varint(len(entry)) + entry  # Struct.fields (field 1)
    return inner


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def test_every_featurepush_method_has_an_admission_class() -> None:
    assert sorted(METHOD_CLASSES) == sorted(m for m, _, _ in METHODS)


@pytest.mark.parametrize("kind", ["garbage", "truncated", "invalid-utf8"])
def test_undecodable_requests_are_invalid_argument_for_every_method(server: Running, kind: str) -> None:
    for method, client_streaming, server_streaming in METHODS:
        body = {"garbage": b"\xff\xff\xff\xff", "truncated": b"\x0a\x05ab"}.get(kind) or _invalid_utf8(method)
        if body is None:
            continue  # a request without a string field (GetServerStatusRequest) has no UTF-8 to get wrong
        err = _raw_call(server.channel, method, client_streaming, server_streaming, body)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, err)
        status = rpc_status.from_call(err)
        assert status is not None and "could not be decoded" in status.message


def test_structs_nested_past_the_decoder_depth_are_invalid_argument(server: Running) -> None:
    record = _nested_struct(200)
    rows = b"\x0a" + _varint(len(record)) + record  # SourceRecords.rows
    entry = b"\x0a\x0ead_impressions" + b"\x12" + _varint(len(rows)) + rows
    body = b"\x0a" + _varint(len(entry)) + entry  # PushRequest.records
    err = _raw_call(server.channel, "/featurepush.v1.IngestService/Push", False, False, body)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_stream_with_an_undecodable_message_ends_invalid_argument_after_acknowledging_the_rest(
    server: Running,
) -> None:
    good = ingest_service_pb2.PushStreamRequest(sequence_id=1)
    good.request.records["ad_impressions"].rows.add().update(
        {"user_id": "u", "timestamp": "2026-01-01T00:00:00Z", "clicked": 1}
    )
    call = server.channel.stream_stream("/featurepush.v1.IngestService/PushStream")(
        iter([good.SerializeToString(), b"\xff\xff"]), timeout=10
    )
    acks = []
    with pytest.raises(grpc.RpcError) as caught:
        for raw in call:
            acks.append(ingest_service_pb2.PushStreamResponse.FromString(raw))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [a.sequence_id for a in acks] == [1] and acks[0].WhichOneof("result") == "response"


def test_many_long_unknown_source_names_still_reach_a_default_client_as_not_found(server: Running) -> None:
    request = ingest_service_pb2.PushRequest()
    for i in range(300):
        request.records[f"{i:03d}" + "s" * 107].rows.add().update({"x": 1})
    with pytest.raises(grpc.RpcError) as caught:
        server.ingest.Push(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "and 295 more" in (caught.value.details() or "")


def test_one_huge_source_name_still_reaches_a_default_client_as_not_found(server: Running) -> None:
    request = ingest_service_pb2.PushRequest()
    request.records["n" * 20_000].rows.add().update({"x": 1})
    with pytest.raises(grpc.RpcError) as caught:
        server.ingest.Push(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as caught:
        server.registry.GetSource(registry_service_pb2.GetSourceRequest(name="n" * 20_000), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_many_long_unknown_field_names_still_reach_a_default_client_as_invalid_argument(
    server: Running,
) -> None:
    request = ingest_service_pb2.PushRequest()
    rows = request.records["ad_impressions"].rows
    for i in range(300):
        row = {"user_id": "u", "timestamp": "2026-01-01T00:00:00Z", "clicked": 1, f"{i:03d}" + "f" * 107: 1}
        rows.add().update(row)
    with pytest.raises(grpc.RpcError) as caught:
        server.ingest.Push(request, timeout=10)
    err = from_rpc_error(caught.value)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert 0 < len(err.violations) < 300
    assert err.message.endswith(f"(300 violations in all, the first {len(err.violations)} listed)")


def _health(channel: grpc.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return int(stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status)


def _idle(stop: threading.Event) -> Iterator[bytes]:
    """A request stream that sends nothing until `stop` is set."""
    stop.wait()
    yield from ()


def test_idle_streams_past_the_cap_are_refused_and_unary_calls_keep_being_served(server: Running) -> None:
    stop = threading.Event()
    calls = [server.ingest.PushStream(_idle(stop), timeout=30) for _ in range(64)]
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and sum(c.done() for c in calls) < 60:
            time.sleep(0.05)
        refused = [c for c in calls if c.done()]
        # The cap is 4: every stream past it is refused at once, and the refusal says when to come back.
        assert len(refused) == 60
        assert {c.code() for c in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert from_rpc_error(refused[0]).retry_delay_s is not None  # type: ignore[arg-type]
        request = online_service_pb2.GetFeaturesRequest(source="ad_impressions")
        request.keys.add().update({"user_id": "nobody"})
        for _ in range(20):
            server.online.GetFeatures(request, timeout=1)
            assert _health(server.channel) == health_pb2.HealthCheckResponse.SERVING
    finally:
        stop.set()
        for call in calls:
            call.cancel()


def test_an_idle_stream_is_closed_after_the_idle_timeout(tmp_path: Path) -> None:
    r = start(tmp_path / "data", stream_idle_timeout_s=0.5)
    try:
        stop = threading.Event()
        call = r.ingest.PushStream(_idle(stop), timeout=20)
        with pytest.raises(grpc.RpcError) as caught:
            list(call)
        stop.set()
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "sent nothing" in (caught.value.details() or "")
    finally:
        r.close()


def _rows(n: int, user: str = "u") -> list[struct_pb2.Struct]:
    out = []
    for i in range(n):
        s = struct_pb2.Struct()
        s.update({"user_id": f"{user}{i}", "timestamp": "2026-01-01T00:00:00Z", "clicked": i})
        out.append(s)
    return out


def test_a_push_flood_is_shed_with_retry_info_while_reads_and_health_keep_their_latency(
    tmp_path: Path,
) -> None:
    r = start(tmp_path / "data", max_concurrent_pushes=1, max_waiting_pushes=1)
    try:
        r.apply(AD_IMPRESSIONS)
        request = ingest_service_pb2.PushRequest()
        request.records["ad_impressions"].rows.extend(_rows(5000))
        stop = threading.Event()
        codes: list[grpc.StatusCode] = []
        retry_delays: list[float | None] = []

        def flood() -> None:
            stub = ingest_service_pb2_grpc.IngestServiceStub(r.channel)
            while not stop.is_set():
                try:
                    stub.Push(request, timeout=30)
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as e:
                    codes.append(e.code())
                    retry_delays.append(from_rpc_error(e).retry_delay_s)

        read = online_service_pb2.GetFeaturesRequest(source="ad_impressions")
        read.keys.add().update({"user_id": "u1"})
        with futures.ThreadPoolExecutor(12) as pool:
            for _ in range(12):
                pool.submit(flood)
            try:
                time.sleep(0.5)
                for _ in range(30):
                    r.online.GetFeatures(read, timeout=2)
                    assert _health(r.channel) == health_pb2.HealthCheckResponse.SERVING
            finally:
                stop.set()
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes and grpc.StatusCode.OK in codes
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert retry_delays and all(d is not None and d > 0 for d in retry_delays)
        # The client's push honours RetryInfo: under the same flood, every push through it lands.
        with Client(r.target) as client:
            rows = [
                {"user_id": f"c{i}", "timestamp": "2026-01-01T00:00:00Z", "clicked": i} for i in range(2000)
            ]
            stop.clear()
            with futures.ThreadPoolExecutor(8) as pool:
                results = list(pool.map(lambda _: client.push("ad_impressions", rows), range(8)))
        assert all(res.counts["ad_impressions"].accepted == 2000 for res in results)
    finally:
        r.close()


def test_overload_refusals_without_retry_info_are_not_retried(tmp_path: Path) -> None:
    r = start(tmp_path / "data", max_records_per_request=1)
    try:
        r.apply(AD_IMPRESSIONS)
        with Client(r.target) as client, pytest.raises(ResourceExhaustedError) as caught:
            client.push(
                "ad_impressions",
                [{"user_id": f"u{i}", "timestamp": "2026-01-01T00:00:00Z", "clicked": 1} for i in range(2)],
            )
        assert caught.value.retry_delay_s is None
    finally:
        r.close()


# --- the gate itself ----------------------------------------------------------------------------


def test_a_gate_admits_up_to_its_calls_then_queues_then_refuses() -> None:
    gate = Gate("push", Limit(calls=1, queue=1, bytes=0, wait_s=0.2))
    gate.enter(10)
    started = time.monotonic()
    with pytest.raises(Overloaded) as caught:
        gate.enter(10)  # waits its 0.2 s in the queue, then gives up
    assert time.monotonic() - started >= 0.15
    assert caught.value.retry_after_s > 0 and gate.waiting == 0 and gate.held_bytes == 10
    done = threading.Event()

    def waiter() -> None:
        gate.enter(5, 5.0)
        done.set()

    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.05)
    with pytest.raises(Overloaded):
        gate.enter(1)  # the one queue place is taken
    gate.leave(10)
    t.join(5)
    assert done.is_set() and gate.running == 1 and gate.held_bytes == 5
    gate.leave(5)
    assert gate.running == 0 and gate.held_bytes == 0 and gate.refused == 2


def test_a_gate_bounds_the_bytes_of_calls_in_progress_but_always_admits_one() -> None:
    gate = Gate("push", Limit(calls=10, queue=10, bytes=100, wait_s=0.1))
    gate.enter(500)  # larger than the bound, but alone
    with pytest.raises(Overloaded) as caught:
        gate.enter(1)
    assert "bytes" in caught.value.why
    gate.leave(500)
    gate.enter(60)
    with pytest.raises(Overloaded):
        gate.enter(60)
    gate.enter(40)
    assert gate.held_bytes == 100


def test_a_gate_waits_no_longer_than_the_calls_deadline() -> None:
    gate = Gate("read", Limit(calls=1, queue=5, bytes=0, wait_s=10.0))
    gate.enter(0)
    started = time.monotonic()
    with pytest.raises(Overloaded):
        gate.enter(0, 0.1)
    assert time.monotonic() - started < 5


def test_admission_counts_the_threads_its_classes_may_hold() -> None:
    admission = Admission({"a": Limit(2, 3, 0, 0.0), "b": Limit(4, 0, 0, 0.0)})
    assert admission.threads_needed() == 9
    assert admission.gate(None) is None and admission.gate("c") is None


def test_a_push_whose_deadline_passed_during_validation_writes_nothing(server: Running) -> None:
    request = ingest_service_pb2.PushRequest()
    request.records["ad_impressions"].rows.extend(_rows(10_000, user="late"))
    # One Int64 as a decimal string: the rows no longer share one layout, so they are checked as Structs,
    # value by value, which takes longer than the deadline (read from their bytes, they may not).
    request.records["ad_impressions"].rows[0]["clicked"] = "0"
    with pytest.raises(grpc.RpcError) as caught:
        server.ingest.Push(request, timeout=0.02)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # Give the server time to finish whatever it still did for the call.
    time.sleep(2.0)
    read = online_service_pb2.GetFeaturesRequest(source="ad_impressions")
    for i in (0, 4999, 9999):
        read.keys.add().update({"user_id": f"late{i}"})
    response = server.online.GetFeatures(read, timeout=5)
    assert [r.status for r in response.results] == [online_service_pb2.FEATURE_STATUS_MISSING] * 3


def test_a_new_stream_closes_the_one_idle_longest_when_every_slot_is_taken(tmp_path: Path) -> None:
    # Streams idle for a quarter of the idle timeout may be closed to make room: here 0.5 s.
    r = start(tmp_path / "data", max_push_streams=2, stream_idle_timeout_s=2.0)
    try:
        r.apply(AD_IMPRESSIONS)
        stop = threading.Event()
        busy_stop = threading.Event()

        def busy() -> Iterator[ingest_service_pb2.PushStreamRequest]:
            # A stream that keeps sending is never the one closed.
            for seq in itertools.count():
                if busy_stop.wait(0.1):
                    return
                request = ingest_service_pb2.PushStreamRequest(sequence_id=seq)
                request.request.records["ad_impressions"].rows.extend(_rows(1, f"busy{seq}-"))
                yield request

        idle = r.ingest.PushStream(_idle(stop), timeout=30)
        active = r.ingest.PushStream(busy(), timeout=30)
        time.sleep(1.0)
        request = ingest_service_pb2.PushStreamRequest(sequence_id=0)
        request.request.records["ad_impressions"].rows.extend(_rows(1, "new"))
        [ack] = list(r.ingest.PushStream(iter([request]), timeout=10))
        assert ack.response.counts["ad_impressions"].written == 1
        with pytest.raises(grpc.RpcError) as caught:
            list(idle)
        assert caught.value.code() == grpc.StatusCode.CANCELLED
        assert not active.done()
        busy_stop.set()
        assert all(a.response.counts["ad_impressions"].written == 1 for a in active)
        stop.set()
    finally:
        r.close()
