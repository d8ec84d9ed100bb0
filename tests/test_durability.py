"""Acknowledged pushes survive a restart and a kill -9 of the server process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import AD_IMPRESSIONS, features, keys_request, rows_request, start

from featurepush.v1 import ingest_service_pb2_grpc, online_service_pb2_grpc

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "ad_impressions.py"


def test_sources_and_rows_survive_a_restart(tmp_path: Path) -> None:
    running = start(tmp_path)
    running.apply(AD_IMPRESSIONS)
    running.ingest.Push(
        rows_request(
            {"ad_impressions": [{"user_id": "u1", "timestamp": "2026-11-25T10:00:00Z", "clicked": 7}]}
        )
    )
    running.close()
    again = start(tmp_path)
    try:
        [result] = features(again, "ad_impressions", {"user_id": "u1"})
        assert result["features"]["clicked"] == "7"
    finally:
        again.close()


class ServerProcess:
    """`featurepush serve` in a child process, on a port it picks itself."""

    def __init__(self, data_dir: Path, fsync: str):
        cmd = [
            sys.executable,
            "-m",
            "featurepush_server.cli",
            "serve",
            "--listen",
            "localhost:0",
            "--data-dir",
            str(data_dir),
            "--definitions",
            str(EXAMPLE),
            "--fsync",
            fsync,
        ]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        deadline = time.monotonic() + 60
        self.port = 0
        for line in self.proc.stderr:
            match = re.search(r"\(port (\d+)\)", line)
            if match:
                self.port = int(match.group(1))
                break
            if time.monotonic() > deadline:
                break
        # Keep draining the log so a chatty server never blocks on a full pipe.
        self._drain = threading.Thread(target=self._read_rest, daemon=True)
        self._drain.start()
        assert self.port, "the server did not report its port"
        self.channel = grpc.insecure_channel(f"localhost:{self.port}")
        self.ingest = ingest_service_pb2_grpc.IngestServiceStub(self.channel)
        self.online = online_service_pb2_grpc.OnlineServiceStub(self.channel)

    def _read_rest(self) -> None:
        assert self.proc.stderr is not None
        for _ in self.proc.stderr:
            pass

    def finish(self) -> None:
        """Make sure the process is gone and its pipe closed."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self._drain.join(10)
        assert self.proc.stderr is not None
        self.proc.stderr.close()

    def kill9(self) -> None:
        self.channel.close()
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)


@pytest.fixture
def processes() -> Iterator[list[ServerProcess]]:
    """Server processes started by a test, all stopped at its end."""
    started: list[ServerProcess] = []
    yield started
    for p in started:
        p.finish()


@pytest.mark.parametrize("fsync", ["always", "never"])
def test_kill_9_right_after_acknowledged_pushes_loses_nothing(
    tmp_path: Path, processes: list[ServerProcess], fsync: str
) -> None:
    server = ServerProcess(tmp_path, fsync)
    processes.append(server)
    acknowledged = []
    for batch in range(20):
        rows = [
            {"user_id": f"u{batch}-{i}", "timestamp": "2026-11-25T10:00:00Z", "clicked": batch * 1000 + i}
            for i in range(50)
        ]
        server.ingest.Push(rows_request({"ad_impressions": rows}))
        acknowledged += rows
    server.kill9()

    revived = ServerProcess(tmp_path, fsync)
    processes.append(revived)
    response = revived.online.GetFeatures(
        keys_request("ad_impressions", *({"user_id": r["user_id"]} for r in acknowledged))
    )
    got = [
        int(v.features.fields["clicked"].string_value) if v.features.fields else None
        for v in response.results
    ]
    assert got == [r["clicked"] for r in acknowledged]
    revived.stop()


def test_the_data_directory_and_its_files_are_the_server_users_alone(
    tmp_path: Path, processes: list[ServerProcess]
) -> None:
    data = tmp_path / "data"
    server = ServerProcess(data, "always")
    processes.append(server)
    server.ingest.Push(
        rows_request(
            {"ad_impressions": [{"user_id": "u", "timestamp": "2026-11-25T10:00:00Z", "clicked": 1}]}
        )
    )
    server.stop()
    assert data.stat().st_mode & 0o777 == 0o700
    found = list(data.rglob("*"))
    assert any(p.is_file() for p in found)
    loose = [str(p) for p in found if p.stat().st_mode & 0o077]
    assert loose == []
