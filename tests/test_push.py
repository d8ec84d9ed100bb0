"""Push behaviour on a real server: atomicity, dry runs, ordering, ttl, limits and error statuses."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pyarrow as pa
import pytest
from conftest import AD_IMPRESSIONS, BOTH_STORES, Running, features, rich_error, rows_request, scalar, start

from featurepush.v1 import ingest_service_pb2
from featurepush_server.core.stores.rocksdb import row_prefix

T0 = "2026-11-25T10:00:00Z"
T1 = "2026-11-25T11:00:00Z"

CLICKS = {
    "name": "clicks",
    "schema": {
        "fields": [
            {"name": "user_id", "type": scalar("INT64")},
            {"name": "page", "type": scalar("STRING")},
            {"name": "ts", "type": scalar("TIMESTAMP")},
            {"name": "n", "type": scalar("INT32")},
        ]
    },
    "entityKeys": ["user_id", "page"],
    "timestampField": "ts",
}


def impression(user: str, ts: str = T0, clicked: object = 1) -> dict[str, object]:
    return {"user_id": user, "timestamp": ts, "clicked": clicked}


def clicked(running: Running, user: str) -> object:
    [result] = features(running, "ad_impressions", {"user_id": user})
    return result.get("features", {}).get("clicked")


@BOTH_STORES
def test_push_then_get_returns_the_record_and_counts(running: Running) -> None:
    response = running.ingest.Push(
        rows_request({"ad_impressions": [impression("u1"), impression("u2", clicked=0)]})
    )
    counts = response.counts["ad_impressions"]
    assert (counts.accepted, counts.written, counts.superseded) == (2, 2, 0)
    results = features(running, "ad_impressions", {"user_id": "u1"}, {"user_id": "nobody"}, {"user_id": "u2"})
    assert results[0] == {
        "status": "FEATURE_STATUS_PRESENT",
        "eventTime": T0,
        "features": {"user_id": "u1", "timestamp": T0, "clicked": "1"},
    }
    assert results[1] == {"status": "FEATURE_STATUS_MISSING"}
    assert results[2]["features"]["clicked"] == "0"


@BOTH_STORES
def test_several_sources_in_one_request(running: Running) -> None:
    running.apply(CLICKS)
    response = running.ingest.Push(
        rows_request(
            {
                "ad_impressions": [impression("u1")],
                "clicks": [
                    {"user_id": 7, "page": "home", "ts": T0, "n": 3},
                    {"user_id": "7", "page": "cart", "ts": T0, "n": 4},
                ],
            }
        )
    )
    assert response.counts["ad_impressions"].written == 1
    assert response.counts["clicks"].written == 2
    got = features(running, "clicks", {"user_id": "7", "page": "cart"}, {"user_id": 7, "page": "home"})
    assert [r["features"]["n"] for r in got] == [4, 3]


@BOTH_STORES
def test_a_bad_record_in_one_source_writes_nothing_in_any(running: Running) -> None:
    running.apply(CLICKS)
    with pytest.raises(grpc.RpcError) as info:
        running.ingest.Push(
            rows_request(
                {
                    "ad_impressions": [impression("u1")],
                    "clicks": [{"user_id": 1, "page": "p", "ts": T0, "n": 2**31}],
                }
            )
        )
    code, violations, _ = rich_error(info.value)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert violations[0][0] == 'records["clicks"][0].n'
    assert clicked(running, "u1") is None


def test_one_bad_record_among_ten_thousand_writes_nothing(running: Running) -> None:
    rows = [impression(f"u{i}", clicked=i) for i in range(10_000)]
    rows[7_777]["clicked"] = 3.9
    with pytest.raises(grpc.RpcError) as info:
        running.ingest.Push(rows_request({"ad_impressions": rows}))
    code, violations, reason = rich_error(info.value)
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_RECORDS")
    assert violations == [
        (
            'records["ad_impressions"][7777].clicked',
            "expected an Int64, got the number 3.9, which is not a whole number",
        )
    ]
    results = features(running, "ad_impressions", *({"user_id": f"u{i}"} for i in range(0, 10_000, 97)))
    assert {r["status"] for r in results} == {"FEATURE_STATUS_MISSING"}


def test_every_violation_is_listed_up_to_the_cap(running: Running) -> None:
    rows = [impression(f"u{i}", clicked="x") for i in range(500)]
    with pytest.raises(grpc.RpcError) as info:
        running.ingest.Push(rows_request({"ad_impressions": rows}))
    _, violations, _ = rich_error(info.value)
    # Details ride in trailing metadata (8 KiB by default), so the list is bounded and says what it left out.
    listed = len(violations)
    assert 10 < listed <= 100
    assert [v[0] for v in violations] == [f'records["ad_impressions"][{i}].clicked' for i in range(listed)]
    assert info.value.details() == (
        f"500 invalid field values; nothing was written (500 violations in all, the first {listed} listed)"
    )


def test_the_message_counts_what_the_bad_request_lists(running: Running) -> None:
    """Where the violations fill the trailers before the core's cap, the message counts those listed."""
    row = impression("u1") | {f"unknown_{i:06d}": 1 for i in range(100_000)}
    with pytest.raises(grpc.RpcError) as info:
        running.ingest.Push(rows_request({"ad_impressions": [row]}))
    code, violations, reason = rich_error(info.value)
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_RECORDS")
    assert 0 < len(violations) < 100
    assert info.value.details() == (
        "100000 invalid field values; nothing was written "
        f"(100000 violations in all, the first {len(violations)} listed)"
    )


@BOTH_STORES
def test_dry_run_validates_and_writes_nothing(running: Running) -> None:
    response = running.ingest.Push(rows_request({"ad_impressions": [impression("u1")]}, dryRun=True))
    assert response.dry_run and response.counts["ad_impressions"].written == 1
    assert clicked(running, "u1") is None
    with pytest.raises(grpc.RpcError) as info:
        running.ingest.Push(rows_request({"ad_impressions": [impression("u1", clicked="no")]}, dryRun=True))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@BOTH_STORES
def test_an_older_event_never_overwrites_a_newer_one(running: Running) -> None:
    running.ingest.Push(rows_request({"ad_impressions": [impression("u1", T1, 5)]}))
    response = running.ingest.Push(rows_request({"ad_impressions": [impression("u1", T0, 9)]}))
    assert (response.counts["ad_impressions"].written, response.counts["ad_impressions"].superseded) == (0, 1)
    assert clicked(running, "u1") == "5"
    # An equal event time replaces, so a correction can land.
    running.ingest.Push(rows_request({"ad_impressions": [impression("u1", T1, 6)]}))
    assert clicked(running, "u1") == "6"


@BOTH_STORES
def test_within_a_batch_the_newest_event_per_entity_wins(running: Running) -> None:
    response = running.ingest.Push(
        rows_request(
            {
                "ad_impressions": [
                    impression("u1", T1, 1),
                    impression("u1", T0, 2),
                    impression("u2", T0, 3),
                    impression("u2", T0, 4),
                ]
            }
        )
    )
    counts = response.counts["ad_impressions"]
    assert (counts.accepted, counts.written, counts.superseded) == (4, 2, 2)
    assert (clicked(running, "u1"), clicked(running, "u2")) == ("1", "4")


@BOTH_STORES
def test_concurrent_pushes_keep_the_newest_event(running: Running) -> None:
    base = datetime(2026, 11, 25, tzinfo=UTC)

    def pusher(worker: int) -> None:
        for i in range(worker, 200, 4):
            ts = (base + timedelta(seconds=i)).isoformat().replace("+00:00", "Z")
            running.ingest.Push(rows_request({"ad_impressions": [impression("hot", ts, i)]}))

    threads = [threading.Thread(target=pusher, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert clicked(running, "hot") == "199"


@BOTH_STORES
def test_ttl_turns_rows_expired(tmp_path: Path, store_settings: dict[str, object]) -> None:
    running = start(tmp_path, **store_settings)
    try:
        running.apply({**AD_IMPRESSIONS, "onlineTtl": "3600s"})
        now = datetime.now(UTC)
        fresh = (now - timedelta(minutes=5)).isoformat().replace("+00:00", "Z")
        stale = (now - timedelta(minutes=90)).isoformat().replace("+00:00", "Z")
        running.ingest.Push(
            rows_request({"ad_impressions": [impression("fresh", fresh), impression("stale", stale)]})
        )
        results = features(running, "ad_impressions", {"user_id": "fresh"}, {"user_id": "stale"})
        assert results[0]["status"] == "FEATURE_STATUS_PRESENT"
        assert results[1]["status"] == "FEATURE_STATUS_EXPIRED"
        assert "features" not in results[1] and results[1]["eventTime"]
    finally:
        running.close()


@BOTH_STORES
def test_request_id_makes_a_retry_a_replay(running: Running) -> None:
    request = rows_request({"ad_impressions": [impression("u1", T0, 1)]}, requestId="batch-42")
    first = running.ingest.Push(request)
    assert not first.replayed
    running.ingest.Push(rows_request({"ad_impressions": [impression("u1", T1, 2)]}))
    again = running.ingest.Push(request)
    assert again.replayed and again.counts == first.counts
    assert clicked(running, "u1") == "2"


def _no_batches() -> bytes:
    """An Arrow IPC stream of ad_impressions' schema and no record batch."""
    schema = pa.schema(
        [("user_id", pa.string()), ("timestamp", pa.timestamp("us", "UTC")), ("clicked", pa.int64())]
    )
    sink = pa.BufferOutputStream()
    pa.ipc.new_stream(sink, schema).close()
    return bytes(sink.getvalue())


@pytest.mark.parametrize(
    "records",
    [
        {"ad_impressions": ingest_service_pb2.SourceRecords(arrow_ipc=_no_batches())},
        {
            "ad_impressions": ingest_service_pb2.SourceRecords(arrow_ipc=_no_batches()),
            "clicks": ingest_service_pb2.SourceRecords(),
        },
    ],
)
def test_an_arrow_push_of_no_rows_is_empty_as_a_row_push_is(
    running: Running, records: dict[str, ingest_service_pb2.SourceRecords]
) -> None:
    running.apply(CLICKS)
    with pytest.raises(grpc.RpcError) as info:
        running.ingest.Push(ingest_service_pb2.PushRequest(records=records))
    code, violations, reason = rich_error(info.value)
    assert (code, reason, violations) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "EMPTY_PUSH",
        [("records", "add at least one record for a source")],
    )


@pytest.mark.parametrize(
    ("request_json", "code", "reason", "words"),
    [
        ({}, grpc.StatusCode.INVALID_ARGUMENT, "EMPTY_PUSH", "no records"),
        ({"records": {"ad_impressions": {}}}, grpc.StatusCode.INVALID_ARGUMENT, "EMPTY_PUSH", "no records"),
        ({"records": {"nope": {"rows": [{"a": 1}]}}}, grpc.StatusCode.NOT_FOUND, "SOURCE_NOT_FOUND", "nope"),
        (
            {"records": {"ad_impressions": {"rows": [{}], "arrowIpc": "AAAA"}}},
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_RECORDS",
            "nothing was written",
        ),
        (
            {"records": {"ad_impressions": {"arrowIpc": "AAAA"}}},
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARROW",
            "Arrow IPC",
        ),
        (
            {"records": {"ad_impressions": {"rows": [{}]}}, "requestId": "x" * 129},
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
            "request_id",
        ),
    ],
)
def test_error_statuses(
    running: Running, request_json: dict[str, object], code: grpc.StatusCode, reason: str, words: str
) -> None:
    from google.protobuf import json_format

    with pytest.raises(grpc.RpcError) as info:
        running.ingest.Push(json_format.ParseDict(request_json, ingest_service_pb2.PushRequest()))
    got_code, _, got_reason = rich_error(info.value)
    assert (got_code, got_reason) == (code, reason)
    assert words in info.value.details()


def test_too_many_records_is_resource_exhausted_naming_the_limit(tmp_path: Path) -> None:
    running = start(tmp_path, max_records_per_request=5)
    try:
        running.apply(AD_IMPRESSIONS)
        with pytest.raises(grpc.RpcError) as info:
            running.ingest.Push(rows_request({"ad_impressions": [impression(f"u{i}") for i in range(6)]}))
        code, _, reason = rich_error(info.value)
        assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_RECORDS")
        assert "at most 5 records" in info.value.details()
    finally:
        running.close()


def test_get_features_rejects_bad_keys(running: Running) -> None:
    from conftest import keys_request

    with pytest.raises(grpc.RpcError) as info:
        running.online.GetFeatures(keys_request("ad_impressions", {"user_id": 5}, {"user": "x"}))
    code, violations, _ = rich_error(info.value)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v[0] for v in violations] == ["keys[0].user_id", "keys[1].user_id", "keys[1].user"]
    with pytest.raises(grpc.RpcError) as info:
        running.online.GetFeatures(keys_request("missing_source", {"user_id": "u"}))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_latest_wins_holds_when_the_in_memory_index_overflows(tmp_path: Path) -> None:
    running = start(tmp_path, latest_index_entries=3)
    try:
        running.apply(AD_IMPRESSIONS)
        users = [f"u{i}" for i in range(10)]
        running.ingest.Push(rows_request({"ad_impressions": [impression(u, T1, 1) for u in users]}))
        # The index keeps at most 3 keys, so most of these reads must go to the store.
        response = running.ingest.Push(
            rows_request({"ad_impressions": [impression(u, T0, 2) for u in users]})
        )
        assert response.counts["ad_impressions"].superseded == 10
        assert {clicked(running, u) for u in users} == {"1"}
    finally:
        running.close()


def test_the_expiry_sweep_deletes_expired_rows_and_keeps_fresh_ones(tmp_path: Path) -> None:
    from featurepush_server.core.expiry import ExpirySweeper

    running = start(tmp_path, expired_sweep_interval_s=0)
    try:
        running.apply({**AD_IMPRESSIONS, "onlineTtl": "3600s"})
        now = datetime.now(UTC)
        fresh = (now - timedelta(minutes=5)).isoformat().replace("+00:00", "Z")
        stale = (now - timedelta(hours=2)).isoformat().replace("+00:00", "Z")
        rows = [impression("fresh", fresh), *(impression(f"stale{i}", stale) for i in range(25))]
        running.ingest.Push(rows_request({"ad_impressions": rows}))
        assert (
            features(running, "ad_impressions", {"user_id": "stale0"})[0]["status"]
            == "FEATURE_STATUS_EXPIRED"
        )
        assert ExpirySweeper(running.server.store, 0).sweep() == 25
        results = features(running, "ad_impressions", {"user_id": "fresh"}, {"user_id": "stale0"})
        assert [r["status"] for r in results] == ["FEATURE_STATUS_PRESENT", "FEATURE_STATUS_MISSING"]
        # A deleted entity takes a new event again, however old the deleted one was.
        running.ingest.Push(rows_request({"ad_impressions": [impression("stale0", fresh, 5)]}))
        assert clicked(running, "stale0") == "5"
    finally:
        running.close()


def test_the_sweep_keeps_a_row_a_newer_event_replaced_after_the_scan(running: Running) -> None:
    store = running.server.store
    running.ingest.Push(rows_request({"ad_impressions": [impression("u1", T0, 1)]}))
    source = running.server.registry.get("ad_impressions")
    key = row_prefix(source.id) + b"u1"
    # The scan picked u1 as older than T1; then an event at T1 lands before the delete.
    running.ingest.Push(rows_request({"ad_impressions": [impression("u1", T1, 2)]}))
    cutoff = (int(datetime(2026, 11, 25, 10, 30, tzinfo=UTC).timestamp() * 1e6) + (1 << 63)).to_bytes(
        8, "big"
    )
    assert store._delete_if_older([key], cutoff) == 0
    assert clicked(running, "u1") == "2"
