"""SIGTERM stops `featurepush serve` cleanly in the middle of pushes, a push stream and a backfill."""

from __future__ import annotations

import datetime as dt
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import AD_IMPRESSIONS, keys_request, rows_request, source_from_json
from servers import ServedProcess, wait_until

from featurepush.v1 import backfill_service_pb2, ingest_service_pb2, registry_service_pb2

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
HISTORY_ROWS = 1_500_000


def _row(user: str, clicked: int) -> dict[str, object]:
    return {"user_id": user, "timestamp": NOW.isoformat(), "clicked": clicked}


def _history(path: Path) -> None:
    n = HISTORY_ROWS
    stamps = pa.array([NOW - dt.timedelta(days=1)] * n, pa.timestamp("us", "UTC"))
    table = pa.table(
        {
            "user_id": [f"h{i}" for i in range(n)],
            "timestamp": stamps,
            "clicked": pa.array(range(n), pa.int64()),
        }
    )
    pq.write_table(table, path, row_group_size=65_536)


class Load:
    """Unary pushes with request ids, a push stream and a backfill against one server, in threads."""

    def __init__(self, server: ServedProcess):
        self.server = server
        self.acknowledged: dict[str, int] = {}
        self.errors: dict[str, grpc.RpcError] = {}
        self.backfill_progress: list[backfill_service_pb2.BackfillResponse] = []
        self._lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._pushes, daemon=True),
            threading.Thread(target=self._stream, daemon=True),
            threading.Thread(target=self._backfill, daemon=True),
        ]
        for t in self.threads:
            t.start()

    def _ack(self, rows: list[dict[str, object]]) -> None:
        with self._lock:
            for r in rows:
                self.acknowledged[str(r["user_id"])] = int(str(r["clicked"]))

    def _pushes(self) -> None:
        for n in range(2000):
            rows = [_row(f"p{n}-{i}", n * 100 + i) for i in range(20)]
            try:
                self.server.ingest.Push(rows_request({"ad_impressions": rows}, requestId=f"push-{n}"))
            except grpc.RpcError as e:
                self.errors["push"] = e
                return
            self._ack(rows)

    def _stream(self) -> None:
        sent: dict[int, list[dict[str, object]]] = {}

        def requests() -> Iterator[ingest_service_pb2.PushStreamRequest]:
            for n in range(2000):
                rows = [_row(f"s{n}-{i}", n * 100 + i) for i in range(20)]
                sent[n] = rows
                request = rows_request({"ad_impressions": rows}, requestId=f"stream-{n}")
                yield ingest_service_pb2.PushStreamRequest(sequence_id=n, request=request)
                time.sleep(0.002)

        try:
            for ack in self.server.ingest.PushStream(requests()):
                if not ack.HasField("error"):
                    self._ack(sent[ack.sequence_id])
        except grpc.RpcError as e:
            self.errors["stream"] = e

    def _backfill(self) -> None:
        try:
            for progress in self.server.backfill.Backfill(
                backfill_service_pb2.BackfillRequest(source="history")
            ):
                self.backfill_progress.append(progress)
        except grpc.RpcError as e:
            self.errors["backfill"] = e

    def join(self) -> None:
        for t in self.threads:
            t.join(60)
            assert not t.is_alive()


def _prepare(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    _history(tmp_path / "history.parquet")
    first = ServedProcess(data)
    try:
        doc = dict(
            AD_IMPRESSIONS,
            name="history",
            batchConfig={"uri": str(tmp_path / "history.parquet"), "fileFormat": "FILE_FORMAT_PARQUET"},
        )
        first.registry.ApplySource(registry_service_pb2.ApplySourceRequest(source=source_from_json(doc)))
    finally:
        first.signal()
        assert first.wait() == 0
    return data


def _check_stored(data: Path, acknowledged: dict[str, int]) -> None:
    again = ServedProcess(data)
    try:
        users = sorted(acknowledged)
        for i in range(0, len(users), 5000):
            chunk = users[i : i + 5000]
            response = again.online.GetFeatures(
                keys_request("ad_impressions", *({"user_id": u} for u in chunk))
            )
            got = [int(r.features.fields["clicked"].string_value) for r in response.results]
            assert got == [acknowledged[u] for u in chunk]
    finally:
        again.signal()
        assert again.wait() == 0


@pytest.mark.parametrize("processes", ["1", "2"])
def test_sigterm_mid_traffic_exits_0_and_keeps_every_acknowledged_record(
    tmp_path: Path, processes: str
) -> None:
    data = _prepare(tmp_path)
    for _ in range(2):
        # With two processes the backfill's chunks are loaded by a worker of the front that runs it.
        flags = ("--config", str(_config(tmp_path, grace_s=10)), "--processes", processes)
        server = ServedProcess(data, *flags)
        try:
            load = Load(server)
            assert wait_until(lambda: len(load.acknowledged) > 500 and load.backfill_progress)  # noqa: B023
            server.signal(signal.SIGTERM)
            assert server.wait() == 0, server.log
            load.join()
        finally:
            server.finish()
        assert "Traceback" not in server.log, server.log
        for call, error in load.errors.items():
            # A unary call that reaches grpc just as it stops accepting calls, before any handler takes it,
            # is failed by grpc itself with a bare CANCELLED; nothing of it ran, so resending is safe.
            transport = call == "push" and error.code() == grpc.StatusCode.CANCELLED
            transport = transport and error.details() == "CANCELLED"
            assert error.code() == grpc.StatusCode.UNAVAILABLE or transport, (call, error)
        # A stream ends with a status saying why; a call the stop overtook may also just fail to connect.
        if "stream" in load.errors and "shutting down" not in load.errors["stream"].details():
            assert "connect" in load.errors["stream"].details().lower()
        backfill = load.errors.get("backfill")
        if backfill is not None and "shutting down" in backfill.details():
            assert "which are stored" in backfill.details()
        else:
            assert backfill is not None or load.backfill_progress[-1].done
        _check_stored(data, load.acknowledged)


def _config(tmp_path: Path, grace_s: float) -> Path:
    path = tmp_path / "featurepush.toml"
    path.write_text(f"[server]\nshutdown_grace_s = {grace_s}\n")
    return path


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_exits_at_once_and_loses_nothing_acknowledged(tmp_path: Path, second: int) -> None:
    data = _prepare(tmp_path)
    server = ServedProcess(data)
    try:
        load = Load(server)
        assert wait_until(lambda: len(load.acknowledged) > 200)
        server.signal(signal.SIGTERM)
        server.signal(second)
        # Pending signals are handled in signal-number order, so either may count as the second.
        assert server.wait() in (0, 128 + signal.SIGTERM, 128 + second), server.log
        load.join()
    finally:
        server.finish()
    assert "Traceback" not in server.log, server.log
    _check_stored(data, load.acknowledged)
