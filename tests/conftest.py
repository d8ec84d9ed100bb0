"""Fixtures: a real featurepush server in-process on port 0 over a real RocksDB in a temp folder."""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from redis_servers import RedisCluster, RedisServer, have_redis

from featurepush.v1 import (
    ingest_service_pb2,
    ingest_service_pb2_grpc,
    online_service_pb2,
    online_service_pb2_grpc,
    registry_service_pb2,
    registry_service_pb2_grpc,
    source_pb2,
)
from featurepush_server.app import Server, create_server, open_store
from featurepush_server.config import ServerConfig
from featurepush_server.core.errors import CoreError
from featurepush_server.processes import front_store, store_owner
from featurepush_server.servicers.ingest import IngestServicer
from featurepush_server.workers import backfill_workers as workers_of

# `featurepush serve` started by a test runs in one process unless the test asks for more (--processes).
os.environ.setdefault("FEATUREPUSH_PROCESSES", "1")

AD_IMPRESSIONS = {
    "name": "ad_impressions",
    "description": "Sample push source for ad impression events",
    "schema": {
        "fields": [
            {"name": "user_id", "type": {"scalar": "SCALAR_TYPE_STRING"}},
            {"name": "timestamp", "type": {"scalar": "SCALAR_TYPE_TIMESTAMP"}},
            {"name": "clicked", "type": {"scalar": "SCALAR_TYPE_INT64"}},
        ]
    },
    "entityKeys": ["user_id"],
    "timestampField": "timestamp",
    "pushConfig": {"logOffline": False},
}


def source_from_json(doc: dict[str, object]) -> source_pb2.PushSource:
    """A PushSource from its proto3 JSON form."""
    return json_format.ParseDict(doc, source_pb2.PushSource())


class Running:
    """A started server with raw stubs on one channel.

    Started with fronts, `fronts` holds one Running per front (this one first) over one store owner.
    """

    def apply(self, doc: dict[str, object]) -> registry_service_pb2.ApplySourceResponse:
        """Apply a source given in proto3 JSON form."""
        return self.registry.ApplySource(
            registry_service_pb2.ApplySourceRequest(source=source_from_json(doc))
        )

    def __init__(self, server: Server):
        self.server = server
        self.target = f"localhost:{server.port}"
        self.channel = grpc.insecure_channel(self.target)
        self.registry = registry_service_pb2_grpc.RegistryServiceStub(self.channel)
        self.ingest = ingest_service_pb2_grpc.IngestServiceStub(self.channel)
        self.online = online_service_pb2_grpc.OnlineServiceStub(self.channel)
        self.fronts: list[Running] = [self]
        # What stops after every front: the store owner and its store.
        self.closers: list[Callable[[], object]] = []

    def close(self) -> None:
        for front in self.fronts:
            front.channel.close()
            front.server.stop(None)
        for close in self.closers:
            close()


def start(data_dir: Path, *, fronts: int = 0, backfill_workers: bool = False, **settings: object) -> Running:
    """Start a server on a free port over `data_dir`.

    With `fronts`, the server is serve --processes' store owner (a RemoteStore's peer over a Unix socket)
    and that many fronts, each on its own port, all in this process so that tests reach their parts. With
    `backfill_workers`, the last front loads its backfills' chunks in worker processes, as in serve.
    """
    config = ServerConfig(listen="localhost:0", data_dir=data_dir, **settings)  # type: ignore[arg-type]
    if not fronts:
        server = create_server(config)
        server.start()
        return Running(server)
    # A Unix socket's path is short, shorter than pytest's temporary folders.
    runtime = Path(tempfile.mkdtemp(prefix="fp-"))
    store = open_store(config)
    owner = store_owner(store, runtime)
    owner.start()
    running: list[Running] = []
    workers = workers_of(config, runtime) if backfill_workers else None
    try:
        for n in range(fronts):
            pool = workers if n == fronts - 1 else None
            front = create_server(config, front=front_store(config, runtime), backfill_workers=pool)
            front.start()
            running.append(Running(front))
    except BaseException:
        for r in running:
            r.close()
        if workers is not None:
            workers.shutdown()
        owner.close()
        store.close()
        raise
    first = running[0]
    first.fronts = running
    first.closers = [owner.close, store.close, functools.partial(shutil.rmtree, runtime, True)]
    if workers is not None:
        first.closers.insert(0, workers.shutdown)
    return first


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the session; tests keep apart by namespace."""
    if not have_redis():
        pytest.skip("redis-server is not installed (make test installs it)")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A real 3-node Redis Cluster for the session."""
    if not have_redis():
        pytest.skip("redis-server is not installed (make test installs it)")
    cluster = RedisCluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def store_settings(request: pytest.FixtureRequest) -> dict[str, object]:
    """Server settings choosing the store: RocksDB, or Redis where a test parametrizes it (BOTH_STORES), or
    RocksDB under serve --processes' store owner with two fronts (ONE_AND_MANY_PROCESSES), or a Redis
    Cluster (EVERY_STORE)."""
    param = getattr(request, "param", "rocksdb")
    if param == "rocksdb":
        return {}
    if param == "processes":
        return {"fronts": 2}
    if param == "redis-cluster":
        cluster: RedisCluster = request.getfixturevalue("redis_cluster")
        return {"store": cluster.url, "redis_namespace": f"t{uuid.uuid4().hex[:12]}"}
    server: RedisServer = request.getfixturevalue("redis_server")
    return {"store": server.url, "redis_namespace": f"t{uuid.uuid4().hex[:12]}"}


# Runs a test once on each store; the test takes `running` or `store_settings`.
BOTH_STORES = pytest.mark.parametrize("store_settings", ["rocksdb", "redis"], indirect=True)
# Runs a test once on a one-process server and once on a store owner with two fronts.
ONE_AND_MANY_PROCESSES = pytest.mark.parametrize("store_settings", ["rocksdb", "processes"], indirect=True)
# Runs a test on every store: one process, an owner with fronts, a Redis node, a Redis Cluster.
EVERY_STORE = pytest.mark.parametrize(
    "store_settings", ["rocksdb", "processes", "redis", "redis-cluster"], indirect=True
)
# Runs a feature view test on every store that holds views: one process, an owner with fronts, Redis.
VIEW_STORES = pytest.mark.parametrize("store_settings", ["rocksdb", "processes", "redis"], indirect=True)


@pytest.fixture
def running(tmp_path: Path, store_settings: dict[str, object]) -> Iterator[Running]:
    """A server with the seed's ad_impressions source applied."""
    r = start(tmp_path / "data", **store_settings)
    try:
        r.registry.ApplySource(
            registry_service_pb2.ApplySourceRequest(source=source_from_json(AD_IMPRESSIONS))
        )
        yield r
    finally:
        r.close()


def refuse_writes(running: Running, monkeypatch: pytest.MonkeyPatch, errors: list[CoreError]) -> list[str]:
    """Make the server's store refuse its next writes with `errors`, one each, as a restarting owner does.

    Returns the request ids of the refused writes, in order.
    """
    store = running.server.store
    write = store.write_latest
    refused: list[str] = []

    def flaky(batches: object, *, request_id: str = "", **rest: object) -> object:
        if errors:
            refused.append(request_id)
            raise errors.pop(0)
        return write(batches, request_id=request_id, **rest)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "write_latest", flaky)
    return refused


def scalar(name: str) -> dict[str, object]:
    """The JSON form of a scalar DataType, such as scalar("INT64")."""
    return {"scalar": f"SCALAR_TYPE_{name}"}


def cancel_first_push_stream(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Make the next server started fail its first PushStream with a bare CANCELLED, before reading it.

    As grpc fails a call that reaches a server just as it stops. The list returned holds True once done.
    """
    real = IngestServicer.PushStream
    cancelled: list[bool] = []

    def cancel_first(
        self: IngestServicer, requests: Iterator[Any], context: grpc.ServicerContext
    ) -> Iterator[ingest_service_pb2.PushStreamResponse]:
        if not cancelled:
            cancelled.append(True)
            context.abort(grpc.StatusCode.CANCELLED, "CANCELLED")
        yield from real(self, requests, context)

    # The servicer's methods are bound when a server is built, so only servers started after this see it.
    monkeypatch.setattr(IngestServicer, "PushStream", cancel_first)
    return cancelled


def rows_request(
    records: dict[str, list[dict[str, object]]], **fields: object
) -> ingest_service_pb2.PushRequest:
    """A PushRequest with rows per source, built from JSON."""
    doc = {"records": {name: {"rows": rows} for name, rows in records.items()}, **fields}
    return json_format.ParseDict(doc, ingest_service_pb2.PushRequest())


def keys_request(source: str, *keys: dict[str, object]) -> online_service_pb2.GetFeaturesRequest:
    """A GetFeaturesRequest for the given entity keys."""
    return json_format.ParseDict(
        {"source": source, "keys": list(keys)}, online_service_pb2.GetFeaturesRequest()
    )


def features(running: Running, source: str, *keys: dict[str, object]) -> list[dict[str, object]]:
    """GetFeatures results as proto3 JSON dicts."""
    response = running.online.GetFeatures(keys_request(source, *keys))
    return [json_format.MessageToDict(r) for r in response.results]


def rich_error(err: grpc.RpcError) -> tuple[grpc.StatusCode, list[tuple[str, str]], str]:
    """The code, (field, description) violations and ErrorInfo reason of a failed call."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    violations: list[tuple[str, str]] = []
    reason = ""
    assert status is not None, f"no rich status on {err}"
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations += [(v.field, v.description) for v in bad.field_violations]
        elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
    return err.code(), violations, reason
