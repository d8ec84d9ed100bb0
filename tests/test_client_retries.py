"""Client and AsyncClient send a call again while no server can take it, where doing so is safe.

A restarting server, or a killed front or store process of `serve --processes`, answers UNAVAILABLE (or
cuts the call off, CANCELLED); a push may have landed all the same, so only reads and pushes with a
request id, which the server answers once, are sent again.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import AD_IMPRESSIONS, Running, refuse_writes, source_from_json, start

from featurepush import Client, FeatureStatus
from featurepush.aio import AsyncClient
from featurepush.errors import FeaturepushError
from featurepush.v1 import registry_service_pb2
from featurepush_server.app import Server, create_server
from featurepush_server.config import ServerConfig
from featurepush_server.core.errors import Unavailable

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
OWNER_GONE = "the server's store process is not answering (it may be restarting)"
# Reconnect quickly after a restart; gRPC's default backoff starts at a second.
FAST_RECONNECT = [("grpc.initial_reconnect_backoff_ms", 50), ("grpc.max_reconnect_backoff_ms", 200)]


def record(i: int) -> dict[str, object]:
    return {"user_id": f"u{i}", "timestamp": T0 + dt.timedelta(seconds=i), "clicked": i}


@pytest.fixture
def client(running: Running) -> Iterator[Client]:
    with Client(running.target) as c:
        yield c


def test_a_push_with_a_request_id_goes_again_until_the_store_takes_it(
    client: Client, running: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    refused = refuse_writes(running, monkeypatch, [Unavailable(OWNER_GONE)] * 3)
    result = client.push("ad_impressions", [record(1)], request_id="r1")
    assert refused == ["r1"] * 3
    assert result.counts["ad_impressions"].written == 1 and not result.replayed
    assert client.get_features("ad_impressions", ["u1"])[0].status == FeatureStatus.PRESENT


def test_a_push_without_a_request_id_is_not_sent_again(
    client: Client, running: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It may have been written before the answer was lost: sending it again could log it twice.
    refused = refuse_writes(running, monkeypatch, [Unavailable(OWNER_GONE)])
    with pytest.raises(FeaturepushError) as caught:
        client.push("ad_impressions", [record(1)])
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert refused == [""]


def test_resending_stops_at_its_budget_with_the_servers_status(
    client: Client, running: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    refused = refuse_writes(running, monkeypatch, [Unavailable(OWNER_GONE)] * 1000)
    client.unavailable_retry_s = 0.5
    began = time.monotonic()
    with pytest.raises(FeaturepushError) as caught:
        client.push("ad_impressions", [record(1)], request_id="r1")
    assert time.monotonic() - began < 10
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE and OWNER_GONE in caught.value.message
    assert 2 <= len(refused) < 1000


def test_a_read_goes_again_through_a_server_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    first = start(data_dir)
    first.registry.ApplySource(
        registry_service_pb2.ApplySourceRequest(source=source_from_json(AD_IMPRESSIONS))
    )
    port = first.server.port
    restarted: list[Server] = []

    def restart() -> None:
        server = create_server(ServerConfig(listen=f"localhost:{port}", data_dir=data_dir))
        server.start()
        restarted.append(server)

    with Client(first.target, channel_options=FAST_RECONNECT) as client:
        client.push("ad_impressions", [record(1)])
        first.close()
        later = threading.Timer(0.5, restart)
        later.start()
        try:
            # Sent to no server at first, answered by the restarted one.
            assert client.get_features("ad_impressions", ["u1"])[0].status == FeatureStatus.PRESENT
        finally:
            later.join()
            for server in restarted:
                server.stop(None)
    assert restarted


def test_the_async_client_resends_as_the_client_does(
    running: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    refused = refuse_writes(running, monkeypatch, [Unavailable(OWNER_GONE)] * 2)

    async def push() -> tuple[int, grpc.StatusCode]:
        async with AsyncClient(running.target) as client:
            result = await client.push("ad_impressions", [record(2)], request_id="r2")
            refuse_writes(running, monkeypatch, [Unavailable(OWNER_GONE)])
            try:
                await client.push("ad_impressions", [record(3)])
            except FeaturepushError as e:
                return result.counts["ad_impressions"].written, e.code
            raise AssertionError("a push without a request id was sent again")

    assert asyncio.run(push()) == (1, grpc.StatusCode.UNAVAILABLE)
    assert refused == ["r2", "r2"]
