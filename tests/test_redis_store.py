"""The Redis store with many servers: a 3-node Redis Cluster, Redis going away, kill -9, the offline log."""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import redis
from conftest import AD_IMPRESSIONS, Running, features, rows_request, start
from redis_servers import RedisCluster, RedisServer, free_port, have_redis
from servers import ServedProcess, wait_until
from test_cli import run
from views_helpers import opened_store

from featurepush.v1 import ingest_service_pb2, registry_service_pb2
from featurepush_server.config import ConfigError, ServerConfig
from featurepush_server.core.errors import Unavailable
from featurepush_server.core.offline_log import OfflineLog
from featurepush_server.core.stores import redis as redis_store
from featurepush_server.core.stores.redis import RedisStore

pytestmark = pytest.mark.skipif(
    not have_redis(), reason="redis-server is not installed (make test installs it)"
)

BASE = datetime(2026, 11, 25, tzinfo=UTC)


def iso(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def namespace() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


@contextmanager
def served(data_dir: Path, store: RedisServer | RedisCluster, **settings: object) -> Iterator[Running]:
    """A server on `store`, in a namespace of its own, while the block runs; `store` stops after it."""
    try:
        running = start(data_dir, store=store.url, redis_namespace=namespace(), **settings)
        try:
            yield running
        finally:
            running.close()
    finally:
        store.stop()


def push_until_accepted(running: Running, request: ingest_service_pb2.PushRequest) -> bool:
    """Send `request` until the server accepts it, while it answers UNAVAILABLE; whether it did."""

    def pushes() -> bool:
        try:
            running.ingest.Push(request, timeout=5)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE
            return False
        return True

    return wait_until(pushes, 30)


def test_three_servers_on_a_cluster_keep_the_latest_event_of_every_entity(
    tmp_path: Path, redis_cluster: RedisCluster
) -> None:
    ns = namespace()
    servers = [start(tmp_path / f"s{i}", store=redis_cluster.url, redis_namespace=ns) for i in range(3)]
    try:
        servers[0].apply(AD_IMPRESSIONS)
        threads_n, pushes, rows = 6, 25, 20
        entities = [f"user-{i}" for i in range(60)]
        acked: list[tuple[str, int, int]] = []
        lock = threading.Lock()
        errors: list[BaseException] = []

        def pusher(worker: int) -> None:
            rng = random.Random(worker)
            # Event times unique across workers, in a random order, so every entity sees conflicts.
            offsets = [worker + threads_n * k for k in range(pushes * rows)]
            rng.shuffle(offsets)
            target = servers[worker % 3]
            try:
                for p in range(pushes):
                    batch = [
                        (rng.choice(entities), offsets[p * rows + r], worker * 100_000 + p * rows + r)
                        for r in range(rows)
                    ]
                    request = rows_request(
                        {
                            "ad_impressions": [
                                {"user_id": e, "timestamp": iso(BASE + timedelta(seconds=s)), "clicked": c}
                                for e, s, c in batch
                            ]
                        },
                        requestId=f"w{worker}-{p}",
                    )
                    target.ingest.Push(request, timeout=30)
                    with lock:
                        acked.extend(batch)
                    if p % 5 == 0:
                        # The same request through another server is a replay, whichever server saw it.
                        assert servers[(worker + 1) % 3].ingest.Push(request, timeout=30).replayed
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=pusher, args=(w,)) for w in range(threads_n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        latest: dict[str, tuple[int, int]] = {}
        for entity, offset, clicked in acked:
            if entity not in latest or offset > latest[entity][0]:
                latest[entity] = (offset, clicked)
        for reader in servers:
            results = features(reader, "ad_impressions", *({"user_id": e} for e in latest))
            got = {r["features"]["user_id"]: (r["eventTime"], int(r["features"]["clicked"])) for r in results}
            want = {e: (iso(BASE + timedelta(seconds=o)), c) for e, (o, c) in latest.items()}
            assert got == want
    finally:
        for s in servers:
            s.close()


def test_a_definition_change_through_one_server_reaches_the_others(
    tmp_path: Path, redis_cluster: RedisCluster
) -> None:
    ns = namespace()
    settings: dict[str, object] = {"store": redis_cluster.url, "redis_namespace": ns}
    a, b = (start(tmp_path / name, redis_registry_refresh_s=0.2, **settings) for name in "ab")
    try:
        a.apply(AD_IMPRESSIONS)
        stale = b.server.registry.get("ad_impressions")
        # An incompatible change while the source holds no rows: b's cached definition is now stale.
        changed = dict(AD_IMPRESSIONS, schema={"fields": [*AD_IMPRESSIONS["schema"]["fields"][:2]]})  # type: ignore[index]
        changed["schema"]["fields"].append({"name": "clicked", "type": {"scalar": "SCALAR_TYPE_STRING"}})  # type: ignore[index]
        a.apply(changed)
        from featurepush_server.core.errors import Aborted
        from featurepush_server.core.stores.base import RowBatch

        key = b.server.store.row_prefix(stale.id) + b"u1"
        with pytest.raises(Aborted):
            b.server.store.write_latest(
                [RowBatch("ad_impressions", [key], [b"\x80" + b"\0" * 7], b"", stale.id, stale.generation)]
            )
        # Within the refresh interval b reads the new definition and takes string clicks.
        assert wait_until(
            lambda: b.server.registry.get("ad_impressions").generation == stale.generation + 1, 5
        )
        b.ingest.Push(
            rows_request({"ad_impressions": [{"user_id": "u1", "timestamp": iso(BASE), "clicked": "yes"}]})
        )
        assert features(a, "ad_impressions", {"user_id": "u1"})[0]["features"]["clicked"] == "yes"
        assert (
            b.registry.DeleteSource(
                __import__("featurepush.v1.registry_service_pb2").v1.registry_service_pb2.DeleteSourceRequest(
                    name="ad_impressions"
                )
            ).rows_deleted
            == 1
        )
    finally:
        a.close()
        b.close()


def test_rows_expire_in_redis_at_event_time_plus_ttl_plus_grace(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    ns = namespace()
    running = start(tmp_path, store=redis_server.url, redis_namespace=ns, redis_expiry_grace_s=60.0)
    try:
        running.apply({**AD_IMPRESSIONS, "onlineTtl": "3600s"})
        event = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
        running.ingest.Push(
            rows_request({"ad_impressions": [{"user_id": "u1", "timestamp": iso(event), "clicked": 1}]})
        )
        client = redis.Redis.from_url(redis_server.url)
        try:
            [key] = client.keys(f"{{{ns}:*}}ru1".encode())
            expected_ms = int(event.timestamp() * 1000) + 3600_000 + 60_000
            assert client.pexpiretime(key) == expected_ms
        finally:
            client.close()
    finally:
        running.close()


@pytest.mark.parametrize("kind", ["node", "cluster"])
def test_redis_down_is_unavailable_within_the_deadline_then_recovers(tmp_path: Path, kind: str) -> None:
    store: RedisServer | RedisCluster
    if kind == "node":
        store = RedisServer(tmp_path / "redis", "--appendfsync", "always")
        nodes = [store]
    else:
        store = RedisCluster(tmp_path / "cluster")
        nodes = store.nodes
    with served(tmp_path / "data", store, redis_timeout_s=0.5) as running:
        running.apply(AD_IMPRESSIONS)
        first = {"user_id": "u1", "timestamp": iso(BASE), "clicked": 1}
        running.ingest.Push(rows_request({"ad_impressions": [first]}))
        for node in nodes:
            node.kill()
        began = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            running.ingest.Push(rows_request({"ad_impressions": [first]}), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError) as info:
            features(running, "ad_impressions", {"user_id": "u1"})
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - began < 5
        assert not running.server.store.writable
        for node in nodes:
            node.start()
        # A cluster accepts it once its restarted nodes agree that it is up again.
        assert push_until_accepted(running, rows_request({"ad_impressions": [dict(first, user_id="u2")]}))
        assert wait_until(lambda: running.server.store.writable, 10)
        results = features(running, "ad_impressions", {"user_id": "u1"}, {"user_id": "u2"})
        assert [r["status"] for r in results] == ["FEATURE_STATUS_PRESENT"] * 2


def test_kill_9_of_a_server_mid_push_loses_no_acknowledged_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = RedisServer(tmp_path / "redis", "--appendfsync", "always")
    ns = namespace()
    monkeypatch.setenv("FEATUREPUSH_STORE", node.url)
    monkeypatch.setenv("FEATUREPUSH_REDIS_NAMESPACE", ns)
    child = ServedProcess(tmp_path / "child")
    acked: list[str] = []
    now = datetime.now(UTC)
    stop = threading.Event()

    def pusher() -> None:
        n = 0
        while not stop.is_set():
            users = [f"k{n + i}" for i in range(10)]
            request = rows_request(
                {"ad_impressions": [{"user_id": u, "timestamp": iso(now), "clicked": 1} for u in users]}
            )
            try:
                child.ingest.Push(request, timeout=5)
            except grpc.RpcError:
                return
            acked.extend(users)
            n += 10

    thread = threading.Thread(target=pusher)
    try:
        thread.start()
        assert wait_until(lambda: len(acked) >= 300, 60)
        child.signal(signal.SIGKILL)
        thread.join(30)
    finally:
        stop.set()
        child.finish()
    monkeypatch.delenv("FEATUREPUSH_STORE")
    running = start(tmp_path / "after", store=node.url, redis_namespace=ns)
    try:
        results = features(running, "ad_impressions", *({"user_id": u} for u in acked))
        assert [r["status"] for r in results] == ["FEATURE_STATUS_PRESENT"] * len(acked)
    finally:
        running.close()
        node.stop()


def test_two_servers_drain_the_offline_log_exactly_once(tmp_path: Path, redis_server: RedisServer) -> None:
    settings: dict[str, object] = {
        "store": redis_server.url,
        "redis_namespace": namespace(),
        "offline_flush_interval_s": 3600.0,
    }
    a, b = (start(tmp_path / name, **settings) for name in "ab")
    assert a.server.offline_log is not None and b.server.offline_log is not None

    def push(i: int) -> None:
        request = rows_request(
            {"ad_impressions": [{"user_id": f"u{i}", "timestamp": iso(BASE), "clicked": i}]},
            requestId=f"r{i}",
        )
        # Each request through both servers: the second is a replay and logs nothing.
        assert not a.ingest.Push(request).replayed
        assert b.ingest.Push(request).replayed

    a_open = True
    try:
        a.apply(dict(AD_IMPRESSIONS, pushConfig={"logOffline": True}))
        for i in range(4):
            push(i)
        assert a.server.offline_log.flush() == 4
        for i in range(4, 8):
            push(i)
        # a holds the drain lease, so b sees nothing to drain; a drains the rest as it stops.
        assert b.server.offline_log.flush() == 0
        a.close()
        a_open = False
        b.ingest.Push(
            rows_request({"ad_impressions": [{"user_id": "u8", "timestamp": iso(BASE), "clicked": 8}]})
        )
        # The lease of a server that stopped was given back, so another drains from then on.
        assert b.server.offline_log.flush() == 1
        clicked: list[int] = []
        for name in "ab":
            folder = tmp_path / name / "offline" / "ad_impressions"
            if folder.exists():
                clicked += ds.dataset(folder, format="parquet").to_table()["clicked"].to_pylist()
        assert sorted(clicked) == list(range(9))
    finally:
        if a_open:
            a.close()
        b.close()


@contextmanager
def with_a_replica(tmp_path: Path) -> Iterator[tuple[RedisServer, Running]]:
    """A server writing to a primary with one replica, waiting for it (WAIT 1); the replica is yielded."""
    primary = RedisServer(tmp_path / "primary")
    replica = RedisServer(tmp_path / "replica")
    running: Running | None = None
    try:
        client = redis.Redis(port=replica.port)
        client.replicaof("127.0.0.1", primary.port)
        assert wait_until(lambda: client.info("replication").get("master_link_status") == "up", 20)
        client.close()
        running = start(
            tmp_path / "data",
            store=primary.url,
            redis_namespace=namespace(),
            redis_wait_replicas=1,
            redis_timeout_s=0.5,
        )
        running.apply(AD_IMPRESSIONS)
        yield replica, running
    finally:
        if replica.proc is not None and replica.proc.poll() is None:
            replica.proc.send_signal(signal.SIGCONT)
        if running is not None:
            running.close()
        replica.stop()
        primary.stop()


def test_a_write_waits_for_its_replica_and_fails_unavailable_without_it(tmp_path: Path) -> None:
    with with_a_replica(tmp_path) as (replica, running):
        row = {"user_id": "u1", "timestamp": iso(BASE), "clicked": 1}
        running.ingest.Push(rows_request({"ad_impressions": [row]}))
        replica.kill()
        with pytest.raises(grpc.RpcError) as info:
            running.ingest.Push(rows_request({"ad_impressions": [row]}), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "replicas" in (info.value.details() or "")


def test_no_write_is_acknowledged_while_its_replica_lags_however_many_arrive_at_once(tmp_path: Path) -> None:
    # A stopped replica stays connected and keeps the offset it last acknowledged: WAIT counts it for
    # whatever a connection wrote before then, so the WAIT must follow the write on its own connection.
    with with_a_replica(tmp_path) as (replica, running):
        first = rows_request({"ad_impressions": [{"user_id": "r", "timestamp": iso(BASE), "clicked": 0}]})
        first.request_id = "before-the-lag"
        running.ingest.Push(first)
        assert replica.proc is not None
        replica.proc.send_signal(signal.SIGSTOP)
        codes: list[grpc.StatusCode] = []

        def push(worker: int) -> None:
            for k in range(4):
                row = {"user_id": f"u{worker}-{k}", "timestamp": iso(BASE), "clicked": k}
                request = rows_request({"ad_impressions": [row]}, requestId=f"w{worker}-{k}")
                try:
                    running.ingest.Push(request, timeout=10)
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as e:
                    codes.append(e.code())

        threads = [threading.Thread(target=push, args=(n,)) for n in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        # Some may be turned away at the door (RESOURCE_EXHAUSTED) while others wait: none is acknowledged.
        assert len(codes) == 48 and grpc.StatusCode.OK not in codes
        assert grpc.StatusCode.UNAVAILABLE in codes
        # Sent again, a write that reached the primary only is not acknowledged by its replay either...
        again = rows_request({"ad_impressions": [{"user_id": "u0-0", "timestamp": iso(BASE), "clicked": 0}]})
        again.request_id = "w0-0"
        with pytest.raises(grpc.RpcError) as info:
            running.ingest.Push(again, timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        replica.proc.send_signal(signal.SIGCONT)
        # ...until the replica has it: then the replay answers.
        assert running.ingest.Push(again, timeout=10).replayed


def test_a_cluster_write_waits_for_a_replica_of_every_primary_it_wrote_to(tmp_path: Path) -> None:
    cluster = RedisCluster(tmp_path / "cluster", replicas=1)
    replicas: list[RedisServer] = []
    for node in cluster.nodes:
        client = redis.Redis(port=node.port)
        if client.info("replication")["role"] == "slave":
            replicas.append(node)
            assert wait_until(lambda c=client: c.info("replication").get("master_link_status") == "up", 20)
        client.close()
    assert len(replicas) == 3
    stopped = replicas[0].proc
    assert stopped is not None
    try:
        with served(tmp_path / "data", cluster, redis_wait_replicas=1, redis_timeout_s=0.5) as running:
            running.apply(AD_IMPRESSIONS)

            def request(request_id: str) -> ingest_service_pb2.PushRequest:
                # Forty entities spread over the source's buckets, and so over every primary.
                rows = [{"user_id": f"u{i}", "timestamp": iso(BASE), "clicked": i} for i in range(40)]
                return rows_request({"ad_impressions": rows}, requestId=request_id)

            assert not running.ingest.Push(request("c-1"), timeout=10).replayed
            stopped.send_signal(signal.SIGSTOP)
            for _ in range(2):
                # The write, then its replay: neither is acknowledged while a primary it wrote to lags.
                with pytest.raises(grpc.RpcError) as info:
                    running.ingest.Push(request("c-2"), timeout=10)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "reached 0 of the 1 Redis replicas" in (info.value.details() or "")
            stopped.send_signal(signal.SIGCONT)
            assert running.ingest.Push(request("c-2"), timeout=10).replayed
    finally:
        if stopped.poll() is None:
            stopped.send_signal(signal.SIGCONT)


def test_records_pushed_after_redis_restarts_from_an_older_snapshot_reach_the_offline_log(
    tmp_path: Path,
) -> None:
    # Snapshots only: a restart after kill -9 takes Redis back to its last SAVE.
    node = RedisServer(tmp_path / "redis", "--appendonly", "no")
    with served(tmp_path / "data", node, offline_flush_interval_s=3600.0) as running:
        offline_log = running.server.offline_log
        assert offline_log is not None
        running.apply(dict(AD_IMPRESSIONS, pushConfig={"logOffline": True}))

        def request(clicked: int) -> ingest_service_pb2.PushRequest:
            row = {"user_id": f"u{clicked}", "timestamp": iso(BASE), "clicked": clicked}
            return rows_request({"ad_impressions": [row]})

        running.ingest.Push(request(0))
        running.ingest.Push(request(1))
        client = redis.Redis(port=node.port)
        client.save()
        client.close()
        running.ingest.Push(request(2))
        assert offline_log.flush() == 3
        node.kill()
        node.start()
        assert push_until_accepted(running, request(10))
        running.ingest.Push(request(11))
        offline_log.flush()
        table = ds.dataset(offline_log.source_dir("ad_impressions"), format="parquet").to_table()
        # Records 0 and 1 came back with the snapshot and were already written: they are not written twice.
        assert sorted(table["clicked"].to_pylist()) == [0, 1, 2, 10, 11]


def test_a_cluster_out_of_reach_at_start_is_the_store_error(tmp_path: Path) -> None:
    with pytest.raises(Unavailable, match="cannot reach its Redis store"):
        start(tmp_path, store=f"redis-cluster://127.0.0.1:{free_port()}", redis_timeout_s=0.5)


def test_writes_to_a_primary_turned_replica_are_unavailable(tmp_path: Path) -> None:
    primary = RedisServer(tmp_path / "primary")
    other = RedisServer(tmp_path / "other")
    try:
        with served(tmp_path / "data", primary) as running:
            running.apply(AD_IMPRESSIONS)
            row = {"user_id": "u1", "timestamp": iso(BASE), "clicked": 1}
            running.ingest.Push(rows_request({"ad_impressions": [row]}))
            # A failover: the other node takes the data and is promoted, the old primary follows it.
            to_other, to_primary = redis.Redis(port=other.port), redis.Redis(port=primary.port)
            to_other.replicaof("127.0.0.1", primary.port)
            assert wait_until(lambda: to_other.info("replication").get("master_link_status") == "up", 20)
            to_other.replicaof("NO", "ONE")
            to_primary.replicaof("127.0.0.1", other.port)
            assert wait_until(lambda: to_primary.info("replication").get("master_link_status") == "up", 20)
            to_other.close()
            to_primary.close()
            with pytest.raises(grpc.RpcError) as info:
                running.ingest.Push(rows_request({"ad_impressions": [dict(row, clicked=2)]}), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "read-only replica" in (info.value.details() or "")
            assert features(running, "ad_impressions", {"user_id": "u1"})[0]["features"]["clicked"] == "1"
    finally:
        other.stop()


def test_a_redis_out_of_memory_refuses_pushes_resource_exhausted_and_writes_none_of_them(
    tmp_path: Path,
) -> None:
    node = RedisServer(tmp_path / "redis", "--maxmemory-policy", "noeviction")
    with served(tmp_path / "data", node) as running:
        running.apply(AD_IMPRESSIONS)
        rows = [{"user_id": f"u{i}", "timestamp": iso(BASE), "clicked": i} for i in range(3)]
        running.ingest.Push(rows_request({"ad_impressions": rows[:1]}))
        client = redis.Redis(port=node.port)
        client.config_set("maxmemory", 1)
        with pytest.raises(grpc.RpcError) as info:
            running.ingest.Push(rows_request({"ad_impressions": rows}), timeout=10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "maxmemory" in (info.value.details() or "")
        results = features(running, "ad_impressions", *({"user_id": r["user_id"]} for r in rows))
        missing = ["FEATURE_STATUS_MISSING"] * 2
        assert [r["status"] for r in results] == ["FEATURE_STATUS_PRESENT", *missing]
        client.config_set("maxmemory", 0)
        client.close()


def test_a_server_stops_while_every_node_of_its_cluster_is_down(tmp_path: Path) -> None:
    cluster = RedisCluster(tmp_path / "cluster")
    with served(tmp_path / "data", cluster) as running:
        running.apply(dict(AD_IMPRESSIONS, pushConfig={"logOffline": True}))
        assert running.server.offline_log is not None
        # The drain lease is taken, so stopping gives it back.
        running.server.offline_log.flush()
        for node in cluster.nodes:
            node.kill()


@pytest.mark.parametrize("kind", ["node", "cluster"])
def test_a_password_in_the_store_url_is_used_and_never_shown(
    tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    secret = f"pw-{uuid.uuid4().hex}"
    store: RedisServer | RedisCluster
    if kind == "node":
        store = RedisServer(tmp_path / "redis", password=secret)
        nodes = [store]
    else:
        store = RedisCluster(tmp_path / "cluster", password=secret)
        nodes = store.nodes
    with served(tmp_path / "data", store, redis_timeout_s=0.5) as running:
        running.apply(AD_IMPRESSIONS)
        row = {"user_id": "u1", "timestamp": iso(BASE), "clicked": 1}
        running.ingest.Push(rows_request({"ad_impressions": [row]}))
        assert features(running, "ad_impressions", {"user_id": "u1"})[0]["status"] == "FEATURE_STATUS_PRESENT"
        for node in nodes:
            node.kill()
        with pytest.raises(grpc.RpcError) as info:
            running.ingest.Push(rows_request({"ad_impressions": [row]}), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        shown = [str(info.value.details()), *(str(v) for _, v in info.value.trailing_metadata() or ())]
        assert not [text for text in shown if secret in text]
    assert secret not in caplog.text
    for url in (f"redis-cluster://:{secret}@127.0.0.1", f"redis://:{secret} x@127.0.0.1:1"):
        with pytest.raises(ConfigError) as refused:
            ServerConfig(store=url)
        assert secret not in str(refused.value)


def test_a_definition_change_holds_the_lock_for_as_long_as_it_runs(
    tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from featurepush_server.core.stores import redis as redis_store

    # An expiry of 0.6 s, so that a change of two seconds outlasts it three times over.
    monkeypatch.setattr(redis_store, "_LOCK_MS", 600)
    ns = namespace()
    settings: dict[str, object] = {"store": redis_server.url, "redis_namespace": ns}
    client = redis.Redis(port=redis_server.port)
    try:
        with opened_store(tmp_path / "data", settings) as store:
            with store.exclusive():
                deadline = time.monotonic() + 2.0
                while time.monotonic() < deadline:
                    assert client.pttl(f"{{{ns}}}:lock") > 0
                    time.sleep(0.05)
            assert not client.exists(f"{{{ns}}}:lock")
    finally:
        client.close()


_BUSY_LOOP = """
local t = redis.call('TIME')
local until_s = tonumber(t[1]) + 60
while tonumber(redis.call('TIME')[1]) < until_s do end
return 1
"""


def test_a_redis_busy_running_a_script_is_unavailable_and_the_push_is_sent_again_later(
    tmp_path: Path,
) -> None:
    # Past 10 ms of a script, Redis answers every other command BUSY until it ends or is killed.
    node = RedisServer(tmp_path / "redis", "--busy-reply-threshold", "10")
    with served(tmp_path / "data", node) as running:
        running.apply(AD_IMPRESSIONS)
        looping = redis.Redis(port=node.port)
        script = threading.Thread(target=lambda: _ignore_killed(looping), daemon=True)
        script.start()
        client = redis.Redis(port=node.port)
        try:
            assert wait_until(lambda: _answers_busy(client), 20)
            row = {"user_id": "u1", "timestamp": iso(BASE), "clicked": 1}
            request = rows_request({"ad_impressions": [row]}, requestId="busy-1")
            with pytest.raises(grpc.RpcError) as info:
                running.ingest.Push(request, timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "busy running a script" in (info.value.details() or "")
            # Redis answers: writes are not reported stopped.
            assert running.server.store.writable
        finally:
            client.script_kill()
            script.join(20)
            client.close()
            looping.close()
        assert not running.ingest.Push(request, timeout=10).replayed
        assert features(running, "ad_impressions", {"user_id": "u1"})[0]["features"]["clicked"] == "1"


def _ignore_killed(client: redis.Redis) -> None:
    """Run the busy loop until SCRIPT KILL ends it."""
    try:
        client.eval(_BUSY_LOOP, 0)
    except redis.exceptions.ResponseError:
        pass


def _answers_busy(client: redis.Redis) -> bool:
    """Whether Redis refuses a command BUSY now."""
    try:
        client.get("any")
    except redis.exceptions.ResponseError as e:
        return str(e).startswith("BUSY")
    return False


@pytest.mark.parametrize("kind", ["node", "cluster"])
def test_a_wrong_password_at_start_names_the_credentials_and_never_shows_them(
    tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store: RedisServer | RedisCluster
    if kind == "node":
        store = RedisServer(tmp_path / "redis", password="right-password")
    else:
        store = RedisCluster(tmp_path / "cluster", password="right-password")
    secret = f"wrong-{uuid.uuid4().hex}"
    try:
        monkeypatch.setenv("FEATUREPUSH_STORE", store.url.replace("right-password", secret))
        cmd = [sys.executable, "-m", "featurepush_server.cli", "serve", "--listen", "localhost:0"]
        done = subprocess.run(
            [*cmd, "--data-dir", str(tmp_path / "data")], capture_output=True, text=True, timeout=120
        )
    finally:
        store.stop()
    assert done.returncode == 1
    assert secret not in done.stdout + done.stderr
    last = done.stderr.splitlines()[-1]
    assert last.startswith("featurepush: error: ")
    assert "refused the credentials" in last
    assert "Traceback" not in done.stderr


def _policy_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "maxmemory-policy" in r.getMessage()
    ]


def test_an_evicting_redis_is_warned_of_at_start_and_in_the_status(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    node = RedisServer(tmp_path / "redis", "--maxmemory-policy", "allkeys-lru")
    with served(tmp_path / "data", node) as running:
        [warning] = _policy_warnings(caplog)
        assert "allkeys-lru" in warning and "CONFIG SET maxmemory-policy noeviction" in warning
        assert "offline-log queue" in warning
        status = running.registry.GetServerStatus(registry_service_pb2.GetServerStatusRequest())
        assert list(status.store_warnings) == [warning]
        code, out, _ = run(capsys, "status", "--target", running.target)
        assert code == 0
        assert f"store:        WARNING: {warning}" in out.splitlines()


def test_a_cluster_primary_that_may_evict_is_named_in_the_warning(
    tmp_path: Path, redis_cluster: RedisCluster, caplog: pytest.LogCaptureFixture
) -> None:
    evicting = redis_cluster.nodes[1]
    client = redis.Redis(port=evicting.port)
    client.config_set("maxmemory-policy", "volatile-lru")
    try:
        running = start(tmp_path, store=redis_cluster.url, redis_namespace=namespace())
        running.close()
    finally:
        client.config_set("maxmemory-policy", "noeviction")
        client.close()
    [warning] = _policy_warnings(caplog)
    assert f"volatile-lru on 127.0.0.1:{evicting.port}" in warning
    assert str(redis_cluster.nodes[0].port) not in warning


def test_a_redis_refusing_config_is_not_checked_and_serves(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="featurepush_server.core.stores.redis")
    # As managed services do: CONFIG is renamed away, so CONFIG GET is an unknown command.
    node = RedisServer(
        tmp_path / "redis", "--maxmemory-policy", "allkeys-lru", "--rename-command", "CONFIG", ""
    )
    with served(tmp_path / "data", node) as running:
        running.apply(AD_IMPRESSIONS)
        store = running.server.store
        assert isinstance(store, RedisStore)
        # Asked again while it runs, it is refused again: no error, and no line more.
        store.check_eviction()
        assert not _policy_warnings(caplog)
        assert caplog.text.count("maxmemory-policy could not be checked") == 1
        status = running.registry.GetServerStatus(registry_service_pb2.GetServerStatusRequest())
        assert list(status.store_warnings) == []


def test_an_eviction_policy_set_at_run_time_is_warned_of_once_and_withdrawn_when_set_back(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.INFO, logger="featurepush_server.core.stores.redis")
    # The recovery thread asks at each of its passes, as it does once a minute in service.
    monkeypatch.setattr(redis_store, "_EVICTION_CHECK_S", 0.0)
    node = RedisServer(tmp_path / "redis")
    client = redis.Redis(port=node.port)
    try:
        with served(tmp_path / "data", node, storage_retry_interval_s=0.05) as running:
            store = running.server.store
            assert isinstance(store, RedisStore)

            def warnings() -> list[str]:
                request = registry_service_pb2.GetServerStatusRequest()
                return list(running.registry.GetServerStatus(request).store_warnings)

            assert warnings() == []
            client.config_set("maxmemory-policy", "allkeys-lru")
            assert wait_until(lambda: warnings() != [], 10)
            [warning] = warnings()
            assert "allkeys-lru" in warning and "CONFIG SET maxmemory-policy noeviction" in warning
            code, out, _ = run(capsys, "status", "--target", running.target)
            assert code == 0
            assert f"store:        WARNING: {warning}" in out.splitlines()
            # However many times it is asked, an unchanged policy is logged once.
            for _ in range(3):
                store.check_eviction()
            assert _policy_warnings(caplog) == [warning]
            client.config_set("maxmemory-policy", "noeviction")
            assert wait_until(lambda: warnings() == [], 10)
            store.check_eviction()
            assert caplog.text.count("its warning is withdrawn") == 1
            assert _policy_warnings(caplog) == [warning]
    finally:
        client.close()


class _Killed(Exception):
    """Stands for a drainer killed between writing its Parquet files and trimming the queue."""


def test_a_drainer_killed_before_trimming_is_finished_once_in_a_shared_folder_and_named_alike_apart(
    tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    ns = namespace()
    settings: dict[str, object] = {"store": redis_server.url, "redis_namespace": ns}
    a, b = (start(tmp_path / name, offline_flush_interval_s=3600.0, **settings) for name in "ab")
    client = redis.Redis.from_url(redis_server.url)
    try:
        a_log, b_log = a.server.offline_log, b.server.offline_log
        assert a_log is not None and b_log is not None
        a.apply(dict(AD_IMPRESSIONS, pushConfig={"logOffline": True}))

        def killed(first: int, last: int) -> None:
            raise _Killed

        monkeypatch.setattr(a.server.store, "delete_offline", killed)

        def crash_after_writing(clicked: range) -> None:
            rows = [{"user_id": f"u{i}", "timestamp": iso(BASE), "clicked": i} for i in clicked]
            a.ingest.Push(rows_request({"ad_impressions": rows}))
            # Whichever server held the lease gave it up: a takes it.
            client.delete(f"{{{ns}}}:offline_lease")
            with pytest.raises(_Killed):
                a_log.flush()
            # The dead drainer's lease runs out.
            client.delete(f"{{{ns}}}:offline_lease")

        def files(name: str) -> dict[str, list[int]]:
            folder = tmp_path / name / "offline" / "ad_impressions"
            return {
                p.name: sorted(pq.read_table(p)["clicked"].to_pylist())
                for p in folder.glob("date=*/*.parquet")
            }

        # One shared folder: the next drainer finds the round's files and finishes that range, once.
        crash_after_writing(range(3))
        shared = OfflineLog(b.server.store, tmp_path / "a" / "offline", interval_s=3600.0)
        assert shared.flush() == 3
        assert list(files("a").values()) == [[0, 1, 2]]
        # Separate folders: the next drainer writes the round again, under the same file name.
        crash_after_writing(range(3, 6))
        assert b_log.flush() == 3
        [again] = [name for name in files("a") if files("a")[name] == [3, 4, 5]]
        assert files("b") == {again: [3, 4, 5]}
        assert b.server.store.count_offline() == 0
    finally:
        client.close()
        a.close()
        b.close()


def test_a_server_starting_on_a_shared_offline_folder_leaves_a_running_drainers_file_alone(
    tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings: dict[str, object] = {
        "store": redis_server.url,
        "redis_namespace": namespace(),
        "offline_flush_interval_s": 3600.0,
    }
    shared = tmp_path / "shared"
    a = start(shared, **settings)
    later: list[Running] = []
    try:
        a_log = a.server.offline_log
        assert a_log is not None
        a.apply(dict(AD_IMPRESSIONS, pushConfig={"logOffline": True}))
        rows = [{"user_id": f"u{i}", "timestamp": iso(BASE), "clicked": i} for i in range(3)]
        a.ingest.Push(rows_request({"ad_impressions": rows}))
        day = shared / "offline" / "ad_impressions" / "date=2026-11-25"
        day.mkdir(parents=True)
        # A drainer that died mid-round long ago left this, unmodified for three leases.
        dead = day / ".00000000000000000001-00000000000000000002.parquet.0123456789ab.tmp"
        dead.write_bytes(b"half a file")
        long_ago = time.time() - 3 * RedisStore.drain_lease_s
        os.utime(dead, (long_ago, long_ago))
        replace = os.replace

        def another_server_starts_then_rename(src: str | Path, dst: str | Path) -> None:
            # a's round has fsynced its temporary file and not yet renamed it: b starts on the folder now.
            if Path(src).parent == day and not later:
                later.append(start(shared, **settings))
            replace(src, dst)

        monkeypatch.setattr(os, "replace", another_server_starts_then_rename)
        assert a_log.flush() == 3
        monkeypatch.undo()
        assert later and not dead.exists()
        [written] = day.glob("*.parquet")
        assert sorted(pq.read_table(written)["clicked"].to_pylist()) == [0, 1, 2]
        assert not list(day.glob(".*.tmp"))
    finally:
        for running in later:
            running.close()
        a.close()


def test_a_leftover_too_young_to_remove_at_start_is_removed_once_old_enough(
    tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    with opened_store(tmp_path, {"store": redis_server.url, "redis_namespace": namespace()}) as store:
        # A short lease, so that "old enough" comes within the test.
        monkeypatch.setattr(store, "drain_lease_s", 1.0)
        day = tmp_path / "offline" / "ad_impressions" / "date=2026-11-25"
        day.mkdir(parents=True)
        young = day / ".00000000000000000001-00000000000000000002.parquet.0123456789ab.tmp"
        young.write_bytes(b"half a file of a drainer killed just before the start")
        log = OfflineLog(store, tmp_path / "offline", interval_s=3600.0)
        assert young.exists()
        assert log.flush() == 0
        assert young.exists()
        time.sleep(2.2)
        assert log.flush() == 0
        assert not young.exists()


def test_a_drainer_whose_lease_another_server_took_mid_round_stops_and_the_records_land_once(
    tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    ns = namespace()
    a = start(tmp_path / "data", store=redis_server.url, redis_namespace=ns, offline_flush_interval_s=3600.0)
    other = redis.Redis.from_url(redis_server.url)
    try:
        log = a.server.offline_log
        assert log is not None
        rows = [{"user_id": f"u{i}", "timestamp": iso(BASE), "clicked": i} for i in range(3)]
        for name in ("ad_impressions", "more_impressions"):
            a.apply(dict(AD_IMPRESSIONS, name=name, pushConfig={"logOffline": True}))
        a.ingest.Push(rows_request({"ad_impressions": rows, "more_impressions": rows}))
        replace = os.replace
        renamed: list[str] = []

        def stall_after_the_first_file(src: str | Path, dst: str | Path) -> None:
            # This drainer stalled past its lease after its first file: another server holds it now.
            replace(src, dst)
            renamed.append(str(dst))
            other.set(f"{{{ns}}}:offline_lease", "another server", px=60_000)

        monkeypatch.setattr(os, "replace", stall_after_the_first_file)
        assert log.flush() == 0
        monkeypatch.undo()
        # One file of the round's two, and every record still queued for the lease's holder.
        assert len(renamed) == 1
        assert other.xlen(f"{{{ns}}}:offline") == 2
        offline = tmp_path / "data" / "offline"
        assert not list(offline.glob("*/date=*/.*.tmp"))
        # The holder goes away (its lease expires); this server finishes the range, each record once.
        other.delete(f"{{{ns}}}:offline_lease")
        assert log.flush() == 6
        for name in ("ad_impressions", "more_impressions"):
            [written] = (offline / name).glob("date=*/*.parquet")
            assert sorted(pq.read_table(written)["clicked"].to_pylist()) == [0, 1, 2]
        assert other.xlen(f"{{{ns}}}:offline") == 0
    finally:
        other.close()
        a.close()
