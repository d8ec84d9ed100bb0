"""`featurepush serve --processes N`: fronts on one port over a store owner or Redis, and killed processes."""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import AD_IMPRESSIONS, keys_request, rows_request, scalar, source_from_json
from redis_servers import RedisServer
from servers import ServedProcess, wait_until

from featurepush.v1 import (
    backfill_service_pb2,
    ingest_service_pb2,
    ingest_service_pb2_grpc,
    online_service_pb2_grpc,
    registry_service_pb2,
    registry_service_pb2_grpc,
)
from featurepush_server.core.stores.rocksdb import ROWS_FOLDER
from featurepush_server.processes import _reserve_port, await_orphaned_owner, orphaned_owner, running

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
# More connections than fronts, so that every front serves some of them.
CONNECTIONS = 8


class Connection:
    """Stubs on a channel of its own: its own TCP connection, so the kernel may give it another front."""

    def __init__(self, port: int):
        self.channel = grpc.insecure_channel(
            f"localhost:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
        )
        self.registry = registry_service_pb2_grpc.RegistryServiceStub(self.channel)
        self.ingest = ingest_service_pb2_grpc.IngestServiceStub(self.channel)
        self.online = online_service_pb2_grpc.OnlineServiceStub(self.channel)


def _row(user: str, clicked: int, seconds: int = 0) -> dict[str, object]:
    return {
        "user_id": user,
        "timestamp": (T0 + dt.timedelta(seconds=seconds)).isoformat(),
        "clicked": clicked,
    }


def _clicked(conn: Connection | ServedProcess, source: str, users: list[str]) -> list[int | None]:
    response = conn.online.GetFeatures(keys_request(source, *({"user_id": u} for u in users)))
    return [
        int(r.features.fields["clicked"].string_value) if "clicked" in r.features.fields else None
        for r in response.results
    ]


def _pids(server: ServedProcess, name: str) -> list[int]:
    return [int(p) for p in re.findall(rf"{name} started, pid (\d+)", server.log)]


@pytest.fixture(autouse=True)
def _room_for_racing_writers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Admission sized for the tests' racing writers, so a slow shared machine never refuses them."""
    monkeypatch.setenv("FEATUREPUSH_MAX_CONCURRENT_PUSHES", "16")
    monkeypatch.setenv("FEATUREPUSH_MAX_WAITING_PUSHES", "32")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[ServedProcess]:
    server = ServedProcess(tmp_path / "data", "--processes", "3")
    try:
        yield server
    finally:
        server.finish()


def test_fronts_share_sources_rows_latest_events_and_request_ids(
    served: ServedProcess, tmp_path: Path
) -> None:
    assert served.log.count("featurepush listening on") == 1
    assert len(_pids(served, r"front \d+")) == 3
    conns = [Connection(served.port) for _ in range(CONNECTIONS)]
    # A source applied through one connection is usable through every other at once.
    doc = dict(AD_IMPRESSIONS, name="clicks")
    conns[0].registry.ApplySource(registry_service_pb2.ApplySourceRequest(source=source_from_json(doc)))
    for i, conn in enumerate(conns):
        conn.ingest.Push(rows_request({"clicks": [_row(f"c{i}", i)]}))
    for conn in conns:
        assert _clicked(conn, "clicks", [f"c{i}" for i in range(CONNECTIONS)]) == list(range(CONNECTIONS))
    # A compatible change through one connection: every other validates against it straight away.
    fields = [*doc["schema"]["fields"], {"name": "cost", "type": scalar("FLOAT64"), "nullable": True}]  # type: ignore[index]
    changed = dict(doc, schema={"fields": fields})
    conns[1].registry.ApplySource(registry_service_pb2.ApplySourceRequest(source=source_from_json(changed)))
    for i, conn in enumerate(conns):
        conn.ingest.Push(rows_request({"clicks": [dict(_row(f"d{i}", i), cost=0.5)]}))

    # Writers through every connection race on the same entities; the latest event time wins.
    failed: list[grpc.RpcError] = []

    def race(n: int) -> None:
        for k in range(20):
            seconds = (k * CONNECTIONS + n) % 97
            try:
                conns[n].ingest.Push(
                    rows_request({"clicks": [_row(f"e{j}", seconds, seconds) for j in range(5)]})
                )
            except grpc.RpcError as e:
                failed.append(e)

    threads = [threading.Thread(target=race, args=(n,)) for n in range(CONNECTIONS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failed
    assert _clicked(conns[2], "clicks", [f"e{j}" for j in range(5)]) == [96] * 5

    # A request id sent again through any other front is answered from the first write.
    first = conns[0].ingest.Push(rows_request({"clicks": [_row("r", 1, 500)]}, requestId="once"))
    assert not first.replayed
    for conn in conns[1:]:
        again = conn.ingest.Push(rows_request({"clicks": [_row("r", 1, 500)]}, requestId="once"))
        assert again.replayed
        # ...and refused with other records, whichever front sees them.
        with pytest.raises(grpc.RpcError) as e:
            conn.ingest.Push(rows_request({"clicks": [_row("r", 2, 600)]}, requestId="once"))
        assert e.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert _clicked(conns[3], "clicks", ["r"]) == [1]
    for conn in conns:
        conn.channel.close()

    served.signal(signal.SIGTERM)
    assert served.wait() == 0
    assert "stopped" in served.log
    # Everything acknowledged is there after a restart, in one process.
    again = ServedProcess(tmp_path / "data", "--processes", "1")
    try:
        assert _clicked(again, "clicks", [f"d{i}" for i in range(CONNECTIONS)]) == list(range(CONNECTIONS))
        assert _clicked(again, "clicks", ["e0", "r"]) == [96, 1]
    finally:
        again.signal()
        assert again.wait() == 0


class Pushers:
    """Threads pushing distinct rows with request ids over their own connections, retrying refusals."""

    def __init__(self, port: int, threads: int = 4):
        self.acknowledged: dict[str, int] = {}
        self.retried = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._push, args=(Connection(port), t), daemon=True)
            for t in range(threads)
        ]
        for t in self._threads:
            t.start()

    def _push(self, conn: Connection, worker: int) -> None:
        n = 0
        while not self._stop.is_set():
            rows = [_row(f"w{worker}-{n}-{i}", n * 10 + i) for i in range(10)]
            request = rows_request({"clicks": rows}, requestId=f"w{worker}-{n}")
            try:
                conn.ingest.Push(request, timeout=30)
            except grpc.RpcError as e:
                # A killed front drops its connections; a killed owner makes fronts refuse until it is back.
                assert e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED), e
                with self._lock:
                    self.retried += 1
                self._stop.wait(0.05)
                continue
            with self._lock:
                self.acknowledged.update((str(r["user_id"]), int(str(r["clicked"]))) for r in rows)
            n += 1
        conn.channel.close()

    def count(self) -> int:
        with self._lock:
            return len(self.acknowledged)

    def stop(self) -> dict[str, int]:
        self._stop.set()
        for t in self._threads:
            t.join(60)
        return dict(self.acknowledged)


def test_killed_front_and_owner_lose_no_acknowledged_record(served: ServedProcess, tmp_path: Path) -> None:
    doc = dict(AD_IMPRESSIONS, name="clicks")
    served.registry.ApplySource(registry_service_pb2.ApplySourceRequest(source=source_from_json(doc)))
    pushers = Pushers(served.port)
    try:
        assert wait_until(lambda: pushers.count() > 200)
        os.kill(_pids(served, r"front \d+")[1], signal.SIGKILL)
        assert wait_until(lambda: "front 1 (pid" in served.log)
        done = pushers.count()
        assert wait_until(lambda: pushers.count() > done + 200)
        os.kill(_pids(served, "the store owner")[0], signal.SIGKILL)
        assert wait_until(lambda: len(_pids(served, "the store owner")) == 2), served.log
        done = pushers.count()
        # Pushes go on once the owner is back; the fronts neither hang nor need a restart.
        assert wait_until(lambda: pushers.count() > done + 200, timeout_s=60)
    finally:
        acknowledged = pushers.stop()
    assert pushers.retried > 0
    served.signal(signal.SIGTERM)
    assert served.wait() == 0, served.log
    again = ServedProcess(tmp_path / "data", "--processes", "1")
    try:
        users = sorted(acknowledged)
        assert _clicked(again, "clicks", users) == [acknowledged[u] for u in users]
    finally:
        again.signal()
        assert again.wait() == 0


def _pushed(conn: Connection, request: ingest_service_pb2.PushRequest) -> bool:
    """Whether the push went through; False while this front does not yet know the source as sent."""
    try:
        conn.ingest.Push(request)
    except grpc.RpcError as e:
        assert e.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT), e
        return False
    return True


def test_redis_fronts_run_without_an_owner_and_share_sources_and_latest_events(
    tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEATUREPUSH_STORE", redis_server.url)
    monkeypatch.setenv("FEATUREPUSH_REDIS_NAMESPACE", f"p{uuid.uuid4().hex[:12]}")
    served = ServedProcess(tmp_path / "data", "--processes", "2")
    conns: list[Connection] = []
    try:
        assert served.log.count("featurepush listening on") == 1
        fronts = _pids(served, r"front \d+")
        assert len(fronts) == 2
        assert not _pids(served, "the store owner")
        # The supervisor's runtime folder (a front's third argument) holds no store socket, nor anything.
        runtime = Path(Path(f"/proc/{fronts[0]}/cmdline").read_bytes().split(b"\0")[5].decode())
        assert runtime.is_dir() and not any(runtime.iterdir())

        conns = [Connection(served.port) for _ in range(CONNECTIONS)]
        doc = dict(AD_IMPRESSIONS, name="clicks")
        conns[0].registry.ApplySource(registry_service_pb2.ApplySourceRequest(source=source_from_json(doc)))
        for i, conn in enumerate(conns):
            conn.ingest.Push(rows_request({"clicks": [_row(f"c{i}", i)]}))
        for conn in conns:
            assert _clicked(conn, "clicks", [f"c{i}" for i in range(CONNECTIONS)]) == list(range(CONNECTIONS))
        # A change through one front reaches the other's cached definition at its next registry refresh.
        fields = [*doc["schema"]["fields"], {"name": "cost", "type": scalar("FLOAT64"), "nullable": True}]  # type: ignore[index]
        changed = dict(doc, schema={"fields": fields})
        conns[1].registry.ApplySource(
            registry_service_pb2.ApplySourceRequest(source=source_from_json(changed))
        )
        for i, conn in enumerate(conns):
            request = rows_request({"clicks": [dict(_row(f"d{i}", i), cost=0.5)]})
            assert wait_until(functools.partial(_pushed, conn, request))

        # Writers through every connection race on the same entities; Redis keeps the latest event time.
        failed: list[grpc.RpcError] = []

        def race(n: int) -> None:
            for k in range(10):
                seconds = (k * CONNECTIONS + n) % 97
                try:
                    conns[n].ingest.Push(
                        rows_request({"clicks": [_row(f"e{j}", seconds, seconds) for j in range(5)]})
                    )
                except grpc.RpcError as e:
                    failed.append(e)

        threads = [threading.Thread(target=race, args=(n,)) for n in range(CONNECTIONS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not failed
        assert _clicked(conns[2], "clicks", [f"e{j}" for j in range(5)]) == [79] * 5
        for conn in conns:
            assert _clicked(conn, "clicks", [f"d{i}" for i in range(CONNECTIONS)]) == list(range(CONNECTIONS))

        first = conns[0].ingest.Push(rows_request({"clicks": [_row("r", 1, 500)]}, requestId="once"))
        assert not first.replayed
        for conn in conns[1:]:
            again = conn.ingest.Push(rows_request({"clicks": [_row("r", 1, 500)]}, requestId="once"))
            assert again.replayed
            with pytest.raises(grpc.RpcError) as e:
                conn.ingest.Push(rows_request({"clicks": [_row("r", 2, 600)]}, requestId="once"))
            assert e.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    finally:
        for conn in conns:
            conn.channel.close()
        served.signal(signal.SIGTERM)
        try:
            code = served.wait()
        finally:
            served.finish()
    assert code == 0, served.log
    assert "stopped" in served.log


def _scrape(port: int) -> dict[str, float]:
    """The /metrics samples as `name{labels}` to value."""
    with urllib.request.urlopen(f"http://localhost:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        name: float(value)
        for line in text.splitlines()
        if line and not line.startswith("#")
        for name, _, value in [line.rpartition(" ")]
    }


def test_metrics_add_up_every_front_and_the_store_owner(tmp_path: Path) -> None:
    served = ServedProcess(tmp_path / "data", "--processes", "3", "--metrics-listen", "localhost:0")
    try:
        port = int(re.findall(r"metrics on http://[^:]+:(\d+)/metrics", served.log)[0])
        conns = [Connection(served.port) for _ in range(CONNECTIONS)]
        for i, conn in enumerate(conns):
            conn.ingest.Push(rows_request({"ad_impressions": [_row(f"m{i}", i)]}))
            with pytest.raises(grpc.RpcError):
                conn.ingest.Push(rows_request({"ad_impressions": [_row(f"m{i}", "x")]}))  # type: ignore[arg-type]
        samples = _scrape(port)
        # Whichever front each connection reached, the totals are every call's.
        method = 'method="IngestService/Push"'
        assert samples[f'featurepush_calls_total{{code="OK",{method}}}'] == CONNECTIONS
        assert samples[f'featurepush_calls_total{{code="INVALID_ARGUMENT",{method}}}'] == CONNECTIONS
        assert samples[f"featurepush_call_seconds_count{{{method}}}"] == 2 * CONNECTIONS
        assert samples['featurepush_records_total{outcome="written",source="ad_impressions"}'] == CONNECTIONS
        # The store owner's own: the offline log and the sweep, which no front runs.
        assert samples["featurepush_offline_log_flush_errors_total"] == 0
        assert samples["featurepush_expired_rows_deleted_total"] == 0
        assert "featurepush_store_keys_estimate" in samples
        assert samples['featurepush_admission_running{class="push"}'] == 0
        for conn in conns:
            conn.channel.close()
    finally:
        served.finish()


def _history(path: Path, rows: int, bad_every: int = 0) -> None:
    """A Parquet history of one event per entity, `clicked` = its row number; every `bad_every`th is bad."""
    clicked = [str(i) for i in range(rows)]
    if bad_every:
        clicked = [f"x{i}" if i % bad_every == 0 else c for i, c in enumerate(clicked)]
    table = pa.table(
        {
            "user_id": [f"h{i}" for i in range(rows)],
            "timestamp": pa.array([T0] * rows, pa.timestamp("us", "UTC")),
            "clicked": pa.array(clicked),
        }
    )
    pq.write_table(table, path, row_group_size=16_384)


def _apply_history(conn: Connection | ServedProcess, path: Path) -> None:
    doc = dict(
        AD_IMPRESSIONS, name="history", batchConfig={"uri": str(path), "fileFormat": "FILE_FORMAT_PARQUET"}
    )
    conn.registry.ApplySource(registry_service_pb2.ApplySourceRequest(source=source_from_json(doc)))


def _stored(conn: Connection | ServedProcess, rows: int) -> dict[int, int]:
    """Row number -> stored clicked, for every history entity stored."""
    found: dict[int, int] = {}
    for first in range(0, rows, 5000):
        users = [f"h{i}" for i in range(first, min(first + 5000, rows))]
        for i, clicked in zip(
            range(first, first + len(users)), _clicked(conn, "history", users), strict=True
        ):
            if clicked is not None:
                found[i] = clicked
    return found


def test_a_backfill_fanned_out_over_workers_loads_and_reports_as_one_process_does(
    served: ServedProcess, tmp_path: Path
) -> None:
    rows = 100_000
    _history(tmp_path / "history.parquet", rows, bad_every=9_999)
    _apply_history(served, tmp_path / "history.parquet")
    reports = list(served.backfill.Backfill(backfill_service_pb2.BackfillRequest(source="history")))
    last = reports[-1]
    bad = [i for i in range(rows) if i % 9_999 == 0]
    assert last.done and len(reports) > 3
    assert (last.rows_read, last.rows_written, last.rows_superseded, last.rows_rejected) == (
        rows,
        rows - len(bad),
        0,
        len(bad),
    )
    # Rejections name rows of the whole range, in order, though chunks were loaded in other processes.
    assert [r.row for r in last.rejections] == bad[:10]
    assert all(r.field == "clicked" for r in last.rejections)
    # Progress only grows, chunk by chunk.
    written = [r.rows_written for r in reports]
    assert written == sorted(written)
    stored = _stored(served, rows)
    assert stored == {i: i for i in range(rows) if i % 9_999}
    # Workers started with the front that ran the backfill, without a warning from Python as they did.
    assert "Traceback" not in served.log and "RuntimeWarning" not in served.log


def test_backfill_workers_hand_the_owner_files_of_rows_it_takes_whole(tmp_path: Path) -> None:
    served = ServedProcess(tmp_path / "data", "--processes", "2", "--metrics-listen", "localhost:0")
    try:
        port = int(re.findall(r"metrics on http://[^:]+:(\d+)/metrics", served.log)[0])
        rows = 50_000
        _history(tmp_path / "history.parquet", rows)
        _apply_history(served, tmp_path / "history.parquet")
        request = backfill_service_pb2.BackfillRequest(source="history")
        last = list(served.backfill.Backfill(request))[-1]
        assert (last.done, last.rows_written) == (True, rows)
        taken = _scrape(port)["featurepush_store_rows_files_ingested_total"]
        assert taken >= 1
        assert _stored(served, rows) == {i: i for i in range(rows)}
        # Every file was dropped once its write was done.
        assert not list((tmp_path / "data" / "online" / ROWS_FOLDER).iterdir())
        # A newer pushed event of one entity: the chunk holding it is written row by row, keeping it,
        # and the other chunks, whose rows are as new as the stored ones, are taken whole again.
        served.ingest.Push(rows_request({"history": [_row("h5", -1, seconds=60)]}))
        last = list(served.backfill.Backfill(request))[-1]
        assert (last.rows_written, last.rows_superseded) == (rows - 1, 1)
        assert _scrape(port)["featurepush_store_rows_files_ingested_total"] > taken
        assert _stored(served, rows) == {i: -1 if i == 5 else i for i in range(rows)}
        assert "Traceback" not in served.log
    finally:
        served.finish()


def _backfill_in_background(
    served: ServedProcess, path: Path, rows: int
) -> tuple[threading.Thread, list[backfill_service_pb2.BackfillResponse], list[grpc.RpcError]]:
    """Write `rows` of history at `path` and backfill it in a thread; reports and errors land in the lists."""
    _history(path, rows)
    _apply_history(served, path)
    reports: list[backfill_service_pb2.BackfillResponse] = []
    errors: list[grpc.RpcError] = []

    def run() -> None:
        try:
            for report in served.backfill.Backfill(backfill_service_pb2.BackfillRequest(source="history")):
                reports.append(report)
        except grpc.RpcError as e:
            errors.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, reports, errors


def test_a_killed_owner_mid_backfill_ends_it_unavailable_and_loses_nothing_reported(
    served: ServedProcess, tmp_path: Path
) -> None:
    rows = 400_000
    thread, reports, errors = _backfill_in_background(served, tmp_path / "history.parquet", rows)
    assert wait_until(lambda: any(r.rows_written for r in reports) or not thread.is_alive())
    os.kill(_pids(served, "the store owner")[0], signal.SIGKILL)
    thread.join(120)
    assert not thread.is_alive()
    # The backfill may have finished first on a fast machine; otherwise it ends UNAVAILABLE, never hangs.
    if errors:
        assert errors[0].code() == grpc.StatusCode.UNAVAILABLE, errors[0]
    else:
        assert reports[-1].done
    reported = max(r.rows_written for r in reports)
    assert wait_until(lambda: len(_pids(served, "the store owner")) == 2), served.log
    served.signal(signal.SIGTERM)
    assert served.wait() == 0, served.log
    again = ServedProcess(tmp_path / "data", "--processes", "2")
    try:
        stored = _stored(again, rows)
        # Every row the progress reported written is stored, with its own value.
        assert len(stored) >= reported
        assert all(stored[i] == i for i in stored)
        # Running it again completes the load.
        last = list(again.backfill.Backfill(backfill_service_pb2.BackfillRequest(source="history")))[-1]
        assert last.done and last.rows_read == rows
        assert len(_stored(again, rows)) == rows
    finally:
        again.signal()
        assert again.wait() == 0


def _backfill_workers(server: ServedProcess) -> list[int]:
    """The backfill worker processes of the server's fronts: children of the fronts' fork servers."""
    servers = set(_fork_servers(server))
    return [pid for pid, parent, _ in _processes() if parent in servers]


def _fork_servers(server: ServedProcess) -> list[int]:
    """The fork servers the server's fronts start their backfill workers from."""
    fronts = set(_pids(server, r"front \d+"))
    return [pid for pid, parent, argv in _processes() if parent in fronts and b"forkserver" in argv]


def _processes() -> list[tuple[int, int, bytes]]:
    """Every process's pid, parent pid and command line."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            argv = (entry / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        found.append((int(entry.name), parent, argv))
    return found


def _backfill_with_workers(
    served: ServedProcess, path: Path, rows: int
) -> tuple[threading.Thread, list[backfill_service_pb2.BackfillResponse], list[grpc.RpcError], list[int]]:
    """A backfill running in a thread, returned once its workers are seen, with their pids."""
    thread, reports, errors = _backfill_in_background(served, path, rows)
    assert wait_until(lambda: (reports and _backfill_workers(served)) or not thread.is_alive())
    workers = _backfill_workers(served)
    assert workers, "the backfill ended before a worker was seen"
    return thread, reports, errors, workers


def test_a_killed_backfill_worker_ends_its_backfill_unavailable_and_the_next_one_loads(
    served: ServedProcess, tmp_path: Path
) -> None:
    rows = 400_000
    thread, reports, errors, workers = _backfill_with_workers(served, tmp_path / "history.parquet", rows)
    os.kill(workers[0], signal.SIGKILL)
    thread.join(120)
    assert not thread.is_alive()
    if errors:
        assert errors[0].code() == grpc.StatusCode.UNAVAILABLE, errors[0]
        assert "run the backfill again" in (errors[0].details() or "")
    else:
        assert reports[-1].done
    last = list(served.backfill.Backfill(backfill_service_pb2.BackfillRequest(source="history")))[-1]
    assert last.done and last.rows_read == rows and last.rows_rejected == 0
    assert len(_stored(served, rows)) == rows


def test_a_killed_front_leaves_no_fork_server_or_backfill_worker_behind(
    served: ServedProcess, tmp_path: Path
) -> None:
    rows = 400_000
    thread, reports, errors, workers = _backfill_with_workers(served, tmp_path / "history.parquet", rows)
    parents = {pid: parent for pid, parent, _ in _processes()}
    fork_server = parents[workers[0]]
    front = parents[fork_server]
    os.kill(front, signal.SIGKILL)
    thread.join(120)
    assert not thread.is_alive() and (errors or reports[-1].done)
    # The fork server sees its front's pipe close and exits; its workers, left without a parent, stop.
    assert wait_until(lambda: not any(running(pid) for pid in [fork_server, *workers]), 30)
    last = list(served.backfill.Backfill(backfill_service_pb2.BackfillRequest(source="history")))[-1]
    assert last.done and last.rows_read == rows and last.rows_rejected == 0
    assert len(_stored(served, rows)) == rows


def test_fronts_answer_reads_themselves_once_writes_pause_and_never_miss_an_acknowledged_one(
    tmp_path: Path,
) -> None:
    served = ServedProcess(tmp_path / "data", "--processes", "3", "--metrics-listen", "localhost:0")
    try:
        port = int(re.findall(r"metrics on http://[^:]+:(\d+)/metrics", served.log)[0])
        conns = [Connection(served.port) for _ in range(CONNECTIONS)]
        users = [f"u{i}" for i in range(CONNECTIONS)]
        doc = dict(AD_IMPRESSIONS, name="clicks")
        conns[0].registry.ApplySource(registry_service_pb2.ApplySourceRequest(source=source_from_json(doc)))

        def local_reads(expected: int) -> float:
            """Read every user through every connection; the reads the fronts answered themselves so far."""
            for conn in conns:
                assert _clicked(conn, "clicks", users) == [expected] * CONNECTIONS
            return _scrape(port).get('featurepush_front_reads_total{answered_by="local"}', 0.0)

        for round_ in range(3):
            # A push through one connection is read at once through every other, on any front.
            for i, conn in enumerate(conns):
                conn.ingest.Push(rows_request({"clicks": [_row(users[i], round_, round_)]}))
            before = local_reads(round_)
            # Once the writes pause the fronts open snapshots and answer reads without the owner.
            more = functools.partial(lambda r, b: local_reads(r) > b, round_, before)
            assert wait_until(more, timeout_s=20)
        samples = _scrape(port)
        assert samples['featurepush_front_reads_total{answered_by="owner"}'] > 0
        assert samples["featurepush_front_snapshots_total"] >= 3
        assert "featurepush_front_snapshots_dropped_total" in samples
        for conn in conns:
            conn.channel.close()
    finally:
        served.finish()


def test_with_front_reads_off_the_owner_answers_every_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEATUREPUSH_FRONT_READS", "false")
    served = ServedProcess(tmp_path / "data", "--processes", "2", "--metrics-listen", "localhost:0")
    try:
        port = int(re.findall(r"metrics on http://[^:]+:(\d+)/metrics", served.log)[0])
        conn = Connection(served.port)
        doc = dict(AD_IMPRESSIONS, name="clicks")
        conn.registry.ApplySource(registry_service_pb2.ApplySourceRequest(source=source_from_json(doc)))
        conn.ingest.Push(rows_request({"clicks": [_row("u", 7)]}))
        for _ in range(10):
            # Well past the pause after which a front with snapshots would answer itself.
            threading.Event().wait(0.1)
            assert _clicked(conn, "clicks", ["u"]) == [7]
        assert not [name for name in _scrape(port) if name.startswith("featurepush_front_")]
        conn.channel.close()
    finally:
        served.finish()


def _port_in_time_wait() -> int:
    """A loopback port whose server side closed a connection first, so TIME_WAIT holds it for a while.

    The listening socket is set as the fronts' are (gRPC sets both options when fronts share a port).
    """
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        server.bind(("127.0.0.1", 0))
        server.listen()
        port: int = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            accepted, _ = server.accept()
            accepted.close()
            client.recv(1)  # the server's close reached the client before the client closes
    return port


def test_a_port_a_killed_server_left_in_time_wait_is_taken_again_but_never_a_used_one() -> None:
    port = _port_in_time_wait()
    listen, holder = _reserve_port(f"127.0.0.1:{port}")
    try:
        assert listen == f"127.0.0.1:{port}"
        # Another featurepush (or anything) already on the port is still refused: its holder, then a listener.
        with pytest.raises(OSError, match="in use"):
            _reserve_port(f"127.0.0.1:{port}")
    finally:
        holder.close()
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        with pytest.raises(OSError, match="in use"):
            _reserve_port(f"127.0.0.1:{other.getsockname()[1]}")


# Holds a store like a store owner (its command line says so) until told to stop.
_FAKE_OWNER = """
import sys, time
from pathlib import Path
from featurepush_server.core.stores.rocksdb import RocksDBStore
store = RocksDBStore(Path(sys.argv[1]), fsync=False)
Path(sys.argv[2]).write_text("ready")
time.sleep(float(sys.argv[3]))
store.close()
"""


def _fake_owner(online: Path, ready: Path, hold_s: float) -> list[str]:
    return [sys.executable, "-c", _FAKE_OWNER, str(online), str(ready), str(hold_s)]


def test_an_owner_left_by_a_killed_supervisor_is_waited_for_and_a_live_one_is_not(tmp_path: Path) -> None:
    from featurepush_server.core.stores.rocksdb import RocksDBStore

    online = tmp_path / "online"
    markers = ["featurepush_server.processes", "owner"]
    # Started by a launcher that exits at once: its parent is gone, as a killed supervisor's owner's is.
    ready = tmp_path / "ready-orphan"
    subprocess.run(
        [sys.executable, "-c", _LAUNCH, *_fake_owner(online, ready, 1.5), *markers], check=True, timeout=30
    )
    assert wait_until(ready.exists, timeout_s=30)
    pid = orphaned_owner(online)
    assert pid is not None and pid != os.getpid()
    began = time.monotonic()
    await_orphaned_owner(online, 30)
    assert 0.2 < time.monotonic() - began < 30
    RocksDBStore(online).close()  # the lock is free: a restarted server's owner opens at once

    # Under a live `featurepush serve` supervisor it is a running server's owner: nothing to wait for.
    ready = tmp_path / "ready-live"
    supervisor = subprocess.Popen(
        [sys.executable, "-c", _SUPERVISE, "featurepush", "serve", *_fake_owner(online, ready, 60), *markers]
    )
    try:
        assert wait_until(ready.exists, timeout_s=30)
        assert orphaned_owner(online) is None
        began = time.monotonic()
        await_orphaned_owner(online, 30)
        assert time.monotonic() - began < 1
    finally:
        for child in _children(supervisor.pid):
            os.kill(child, signal.SIGKILL)
        supervisor.kill()
        supervisor.wait(30)


# Starts its arguments in a session of their own and exits; they live on without it.
_LAUNCH = "import subprocess, sys; subprocess.Popen(sys.argv[1:], start_new_session=True)"
# Runs its arguments after the first two (which make its command line a supervisor's) and waits for them.
_SUPERVISE = "import subprocess, sys; subprocess.Popen(sys.argv[3:]).wait()"


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found
