"""Client.push with every data form, and the batching pusher: size and time batching, errors, restarts."""

from __future__ import annotations

import datetime as dt
import logging
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pandas as pd
import pyarrow as pa
import pytest
from conftest import (
    AD_IMPRESSIONS,
    Running,
    cancel_first_push_stream,
    refuse_writes,
    source_from_json,
    start,
)
from servers import wait_until

import featurepush.pusher
from featurepush import Client, FeatureStatus, InvalidArgumentError
from featurepush.payload import BatchFailure, PushBatchError
from featurepush.pusher import BatchBook, Pusher, check_sizes
from featurepush.v1 import ingest_service_pb2, registry_service_pb2
from featurepush_server.app import create_server
from featurepush_server.config import ServerConfig
from featurepush_server.core.errors import Aborted, Unavailable
from featurepush_server.core.stores.rocksdb import REQUEST

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
# Reconnect quickly after a restart; gRPC's default backoff starts at a second and grows to minutes.
FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 200),
]


def record(i: int, clicked: object = None) -> dict[str, object]:
    return {
        "user_id": f"u{i}",
        "timestamp": T0 + dt.timedelta(seconds=i),
        "clicked": i if clicked is None else clicked,
    }


@pytest.fixture
def client(running: Running) -> Client:
    with Client(running.target) as c:
        yield c  # type: ignore[misc]


def features(client: Client, n: int) -> list[object]:
    return [
        (r.status, r.features) for r in client.get_features("ad_impressions", [f"u{i}" for i in range(n)])
    ]


FORMS = {
    "dicts": lambda rows: rows,
    "table": lambda rows: pa.Table.from_pylist(rows),
    "record_batch": lambda rows: pa.RecordBatch.from_pylist(rows),
    "dataframe": lambda rows: pd.DataFrame(rows),
}


@pytest.mark.parametrize("form", list(FORMS))
def test_push_takes_every_data_form_and_they_land_alike(client: Client, form: str) -> None:
    rows = [record(i) for i in range(5)]
    result = client.push("ad_impressions", FORMS[form](rows))
    assert result.counts["ad_impressions"].written == 5
    assert features(client, 5) == [
        (FeatureStatus.PRESENT, {"user_id": f"u{i}", "timestamp": T0 + dt.timedelta(seconds=i), "clicked": i})
        for i in range(5)
    ]


def test_push_of_a_lossy_dataframe_is_rejected_by_row(client: Client) -> None:
    frame = pd.DataFrame([record(0), record(1, clicked=2.5)])
    with pytest.raises(InvalidArgumentError) as caught:
        client.push("ad_impressions", frame)
    assert [v.field for v in caught.value.violations] == ['records["ad_impressions"][1].clicked']


def test_pusher_batches_by_size_and_flushes_on_close(client: Client) -> None:
    with client.pusher("ad_impressions", max_rows=100, linger_ms=60_000) as p:
        p.add_many(record(i) for i in range(250))
    stats = p.stats
    assert (stats.batches, stats.records, stats.written, stats.failed_batches) == (3, 250, 250, 0)
    assert all(status == FeatureStatus.PRESENT for status, _ in features(client, 250))


def test_pusher_sends_a_lingering_batch_without_flush(client: Client) -> None:
    sent = threading.Event()
    with client.pusher("ad_impressions", max_rows=1000, linger_ms=5) as p:
        p.add(record(1))
        while p.stats.batches == 0:
            sent.wait(0.01)
        assert p.stats.records == 1


def test_rejected_batch_goes_to_on_error_with_its_records(client: Client) -> None:
    failures: list[BatchFailure] = []
    with client.pusher("ad_impressions", max_rows=3, linger_ms=60_000, on_error=failures.append) as p:
        p.add_many([record(0), record(1), record(2)])
        p.add_many([record(3), record(4, clicked=3.9), record(5)])
        p.add_many([record(6)])
    assert len(failures) == 1
    failure = failures[0]
    assert [r["user_id"] for r in failure.records] == ["u3", "u4", "u5"]
    assert isinstance(failure.error, InvalidArgumentError)
    assert [v.field for v in failure.error.violations] == ['records["ad_impressions"][1].clicked']
    assert failure.sequence_id == 1 and failure.request_id.endswith("-1")
    assert p.stats.written == 4 and p.stats.failed_records == 3


def test_rejected_batch_is_raised_by_close_without_a_callback(client: Client) -> None:
    p = client.pusher("ad_impressions", max_rows=2, linger_ms=60_000)
    p.add_many([record(0), record(1, clicked="many"), record(2)])
    with pytest.raises(PushBatchError) as caught:
        p.close()
    assert [f.sequence_id for f in caught.value.failures] == [0]
    assert features(client, 3)[2][0] == FeatureStatus.PRESENT


def test_add_refuses_a_record_that_is_not_a_mapping_at_once(client: Client) -> None:
    with client.pusher("ad_impressions") as p:
        with pytest.raises(TypeError, match="mapping"):
            p.add([("user_id", "u0")])  # type: ignore[arg-type]
        p.add(record(0))
    assert p.stats.records == 1 and p.stats.failed_batches == 0


def test_add_many_queues_in_order_up_to_a_record_that_is_not_a_mapping(client: Client) -> None:
    seen: list[int] = []

    def records() -> Iterator[object]:
        for i in range(3000):
            # The generator may ask the pusher while add_many draws from it.
            seen.append(p.stats.records)
            yield record(i)
        yield "not a record"
        yield record(3000)

    with client.pusher("ad_impressions", max_rows=1000, max_pending=1) as p:
        with pytest.raises(TypeError, match="mapping"):
            p.add_many(records())  # type: ignore[arg-type]
    assert p.stats.records == 3000 and len(seen) == 3000
    got = client.get_features("ad_impressions", [f"u{i}" for i in range(3001)])
    assert [r.features["clicked"] for r in got[:3000]] == list(range(3000))  # type: ignore[index]
    assert got[3000].status == FeatureStatus.MISSING


def test_a_batch_with_unencodable_values_fails_unsent_naming_each_and_the_stream_goes_on(
    client: Client,
) -> None:
    failures: list[BatchFailure] = []
    with client.pusher("ad_impressions", max_rows=4, on_error=failures.append) as p:
        p.add_many([record(0), record(1), record(2), record(3)])
        p.flush()
        naive = {**record(5), "timestamp": dt.datetime(2026, 1, 1)}
        bad = [record(4), naive, record(6, clicked=object()), {**record(7), 8: "x"}]
        # add() takes them: values are checked as their batch is built, off the caller's thread.
        p.add_many(bad)
        p.add_many([record(8), record(9)])
    [failure] = failures
    assert failure.records == bad and failure.sequence_id == 1
    assert isinstance(failure.error, InvalidArgumentError)
    assert failure.error.reason == "UNENCODABLE_RECORDS"
    assert failure.error.message == (
        "the batch was not sent: 3 value(s) cannot be encoded (see the violations); "
        "mend them and add the batch's records again"
    )
    violations = [(v.field, v.description) for v in failure.error.violations]
    assert violations[0] == (
        'records["ad_impressions"][1].timestamp',
        "datetime 2026-01-01T00:00:00 is naive; give it a timezone",
    )
    assert violations[1][0] == 'records["ad_impressions"][2].clicked'
    assert violations[1][1].startswith("cannot encode object <object object at")
    assert violations[2] == ('records["ad_impressions"][3]', "keys must be str, got int 8")
    assert (p.stats.batches, p.stats.records, p.stats.failed_batches, p.stats.failed_records) == (2, 6, 1, 4)
    got = features(client, 10)
    assert [status for status, _ in got] == [FeatureStatus.PRESENT] * 4 + [FeatureStatus.MISSING] * 4 + [
        FeatureStatus.PRESENT
    ] * 2


def test_on_error_runs_on_a_thread_of_its_own_and_may_add_records_again(client: Client) -> None:
    # With one batch in flight at most, a callback that adds records waits for an acknowledgement: run on
    # the thread that reads them, or on the one that feeds the stream, it would wait for ever.
    threads: list[str] = []
    pushers: list[Pusher] = []

    def fix(failure: BatchFailure) -> None:
        threads.append(threading.current_thread().name)
        fixed = []
        for r in failure.records:
            at, clicked = r["timestamp"], r["clicked"]
            assert isinstance(at, dt.datetime) and isinstance(clicked, int | float)
            fixed.append({**r, "timestamp": at.replace(tzinfo=dt.UTC), "clicked": int(clicked)})
        pushers[0].add_many(fixed)
        pushers[0].flush()  # a callback may flush too: it waits for batches, not for itself

    p = client.pusher("ad_impressions", max_rows=2, max_pending=1, on_error=fix)
    pushers.append(p)
    naive = {**record(1), "timestamp": dt.datetime(2026, 1, 1)}
    # The client refuses the first batch (a naive datetime), the server the second (3.9 for an Int64).
    p.add_many([record(0), naive, record(2), record(3, clicked=3.9), *[record(i) for i in range(4, 8)]])
    # flush() waits for on_error too; records a callback adds once close() has begun are refused.
    flusher = threading.Thread(target=p.flush, daemon=True)
    flusher.start()
    flusher.join(60)
    assert not flusher.is_alive()
    closer = threading.Thread(target=p.close, daemon=True)
    closer.start()
    closer.join(60)
    assert not closer.is_alive()
    assert threads == ["pusher-ad_impressions-on-error"] * 2
    assert p.stats.records == 8 and p.stats.failed_records == 4
    got = features(client, 8)
    assert [status for status, _ in got] == [FeatureStatus.PRESENT] * 8
    assert [f["clicked"] for _, f in got] == list(range(8))  # type: ignore[index]


def test_a_callback_that_blocks_holds_up_neither_lingering_records_nor_acknowledgements(
    client: Client,
) -> None:
    release = threading.Event()
    p = client.pusher("ad_impressions", max_rows=2, linger_ms=20, on_error=lambda failure: release.wait(60))
    try:
        p.add_many([record(0), record(1, clicked="x")])  # rejected: the callback blocks until released
        assert wait_until(lambda: p.stats.failed_batches == 1)
        p.add(record(2))  # one record: sent once its linger time is up, while the callback still waits
        assert wait_until(lambda: p.stats.records == 1)
        assert features(client, 3)[2][0] == FeatureStatus.PRESENT
    finally:
        release.set()
        p.close()


def test_flush_returns_once_on_error_has_had_every_failure(client: Client) -> None:
    failures: list[BatchFailure] = []

    def slow(failure: BatchFailure) -> None:
        time.sleep(0.2)
        failures.append(failure)

    with client.pusher("ad_impressions", max_rows=2, on_error=slow) as p:
        dated = {**record(3), "timestamp": dt.date(2026, 1, 1)}
        p.add_many([record(0), record(1, clicked="x"), record(2), dated])
        p.flush()
        assert sorted(f.sequence_id for f in failures) == [0, 1]


def test_an_unencodable_last_batch_is_raised_by_close_and_nothing_hangs(client: Client) -> None:
    p = client.pusher("ad_impressions", linger_ms=60_000)
    p.add({**record(0), "timestamp": dt.date(2026, 1, 1)})
    with pytest.raises(PushBatchError) as caught:
        p.close()
    [failure] = caught.value.failures
    assert isinstance(failure.error, InvalidArgumentError)
    assert [(v.field, v.description) for v in failure.error.violations] == [
        ('records["ad_impressions"][0].timestamp', "a date is not a timestamp; pass an aware datetime")
    ]
    assert features(client, 1)[0][0] == FeatureStatus.MISSING


def test_a_mapping_whose_methods_raise_fails_its_batch_not_the_stream(client: Client) -> None:
    class Broken(dict[str, object]):
        def items(self):  # type: ignore[no-untyped-def,override]
            raise RuntimeError("broken mapping")

    failures: list[BatchFailure] = []
    with client.pusher("ad_impressions", max_rows=2, on_error=failures.append) as p:
        p.add_many([record(0), Broken(record(1))])
        p.add_many([record(2), record(3)])
    [failure] = failures
    assert isinstance(failure.error, InvalidArgumentError)
    assert [(v.field, v.description) for v in failure.error.violations] == [
        ('records["ad_impressions"][1]', "cannot encode: RuntimeError: broken mapping")
    ]
    assert p.stats.records == 2 and p.stats.reconnects == 0


def test_close_returns_once_settled_not_when_the_linger_thread_next_wakes(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With nothing due the linger thread sleeps this long unless woken; close() must wake it.
    monkeypatch.setattr(featurepush.pusher, "IDLE_WAIT_S", 600.0)
    p = client.pusher("ad_impressions")
    p.add_many([record(i) for i in range(3)])
    p.flush()
    closer = threading.Thread(target=p.close, daemon=True)
    closer.start()
    closer.join(60)
    assert not closer.is_alive() and p.stats.records == 3


def test_pusher_resends_through_a_server_restart_without_doubling(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="featurepush.pusher")
    data_dir = tmp_path / "data"
    first = start(data_dir)
    first.registry.ApplySource(
        registry_service_pb2.ApplySourceRequest(source=source_from_json(AD_IMPRESSIONS))
    )
    port = first.server.port
    with Client(first.target, channel_options=FAST_RECONNECT) as client:
        # Batches are sealed by size alone: a short linger would seal a part-filled batch whenever adding
        # 50 records took longer than it, and the number of batches (and request ids) would vary.
        p = client.pusher(
            "ad_impressions", max_rows=50, linger_ms=60_000, backoff_initial_s=0.02, backoff_max_s=0.2
        )
        p.add_many(record(i) for i in range(200))
        p.flush()
        first.close()
        # These batches meet a dead server and must wait for the restarted one.
        p.add_many(record(i) for i in range(200, 400))
        # Start the new server only once the pusher has met the dead one, however fast it sends.
        deadline = time.monotonic() + 30
        while p.stats.reconnects == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        second = create_server(ServerConfig(listen=f"localhost:{port}", data_dir=data_dir))
        second.start()
        try:
            p.close()
            stats = p.stats
            counts = (stats.batches, stats.records, stats.accepted, stats.written, stats.failed_batches)
            assert counts == (8, 400, 400, 400, 0)
            assert stats.reconnects >= 1
            # Every retry says so at WARNING, with how long the batches have waited; the recovery once.
            messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            retries = [m for m in messages if "broke" in m]
            assert len(retries) == stats.reconnects
            assert all(
                re.fullmatch(
                    r"push stream to ad_impressions broke \(\w+\); retrying for \d+\.\ds, next in \d+\.\d\ds",
                    m,
                )
                for m in retries
            ), retries
            recovered = [m for m in messages if "recovered" in m]
            assert len(recovered) == 1 and recovered[0].startswith(
                "push stream to ad_impressions recovered after"
            )
            assert all(status == FeatureStatus.PRESENT for status, _ in features(client, 400))
            # One idempotency record per batch: no batch was written under two ids.
            db = second.store._db
            assert sum(1 for k in db.keys(from_key=REQUEST) if k.startswith(REQUEST)) == 8
        finally:
            second.stop(None)


def test_a_batch_not_written_for_now_is_resent_with_the_batches_after_it(
    client: Client, running: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The store owner restarting, then a definition changed while a batch was validated: neither wrote.
    owner_gone = Unavailable("the server's store process is not answering (it may be restarting)")
    changed = Aborted("push source 'ad_impressions' was changed", reason="SOURCE_CHANGED")
    refused = refuse_writes(running, monkeypatch, [owner_gone, owner_gone, changed])
    failures: list[BatchFailure] = []
    with client.pusher(
        "ad_impressions", max_rows=10, linger_ms=60_000, backoff_initial_s=0.01, on_error=failures.append
    ) as p:
        p.add_many(record(i) for i in range(60))
        p.flush()
        stats = p.stats
    assert failures == []
    assert (stats.batches, stats.records, stats.written, stats.failed_batches) == (6, 60, 60, 0)
    # Two batches in flight may both be refused before the stream is begun anew.
    assert 1 <= stats.reconnects <= 3
    assert len(refused) == 3
    # Each refused batch went again under its own request id: one idempotency record per batch.
    db = running.server.store._db
    ids = {k[len(REQUEST) :].decode() for k in db.keys(from_key=REQUEST) if k.startswith(REQUEST)}
    assert len(ids) == 6 and set(refused) <= ids
    assert all(status == FeatureStatus.PRESENT for status, _ in features(client, 60))


def test_a_batch_refused_past_the_retry_budget_fails_with_the_servers_status(
    client: Client, running: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    owner_gone = Unavailable("the server's store process is not answering (it may be restarting)")
    refuse_writes(running, monkeypatch, [owner_gone] * 1000)
    failures: list[BatchFailure] = []
    began = time.monotonic()
    with client.pusher(
        "ad_impressions",
        max_rows=10,
        linger_ms=60_000,
        backoff_initial_s=0.01,
        backoff_max_s=0.05,
        retry_timeout_s=0.3,
        on_error=failures.append,
    ) as p:
        p.add_many(record(i) for i in range(20))
        p.flush()
    assert time.monotonic() - began < 10
    assert sorted(r["user_id"] for f in failures for r in f.records) == sorted(f"u{i}" for i in range(20))
    assert {f.error.code for f in failures} == {grpc.StatusCode.UNAVAILABLE}
    assert "not answering" in failures[0].error.message


def test_a_resent_batch_is_replayed_not_written_again(client: Client, running: Running) -> None:
    with client.pusher("ad_impressions", max_rows=2, linger_ms=60_000) as p:
        p.add_many([record(0), record(1)])
        p.flush()
        sent = p._book  # the first batch's request id, as a resend would carry it
    request_id = f"{sent.stream_id}-0"
    again = client.push("ad_impressions", [record(0), record(1)], request_id=request_id)
    assert again.replayed and again.counts["ad_impressions"].written == 2


def _gone_server(data_dir: Path) -> tuple[str, int]:
    """The address and port of a server that applied ad_impressions over `data_dir`, then stopped."""
    first = start(data_dir)
    first.registry.ApplySource(
        registry_service_pb2.ApplySourceRequest(source=source_from_json(AD_IMPRESSIONS))
    )
    first.close()
    return first.target, first.server.port


def test_batches_grow_while_earlier_ones_wait_and_keep_their_order(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    target, port = _gone_server(data_dir)
    with Client(target, channel_options=FAST_RECONNECT) as client:
        p = client.pusher(
            "ad_impressions",
            eager_rows=10,
            max_rows=100,
            linger_ms=60_000,
            backoff_initial_s=0.02,
            backoff_max_s=0.2,
        )
        # With no server, no batch is acknowledged: the first two go at 10 records, then batches fill to 100.
        p.add_many(record(i) for i in range(270))
        sizes = [len(b.records) for b in p._book.in_order()]
        assert sizes == [10, 10, 100, 100] and len(p._book.buffer) == 50
        second = create_server(ServerConfig(listen=f"localhost:{port}", data_dir=data_dir))
        second.start()
        try:
            p.close()
            stats = p.stats
            assert (stats.batches, stats.records, stats.written, stats.failed_batches) == (5, 270, 270, 0)
            assert [f for f in features(client, 270)] == [
                (FeatureStatus.PRESENT, record(i)) for i in range(270)
            ]
            db = second.store._db
            assert sum(1 for k in db.keys(from_key=REQUEST) if k.startswith(REQUEST)) == 5
        finally:
            second.stop(None)


def test_a_lingering_buffer_waits_for_an_acknowledgement_while_two_batches_are_in_flight(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    target, port = _gone_server(data_dir)
    with Client(target, channel_options=FAST_RECONNECT) as client:
        p = client.pusher(
            "ad_impressions",
            eager_rows=1,
            max_rows=100,
            linger_ms=1,
            backoff_initial_s=0.02,
            backoff_max_s=0.2,
        )
        p.add_many(record(i) for i in range(52))
        # Fifty times the linger time: with two batches unacknowledged, the buffer is not sealed by time.
        threading.Event().wait(0.05)
        assert [len(b.records) for b in p._book.in_order()] == [1, 1] and len(p._book.buffer) == 50
        second = create_server(ServerConfig(listen=f"localhost:{port}", data_dir=data_dir))
        second.start()
        try:
            # The first acknowledgement seals the buffer, without flush or close.
            deadline = time.monotonic() + 30
            while p.stats.records < 52 and time.monotonic() < deadline:
                threading.Event().wait(0.01)
            assert (p.stats.batches, p.stats.records) == (3, 52)
            p.close()
        finally:
            second.stop(None)


def test_the_byte_budget_bounds_how_far_a_batch_grows() -> None:
    book = BatchBook("ad_impressions", max_rows=10_000, eager_rows=10, max_batch_bytes=20_000)
    ok = ingest_service_pb2.PushResponse()
    for sequence, size in enumerate((10, 100)):
        for i in range(size):
            book.append(record(i))
        batch = book.seal()
        assert batch is not None
        per_record = batch.message().ByteSize() // size
        book.acknowledge(ingest_service_pb2.PushStreamResponse(sequence_id=sequence, response=ok))
        # Ten records say nothing (their bytes are mostly the message's own); a hundred set the budget.
        assert book.grow_to == (10_000 if size == 10 else max(10, 20_000 // per_record))
    assert book.grow_to < 10_000
    # Two batches in flight: the buffer is sealed only at the budget's count of records.
    book.pending = {1: batch, 2: batch}
    for i in range(book.grow_to - 1):
        assert not book.append(record(i))
    assert book.append(record(0)) is True


def test_pusher_sizes_are_checked() -> None:
    with pytest.raises(ValueError, match="eager_rows"):
        check_sizes(max_rows=10, max_pending=1, linger_ms=0, eager_rows=0, max_batch_bytes=1)


def test_pusher_resends_a_stream_the_server_side_cancelled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """grpc fails a call reaching a server as it stops with a bare CANCELLED: the pusher sends it again."""
    cancelled = cancel_first_push_stream(monkeypatch)
    running = start(tmp_path / "data")
    try:
        running.registry.ApplySource(
            registry_service_pb2.ApplySourceRequest(source=source_from_json(AD_IMPRESSIONS))
        )
        failures: list[BatchFailure] = []
        with Client(running.target) as client:
            p = client.pusher(
                "ad_impressions",
                max_rows=50,
                linger_ms=60_000,
                backoff_initial_s=0.02,
                on_error=failures.append,
            )
            p.add_many(record(i) for i in range(100))
            p.close()
            assert cancelled and failures == []
            assert (p.stats.records, p.stats.written, p.stats.failed_batches) == (100, 100, 0)
            assert p.stats.reconnects >= 1
            assert all(status == FeatureStatus.PRESENT for status, _ in features(client, 100))
    finally:
        running.close()


def test_a_pusher_whose_channel_was_closed_fails_its_batches_and_closes(tmp_path: Path) -> None:
    running = start(tmp_path / "data")
    try:
        running.registry.ApplySource(
            registry_service_pb2.ApplySourceRequest(source=source_from_json(AD_IMPRESSIONS))
        )
        failures: list[BatchFailure] = []
        client = Client(running.target)
        p = client.pusher("ad_impressions", max_rows=50, linger_ms=60_000, on_error=failures.append)
        p.add_many(record(i) for i in range(50))
        p.flush()
        client.close()
        # No call can be made on the closed channel: the batch fails at once rather than retrying.
        p.add_many(record(i) for i in range(50, 100))
        closer = threading.Thread(target=p.close)
        closer.start()
        closer.join(30)
        assert not closer.is_alive()
        assert [f.error.code for f in failures] == [grpc.StatusCode.CANCELLED]
        assert "channel is closed" in failures[0].error.message
        assert [r["user_id"] for r in failures[0].records] == [record(i)["user_id"] for i in range(50, 100)]
        assert (p.stats.written, p.stats.failed_records) == (50, 50)
    finally:
        running.close()
