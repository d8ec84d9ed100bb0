"""Redis store scenarios: `featurepush serve` on a real redis-server, and raw redis-py as the ceiling."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import redis

from bench.common import free_port, start_serve
from featurepush import Client, StreamSource
from featurepush_server.core.encoding import encode_rows
from featurepush_server.core.schema import compile_source
from featurepush_server.core.stores.redis import RedisStore

# name, value, unit, ceiling
Row = tuple[str, float, str, float]


def missing_reason() -> str:
    """Why the Redis scenarios cannot run here, or "" when they can."""
    return "" if shutil.which("redis-server") else "redis-server is not installed (make test installs it)"


def _start_redis(folder: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    # Append-only with the default fsync every second: what an operator would run for this store.
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder)]
    command += ["--save", "", "--appendonly", "yes"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except redis.exceptions.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    client.close()
    return process, port


def _raw_keys_values(
    source: StreamSource, rows: list[dict[str, object]], port: int
) -> list[tuple[bytes, bytes]]:
    """The very Redis keys and values the store writes for these rows."""
    spec = compile_source(source.to_proto())
    table = pa.Table.from_pylist(rows, schema=spec.arrow_schema)
    store = RedisStore(redis.Redis(port=port), cluster=False)
    keys, values = encode_rows(
        table, spec.fields, spec.entity_keys, spec.timestamp_field, store.row_prefix(1)
    )
    return [(store.redis_key(k), v) for k, v in zip(keys, values, strict=True)]


def _raw_set_rows_per_s(pairs: list[tuple[bytes, bytes]], seconds: float) -> float:
    client = redis.Redis(port=int(os.environ["FEATUREPUSH_BENCH_REDIS_PORT"]))
    written, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        pipe = client.pipeline(transaction=False)
        for key, value in pairs:
            pipe.set(key, value)
        pipe.execute()
        written += len(pairs)
    elapsed = time.perf_counter() - start
    client.close()
    return written / elapsed


def _raw_mget_keys_per_s(keys: list[bytes], seconds: float) -> float:
    client = redis.Redis(port=int(os.environ["FEATUREPUSH_BENCH_REDIS_PORT"]))
    got, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        client.mget(keys)
        got += len(keys)
    elapsed = time.perf_counter() - start
    client.close()
    return got / elapsed


def measure_redis(
    folder: Path,
    source: StreamSource,
    rows: Callable[[int, int], list[dict[str, object]]],
    throughput: Callable[[str, str], float],
    grpc_ceiling: dict[str, float],
    seconds: float,
) -> list[Row]:
    """push_rows_redis, push_arrow_redis, get_features_redis, each against raw redis-py of the same keys."""
    redis_process, port = _start_redis(folder / "redis")
    os.environ["FEATUREPUSH_BENCH_REDIS_PORT"] = str(port)
    server: subprocess.Popen[bytes] | None = None
    try:
        os.environ["FEATUREPUSH_STORE"] = f"redis://127.0.0.1:{port}"
        try:
            server, target = start_serve(folder / "redis-server-data", "always")
        finally:
            del os.environ["FEATUREPUSH_STORE"]
        with Client(target) as client:
            client.apply(source)
            for worker in range(2):
                client.push(source.name, rows(worker, 1000))
        pairs_1k = _raw_keys_values(source, rows(0, 1000), port)
        pairs_10k = _raw_keys_values(source, rows(0, 10_000), port)
        raw_1k = _raw_set_rows_per_s(pairs_1k, seconds)
        raw_10k = _raw_set_rows_per_s(pairs_10k, seconds)
        raw_get = _raw_mget_keys_per_s([k for k, _ in pairs_1k[:100]], seconds)
        out: list[Row] = [
            ("push_rows_redis", throughput(target, "rows"), "rows/s", min(grpc_ceiling["rows"], raw_1k)),
            ("push_arrow_redis", throughput(target, "arrow"), "rows/s", min(grpc_ceiling["arrow"], raw_10k)),
            ("get_features_redis", throughput(target, "get"), "keys/s", min(grpc_ceiling["get"], raw_get)),
            ("ceiling_redis_pipeline_set_1k", raw_1k, "rows/s", 0),
            ("ceiling_redis_pipeline_set_10k", raw_10k, "rows/s", 0),
            ("ceiling_redis_mget_100", raw_get, "keys/s", 0),
        ]
        return out
    finally:
        for process in (server, redis_process):
            if process is not None:
                process.terminate()
                process.wait(30)
