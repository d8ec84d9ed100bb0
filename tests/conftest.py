"""Fixtures: a real featurepush server in-process on port 0 over a real RocksDB in a temp folder."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from featurepush.v1 import (
    ingest_service_pb2_grpc,
    online_service_pb2_grpc,
    registry_service_pb2_grpc,
    source_pb2,
)
from google.protobuf import json_format

from featurepush_server.app import Server, create_server
from featurepush_server.config import ServerConfig

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
    """A started server with raw stubs on one channel."""

    def __init__(self, server: Server):
        self.server = server
        self.target = f"localhost:{server.port}"
        self.channel = grpc.insecure_channel(self.target)
        self.registry = registry_service_pb2_grpc.RegistryServiceStub(self.channel)
        self.ingest = ingest_service_pb2_grpc.IngestServiceStub(self.channel)
        self.online = online_service_pb2_grpc.OnlineServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.server.stop(None)


def start(data_dir: Path, **settings: object) -> Running:
    """Start a server on a free port over `data_dir`."""
    config = ServerConfig(listen="localhost:0", data_dir=data_dir, **settings)  # type: ignore[arg-type]
    server = create_server(config)
    server.start()
    return Running(server)


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    """A server with the seed's ad_impressions source applied."""
    r = start(tmp_path / "data")
    try:
        from featurepush.v1 import registry_service_pb2

        r.registry.ApplySource(registry_service_pb2.ApplySourceRequest(source=source_from_json(AD_IMPRESSIONS)))
        yield r
    finally:
        r.close()


