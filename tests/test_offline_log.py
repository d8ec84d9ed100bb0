"""log_offline: acknowledged pushes reach the Parquet offline log exactly once, even across kill -9."""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pytest
from conftest import AD_IMPRESSIONS, BOTH_STORES, Running, source_from_json, start

from featurepush import Client
from featurepush.batch import read_batch_source
from featurepush.v1 import registry_service_pb2, registry_service_pb2_grpc

DAY0 = dt.datetime(2024, 5, 1, 23, tzinfo=dt.UTC)
LOGGED = dict(AD_IMPRESSIONS, pushConfig={"logOffline": True})
LOGGED_WITH_BATCH = dict(
    LOGGED, batchConfig={"uri": "offline://ad_impressions", "fileFormat": "FILE_FORMAT_PARQUET"}
)


def records(first: int, n: int) -> list[dict[str, object]]:
    """n records, numbered from `first`, an hour apart so that they span two dates."""
    return [
        {"user_id": f"u{i % 5}", "timestamp": DAY0 + dt.timedelta(minutes=30 * i), "clicked": i}
        for i in range(first, first + n)
    ]


def logged(data_dir: Path) -> pa.Table:
    """Every row of the offline log on disk."""
    return ds.dataset(data_dir / "offline" / "ad_impressions", format="parquet").to_table()


@BOTH_STORES
def test_push_log_read_round_trip(tmp_path: Path, store_settings: dict[str, object]) -> None:
    running = start(tmp_path / "data", offline_flush_interval_s=3600.0, **store_settings)
    try:
        running.apply(LOGGED_WITH_BATCH)
        with Client.from_channel(running.channel) as client:
            client.push("ad_impressions", records(0, 4))
            client.push("ad_impressions", records(4, 4), dry_run=True)
            client.push("ad_impressions", records(8, 4), request_id="once")
            client.push("ad_impressions", records(8, 4), request_id="once")
        assert running.server.offline_log is not None
        assert running.server.offline_log.flush() == 8
        dates = sorted(p.name for p in (tmp_path / "data" / "offline" / "ad_impressions").iterdir())
        assert dates == ["date=2024-05-01", "date=2024-05-02"]
        got = read_batch_source(running.channel, "ad_impressions").read_all().sort_by("clicked")
        assert got["clicked"].to_pylist() == [0, 1, 2, 3, 8, 9, 10, 11]
    finally:
        running.close()


def test_a_compatible_schema_change_between_flushes_still_logs_everything(tmp_path: Path) -> None:
    running = start(tmp_path / "data", offline_flush_interval_s=3600.0)
    try:
        running.apply(LOGGED_WITH_BATCH)
        with Client.from_channel(running.channel) as client:
            client.push("ad_impressions", records(0, 2))
            widened = dict(LOGGED_WITH_BATCH)
            widened["schema"] = {
                "fields": [
                    *AD_IMPRESSIONS["schema"]["fields"],  # type: ignore[index]
                    {"name": "country", "type": {"scalar": "SCALAR_TYPE_STRING"}, "nullable": True},
                ]
            }
            running.apply(widened)
            client.push("ad_impressions", [dict(r, country="FR") for r in records(2, 2)])
        assert running.server.offline_log is not None
        # Both shapes sit in the queue together, so one round must unify them.
        assert running.server.offline_log.flush() == 4
        got = read_batch_source(running.channel, "ad_impressions").read_all().sort_by("clicked")
        assert got["country"].to_pylist() == [None, None, "FR", "FR"]
    finally:
        running.close()


def test_a_source_without_log_offline_logs_nothing(running: Running) -> None:
    with Client.from_channel(running.channel) as client:
        client.push("ad_impressions", records(0, 3))
    assert running.server.offline_log is not None
    assert running.server.offline_log.flush() == 0


def test_a_crash_between_rename_and_dequeue_duplicates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    running = start(tmp_path / "data", offline_flush_interval_s=3600.0)
    try:
        running.apply(LOGGED)
        with Client.from_channel(running.channel) as client:
            client.push("ad_impressions", records(0, 6))
        store = running.server.store
        log = running.server.offline_log
        assert log is not None

        def crash(first: int, last: int) -> None:
            raise OSError("crashed before the queue entries were deleted")

        with monkeypatch.context() as patch:
            patch.setattr(store, "delete_offline", crash)
            with pytest.raises(OSError, match="crashed"):
                log.flush()
        assert logged(tmp_path / "data").num_rows == 6
        with Client.from_channel(running.channel) as client:
            client.push("ad_impressions", records(6, 3))
        log.flush()
        assert sorted(logged(tmp_path / "data")["clicked"].to_pylist()) == list(range(9))
    finally:
        running.close()


class ServerProcess:
    """`featurepush serve` in a child process that never flushes the offline log on its own."""

    def __init__(self, data_dir: Path):
        env = dict(os.environ, FEATUREPUSH_OFFLINE_FLUSH_INTERVAL_S="3600")
        cmd = [sys.executable, "-m", "featurepush_server.cli", "serve", "--listen", "localhost:0"]
        cmd += ["--data-dir", str(data_dir)]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
        assert self.proc.stderr is not None
        self.port = 0
        for line in self.proc.stderr:
            match = re.search(r"\(port (\d+)\)", line)
            if match:
                self.port = int(match.group(1))
                break
        # Keep draining the log so a chatty server never blocks on a full pipe.
        self._drain = threading.Thread(target=self.proc.stderr.read, daemon=True)
        self._drain.start()
        assert self.port, "the server did not report its port"

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self._drain.join()
        assert self.proc.stderr is not None
        self.proc.stderr.close()


def test_kill_9_between_ack_and_flush_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    child = ServerProcess(tmp_path / "data")
    try:
        with Client(f"localhost:{child.port}") as client:
            stub = registry_service_pb2_grpc.RegistryServiceStub(client.channel)
            stub.ApplySource(registry_service_pb2.ApplySourceRequest(source=source_from_json(LOGGED)))
            for first in range(0, 40, 8):
                client.push("ad_impressions", records(first, 8))
        assert not (tmp_path / "data" / "offline" / "ad_impressions").exists()
    finally:
        child.kill()
    running = start(tmp_path / "data", offline_flush_interval_s=3600.0)
    try:
        assert running.server.offline_log is not None
        assert running.server.offline_log.flush() == 40
        assert running.server.offline_log.flush() == 0
    finally:
        running.close()
    assert sorted(logged(tmp_path / "data")["clicked"].to_pylist()) == list(range(40))
