"""A request id answers only the records it was first written with: sent again with others, it is refused."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pyarrow as pa
import pytest
from conftest import AD_IMPRESSIONS, EVERY_STORE, Running, features, rich_error, rows_request, scalar, start

from featurepush.v1 import ingest_service_pb2 as pb
from featurepush.v1 import registry_service_pb2
from featurepush_server.core.stores.base import BatchCounts, RowBatch
from featurepush_server.core.stores.rocksdb import FORMAT_KEY, FORMAT_VERSION, REQUEST, RocksDBStore

T0 = "2026-11-25T10:00:00Z"


def _impression(user: str, clicked: int, ts: str = T0) -> dict[str, object]:
    return {"user_id": user, "timestamp": ts, "clicked": clicked}


def _arrow(rows: list[dict[str, object]]) -> bytes:
    """The rows as one Arrow IPC stream of ad_impressions' schema."""
    table = pa.table(
        {
            "user_id": pa.array([r["user_id"] for r in rows], pa.string()),
            "timestamp": pa.array([r["timestamp"] for r in rows], pa.string()).cast(
                pa.timestamp("us", "UTC")
            ),
            "clicked": pa.array([r["clicked"] for r in rows], pa.int64()),
        }
    )
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=1):
            writer.write_batch(batch)
    return bytes(sink.getvalue())


def _clicked(running: Running, user: str) -> object:
    (result,) = features(running, "ad_impressions", {"user_id": user})
    return result.get("features", {}).get("clicked")


@EVERY_STORE
def test_a_request_id_sent_again_with_other_records_is_refused_and_writes_nothing(running: Running) -> None:
    first = rows_request({"ad_impressions": [_impression("u1", 1)]}, requestId="batch-7")
    assert not running.ingest.Push(first).replayed
    other = rows_request(
        {"ad_impressions": [_impression("u1", 5), _impression("u2", 6)]}, requestId="batch-7"
    )
    with pytest.raises(grpc.RpcError) as e:
        running.ingest.Push(other)
    code, _, reason = rich_error(e.value)
    assert code is grpc.StatusCode.FAILED_PRECONDITION and reason == "REQUEST_ID_REUSED"
    details = e.value.details() or ""
    assert "'batch-7'" in details and "nothing was written" in details
    assert _clicked(running, "u1") == "1" and _clicked(running, "u2") is None
    # The first records under their id are still a replay, and a fresh id writes the others.
    assert running.ingest.Push(first).replayed
    fresh = rows_request({"ad_impressions": [_impression("u1", 5)]}, requestId="batch-8")
    assert not running.ingest.Push(fresh).replayed
    assert _clicked(running, "u1") == "5"


@EVERY_STORE
def test_the_same_records_as_arrow_or_in_another_form_are_a_replay(running: Running) -> None:
    rows = [_impression("u1", 1), _impression("u2", 2), _impression("u3", 3)]
    first = running.ingest.Push(rows_request({"ad_impressions": rows}, requestId="same-records"))
    as_arrow = pb.PushRequest(request_id="same-records")
    as_arrow.records["ad_impressions"].arrow_ipc = _arrow(rows)
    again = running.ingest.Push(as_arrow)
    assert again.replayed and again.counts == first.counts
    # The same instant written another way is the same record.
    shifted = [_impression("u1", 1, "2026-11-25T12:00:00+02:00"), rows[1], rows[2]]
    assert running.ingest.Push(rows_request({"ad_impressions": shifted}, requestId="same-records")).replayed
    # Many rows out of key order, taken as Arrow or as rows alike.
    many = [_impression(f"m{(i * 37) % 500}", i) for i in range(500)]
    as_rows = rows_request({"ad_impressions": many}, requestId="many")
    assert not running.ingest.Push(as_rows).replayed
    many_arrow = pb.PushRequest(request_id="many")
    many_arrow.records["ad_impressions"].arrow_ipc = _arrow(many)
    assert running.ingest.Push(many_arrow).replayed
    # A value changed, a row dropped or one added: other records.
    for changed in ([rows[0], rows[1], _impression("u3", 4)], rows[:2], [*rows, _impression("u4", 4)]):
        with pytest.raises(grpc.RpcError) as e:
            running.ingest.Push(rows_request({"ad_impressions": changed}, requestId="same-records"))
        assert rich_error(e.value)[2] == "REQUEST_ID_REUSED"


@EVERY_STORE
def test_a_stream_batch_reusing_a_request_id_fails_alone(running: Running) -> None:
    def batch(seq: int, clicked: int) -> pb.PushStreamRequest:
        request = rows_request({"ad_impressions": [_impression("s1", clicked)]}, requestId="stream-1")
        return pb.PushStreamRequest(sequence_id=seq, request=request)

    acks = list(running.ingest.PushStream(iter([batch(1, 1), batch(2, 1), batch(3, 9)])))
    assert [a.WhichOneof("result") for a in acks] == ["response", "response", "error"]
    assert acks[1].response.replayed
    assert acks[2].error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert "stream-1" in acks[2].error.message
    assert _clicked(running, "s1") == "1"


@EVERY_STORE
def test_a_dry_run_reusing_a_request_id_is_refused_too(running: Running) -> None:
    running.ingest.Push(rows_request({"ad_impressions": [_impression("d1", 1)]}, requestId="dry-1"))
    request = rows_request({"ad_impressions": [_impression("d1", 2)]}, requestId="dry-1", dryRun=True)
    with pytest.raises(grpc.RpcError) as e:
        running.ingest.Push(request)
    assert rich_error(e.value)[2] == "REQUEST_ID_REUSED"


@EVERY_STORE
def test_the_same_records_replay_after_a_nullable_field_is_added(running: Running) -> None:
    few = [_impression("n1", 1), _impression("n2", 2)]
    # More rows than are encoded one by one, so that the column path writes them.
    many = [_impression(f"m{i}", i) for i in range(40)]
    as_arrow = pb.PushRequest(request_id="added-arrow")
    as_arrow.records["ad_impressions"].arrow_ipc = _arrow(few)
    sent = [
        rows_request({"ad_impressions": few}, requestId="added-few"),
        rows_request({"ad_impressions": many}, requestId="added-many"),
        as_arrow,
    ]
    firsts = [running.ingest.Push(request) for request in sent]
    fields = [
        *AD_IMPRESSIONS["schema"]["fields"],
        {"name": "country", "type": scalar("STRING"), "nullable": True},
    ]  # type: ignore[index]
    running.apply({**AD_IMPRESSIONS, "schema": {"fields": fields}})
    # Their stored form now holds the new field: a retry that met the change is still a replay.
    for request, first in zip(sent, firsts, strict=True):
        again = running.ingest.Push(request)
        assert again.replayed and again.counts == first.counts, request.request_id
    # Ids first used since the change are checked again.
    running.ingest.Push(rows_request({"ad_impressions": few}, requestId="after"))
    other = rows_request({"ad_impressions": [{**few[0], "country": "FR"}, few[1]]}, requestId="after")
    with pytest.raises(grpc.RpcError) as e:
        running.ingest.Push(other)
    assert rich_error(e.value)[2] == "REQUEST_ID_REUSED"


@EVERY_STORE
def test_a_request_id_sent_again_to_another_source_is_refused(running: Running) -> None:
    running.apply({**AD_IMPRESSIONS, "name": "other_impressions"})
    rows = [_impression("o1", 1)]
    running.ingest.Push(rows_request({"ad_impressions": rows}, requestId="one-source"))
    with pytest.raises(grpc.RpcError) as e:
        running.ingest.Push(rows_request({"other_impressions": rows}, requestId="one-source"))
    assert rich_error(e.value)[2] == "REQUEST_ID_REUSED"
    with pytest.raises(grpc.RpcError) as e:
        running.ingest.Push(
            rows_request({"ad_impressions": rows, "other_impressions": rows}, requestId="one-source")
        )
    assert rich_error(e.value)[2] == "REQUEST_ID_REUSED"


def _recreate(running: Running, name: str) -> None:
    """Delete a source, its rows with it, and apply the same definition again (a new store id)."""
    running.registry.DeleteSource(registry_service_pb2.DeleteSourceRequest(name=name))
    running.apply({**AD_IMPRESSIONS, "name": name})


@EVERY_STORE
def test_a_request_id_sent_again_after_its_source_was_recreated_writes_its_records(running: Running) -> None:
    # The first write's rows went with the deletion: answering from its record would say they are stored.
    push = rows_request({"ad_impressions": [_impression("r1", 3)]}, requestId="across-delete")
    assert not running.ingest.Push(push).replayed
    _recreate(running, "ad_impressions")
    assert _clicked(running, "r1") is None
    again = running.ingest.Push(push)
    assert not again.replayed and again.counts["ad_impressions"].written == 1
    assert _clicked(running, "r1") == "3"
    # Its record now answers for the rows written the second time.
    assert running.ingest.Push(push).replayed
    other = rows_request({"ad_impressions": [_impression("r1", 9)]}, requestId="across-delete")
    with pytest.raises(grpc.RpcError) as e:
        running.ingest.Push(other)
    assert rich_error(e.value)[2] == "REQUEST_ID_REUSED"
    assert _clicked(running, "r1") == "3"


@EVERY_STORE
def test_a_push_to_two_sources_one_of_them_recreated_is_written_again_whole(running: Running) -> None:
    running.apply({**AD_IMPRESSIONS, "name": "kept_impressions"})
    rows = [_impression("w1", 4)]
    push = rows_request({"ad_impressions": rows, "kept_impressions": rows}, requestId="two-sources")
    assert not running.ingest.Push(push).replayed
    _recreate(running, "ad_impressions")
    again = running.ingest.Push(push)
    assert not again.replayed
    assert again.counts["ad_impressions"].written == 1
    # The kept source's row is the same event: written again over itself.
    assert again.counts["kept_impressions"].accepted == 1
    assert _clicked(running, "w1") == "4"
    assert features(running, "kept_impressions", {"user_id": "w1"})[0]["features"]["clicked"] == "4"


def test_a_record_whose_fingerprint_names_sources_without_ids_replays_the_same_records(
    tmp_path: Path,
) -> None:
    # Fingerprints written before sources were named with their store ids ("name=fields|records"): the
    # same records sent again after an upgrade are a replay, other records are still refused.
    running = start(tmp_path / "data")
    try:
        running.apply(AD_IMPRESSIONS)
        push = rows_request({"ad_impressions": [_impression("v1", 2)]}, requestId="before-ids")
        running.ingest.Push(push)
        store = running.server.store
        raw = store._db.get(REQUEST + b"before-ids")
        record = json.loads(raw[8:])
        sources, _, records = record["#"].partition("|")
        record["#"] = (
            ",".join(s.split("#")[0] + "=" + s.split("=")[1] for s in sources.split(",")) + "|" + records
        )
        assert "#" not in record["#"]
        store._db.put(REQUEST + b"before-ids", raw[:8] + json.dumps(record).encode())
        assert running.ingest.Push(push).replayed
        other = rows_request({"ad_impressions": [_impression("v1", 7)]}, requestId="before-ids")
        with pytest.raises(grpc.RpcError) as e:
            running.ingest.Push(other)
        assert rich_error(e.value)[2] == "REQUEST_ID_REUSED"
    finally:
        running.close()


def test_a_record_is_replaced_only_where_its_fingerprint_is_the_one_named(tmp_path: Path) -> None:
    # Two senders that both found the record stale: the first replaces it, the second is a replay of that.
    store = RocksDBStore(tmp_path / "db")
    try:
        store.write_latest([_batch(b"k")], request_id="id", fingerprint="old")
        first = store.write_latest([_batch(b"k")], request_id="id", fingerprint="new", replace="old")
        assert not first.replayed
        second = store.write_latest([_batch(b"k")], request_id="id", fingerprint="new", replace="old")
        assert second.replayed and second.fingerprint == "new"
    finally:
        store.close()


def _batch(key: bytes, value: bytes = b"\x80" + bytes(7) + b"v") -> RowBatch:
    return RowBatch("clicks", [b"r\x00\x00\x00\x01" + key], [value])


def test_a_record_written_before_fingerprints_replays_whatever_is_sent(tmp_path: Path) -> None:
    # A format 3 directory: its records have no fingerprint, so any records sent again with its id are
    # answered from it, as they were when it was written.
    store = RocksDBStore(tmp_path / "db")
    try:
        store.write_latest([_batch(b"k")], request_id="old")
        raw = store._db.get(REQUEST + b"old")
        # As format 3 wrote it: the time, then the counts alone.
        store._db.put(REQUEST + b"old", raw[:8] + b'{"clicks": [1, 1, 0, 0]}')
        store._db.put(FORMAT_KEY, (3).to_bytes(4, "big"))
    finally:
        store.close()
    store = RocksDBStore(tmp_path / "db")
    try:
        assert int.from_bytes(store._db.get(FORMAT_KEY), "big") == FORMAT_VERSION == 4
        result = store.write_latest([_batch(b"other")], request_id="old", fingerprint="f" * 32)
        assert result.replayed and result.fingerprint == ""
        assert result.counts == {"clicks": BatchCounts(1, 1, 0, 0)}
        fresh = store.write_latest([_batch(b"k2")], request_id="new", fingerprint="a" * 32)
        assert not fresh.replayed
        assert store.write_latest([_batch(b"x")], request_id="new").fingerprint == "a" * 32
        assert store.seen_request("new") == {"clicks": BatchCounts(1, 1, 0, 0)}
    finally:
        store.close()
