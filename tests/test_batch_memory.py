"""A stalled ReadBatchSource reader holds the server's memory flat: read-ahead is bounded in bytes."""

from __future__ import annotations

import datetime as dt
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from conftest import scalar, start
from test_batch_source import wait_until

from featurepush.v1 import backfill_service_pb2 as pb
from featurepush.v1 import backfill_service_pb2_grpc

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
