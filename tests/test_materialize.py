"""The one materialization step: writers plug in, pushes and backfills share it, and a fake store suffices."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import AD_IMPRESSIONS, Running, source_from_json

from featurepush_server.core import materialize
from featurepush_server.core.errors import Cancelled
from featurepush_server.core.materialize import (
    LatestRowWriter,
    Materializer,
    Origin,
    SourceRecords,
    Staged,
)
from featurepush_server.core.offline_log import OfflineLogWriter
from featurepush_server.core.registry import Registry, Source
from featurepush_server.core.stores.base import ROWS_FILES_INGESTED, BatchCounts, RowBatch, WriteResult
from featurepush_server.core.stores.rocksdb import RocksDBStore, write_rows_file


class _Recorder:
    """A writer that only notes what it was shown, as a metrics writer would."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, Origin, int]] = []

    def stage(self, staged: Staged) -> None:
        self.seen.append((staged.source.spec.name, staged.origin, staged.table.num_rows))


class _FakeRows:
    """The LatestRows protocol in a dict: last write wins, which is all these tests need of it."""

    def __init__(self) -> None:
        self.rows: dict[bytes, bytes] = {}
        self.batches: list[RowBatch] = []

    def row_prefix(self, source_id: int) -> bytes:
        return f"{source_id}/".encode()

    def write_latest(
        self,
        batches: Sequence[RowBatch],
        *,
        request_id: str = "",
        fingerprint: str = "",
        dry_run: bool = False,
        replace: str = "",
    ) -> WriteResult:
        self.batches += batches
        for b in batches if not dry_run else ():
            self.rows.update(zip(b.keys, b.values, strict=True))
        return WriteResult({b.source: BatchCounts(len(b.keys), len(b.keys), 0) for b in batches})

    def rows_file(self, keys: Sequence[bytes], values: Sequence[bytes]) -> str:
        return ""

    def read(self, keys: list[bytes]) -> list[bytes | None]:
        return [self.rows.get(k) for k in keys]

    def delete_expired(self, source_id: int, cutoff_micros: int) -> int:
        return 0

    def has_rows(self, source_id: int) -> bool:
        return any(k.startswith(self.row_prefix(source_id)) for k in self.rows)


LOGGED = {**AD_IMPRESSIONS, "name": "logged", "pushConfig": {"logOffline": True}}


def _table(users: list[str], clicked: int) -> pa.Table:
    when = dt.datetime(2026, 11, 25, 10, tzinfo=dt.UTC)
    return pa.table(
        {
            "user_id": pa.array(users, pa.string()),
            "timestamp": pa.array([when] * len(users), pa.timestamp("us", tz="UTC")),
            "clicked": pa.array([clicked] * len(users), pa.int64()),
        }
    )


@pytest.fixture
def core(tmp_path: Path) -> Iterator[tuple[RocksDBStore, Registry]]:
    """A store and registry of their own, with no background flusher to empty the offline queue."""
    store = RocksDBStore(tmp_path / "db", fsync=False)
    registry = Registry(store)
    registry.apply(source_from_json(LOGGED))
    try:
        yield store, registry
    finally:
        store.close()


def test_writers_see_pushes_and_backfills_and_only_pushes_are_logged(
    core: tuple[RocksDBStore, Registry],
) -> None:
    store, registry = core
    recorder = _Recorder()
    step = Materializer(store, [LatestRowWriter(store), OfflineLogWriter(), recorder])
    logged = registry.get("logged")
    pushed = step.write([SourceRecords(logged, _table(["a", "b"], 1))], origin=Origin.PUSH)
    assert pushed.counts == {"logged": BatchCounts(2, 2, 0)}
    queued = store.queued_offline(1 << 30)
    assert [(q.source, pa.ipc.open_stream(q.arrow_ipc).read_all().num_rows) for q in queued] == [
        ("logged", 2)
    ]
    backfilled = step.write([SourceRecords(logged, _table(["c"], 2))], origin=Origin.BACKFILL)
    assert backfilled.counts == {"logged": BatchCounts(1, 1, 0)}
    # A backfill reads history, often the offline log itself: logging it again would duplicate it.
    assert len(store.queued_offline(1 << 30)) == 1
    assert recorder.seen == [("logged", Origin.PUSH, 2), ("logged", Origin.BACKFILL, 1)]
    prefix = store.row_prefix(logged.id)
    assert all(v is not None for v in store.read([prefix + b"a", prefix + b"b", prefix + b"c"]))
    # A dry run stages through every writer but writes nothing, and logs nothing.
    dry = step.write([SourceRecords(logged, _table(["d"], 3))], origin=Origin.PUSH, dry_run=True)
    assert dry.counts == {"logged": BatchCounts(1, 1, 0)}
    assert store.read([prefix + b"d"]) == [None] and len(store.queued_offline(1 << 30)) == 1


class _FileTakingStore(RocksDBStore):
    """The store as a front or backfill worker reaches it with `serve --processes`: it builds rows files."""

    def rows_file(self, keys: Sequence[bytes], values: Sequence[bytes]) -> str:
        return write_rows_file(self.rows_folder, keys, values)


def test_only_a_large_backfill_write_goes_as_a_rows_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(materialize, "ROWS_FILE_MIN_ROWS", 3)
    store = _FileTakingStore(tmp_path / "db", fsync=False)
    try:
        registry = Registry(store)
        registry.apply(source_from_json(LOGGED))
        logged = registry.get("logged")
        step = Materializer(store, [LatestRowWriter(store), OfflineLogWriter()])

        def write(users: list[str], origin: Origin, dry_run: bool = False) -> int | None:
            step.write([SourceRecords(logged, _table(users, 1))], origin=origin, dry_run=dry_run)
            return store.statistic(ROWS_FILES_INGESTED)

        assert write(["a", "b"], Origin.BACKFILL) == 0  # below the bound
        assert write(["a", "b", "c"], Origin.PUSH) == 0  # a push: its offline entry goes in the same write
        assert write(["d", "e", "f"], Origin.BACKFILL, dry_run=True) == 0
        assert write(["g", "h", "i"], Origin.BACKFILL) == 1
        prefix = store.row_prefix(logged.id)
        assert all(store.read([prefix + u.encode() for u in "abcghi"]))
        assert store.read([prefix + b"d"]) == [None]
        assert not list(store.rows_folder.iterdir())
    finally:
        store.close()


def _source(running: Running, name: str) -> Source:
    return running.server.registry.get(name)


def test_a_fake_store_takes_the_same_write(running: Running) -> None:
    fake = _FakeRows()
    source = _source(running, "ad_impressions")
    step = Materializer(fake, [LatestRowWriter(fake), OfflineLogWriter()])
    result = step.write([SourceRecords(source, _table(["u1"], 3))], origin=Origin.PUSH, request_id="r1")
    assert result.counts == {"ad_impressions": BatchCounts(1, 1, 0)}
    # The rows the fake holds are the bytes the real store would hold for the same records.
    real = Materializer(running.server.store, [LatestRowWriter(running.server.store)])
    real.write([SourceRecords(source, _table(["u1"], 3))], origin=Origin.PUSH)
    key = running.server.store.row_prefix(source.id) + b"u1"
    assert fake.read([fake.row_prefix(source.id) + b"u1"]) == running.server.store.read([key])
    assert fake.batches[0].source_id == source.id and fake.batches[0].generation == source.generation


def test_a_stop_after_staging_writes_nothing(running: Running) -> None:
    fake = _FakeRows()
    step = Materializer(fake, [LatestRowWriter(fake)])
    records = [SourceRecords(_source(running, "ad_impressions"), _table(["u1"], 3))]
    with pytest.raises(Cancelled, match="nothing was written"):
        step.write(records, origin=Origin.PUSH, stop=lambda: True)
    assert fake.batches == [] and fake.rows == {}
