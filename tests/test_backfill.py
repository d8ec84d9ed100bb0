"""Backfill: the push path's validation and latest-by-event-time rule, rejections reported, idempotent."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import Running, start
from test_batch_source import DAY0, history, source_doc

from featurepush import Client, InvalidArgumentError
from featurepush.batch import BackfillProgress, backfill
from featurepush_server.workers import BackfillWorkers


def apply_parquet(tmp_path: Path, table: pa.Table) -> Running:
    """A server whose ad_impressions source reads `table` from Parquet."""
    pq.write_table(table, tmp_path / "h.parquet")
    running = start(tmp_path / "data", batch_roots=(tmp_path,))
    running.apply(source_doc(str(tmp_path / "h.parquet"), "FILE_FORMAT_PARQUET"))
    return running


def latest(running: Running, *users: str) -> list[object]:
    with Client.from_channel(running.channel) as client:
        return [
            r.features["clicked"] if r.features else None
            for r in client.get_features("ad_impressions", [{"user_id": u} for u in users])
        ]


def test_backfill_loads_the_latest_row_per_entity_and_reports_progress(tmp_path: Path) -> None:
    running = apply_parquet(tmp_path, history(10))
    try:
        seen: list[BackfillProgress] = []
        result = backfill(running.channel, "ad_impressions", on_progress=seen.append)
        assert result.done and seen[-1] == result
        assert (result.rows_read, result.rows_written, result.rows_superseded, result.rows_rejected) == (
            10,
            3,
            7,
            0,
        )
        assert latest(running, "u0", "u1", "u2") == [9, 7, 8]
    finally:
        running.close()


def test_backfill_never_overwrites_a_newer_pushed_value(tmp_path: Path) -> None:
    running = apply_parquet(tmp_path, history(10))
    try:
        with Client.from_channel(running.channel) as client:
            client.push(
                "ad_impressions",
                [{"user_id": "u0", "timestamp": DAY0 + dt.timedelta(days=30), "clicked": 999}],
            )
            client.backfill("ad_impressions")
        assert latest(running, "u0", "u1") == [999, 7]
    finally:
        running.close()


def test_backfill_time_range(tmp_path: Path) -> None:
    running = apply_parquet(tmp_path, history(10))
    try:
        result = backfill(running.channel, "ad_impressions", start=DAY0, end=DAY0 + dt.timedelta(hours=3))
        assert result.rows_written == 3
        assert latest(running, "u0", "u1", "u2") == [0, 1, 2]
    finally:
        running.close()


def test_backfill_twice_gives_the_same_store(tmp_path: Path) -> None:
    running = apply_parquet(tmp_path, history(50))
    try:
        backfill(running.channel, "ad_impressions")
        db = running.server.store
        first = {k: v for k, v in db._db.items() if k.startswith(b"r")}
        second_run = backfill(running.channel, "ad_impressions")
        assert second_run.rows_rejected == 0
        assert {k: v for k, v in db._db.items() if k.startswith(b"r")} == first
    finally:
        running.close()


def test_bad_rows_are_counted_and_reported_while_good_rows_load(tmp_path: Path) -> None:
    table = history(30).set_column(2, "clicked", pa.array([str(i) if i % 7 else f"x{i}" for i in range(30)]))
    running = apply_parquet(tmp_path, table)
    try:
        result = backfill(running.channel, "ad_impressions")
        bad = [i for i in range(30) if i % 7 == 0]
        assert result.rows_rejected == len(bad)
        assert [r.row for r in result.rejections] == bad
        assert all(r.field == "clicked" and "x" in r.description for r in result.rejections)
        assert result.rows_written + result.rows_superseded == 30 - len(bad)
        # Row 28 (u1) is bad, so u1 keeps row 25.
        assert latest(running, "u0", "u1", "u2") == [27, 25, 29]
    finally:
        running.close()


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    running = apply_parquet(tmp_path, history(10))
    try:
        result = backfill(running.channel, "ad_impressions", dry_run=True)
        assert result.rows_read == 10
        assert latest(running, "u0") == [None]
    finally:
        running.close()


@pytest.mark.parametrize("workers_up", [True, False])
def test_a_front_loads_chunks_itself_until_a_backfill_worker_is_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers_up: bool
) -> None:
    if not workers_up:
        # Workers that never come up: the front loads every chunk, with the same outcome.
        monkeypatch.setattr(BackfillWorkers, "ready", property(lambda self: False))
    pq.write_table(history(20_000), tmp_path / "h.parquet")
    # Chunks of a few thousand rows: the front reads in batches of a quarter of the read-ahead bytes.
    settings = {"batch_roots": (tmp_path,), "stream_read_ahead_bytes": 256 * 1024}
    running = start(tmp_path / "data", fronts=2, backfill_workers=True, **settings)
    try:
        front = running.fronts[-1]  # the one with workers
        front.apply(source_doc(str(tmp_path / "h.parquet"), "FILE_FORMAT_PARQUET"))
        seen: list[BackfillProgress] = []
        result = backfill(front.channel, "ad_impressions", on_progress=seen.append)
        assert result.done and len(seen) > 3
        assert result.rows_read == 20_000 and result.rows_rejected == 0
        assert result.rows_written + result.rows_superseded == 20_000
        assert [p.rows_read for p in seen] == sorted(p.rows_read for p in seen)
        assert latest(front, "u0", "u1", "u2") == [19_998, 19_999, 19_997]
    finally:
        running.close()


def test_an_end_before_the_start_is_refused_as_a_read_of_the_range_is(tmp_path: Path) -> None:
    running = apply_parquet(tmp_path, history(10))
    try:
        start, end = DAY0 + dt.timedelta(days=11), DAY0
        with Client.from_channel(running.channel) as client:
            with pytest.raises(InvalidArgumentError) as read:
                client.read_batch_source("ad_impressions", start=start, end=end).read_all()
            with pytest.raises(InvalidArgumentError) as loaded:
                client.backfill("ad_impressions", start=start, end=end)
        assert [(v.field, v.description) for v in loaded.value.violations] == [
            ("end_time", "must not be before start_time")
        ]
        assert loaded.value.violations == read.value.violations
        assert latest(running, "u0") == [None]
    finally:
        running.close()
