"""Feature views and services as an attacker reaches them: mutated requests, huge reads, extreme values."""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import AD_IMPRESSIONS, Running, rich_error, start
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from views_helpers import MINUTE, Aggregate, apply, push, view

from featurepush.v1 import feature_view_pb2 as fv_pb2
from featurepush.v1 import feature_view_service_pb2 as fvs_pb2
from featurepush.v1 import feature_view_service_pb2_grpc as fvs_grpc
from featurepush.v1 import online_service_pb2
from featurepush_server.admission import Gate, Limit
from featurepush_server.app import _view_read_bytes
from featurepush_server.core.errors import Busy
from featurepush_server.core.wire import read_varint, varint

M = 60_000_000
ARROW = online_service_pb2.RESPONSE_FORMAT_ARROW
SERVICE = "/featurepush.v1.FeatureViewService/"
# Answers that mean the server failed rather than refused.
FAILURES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}


def _fields(data: bytes) -> list[tuple[int, int, bytes]]:
    """The top-level fields of a well-formed message: (number, wire type, the bytes after the tag)."""
    out = []
    at = 0
    while at < len(data):
        tag, body = read_varint(data, at)
        wire = tag & 7
        if wire == 0:
            _, end = read_varint(data, body)
        elif wire == 1:
            end = body + 8
        elif wire == 5:
            end = body + 4
        else:
            size, start = read_varint(data, body)
            end = start + size
        out.append((tag >> 3, wire, data[body:end]))
        at = end
    return out


def _seeds() -> list[tuple[str, bytes]]:
    """Valid requests of every view and service RPC: the seeds of the mutations."""
    definition = view("clicks").to_proto()
    service = fv_pb2.FeatureService(name="svc", features=[fv_pb2.FeatureReference(view="clicks")])
    read = fvs_pb2.GetViewFeaturesRequest(feature_view="clicks", keys=[{"user_id": "u1"}, {"user_id": "u2"}])
    read.as_of.FromMicroseconds(time.time_ns() // 1000)
    arrow = fvs_pb2.GetViewFeaturesRequest(
        feature_service="svc",
        keys=[{"user_id": f"u{i}"} for i in range(4)],
        response_format=ARROW,
    )
    requests = [
        ("ApplyFeatureView", fvs_pb2.ApplyFeatureViewRequest(view=definition, validate_only=True)),
        ("GetFeatureView", fvs_pb2.GetFeatureViewRequest(name="clicks")),
        ("ListFeatureViews", fvs_pb2.ListFeatureViewsRequest(page_size=2, page_token="Y2xpY2tz")),
        ("DeleteFeatureView", fvs_pb2.DeleteFeatureViewRequest(name="clicks")),
        ("ApplyFeatureService", fvs_pb2.ApplyFeatureServiceRequest(service=service, validate_only=True)),
        ("GetFeatureService", fvs_pb2.GetFeatureServiceRequest(name="svc")),
        ("ListFeatureServices", fvs_pb2.ListFeatureServicesRequest(page_size=1)),
        ("DeleteFeatureService", fvs_pb2.DeleteFeatureServiceRequest(name="svc")),
        ("GetViewFeatures", read),
        ("GetViewFeatures", arrow),
    ]
    return [(method, request.SerializeToString()) for method, request in requests]


SEEDS = _seeds()


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, bytes]:
    """A seed request with bytes flipped, cut, repeated or inserted, or its fields renumbered or swapped."""
    method, data = draw(st.sampled_from(SEEDS))
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "cut", "repeat", "insert", "renumber", "swap"]))
        at = draw(st.integers(0, len(out)))
        if op == "flip" and out:
            out[min(at, len(out) - 1)] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del out[at:]
        elif op == "cut":
            del out[at : at + draw(st.integers(1, 16))]
        elif op == "repeat":
            out[at:at] = out[at : at + draw(st.integers(1, 64))]
        elif op == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            try:
                fields = _fields(bytes(out))
            except IndexError:
                continue
            if not fields:
                continue
            i = draw(st.integers(0, len(fields) - 1))
            if op == "renumber":
                number, wire, body = fields[i]
                fields[i] = (draw(st.integers(1, 12)), wire, body)
            else:
                j = draw(st.integers(0, len(fields) - 1))
                (a, wa, ba), (b, wb, bb) = fields[i], fields[j]
                fields[i], fields[j] = (b, wa, ba), (a, wb, bb)
            out = bytearray(b"".join(varint(n << 3 | w) + body for n, w, body in fields))
    return method, bytes(out)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    r = start(tmp_path_factory.mktemp("hostile") / "data")
    try:
        r.apply(AD_IMPRESSIONS)
        yield r
    finally:
        r.close()


def _fill(running: Running) -> None:
    """The view and service the seeds name, applied again where a mutation deleted them."""
    apply(running, view("clicks"))
    service = fv_pb2.FeatureService(name="svc", features=[fv_pb2.FeatureReference(view="clicks")])
    fvs_grpc.FeatureViewServiceStub(running.channel).ApplyFeatureService(
        fvs_pb2.ApplyFeatureServiceRequest(service=service)
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(call=mutated())
def test_mutated_view_and_service_requests_are_refused_or_answered_never_failed(
    server: Running, call: tuple[str, bytes]
) -> None:
    method, body = call
    if method.startswith("Delete"):
        _fill(server)
    try:
        server.channel.unary_unary(SERVICE + method)(body, timeout=20)
    except grpc.RpcError as e:
        assert e.code() not in FAILURES, (method, body, e.code(), e.details())
    health = health_pb2_grpc.HealthStub(server.channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_the_seeds_are_answered(server: Running) -> None:
    _fill(server)
    push(server, [("u1", time.time_ns() // 1000 - 5 * M, 3)])
    for method, body in SEEDS:
        if method.startswith("Delete"):
            continue
        server.channel.unary_unary(SERVICE + method)(body, timeout=20)


def test_a_read_whose_reply_cannot_be_sent_is_refused_before_it_is_built(server: Running) -> None:
    stub = fvs_grpc.FeatureViewServiceStub(server.channel)
    # Seven views of a hundred features: 700 features, read for 10,000 keys, at least 70 MB. Built whole,
    # such a reply took a gigabyte of memory and seconds of CPU before gRPC refused to send it (a service
    # may name a hundred such views).
    counts = [Aggregate("clicked", "count", k * MINUTE) for k in range(1, 101)]
    names = [f"wide{i}" for i in range(7)]
    for name in names:
        apply(server, view(name, aggregations=counts))
    wide = fv_pb2.FeatureService(name="wide", features=[fv_pb2.FeatureReference(view=n) for n in names])
    stub.ApplyFeatureService(fvs_pb2.ApplyFeatureServiceRequest(service=wide))
    keys = [{"user_id": f"u{i}"} for i in range(10_000)]
    for response_format in (online_service_pb2.RESPONSE_FORMAT_STRUCT, ARROW):
        request = fvs_pb2.GetViewFeaturesRequest(
            feature_service="wide", keys=keys, response_format=response_format
        )
        assert_refused_at_once(stub, request, "REPLY_TOO_LARGE", within_s=10)
    # The same service read for fewer keys is answered.
    request = fvs_pb2.GetViewFeaturesRequest(feature_service="wide", keys=keys[:100])
    assert len(stub.GetViewFeatures(request).results) == 100
    stub.DeleteFeatureService(fvs_pb2.DeleteFeatureServiceRequest(name="wide"))
    for name in names:
        stub.DeleteFeatureView(fvs_pb2.DeleteFeatureViewRequest(name=name))


def assert_refused_at_once(
    stub: fvs_grpc.FeatureViewServiceStub,
    request: fvs_pb2.GetViewFeaturesRequest,
    reason: str,
    within_s: float,
) -> None:
    """The read is RESOURCE_EXHAUSTED with `reason`, saying what to ask for, before any of it is built."""
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        stub.GetViewFeatures(request, timeout=60)
    assert rich_error(info.value)[0::2] == (grpc.StatusCode.RESOURCE_EXHAUSTED, reason)
    assert "fewer keys or features" in str(info.value.details())
    assert time.monotonic() - started < within_s


def test_a_long_list_window_read_for_many_keys_takes_memory_for_the_tiles_stored_only(
    server: Running,
) -> None:
    stub = fvs_grpc.FeatureViewServiceStub(server.channel)
    # last_n over 90 days of 1-minute tiles: 129,600 slots per key. A read of 2,000 keys laid every slot
    # out in one list (2 GB, 30 s), with one event per key stored.
    apply(
        server,
        view("long_lists", aggregations=[Aggregate("clicked", "last_n", 90 * 24 * 60 * MINUTE, n=1000)]),
    )
    now = time.time_ns() // 1000
    push(server, [(f"u{i}", now - (1 + i % 50) * 60_000_000, i % 7) for i in range(2_000)])
    request = fvs_pb2.GetViewFeaturesRequest(
        feature_view="long_lists", keys=[{"user_id": f"u{i}"} for i in range(2_000)]
    )
    tracemalloc.start()
    try:
        started = time.monotonic()
        results = stub.GetViewFeatures(request, timeout=60).results
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.monotonic() - started < 10
    assert peak < 64 << 20
    assert [r.values[0].value.list_value.values[0].string_value for r in results[:3]] == ["0", "1", "2"]
    stub.DeleteFeatureView(fvs_pb2.DeleteFeatureViewRequest(name="long_lists"))


def test_a_read_past_the_working_memory_bound_is_refused_and_reads_go_on(tmp_path: Path) -> None:
    r = start(tmp_path / "data", max_view_read_bytes=4 << 20)
    try:
        r.apply(AD_IMPRESSIONS)
        apply(r, view("clicks"))
        stub = fvs_grpc.FeatureViewServiceStub(r.channel)
        # 20 features of 10,000 keys hold about 10 MB of reply: past 4 MiB, though far under REPLY_TOO_LARGE.
        request = fvs_pb2.GetViewFeaturesRequest(
            feature_view="clicks", keys=[{"user_id": f"u{i}"} for i in range(10_000)]
        )
        assert_refused_at_once(stub, request, "READ_TOO_LARGE", within_s=5)
        health = health_pb2_grpc.HealthStub(r.channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert (
            len(
                stub.GetViewFeatures(
                    fvs_pb2.GetViewFeaturesRequest(feature_view="clicks", keys=request.keys[:100])
                ).results
            )
            == 100
        )
    finally:
        r.close()


def test_reads_held_past_the_budget_refuse_the_next_one_until_they_end() -> None:
    gate = Gate("read", Limit(calls=1, queue=0, bytes=100, wait_s=0.0))
    with _view_read_bytes(gate, 80):
        with pytest.raises(Busy) as info, _view_read_bytes(gate, 30):
            pass
        assert info.value.reason == "OVERLOADED" and "max_view_read_bytes" in str(info.value)
        # A read that fits beside it is admitted.
        with _view_read_bytes(gate, 20):
            assert gate.held_bytes == 100
    # Alone, a read is admitted whatever its estimate (each is bounded on its own by READ_TOO_LARGE).
    with _view_read_bytes(gate, 500):
        assert gate.held_bytes == 500
    assert gate.held_bytes == 0


def test_an_unknown_response_format_is_refused_as_get_features_refuses_it(server: Running) -> None:
    _fill(server)
    stub = fvs_grpc.FeatureViewServiceStub(server.channel)
    for response_format in (3, 99, -1):
        request = fvs_pb2.GetViewFeaturesRequest(
            feature_view="clicks", keys=[{"user_id": "u1"}], response_format=response_format
        )
        with pytest.raises(grpc.RpcError) as info:
            stub.GetViewFeatures(request)
        code, violations, reason = rich_error(info.value)
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_RESPONSE_FORMAT")
        assert [path for path, _ in violations] == ["response_format"]


def _service_refusal(running: Running, *refs: fv_pb2.FeatureReference) -> list[str]:
    """The paths a refused ApplyFeatureService names; also refused with validate_only."""
    stub = fvs_grpc.FeatureViewServiceStub(running.channel)
    paths = []
    for validate_only in (False, True):
        request = fvs_pb2.ApplyFeatureServiceRequest(
            service=fv_pb2.FeatureService(name="twice", features=refs), validate_only=validate_only
        )
        with pytest.raises(grpc.RpcError) as info:
            stub.ApplyFeatureService(request)
        code, violations, reason = rich_error(info.value)
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_SERVICE")
        paths = [path for path, _ in violations]
    return paths


def test_a_service_naming_a_feature_twice_is_refused(server: Running) -> None:
    _fill(server)
    whole = fv_pb2.FeatureReference(view="clicks")
    count = fv_pb2.FeatureReference(view="clicks", features=["clicked_count_10m"])
    # Each reply would hold two columns named clicks.clicked_count_10m, the Arrow form two fields of it.
    assert _service_refusal(server, whole, whole) == ["service.features[1].view"]
    assert _service_refusal(server, whole, count) == ["service.features[1].features[0]"]
    twice = fv_pb2.FeatureReference(view="clicks", features=["clicked_sum_1h", "clicked_count_10m"] * 2)
    assert _service_refusal(server, twice) == [
        "service.features[0].features[2]",
        "service.features[0].features[3]",
    ]
    # Other features of one view in two references are served.
    stub = fvs_grpc.FeatureViewServiceStub(server.channel)
    sums = fv_pb2.FeatureReference(view="clicks", features=["clicked_sum_10m"])
    service = fv_pb2.FeatureService(name="split", features=[count, sums])
    assert stub.ApplyFeatureService(fvs_pb2.ApplyFeatureServiceRequest(service=service)).created
    read = fvs_pb2.GetViewFeaturesRequest(feature_service="split", keys=[{"user_id": "u1"}])
    assert [f.name for f in stub.GetViewFeatures(read).features] == [
        "clicks.clicked_count_10m",
        "clicks.clicked_sum_10m",
    ]
    stub.DeleteFeatureService(fvs_pb2.DeleteFeatureServiceRequest(name="split"))
