"""The asyncio client on a real server: push, get_features and the batching pusher."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import grpc
import pyarrow as pa
import pytest
from conftest import AD_IMPRESSIONS, VIEW_STORES, Running, cancel_first_push_stream, source_from_json, start

import featurepush.aio
from featurepush import (
    Aggregate,
    FeatureService,
    FeatureStatus,
    Field,
    Int64,
    InvalidArgumentError,
    NotFoundError,
    StreamFeatureView,
)
from featurepush.aio import AsyncClient
from featurepush.payload import BatchFailure, PushBatchError
from featurepush.pusher import PusherStats
from featurepush.v1 import registry_service_pb2
from featurepush_server.core.errors import Unavailable

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def record(i: int, clicked: object = None) -> dict[str, object]:
    return {"user_id": f"u{i}", "timestamp": T0, "clicked": i if clicked is None else clicked}


async def push_through_retries(target: str, n: int, failures: list[BatchFailure]) -> PusherStats:
    """Push n records in batches of 10 through a pusher that had to retry; each must read back PRESENT."""
    async with AsyncClient(target) as client:
        async with client.pusher(
            "ad_impressions", max_rows=10, linger_ms=60_000, backoff_initial_s=0.01, on_error=failures.append
        ) as p:
            await p.add_many(record(i) for i in range(n))
        assert p.stats.reconnects >= 1
        results = await client.get_features("ad_impressions", [f"u{i}" for i in range(n)])
        assert all(r.status == FeatureStatus.PRESENT for r in results)
    return p.stats


def test_push_and_get_features(running: Running) -> None:
    async def scenario() -> None:
        async with AsyncClient(running.target) as client:
            rows = await client.push("ad_impressions", [record(0), record(1)])
            columns = await client.push("ad_impressions", pa.Table.from_pylist([record(2)]))
            assert (
                rows.counts["ad_impressions"].written == 2 and columns.counts["ad_impressions"].written == 1
            )
            results = await client.get_features("ad_impressions", ["u0", "u2", "nobody"])
            assert [r.status for r in results] == [FeatureStatus.PRESENT] * 2 + [FeatureStatus.MISSING]
            assert results[1].features == record(2)
            try:
                await client.push("ad_impressions", [record(3, clicked=1.5)])
            except InvalidArgumentError as e:
                assert [v.field for v in e.violations] == ['records["ad_impressions"][0].clicked']
            else:
                raise AssertionError("a lossy push was accepted")

    asyncio.run(scenario())


def test_pusher_batches_reports_failures_and_flushes_on_close(running: Running) -> None:
    failures: list[BatchFailure] = []

    async def scenario() -> None:
        async with AsyncClient(running.target) as client:
            async with client.pusher(
                "ad_impressions", max_rows=10, linger_ms=60_000, on_error=failures.append
            ) as p:
                await p.add_many(record(i) for i in range(25))
                await p.add_many([record(25, clicked="x")] + [record(i) for i in range(26, 30)])
                await p.add_many(record(i) for i in range(30, 35))
            assert (p.stats.batches, p.stats.written, p.stats.failed_records) == (3, 25, 10)
            results = await client.get_features("ad_impressions", [f"u{i}" for i in range(35)])
            present = [r.status == FeatureStatus.PRESENT for r in results]
            assert present == [True] * 20 + [False] * 10 + [True] * 5

    asyncio.run(scenario())
    assert len(failures) == 1 and [r["user_id"] for r in failures[0].records] == [
        f"u{i}" for i in range(20, 30)
    ]


def test_pusher_resends_a_batch_not_written_for_now(
    running: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The store owner restarting answers a batch UNAVAILABLE without writing it; the stream itself is fine.
    store = running.server.store
    write = store.write_latest
    refused: list[str] = []

    def flaky(batches: object, *, request_id: str = "", **rest: object) -> object:
        if len(refused) < 2:
            refused.append(request_id)
            raise Unavailable("the server's store process is not answering (it may be restarting)")
        return write(batches, request_id=request_id, **rest)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "write_latest", flaky)
    failures: list[BatchFailure] = []

    stats = asyncio.run(push_through_retries(running.target, 40, failures))
    assert (stats.batches, stats.written, stats.failed_batches) == (4, 40, 0)
    assert failures == [] and len(refused) == 2


def test_pusher_raises_failures_on_close_without_a_callback(running: Running) -> None:
    async def scenario() -> None:
        async with AsyncClient(running.target) as client:
            p = client.pusher("ad_impressions", max_rows=1, linger_ms=1)
            await p.add(record(0, clicked=True))
            await p.add(record(1))
            try:
                await p.close()
            except PushBatchError as e:
                assert [f.sequence_id for f in e.failures] == [0]
            else:
                raise AssertionError("close did not raise the failed batch")
            assert p.stats.written == 1

    asyncio.run(scenario())


def test_pusher_sends_lingering_records(running: Running) -> None:
    async def scenario() -> None:
        async with AsyncClient(running.target) as client:
            async with client.pusher("ad_impressions", max_rows=100, linger_ms=5) as p:
                await p.add(record(7))
                while p.stats.batches == 0:
                    await asyncio.sleep(0.01)

    asyncio.run(scenario())


def test_pusher_close_returns_once_settled_not_when_the_linger_task_next_wakes(
    running: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With nothing due the linger task sleeps this long unless woken; close() must wake it.
    monkeypatch.setattr(featurepush.aio, "IDLE_WAIT_S", 600.0)

    async def scenario() -> None:
        async with AsyncClient(running.target) as client:
            p = client.pusher("ad_impressions")
            p.start()
            await p.add_many([record(i) for i in range(3)])
            await p.flush()
            await asyncio.wait_for(p.close(), 60)
            assert p.stats.records == 3

    asyncio.run(scenario())


@VIEW_STORES
def test_apply_read_and_delete_a_view(running: Running) -> None:
    hour = dt.timedelta(hours=1)
    clicks = StreamFeatureView(
        name="clicks",
        source="ad_impressions",
        entities=["user_id"],
        schema=[Field("clicked", Int64)],
        aggregations=[Aggregate("clicked", "count", hour), Aggregate("clicked", "sum", hour)],
        aggregation_interval=dt.timedelta(minutes=1),
    )
    now = dt.datetime.now(dt.UTC)
    later = now + dt.timedelta(minutes=2)

    async def scenario() -> None:
        async with AsyncClient(running.target) as client:
            [created] = await client.apply_views(clicks)
            [unchanged] = await client.apply_views(clicks)
            assert (created.created, unchanged.changed) == (True, False)
            await client.push(
                "ad_impressions", [{"user_id": "u", "timestamp": now, "clicked": c} for c in (2, 3)]
            )
            [seen, unseen] = await client.get_view_features(
                [{"user_id": "u"}, {"user_id": "nobody"}], view="clicks", as_of=later
            )
            assert {name: (v.status, v.value) for name, v in seen.items()} == {
                "clicked_count_1h": ("PRESENT", 2),
                "clicked_sum_1h": ("PRESENT", 5),
            }
            assert unseen["clicked_sum_1h"].status == "MISSING" and unseen["clicked_sum_1h"].value is None
            await client.apply_views(FeatureService(name="ranking", features=[clicks]))
            [served] = await client.get_view_features(["u"], service="ranking", as_of=later)
            assert served["clicks.clicked_sum_1h"].value == 5
            await client.delete_service("ranking")
            assert await client.delete_view("clicks") >= 1
            try:
                await client.get_view_features([{"user_id": "u"}], view="clicks")
            except NotFoundError:
                pass
            else:
                raise AssertionError("a deleted view was read")

    asyncio.run(scenario())


def test_pusher_resends_a_stream_the_server_side_cancelled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cancelled = cancel_first_push_stream(monkeypatch)
    running = start(tmp_path / "data")
    failures: list[BatchFailure] = []
    try:
        running.registry.ApplySource(
            registry_service_pb2.ApplySourceRequest(source=source_from_json(AD_IMPRESSIONS))
        )
        stats = asyncio.run(push_through_retries(running.target, 20, failures))
    finally:
        running.close()
    assert (stats.records, stats.written, stats.failed_batches) == (20, 20, 0)
    assert cancelled and failures == []


def test_a_pusher_whose_channel_was_closed_fails_its_batches_and_closes(running: Running) -> None:
    failures: list[BatchFailure] = []

    async def scenario() -> None:
        client = AsyncClient(running.target)
        p = client.pusher("ad_impressions", max_rows=10, linger_ms=60_000, on_error=failures.append)
        await p.add_many(record(i) for i in range(10))
        await p.flush()
        await client.close()
        # No call can be made on the closed channel: the batch fails at once rather than retrying.
        await p.add_many(record(i) for i in range(10, 20))
        await asyncio.wait_for(p.close(), 30)
        assert (p.stats.written, p.stats.failed_records) == (10, 10)

    asyncio.run(scenario())
    assert [f.error.code for f in failures] == [grpc.StatusCode.CANCELLED]
    assert "channel is closed" in failures[0].error.message
    assert [r["user_id"] for r in failures[0].records] == [f"u{i}" for i in range(10, 20)]


def test_a_status_grpc_lost_to_a_write_after_the_servers_end_is_a_broken_stream() -> None:
    """grpc.aio reports INTERNAL in place of the server's status when a write follows the end of the call."""
    empty = grpc.aio.Metadata()
    lost = grpc.aio.AioRpcError(
        grpc.StatusCode.INTERNAL,
        empty,
        empty,
        details="Internal error from Core",
        debug_error_string='Failed "execute_batch": (SendMessageOperation,)',
    )
    error = featurepush.aio._stream_error(lost)
    assert error.code == grpc.StatusCode.UNAVAILABLE and "execute_batch" in error.message
    # The server's own INTERNAL stays what it is: resending would only fail again.
    own = grpc.aio.AioRpcError(grpc.StatusCode.INTERNAL, empty, empty, details="the server failed")
    assert featurepush.aio._stream_error(own).code == grpc.StatusCode.INTERNAL
