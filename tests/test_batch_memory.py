"""What a ReadBatchSource read holds in the server: read-ahead bounded in bytes, files read, not mapped."""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import AD_IMPRESSIONS, rich_error, scalar, source_from_json, start
from servers import ServedProcess
from test_batch_source import wait_until

from featurepush.v1 import backfill_service_pb2 as pb
from featurepush.v1 import backfill_service_pb2_grpc, registry_service_pb2

ROWS = 400_000
WIDTH = 1024
READ_AHEAD = 16 * 1024 * 1024
# The budget, twice over for the batch being cast and sliced, plus the decoder's own buffers.
ALLOWED = 3 * READ_AHEAD + 16 * 1024 * 1024


def write_wide_history(path: Path) -> int:
    """About 400 MB of decoded rows in a small file: a few thousand distinct payloads, repeated."""
    rng = np.random.default_rng(3)
    distinct = 4096
    payloads = rng.bytes(distinct * WIDTH)
    # Built one block of `distinct` rows, then repeated, so writing takes a fraction of a second.
    block = pa.BinaryArray.from_buffers(
        pa.binary(),
        distinct,
        [None, pa.py_buffer((np.arange(distinct + 1) * WIDTH).astype(np.int32)), pa.py_buffer(payloads)],
    )
    reps = ROWS // distinct
    payload = pa.chunked_array([block] * reps)
    n = reps * distinct
    base = int(dt.datetime(2024, 5, 1, tzinfo=dt.UTC).timestamp() * 1_000_000)
    table = pa.table(
        {
            "user_id": pa.array(np.char.add("u", (np.arange(n) % 1000).astype(str))),
            "timestamp": pa.array(base + np.arange(n) * 1000, pa.timestamp("us", "UTC")),
            "clicked": pa.array(np.arange(n)),
            "payload": payload,
        }
    )
    pq.write_table(table, path, row_group_size=100_000)
    return int(table.nbytes)


def test_a_stalled_reader_holds_the_servers_memory_flat(tmp_path: Path) -> None:
    decoded = write_wide_history(tmp_path / "wide.parquet")
    assert decoded > 5 * ALLOWED
    running = start(tmp_path / "data", batch_roots=(tmp_path,), stream_read_ahead_bytes=READ_AHEAD)
    try:
        running.apply(
            {
                "name": "wide",
                "schema": {
                    "fields": [
                        {"name": "user_id", "type": scalar("STRING")},
                        {"name": "timestamp", "type": scalar("TIMESTAMP")},
                        {"name": "clicked", "type": scalar("INT64")},
                        {"name": "payload", "type": scalar("BYTES")},
                    ]
                },
                "entityKeys": ["user_id"],
                "timestampField": "timestamp",
                "batchConfig": {"uri": str(tmp_path / "wide.parquet"), "fileFormat": "FILE_FORMAT_PARQUET"},
            }
        )
        sources = running.server.batch_sources
        assert sources is not None
        stub = backfill_service_pb2_grpc.BackfillServiceStub(running.channel)
        baseline = pa.total_allocated_bytes()
        peak = [baseline]
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.is_set():
                peak[0] = max(peak[0], pa.total_allocated_bytes())
                time.sleep(0.01)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            call = stub.ReadBatchSource(pb.ReadBatchSourceRequest(source="wide"))
            assert next(call).HasField("arrow_schema")
            assert next(call).HasField("arrow_record_batch")
            # The reader stalls: the server may fill its read-ahead, and then must wait.
            time.sleep(3)
            stalled = peak[0] - baseline
            call.cancel()
            wait_until(lambda: sources.open_readers == 0)
        finally:
            sampling.set()
            sampler.join()
        print(f"decoded source {decoded / 1e6:.0f} MB; Arrow memory while stalled {stalled / 1e6:.1f} MB")
        assert stalled < ALLOWED
    finally:
        running.close()


# A read-ahead budget so small that a read stops a few batches into a file until its reader asks on.
SMALL_READ_AHEAD = 64 * 1024


def write_long_history(path: Path, rows: int = 1_000_000) -> None:
    """ad_impressions events in many row groups of random clicks, so the file barely compresses."""
    base = int(dt.datetime(2024, 5, 1, tzinfo=dt.UTC).timestamp() * 1_000_000)
    table = pa.table(
        {
            "user_id": pa.array(np.char.add("u", (np.arange(rows) % 1000).astype(str))),
            "timestamp": pa.array(base + np.arange(rows) * 1000, pa.timestamp("us", "UTC")),
            "clicked": pa.array(np.random.default_rng(5).integers(0, 1 << 62, rows)),
        }
    )
    pq.write_table(table, path, row_group_size=20_000)


def ad_impressions_from(path: Path) -> dict[str, object]:
    """The ad_impressions source reading its history from one Parquet file."""
    return dict(AD_IMPRESSIONS, batchConfig={"uri": str(path), "fileFormat": "FILE_FORMAT_PARQUET"})


def test_a_read_does_not_map_its_file(tmp_path: Path) -> None:
    """Pages of a mapped file stay in the server's resident memory until the read closes the file."""
    maps = Path(f"/proc/{os.getpid()}/maps")
    if not maps.exists():
        pytest.skip("needs /proc to list the process's mappings")
    path = tmp_path / "long.parquet"
    write_long_history(path, 200_000)
    running = start(tmp_path / "data", batch_roots=(tmp_path,), stream_read_ahead_bytes=SMALL_READ_AHEAD)
    try:
        running.apply(ad_impressions_from(path))
        sources = running.server.batch_sources
        assert sources is not None
        stub = backfill_service_pb2_grpc.BackfillServiceStub(running.channel)
        call = stub.ReadBatchSource(pb.ReadBatchSourceRequest(source="ad_impressions"))
        assert next(call).HasField("arrow_schema")
        assert next(call).HasField("arrow_record_batch")
        # The read has the file open and waits for its reader.
        assert sources.open_readers == 1
        assert str(path) not in maps.read_text()
        call.cancel()
        wait_until(lambda: sources.open_readers == 0)
    finally:
        running.close()


def test_a_file_cut_short_during_a_read_fails_the_read_and_the_server_lives_on(tmp_path: Path) -> None:
    """A file truncated under a read fails that read; read through a mapping, SIGBUS killed the server."""
    path = tmp_path / "long.parquet"
    write_long_history(path)
    served = ServedProcess(tmp_path / "data", "--stream-read-ahead-bytes", str(SMALL_READ_AHEAD))
    try:
        served.registry.ApplySource(
            registry_service_pb2.ApplySourceRequest(source=source_from_json(ad_impressions_from(path)))
        )
        call = served.backfill.ReadBatchSource(pb.ReadBatchSourceRequest(source="ad_impressions"))
        assert next(call).HasField("arrow_schema")
        assert next(call).HasField("arrow_record_batch")
        # The read has decoded a few batches of the first row groups; the rest of the file is gone.
        os.truncate(path, path.stat().st_size // 4)
        with pytest.raises(grpc.RpcError) as raised:
            for _ in call:
                pass
        code, _, reason = rich_error(raised.value)
        assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "BATCH_SOURCE_UNREADABLE"), served.log
        assert "could not be read from storage" in (raised.value.details() or "")
        assert served.proc.poll() is None, served.log
        assert served.registry.GetSource(
            registry_service_pb2.GetSourceRequest(name="ad_impressions")
        ).source.name
    finally:
        served.finish()
