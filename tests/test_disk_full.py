"""A full disk refuses pushes with RESOURCE_EXHAUSTED, reads go on, and writes resume once space is back.

The disk is a small tmpfs mounted for the test; where the sandbox refuses mounts the tests are skipped.
"""

from __future__ import annotations

import datetime as dt
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import AD_IMPRESSIONS, Running, features, rows_request, start
from grpc_health.v1 import health_pb2, health_pb2_grpc
from servers import ServedProcess, wait_until

from featurepush.v1 import ingest_service_pb2, ingest_service_pb2_grpc

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()
INGEST = ingest_service_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name
ONLINE = "featurepush.v1.OnlineService"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 48 MiB tmpfs, unmounted at the end."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here to fill it (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path) -> Path:
    """Fill the disk to the last byte with one file."""
    filler = disk / "filler"
    # Unbuffered, so that nothing is left to fail at close.
    with open(filler, "wb", buffering=0) as fh:
        block = b"\xff" * (1 << 20)
        while block:
            try:
                fh.write(block)
            except OSError:
                block = block[: len(block) // 2]
    return filler


def _push(stub: ingest_service_pb2_grpc.IngestServiceStub, n: int) -> None:
    rows = [{"user_id": f"u{n}-{i}", "timestamp": NOW, "clicked": n} for i in range(2000)]
    stub.Push(rows_request({"ad_impressions": rows}, requestId=f"fill-{n}"))


def _push_until_refused(stub: ingest_service_pb2_grpc.IngestServiceStub) -> grpc.RpcError:
    """Push until the disk refuses; RocksDB's preallocated log absorbs the first few."""
    for n in range(500):
        try:
            _push(stub, n)
        except grpc.RpcError as e:
            return e
    raise AssertionError("a full disk never refused a push")


def _status(channel: grpc.Channel, service: str) -> int:
    health = health_pb2_grpc.HealthStub(channel)
    return int(health.Check(health_pb2.HealthCheckRequest(service=service)).status)


def test_full_disk_refuses_pushes_keeps_reads_and_resumes_by_itself(small_disk: Path) -> None:
    running: Running = start(small_disk / "data", storage_retry_interval_s=0.2, offline_flush_interval_s=0.2)
    try:
        running.apply(AD_IMPRESSIONS)
        running.ingest.Push(
            rows_request({"ad_impressions": [{"user_id": "kept", "timestamp": NOW, "clicked": 1}]})
        )
        filler = _fill(small_disk)
        refused = _push_until_refused(running.ingest)
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused
        assert "disk is full" in (refused.details() or "")
        assert _status(running.channel, INGEST) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert _status(running.channel, ONLINE) == health_pb2.HealthCheckResponse.SERVING
        [kept] = features(running, "ad_impressions", {"user_id": "kept"})
        assert kept["features"]["clicked"] == "1"

        filler.unlink()

        def pushed() -> bool:
            try:
                running.ingest.Push(
                    rows_request({"ad_impressions": [{"user_id": "later", "timestamp": NOW, "clicked": 2}]})
                )
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
                return False
            return True

        assert wait_until(pushed, timeout_s=30, every_s=0.2)
        # Health follows the reopen from the recovery thread, a moment after writes are taken again.
        assert wait_until(
            lambda: _status(running.channel, INGEST) == health_pb2.HealthCheckResponse.SERVING, timeout_s=5
        )
        [later] = features(running, "ad_impressions", {"user_id": "later"})
        assert later["features"]["clicked"] == "2"
    finally:
        running.close()


def test_sigterm_on_a_full_disk_exits_0(small_disk: Path) -> None:
    server = ServedProcess(small_disk / "data")
    try:
        _fill(small_disk)
        refused = _push_until_refused(server.ingest)
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused
        server.signal(signal.SIGTERM)
        assert server.wait() == 0, server.log
    finally:
        server.finish()
    assert "Traceback" not in server.log, server.log
