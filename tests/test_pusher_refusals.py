"""A pusher's batches holding values the client cannot encode fail unsent, whole and named; the rest land."""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import AD_IMPRESSIONS, Running, start
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from featurepush import Client, FeatureStatus, InvalidArgumentError
from featurepush.payload import BatchFailure

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
SOURCE = "ad_impressions"
_examples = itertools.count()


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    running: Running = start(Path(tmp_path_factory.mktemp("refusals")))
    running.apply(AD_IMPRESSIONS)
    try:
        yield running.target
    finally:
        running.close()


class _Opaque:
    """A value of no type the encoder knows."""

    def __repr__(self) -> str:
        return "<opaque>"


# Each damage: the field it goes in (None: a key added to the record), the value, what the encoder says.
DAMAGES: list[tuple[str | None, Any, str]] = [
    ("timestamp", dt.datetime(2026, 1, 1, 12), "datetime 2026-01-01T12:00:00 is naive; give it a timezone"),
    ("timestamp", dt.date(2026, 1, 1), "a date is not a timestamp; pass an aware datetime"),
    ("clicked", _Opaque(), "cannot encode _Opaque <opaque>"),
    ("clicked", {1, 2}, "cannot encode set {1, 2}"),
    ("user_id", 1j, "cannot encode complex 1j"),
    (None, 7, "keys must be str, got int 7"),
]


def _record(prefix: str, i: int, damage: int | None) -> dict[Any, Any]:
    at = T0 + dt.timedelta(seconds=i)
    record: dict[Any, Any] = {"user_id": f"{prefix}-{i}", "timestamp": at, "clicked": i}
    if damage is not None:
        field, value, _ = DAMAGES[damage]
        if field is None:
            record[value] = "x"
        else:
            record[field] = value
    return record


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    damages=st.lists(st.none() | st.integers(0, len(DAMAGES) - 1), min_size=1, max_size=40),
    max_rows=st.integers(1, 12),
)
def test_exactly_the_batches_with_unencodable_values_fail_each_naming_them(
    target: str, damages: list[int | None], max_rows: int
) -> None:
    prefix = f"p{next(_examples)}"
    records = [_record(prefix, i, d) for i, d in enumerate(damages)]
    failures: list[BatchFailure] = []
    with Client(target) as client:
        # With max_rows records a batch is sealed at once: batches are the records max_rows by max_rows.
        with client.pusher(SOURCE, max_rows=max_rows, linger_ms=60_000, on_error=failures.append) as pusher:
            pusher.add_many(records)
        chunks = [range(at, min(at + max_rows, len(records))) for at in range(0, len(records), max_rows)]
        bad_chunks = [c for c in chunks if any(damages[i] is not None for i in c)]
        assert [f.records for f in failures] == [[records[i] for i in c] for c in bad_chunks]
        for failure, chunk in zip(failures, bad_chunks, strict=True):
            assert isinstance(failure.error, InvalidArgumentError)
            assert failure.error.reason == "UNENCODABLE_RECORDS"
            expected = []
            for j, i in enumerate(chunk):
                damage = damages[i]
                if damage is not None:
                    field, _, problem = DAMAGES[damage]
                    path = f'records["{SOURCE}"][{j}]' + (f".{field}" if field else "")
                    expected.append((path, problem))
            assert [(v.field, v.description) for v in failure.error.violations] == expected
        stats = pusher.stats
        assert (stats.failed_batches, stats.batches) == (len(bad_chunks), len(chunks) - len(bad_chunks))
        assert stats.failed_records == sum(len(c) for c in bad_chunks)
        failed = {i for c in bad_chunks for i in c}
        results = client.get_features(SOURCE, [f"{prefix}-{i}" for i in range(len(records))])
        for i, result in enumerate(results):
            if i in failed:
                assert result.status == FeatureStatus.MISSING
            else:
                assert result.status == FeatureStatus.PRESENT and result.features is not None
                assert result.features["clicked"] == i
