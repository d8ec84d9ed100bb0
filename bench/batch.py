"""Benchmarks of batch sources: ReadBatchSource throughput and memory, and Backfill rows per second."""

from __future__ import annotations

import datetime as dt
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import rocksdict
from google.protobuf import json_format

from bench.common import start_empty, start_serve
from bench.empty_server import write_frames
from featurepush.batch import backfill, read_batch_source
from featurepush.v1 import backfill_service_pb2 as pb
from featurepush.v1 import backfill_service_pb2_grpc as pb_grpc
from featurepush.v1 import registry_service_pb2, registry_service_pb2_grpc, source_pb2
from featurepush_server.core.encoding import encode_rows
from featurepush_server.core.schema import compile_source
from featurepush_server.core.stores.rocksdb import row_prefix

DAY0 = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)


def _source(uri: str) -> source_pb2.PushSource:
    doc = {
        "name": "bench",
        "schema": {
            "fields": [
                {"name": "user_id", "type": {"scalar": "SCALAR_TYPE_STRING"}},
                {"name": "timestamp", "type": {"scalar": "SCALAR_TYPE_TIMESTAMP"}},
                {"name": "clicked", "type": {"scalar": "SCALAR_TYPE_INT64"}},
                {"name": "score", "type": {"scalar": "SCALAR_TYPE_FLOAT64"}},
            ]
        },
        "entityKeys": ["user_id"],
        "timestampField": "timestamp",
        "batchConfig": {"uri": uri, "fileFormat": "FILE_FORMAT_PARQUET"},
    }
    return json_format.ParseDict(doc, source_pb2.PushSource())


def _write_history(path: Path, rows: int, entities: int) -> None:
    """A Parquet file of `rows` events, written in row groups so that writing it stays small in memory."""
    schema = pa.schema(
        [
            ("user_id", pa.string()),
            ("timestamp", pa.timestamp("us", "UTC")),
            ("clicked", pa.int64()),
            ("score", pa.float64()),
        ]
    )
    rng = np.random.default_rng(7)
    base = int(DAY0.timestamp() * 1_000_000)
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, 1_000_000):
            n = min(1_000_000, rows - start)
            ids = np.arange(start, start + n)
            table = pa.table(
                {
                    "user_id": pa.array([f"user{i}" for i in ids % entities]),
                    "timestamp": pa.array(base + ids * 1000, pa.timestamp("us", "UTC")),
                    "clicked": pa.array(rng.integers(0, 100, n)),
                    "score": pa.array(rng.random(n)),
                },
                schema=schema,
            )
            writer.write_table(table, row_group_size=131_072)


class _Server:
    """A `featurepush serve` process over a temp folder with the bench source applied."""

    def __init__(self, folder: Path, history: Path, processes: int = 1, data: str = "data"):
        self.process, target = start_serve(folder / data, "never", batch_root=folder, processes=processes)
        self.channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 64 << 20)])
        registry_service_pb2_grpc.RegistryServiceStub(self.channel).ApplySource(
            registry_service_pb2.ApplySourceRequest(source=_source(str(history)))
        )

    def close(self) -> None:
        self.channel.close()
        self.process.terminate()
        self.process.wait(30)


def _result(name: str, value: float, unit: str, ceiling: float | None) -> dict[str, Any]:
    ratio = value / ceiling if ceiling else None
    return {
        "name": name,
        "value": round(value, 3),
        "unit": unit,
        "ceiling": ceiling and round(ceiling, 3),
        "ratio": ratio and round(ratio, 3),
    }


def _megabytes_per_s(channel: grpc.Channel) -> tuple[float, int]:
    """MB/s and bytes of Arrow data one client reads from ReadBatchSource, decoding it as users do."""
    began = time.perf_counter()
    total = sum(b.nbytes for b in read_batch_source(channel, "bench"))
    return total / (time.perf_counter() - began) / 1e6, total


def read_batch_source_mb_s(rows: int = 2_000_000) -> dict[str, Any]:
    """MB/s of Arrow data streamed by ReadBatchSource from Parquet to one client.

    The ceiling is an empty-handler server sending the very same reply messages to the same client code.
    """
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _write_history(folder / "h.parquet", rows, 100_000)
        running = _Server(folder, folder / "h.parquet")
        try:
            _megabytes_per_s(running.channel)  # warm the page cache
            ours, _ = _megabytes_per_s(running.channel)
            stub = pb_grpc.BackfillServiceStub(running.channel)
            frames = [
                m.SerializeToString() for m in stub.ReadBatchSource(pb.ReadBatchSourceRequest(source="bench"))
            ]
        finally:
            running.close()
        write_frames(folder / "frames.bin", frames)
        echo, target = start_empty("--stream-frames", str(folder / "frames.bin"))
        try:
            with grpc.insecure_channel(
                target, options=[("grpc.max_receive_message_length", 64 << 20)]
            ) as channel:
                _megabytes_per_s(channel)
                ceiling, _ = _megabytes_per_s(channel)
        finally:
            echo.terminate()
            echo.wait(30)
    return _result("read_batch_source_mb_s", ours, "MB/s", ceiling)


def backfill_rows(rows: int = 5_000_000) -> dict[str, Any]:
    """Rows per second that Backfill loads into RocksDB, against a raw rocksdict WriteBatch of them."""
    entities = rows // 2
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _write_history(folder / "h.parquet", rows, entities)
        running = _Server(folder, folder / "h.parquet")
        try:
            began = time.perf_counter()
            result = backfill(running.channel, "bench")
            ours = result.rows_read / (time.perf_counter() - began)
        finally:
            running.close()
        spec = compile_source(_source(str(folder / "h.parquet")))
        table = pq.read_table(folder / "h.parquet")
        keys, values = encode_rows(table, spec.fields, spec.entity_keys, spec.timestamp_field, row_prefix(1))
        options = rocksdict.Options(raw_mode=True)
        options.create_if_missing(True)
        db = rocksdict.Rdict(str(folder / "raw"), options)
        try:
            began = time.perf_counter()
            for start in range(0, rows, 65_536):
                wb = rocksdict.WriteBatch(raw_mode=True)
                for key, value in zip(
                    keys[start : start + 65_536], values[start : start + 65_536], strict=True
                ):
                    wb.put(key, value)
                db.write(wb)
            ceiling = rows / (time.perf_counter() - began)
        finally:
            db.close()
    return _result("backfill_rows", ours, "rows/s", ceiling)


def backfill_pair(processes: int, rows: int = 2_000_000) -> list[Any]:
    """backfill_rows with serve --processes 1 and `processes`, over the same history in one run.

    Each starts on an empty data folder; the ceiling of both is the --processes 1 figure. With several
    processes the owner's CPU per row is reported too, with the rows per second one owner core could take,
    and the same backfill once more on another new server whose backfill workers a 1,000-row backfill of
    another source started first (backfill_rows_warm): what every backfill after a server's first gets.
    """
    from bench.run import Result, cpu_seconds, owner_pid, python_cpu_seconds

    figures: dict[int, float] = {}
    owner_us = owner_python = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _write_history(folder / "h.parquet", rows, rows // 2)
        _write_history(folder / "small.parquet", 1000, 1000)
        if processes > 1:
            running = _Server(folder, folder / "h.parquet", processes=processes, data="data-warm")
            try:
                small = _source(str(folder / "small.parquet"))
                small.name = "small"
                registry_service_pb2_grpc.RegistryServiceStub(running.channel).ApplySource(
                    registry_service_pb2.ApplySourceRequest(source=small)
                )
                backfill(running.channel, "small")
                began = time.perf_counter()
                result = backfill(running.channel, "bench")
                warm = result.rows_read / (time.perf_counter() - began)
            finally:
                running.close()
        for n in (1, processes):
            running = _Server(folder, folder / "h.parquet", processes=n, data=f"data-{n}")
            try:
                owner = owner_pid(running.process.pid)
                before = cpu_seconds(owner) if owner else 0.0
                python_before = python_cpu_seconds(owner) if owner else 0.0
                began = time.perf_counter()
                result = backfill(running.channel, "bench")
                wall = time.perf_counter() - began
                figures[n] = result.rows_read / wall
                if owner:
                    owner_us = (cpu_seconds(owner) - before) * 1e6 / result.rows_read
                    owner_python = (python_cpu_seconds(owner) - python_before) / wall
            finally:
                running.close()
    one = figures[1]
    out = [
        Result(
            f"backfill_rows[processes={n}]",
            round(figures[n], 3),
            "rows/s",
            round(one, 3),
            round(figures[n] / one, 3),
        )
        for n in (1, processes)
    ]
    if processes > 1:
        out.append(
            Result(
                f"backfill_rows_warm[processes={processes}]",
                round(warm, 3),
                "rows/s",
                round(one, 3),
                round(warm / one, 3),
            )
        )
    if owner_us:
        bound = 1e6 / owner_us
        ratio = round(figures[processes] / bound, 3)
        out.append(
            Result("owner_cpu_us_per_row[backfill_rows]", round(owner_us, 3), "us", round(bound), ratio)
        )
        # Near 1: the owner's GIL bounds the backfill; well below: the reading and encoding side does.
        busy = round(owner_python, 3)
        out.append(Result("owner_python_cores[backfill_rows]", busy, "cores", 1, busy))
    return out


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc")


def read_batch_source_rss_mb(rows: int = 10_000_000) -> dict[str, Any]:
    """Growth in MB of the server process's resident memory while ReadBatchSource streams `rows` rows."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _write_history(folder / "h.parquet", rows, 1_000_000)
        running = _Server(folder, folder / "h.parquet")
        try:
            pid = running.process.pid
            before = _rss_mb(pid)
            peak = before
            streamed = 0
            for batch in read_batch_source(running.channel, "bench"):
                streamed += batch.num_rows
                peak = max(peak, _rss_mb(pid))
            assert streamed == rows
        finally:
            running.close()
    return _result("read_batch_source_rss_mb", peak - before, "MB", 300.0)
