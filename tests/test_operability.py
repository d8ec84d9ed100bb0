"""What an operator sees: Prometheus metrics after traffic, a log line per failed call and registry change."""

from __future__ import annotations

import json
import logging
import math
import re
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import AD_IMPRESSIONS, Running, keys_request, rows_request, start
from prometheus_client import CollectorRegistry
from servers import ServedProcess, wait_until

from featurepush.v1 import ingest_service_pb2, registry_service_pb2
from featurepush_server.config import ConfigError, ServerConfig
from featurepush_server.core.line_budget import LineBudget
from featurepush_server.logs import JsonLines
from featurepush_server.metrics import METRICS_CONNECTIONS, serve_http


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Running]:
    r = start(tmp_path / "data", metrics_listen="localhost:0", max_records_per_request=100)
    try:
        r.apply(AD_IMPRESSIONS)
        yield r
    finally:
        r.close()


def _scrape(r: Running) -> dict[str, float]:
    """The metrics endpoint's samples, as `name{labels}` to value."""
    with urllib.request.urlopen(f"http://localhost:{r.server.metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def _row(user: str, clicked: object) -> dict[str, object]:
    return {"user_id": user, "timestamp": "2026-11-25T10:00:00Z", "clicked": clicked}


def test_metrics_after_traffic_count_calls_records_and_state(server: Running) -> None:
    server.ingest.Push(rows_request({"ad_impressions": [_row("a", 1), _row("b", 2), _row("a", 0)]}))
    with pytest.raises(grpc.RpcError):
        server.ingest.Push(rows_request({"ad_impressions": [_row("c", 1), _row("d", "not a number")]}))
    with pytest.raises(grpc.RpcError):
        server.ingest.Push(rows_request({"nobody_applied_this": [_row("e", 1)]}))
    server.online.GetFeatures(keys_request("ad_impressions", {"user_id": "a"}))
    samples = _scrape(server)
    assert samples['featurepush_calls_total{code="OK",method="IngestService/Push"}'] == 1
    assert samples['featurepush_calls_total{code="INVALID_ARGUMENT",method="IngestService/Push"}'] == 1
    assert samples['featurepush_calls_total{code="NOT_FOUND",method="IngestService/Push"}'] == 1
    assert samples['featurepush_calls_total{code="OK",method="OnlineService/GetFeatures"}'] == 1
    assert samples['featurepush_call_seconds_count{method="IngestService/Push"}'] == 3
    assert samples['featurepush_request_bytes_total{method="IngestService/Push"}'] > 0
    assert samples['featurepush_records_total{outcome="accepted",source="ad_impressions"}'] == 3
    assert samples['featurepush_records_total{outcome="written",source="ad_impressions"}'] == 2
    assert samples['featurepush_records_total{outcome="superseded",source="ad_impressions"}'] == 1
    assert samples['featurepush_records_total{outcome="rejected",source="ad_impressions"}'] == 2
    assert samples['featurepush_pushes_rejected_total{source="ad_impressions"}'] == 1
    # Names no one applied never become labels: a caller could otherwise grow them without bound.
    assert not any("nobody_applied_this" in name for name in samples)
    assert samples['featurepush_admission_refused_total{class="push"}'] == 0
    assert samples['featurepush_admission_running{class="read"}'] == 0
    assert samples["featurepush_offline_log_lag_seconds"] == 0
    assert samples["featurepush_offline_log_flush_errors_total"] == 0
    assert samples["featurepush_expired_rows_deleted_total"] == 0
    assert "featurepush_store_background_errors" in samples
    assert "featurepush_store_pending_compaction_bytes" in samples


def test_metrics_are_off_unless_configured(tmp_path: Path) -> None:
    r = start(tmp_path / "data")
    try:
        assert r.server.metrics_http is None and r.server.metrics_port == 0
    finally:
        r.close()


def _idle_connections(port: int, count: int) -> list[socket.socket]:
    """`count` connections to the metrics port that send nothing."""
    return [socket.create_connection(("localhost", port), timeout=5) for _ in range(count)]


def test_idle_metrics_connections_hold_a_bounded_number_of_threads(server: Running) -> None:
    before = threading.active_count()
    idle = _idle_connections(server.server.metrics_port, 2 * METRICS_CONNECTIONS)
    try:
        # A thread per connection, each waiting for ever for a request line, until the connections end.
        time.sleep(0.5)
        assert threading.active_count() <= before + METRICS_CONNECTIONS
    finally:
        for connection in idle:
            connection.close()
    assert wait_until(lambda: threading.active_count() <= before, timeout_s=10)
    assert (
        "featurepush_calls_total"
        in urllib.request.urlopen(f"http://localhost:{server.server.metrics_port}/metrics", timeout=10)
        .read()
        .decode()
    )


def test_the_metrics_endpoint_closes_a_connection_idle_past_its_timeout(
    capfd: pytest.CaptureFixture[str],
) -> None:
    http, port = serve_http("localhost:0", CollectorRegistry(), idle_s=0.3, connections=2)
    idle = _idle_connections(port, 3)
    try:
        # The third finds both slots taken and is closed unanswered.
        assert idle[2].recv(1) == b""
        started = time.monotonic()
        assert idle[0].recv(1) == b"" and idle[1].recv(1) == b""
        assert time.monotonic() - started < 5
        with urllib.request.urlopen(f"http://localhost:{port}/metrics", timeout=10) as reply:
            assert reply.status == 200
        # A caller's timeout is not the server's error: nothing is printed of it.
        assert "Traceback" not in capfd.readouterr().err
    finally:
        for connection in idle:
            connection.close()
        http.shutdown()
        http.server_close()


def test_a_failed_call_logs_method_code_source_and_request_id_but_no_value(
    server: Running, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    request = rows_request({"ad_impressions": [_row("secret-entity-key", "secret-record-value")]})
    request.request_id = "req-42"
    with pytest.raises(grpc.RpcError):
        server.ingest.Push(request)
    lines = [r.getMessage() for r in caplog.records if "call failed" in r.getMessage()]
    assert lines == [
        "call failed: method=IngestService/Push code=INVALID_ARGUMENT "
        "source='ad_impressions' request_id='req-42'"
    ]
    assert not any("secret" in r.getMessage() for r in caplog.records)


def test_a_flood_of_failed_calls_logs_a_bounded_number_of_lines(
    server: Running, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    request = rows_request({"ad_impressions": [_row("u", "not a number")]})
    started = time.monotonic()
    for _ in range(200):
        with pytest.raises(grpc.RpcError):
            server.ingest.Push(request)
    elapsed = time.monotonic() - started
    lines = [r.getMessage() for r in caplog.records if "call failed" in r.getMessage()]
    # A burst of 20 gets through, then one a second, however long the 200 calls took.
    assert 20 <= len(lines) <= 20 + math.ceil(elapsed) + 1
    # Another method's failures keep their own budget.
    with pytest.raises(grpc.RpcError):
        server.registry.DeleteSource(registry_service_pb2.DeleteSourceRequest(name="nobody"))
    assert "method=RegistryService/DeleteSource" in caplog.records[-1].getMessage()


def test_the_line_budget_counts_what_it_held_back() -> None:
    now = [0.0]
    budget = LineBudget(burst=2, interval_s=1.0, clock=lambda: now[0])
    assert [budget.take("a") for _ in range(5)] == [0, 0, None, None, None]
    assert budget.take("b") == 0
    now[0] = 1.0
    assert budget.take("a") == 3
    assert budget.take("a") is None
    now[0] = 10.0
    assert [budget.take("a") for _ in range(3)] == [1, 0, None]


def test_a_failed_stream_logs_its_last_source(server: Running, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    item = ingest_service_pb2.PushStreamRequest(sequence_id=1, request=rows_request({"ad_impressions": []}))
    call = server.channel.stream_stream("/featurepush.v1.IngestService/PushStream")
    with pytest.raises(grpc.RpcError) as caught:
        list(call(iter([item.SerializeToString(), b"\xff"]), timeout=10))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert any(
        "method=IngestService/PushStream code=INVALID_ARGUMENT" in r.getMessage() for r in caplog.records
    )


def test_registry_changes_are_logged(server: Running, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    server.apply(dict(AD_IMPRESSIONS, name="clicks"))
    server.apply(dict(AD_IMPRESSIONS, name="clicks"))
    server.registry.DeleteSource(registry_service_pb2.DeleteSourceRequest(name="clicks"))
    messages = [r.getMessage() for r in caplog.records if r.name.endswith("servicers.registry")]
    assert messages == [
        "source 'clicks' applied: created",
        "source 'clicks' applied: unchanged",
        "source 'clicks' deleted with 0 online rows",
    ]


def test_json_lines_logging_from_the_command_line(tmp_path: Path) -> None:
    server = ServedProcess(tmp_path / "data", "--log-format", "json", "--log-level", "INFO")
    try:
        with pytest.raises(grpc.RpcError):
            server.ingest.Push(rows_request({"ad_impressions": [_row("x", "bad")]}))
        server.signal(signal.SIGTERM)
        assert server.wait() == 0
    finally:
        server.finish()
    docs = [json.loads(line) for line in server.log.splitlines() if line.strip()]
    assert docs and all({"time", "level", "logger", "message"} <= doc.keys() for doc in docs)
    assert any(re.search(r"code=INVALID_ARGUMENT", doc["message"]) for doc in docs)


def test_the_json_formatter_keeps_exceptions_on_one_line() -> None:
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed %s", ("here",), exc_info=True)
        record.exc_info = __import__("sys").exc_info()
    line = JsonLines().format(record)
    assert "\n" not in line and json.loads(line)["message"] == "failed here"
    assert "ValueError" in json.loads(line)["exception"]


@pytest.mark.parametrize(
    "settings",
    [{"metrics_listen": "nope"}, {"log_level": "LOUD"}, {"log_format": "xml"}],
)
def test_bad_operability_settings_are_refused(settings: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        ServerConfig(**settings)  # type: ignore[arg-type]
