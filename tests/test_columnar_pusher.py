"""Pushers send batches as Arrow where the schema takes them; rejections come worded by the row rules."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest
from conftest import Running

from featurepush import Client, InvalidArgumentError
from featurepush import types as t
from featurepush.aio import AsyncClient
from featurepush.definitions import StreamSource
from featurepush.payload import SMALL_PUSH_ROWS, BatchFailure, PushBatchError, PushSchema
from featurepush.pusher import _Batch

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
FIELDS = [t.Field("user_id", t.String), t.Field("timestamp", t.Timestamp), t.Field("clicked", t.Int64)]


def rows(n: int, bad_at: int | None = None) -> list[dict[str, object]]:
    return [
        {"user_id": f"u{i}", "timestamp": T0 + dt.timedelta(seconds=i), "clicked": 1.5 if i == bad_at else i}
        for i in range(n)
    ]


def test_pusher_batches_land_and_a_rejected_batch_carries_the_row_rules_answer(running: Running) -> None:
    failures: list[BatchFailure] = []
    with Client(running.target) as client:
        # Batches of more than SMALL_PUSH_ROWS records, which go as Arrow.
        good, bad = rows(60), rows(20, bad_at=3)
        with client.pusher("ad_impressions", max_rows=20, on_error=failures.append) as pusher:
            for record in good:
                pusher.add(record)
            pusher.flush()
            pusher.add_many(bad)
        assert pusher.stats.records == 60 and pusher.stats.failed_records == 20
        [failure] = failures
        assert failure.records == bad
        assert isinstance(failure.error, InvalidArgumentError)
        assert [(v.field, v.description) for v in failure.error.violations] == [
            (
                'records["ad_impressions"][3].clicked',
                "expected an Int64, got the number 1.5, which is not a whole number",
            )
        ]
        results = client.get_features("ad_impressions", [f"u{i}" for i in range(60)])
        assert [r.features["clicked"] for r in results if r.features] == list(range(60))


def test_pusher_resends_an_arrow_batch_refused_for_a_stale_schema_as_rows(running: Running) -> None:
    with Client(running.target) as client:
        client.apply(StreamSource("changing", FIELDS, ["user_id"], "timestamp"))
        client.get_source("changing")
        with client.pusher("changing", max_rows=20) as pusher:
            pusher.add_many(rows(20))
            pusher.flush()
            # Another client makes clicked a String: batches built by the cached schema are refused as
            # Arrow, then resent as rows, which the new schema takes.
            with Client(running.target) as other:
                other.delete_source("changing")
                fields = [*FIELDS[:2], t.Field("clicked", t.String)]
                other.apply(StreamSource("changing", fields, ["user_id"], "timestamp"))
            pusher.add_many({**r, "clicked": str(r["clicked"])} for r in rows(20))
        assert pusher.stats.records == 40 and pusher.stats.failed_batches == 0


def test_a_schema_known_batch_with_unencodable_values_fails_unsent_in_both_pushers(running: Running) -> None:
    naive = {"user_id": "u1", "timestamp": dt.datetime(2026, 1, 1), "clicked": 1}
    # More than SMALL_PUSH_ROWS records, which the client tries as Arrow first.
    batch = [*rows(SMALL_PUSH_ROWS), naive, {"user_id": "u2", "timestamp": T0, "clicked": object()}]
    at = SMALL_PUSH_ROWS
    expected = [
        (f'records["ad_impressions"][{at}].timestamp', "datetime 2026-01-01T00:00:00 is naive"),
        (f'records["ad_impressions"][{at + 1}].clicked', "cannot encode object"),
    ]

    def check(failures: list[BatchFailure], stats_failed: int) -> None:
        [failure] = failures
        assert failure.records == batch and stats_failed == len(batch)
        assert isinstance(failure.error, InvalidArgumentError)
        violations = failure.error.violations
        assert len(violations) == 2
        got = [(v.field, v.description[: len(d)]) for v, (_, d) in zip(violations, expected, strict=True)]
        assert got == expected

    failures: list[BatchFailure] = []
    with Client(running.target) as client:
        with client.pusher("ad_impressions", max_rows=len(batch), on_error=failures.append) as pusher:
            pusher.add_many(batch)
            pusher.add_many(rows(3))
        check(failures, pusher.stats.failed_records)
        assert pusher.stats.records == 3

    async def main() -> None:
        async_failures: list[BatchFailure] = []
        async with AsyncClient(running.target) as client:
            async with client.pusher(
                "ad_impressions", max_rows=len(batch), on_error=async_failures.append
            ) as pusher:
                await pusher.add_many(batch)
                await pusher.add_many(rows(3))
                with pytest.raises(TypeError, match="mapping"):
                    await pusher.add("u9")  # type: ignore[arg-type]
            check(async_failures, pusher.stats.failed_records)
            assert pusher.stats.records == 3
            last = client.pusher("ad_impressions", linger_ms=60_000)
            await last.add(naive)
            with pytest.raises(PushBatchError):
                await last.close()

    asyncio.run(main())


def test_async_client_has_the_clients_surface(running: Running) -> None:
    async def main() -> None:
        async with AsyncClient(running.target) as client:
            [applied] = await client.apply(StreamSource("async_src", FIELDS, ["user_id"], "timestamp"))
            assert applied.created
            assert (await client.get_source("async_src")).schema == tuple(FIELDS)
            assert [s.name async for s in client.list_sources(page_size=1)] == ["ad_impressions", "async_src"]
            assert (await client.push("async_src", rows(3))).counts["async_src"].accepted == 3
            with pytest.raises(InvalidArgumentError) as caught:
                await client.push("async_src", rows(3, bad_at=1))
            assert caught.value.violations[0].field == 'records["async_src"][1].clicked'
            failures: list[BatchFailure] = []
            async with client.pusher("async_src", max_rows=4, on_error=failures.append) as pusher:
                await pusher.add_many(rows(10))
                await pusher.flush()
                await pusher.add_many(rows(2, bad_at=0))
            assert pusher.stats.records == 10
            assert failures[0].error.violations[0].field == 'records["async_src"][0].clicked'  # type: ignore[attr-defined]
            assert await client.delete_source("async_src") == 10
            with pytest.raises(Exception, match="batch"):
                await client.backfill("ad_impressions")
            with pytest.raises(Exception, match="batch"):
                [b async for b in client.read_batch_source("ad_impressions")]

    asyncio.run(main())


def test_a_short_batch_goes_as_structs_and_a_longer_one_as_arrow() -> None:
    """A batch of a few records costs less as Structs, to the client and the server, as with Client.push."""
    schema = PushSchema.of(FIELDS)
    short = _Batch("s", 0, "r0", rows(SMALL_PUSH_ROWS), lambda: schema)
    longer = _Batch("s", 1, "r1", rows(SMALL_PUSH_ROWS + 1), lambda: schema)
    assert len(short.message().request.records["s"].rows) == SMALL_PUSH_ROWS and not short.columnar
    assert longer.message().request.records["s"].arrow_ipc and longer.columnar


def test_both_clients_send_a_few_records_as_structs(running: Running) -> None:
    few, more = rows(SMALL_PUSH_ROWS), rows(SMALL_PUSH_ROWS + 1)
    with Client(running.target) as client:
        assert client._push_schema("ad_impressions", few) is None
        assert client._push_schema("ad_impressions", more) is not None

    async def main() -> None:
        async with AsyncClient(running.target) as client:
            assert await client._push_schema("ad_impressions", few) is None
            assert await client._push_schema("ad_impressions", more) is not None

    asyncio.run(main())
