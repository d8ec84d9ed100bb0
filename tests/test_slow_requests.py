"""Callers that open calls and never send their request: bounded threads and time, the server answers on.

The calls are opened by grpcio itself as streams of requests whose iterator yields nothing, which a
server sees as a call whose request message never arrives.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import AD_IMPRESSIONS, start
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from featurepush.v1 import online_service_pb2, online_service_pb2_grpc
from featurepush_server.core.keys import add_key
from featurepush_server.waits import RequestWaits, peer_address

PUSH = "/featurepush.v1.IngestService/Push"
GET = "/featurepush.v1.OnlineService/GetFeatures"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"


class Stalled:
    """`count` calls to `method` on one channel that send nothing until `release()`."""

    def __init__(self, target: str, method: str, count: int, first: bytes | None = None):
        self._release = threading.Event()
        self.channel = grpc.insecure_channel(target)
        caller = self.channel.stream_stream(method)
        self.codes: list[grpc.StatusCode] = []
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(caller, first), daemon=True) for _ in range(count)
        ]
        for t in self._threads:
            t.start()

    def _requests(self, first: bytes | None) -> Iterator[bytes]:
        if first is not None:
            yield first
        self._release.wait()

    def _run(self, caller: grpc.StreamStreamMultiCallable, first: bytes | None) -> None:
        call = caller(self._requests(first))
        try:
            for _ in call:
                pass
            code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            code = e.code()
        with self._lock:
            self.codes.append(code)

    def ended(self) -> int:
        with self._lock:
            return len(self.codes)

    def release(self) -> None:
        self._release.set()
        for t in self._threads:
            t.join(10)
        self.channel.close()


def wait_for(check: object, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def test_calls_that_never_send_their_request_cannot_take_the_server_s_threads(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING", logger="featurepush_server.waits")
    running = start(tmp_path / "data", workers=4, request_timeout_s=4.0)
    try:
        running.apply(AD_IMPRESSIONS)
        total, per_address = running.server.config.slow_request_bounds()
        assert (total, per_address) == (2, 1)
        # Far more than the pool has threads: without the bound, every later call would queue behind them.
        # They come from ::1, the calls that must be answered from 127.0.0.1, another address.
        stalled = Stalled(f"[::1]:{running.server.port}", PUSH, 300)
        try:
            time.sleep(2.0)
            # Reads, health and new pushes are answered while the stalled calls are open.
            request = online_service_pb2.GetFeaturesRequest(source="ad_impressions")
            request.keys.add().fields["user_id"].string_value = "u1"
            with grpc.insecure_channel(f"127.0.0.1:{running.server.port}") as other:
                reply = online_service_pb2_grpc.OnlineServiceStub(other).GetFeatures(request, timeout=5)
                assert reply.results[0].status == online_service_pb2.FEATURE_STATUS_MISSING
                health = health_pb2_grpc.HealthStub(other)
                assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == 1
            # The calls past the address's share are cancelled or refused within a second or so...
            assert wait_for(lambda: stalled.ended() >= 300 - per_address, 10), stalled.ended()
            assert set(stalled.codes) <= {grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED}
            # ...and the one it may keep, once request_timeout_s has passed.
            assert wait_for(lambda: stalled.ended() == 300, 10), stalled.ended()
            assert grpc.StatusCode.CANCELLED in stalled.codes
        finally:
            stalled.release()
        assert "whose request had not arrived" in caplog.text
    finally:
        running.close()


def test_a_reflection_stream_that_stops_sending_is_cancelled_after_the_request_timeout(
    tmp_path: Path,
) -> None:
    running = start(tmp_path / "data", request_timeout_s=1.0)
    try:
        first = reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString()
        stalled = Stalled(running.target, REFLECTION, 1, first=first)
        try:
            assert wait_for(lambda: stalled.ended() == 1, 10)
            assert stalled.codes == [grpc.StatusCode.CANCELLED]
        finally:
            stalled.release()
    finally:
        running.close()


def test_a_caller_without_a_key_is_refused_before_it_sends_its_request(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.json"
    add_key(keys_file, ["read"], "reader")
    running = start(tmp_path / "data", keys_file=keys_file, request_timeout_s=30.0)
    try:
        stalled = Stalled(running.target, GET, 3)
        try:
            # Long before the request timeout: the refusal reads no request.
            assert wait_for(lambda: stalled.ended() == 3, 5)
            assert stalled.codes == [grpc.StatusCode.UNAUTHENTICATED] * 3
        finally:
            stalled.release()
    finally:
        running.close()


@pytest.mark.parametrize(
    ("peer", "address"),
    [
        ("ipv4:10.0.0.7:5143", "10.0.0.7"),
        ("ipv6:[2001:db8:1:2:3:4:5:6]:443", "2001:db8:1:2::/64"),
        ("ipv6:[::1]:50051", "::/64"),
        ("ipv6:[fe80::1%eth0]:1", "fe80::/64"),
        ("unix:/tmp/socket", "unix"),
    ],
)
def test_calls_count_by_address_and_ipv6_by_network(peer: str, address: str) -> None:
    assert peer_address(peer) == address


def test_a_bound_of_slow_waits_refuses_that_address_only_until_they_end() -> None:
    class Context:
        def __init__(self, peer: str):
            self._peer = peer
            self.cancelled = threading.Event()

        def peer(self) -> str:
            return self._peer

        def cancel(self) -> None:
            self.cancelled.set()

    waits = RequestWaits(limit=3, per_peer=1, timeout_s=30.0, slow_s=0.2)
    blocked = threading.Event()

    def forever() -> Iterator[bytes]:
        blocked.wait()
        yield b""

    first, second = Context("ipv4:10.0.0.1:1"), Context("ipv4:10.0.0.1:2")
    threads = [
        threading.Thread(target=lambda c=c: waits.next_message(forever(), c), daemon=True)  # type: ignore[misc]
        for c in (first, second)
    ]
    for t in threads:
        t.start()
        time.sleep(0.05)
    # Once both are slow, the newer one is cancelled, the older kept, and that address refused.
    assert second.cancelled.wait(5) and not first.cancelled.is_set()
    with pytest.raises(Exception, match="1 calls from one address still sending their request"):
        waits.next_message(iter([b"x"]), Context("ipv4:10.0.0.1:3"))
    # Another address is served.
    assert waits.next_message(iter([b"x"]), Context("ipv4:10.0.0.2:1")) == b"x"
    blocked.set()
    for t in threads:
        t.join(5)
    waits.close()


def test_health_watch_still_streams_changes_through_the_guard(tmp_path: Path) -> None:
    running = start(tmp_path / "data")
    try:
        stub = health_pb2_grpc.HealthStub(running.channel)
        service = "featurepush.v1.IngestService"
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        running.server.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
    finally:
        running.close()


def test_the_watch_over_request_waits_stops_with_the_server(tmp_path: Path) -> None:
    def watches() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name == "featurepush-request-waits"}

    before = watches()
    running = start(tmp_path / "data")
    health = health_pb2_grpc.HealthStub(running.channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == 1
    [watch] = watches() - before
    running.close()
    watch.join(5)
    assert not watch.is_alive()


def test_a_reflection_stream_from_an_address_at_its_bound_is_refused_with_retry_info(tmp_path: Path) -> None:
    running = start(tmp_path / "data", workers=4, request_timeout_s=30.0)
    try:
        stalled = Stalled(f"[::1]:{running.server.port}", PUSH, 2)
        try:
            # One of the two is kept (the address's share), the other cancelled; ::1 is then at its bound.
            assert wait_for(lambda: stalled.ended() == 1, 10)
            first = reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString()
            with grpc.insecure_channel(f"[::1]:{running.server.port}") as channel:
                call = channel.stream_stream(REFLECTION)(iter([first]))
                with pytest.raises(grpc.RpcError) as caught:
                    list(call)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "still sending their request" in (caught.value.details() or "")
        finally:
            stalled.release()
    finally:
        running.close()
