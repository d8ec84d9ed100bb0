"""Helpers of the feature view tests: definitions, pushes, reads, and brute-force twins of the aggregates."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
from conftest import Running, rows_request
from google.protobuf import json_format

from featurepush.definitions import Aggregate, StreamFeatureView
from featurepush.types import Field, Float64, Int64, String
from featurepush.v1 import feature_view_service_pb2 as fvs_pb2
from featurepush.v1 import feature_view_service_pb2_grpc as fvs_grpc
from featurepush.v1 import ingest_service_pb2
from featurepush_server.app import open_store
from featurepush_server.config import ServerConfig
from featurepush_server.core.stores.base import Store

HOUR = dt.timedelta(hours=1)
MINUTE = dt.timedelta(minutes=1)


def amount(table: pa.Table) -> pa.Table:
    """The transformation of the tests: clicked as a float amount, a label, and clicks only."""
    import pyarrow.compute as pc

    clicked = table.column("clicked")
    return table.append_column("amount", pc.multiply(pc.cast(clicked, pa.float64()), 1.5)).append_column(
        "label", pc.cast(clicked, pa.string())
    )


def broken(table: pa.Table) -> pa.Table:
    """A transformation that fails on every batch."""
    raise ValueError(f"cannot transform {table.num_rows} rows")


def view(name: str = "clicks", interval: dt.timedelta = MINUTE, **kwargs: Any) -> StreamFeatureView:
    """A view of every function over the ad_impressions source."""
    aggs = kwargs.pop("aggregations", None) or [
        Aggregate("clicked", fn, w, n=3 if fn.endswith("_n") else 0)
        for w in (10 * MINUTE, HOUR)
        for fn in (
            "count",
            "sum",
            "mean",
            "min",
            "max",
            "stddev",
            "last_n",
            "first_n",
            "last_distinct_n",
            "approx_count_distinct",
        )
    ]
    return StreamFeatureView(
        name=name,
        source=kwargs.pop("source", "ad_impressions"),
        entities=["user_id"],
        schema=kwargs.pop("schema", [Field("clicked", Int64)]),
        aggregations=aggs,
        aggregation_interval=interval,
        **kwargs,
    )


VIEW_SCHEMA = [Field("clicked", Int64), Field("amount", Float64), Field("label", String)]


def stub(running: Running) -> fvs_grpc.FeatureViewServiceStub:
    """The FeatureViewService stub on the server's channel."""
    return fvs_grpc.FeatureViewServiceStub(running.channel)


def apply(running: Running, v: StreamFeatureView) -> fvs_pb2.ApplyFeatureViewResponse:
    """Apply a view."""
    return stub(running).ApplyFeatureView(fvs_pb2.ApplyFeatureViewRequest(view=v.to_proto()))


@contextmanager
def opened_store(data: Path, settings: dict[str, object]) -> Iterator[Store]:
    """The store of servers started over `data` with `settings` (as `start` takes them), opened here.

    An embedded RocksDB opens only while no server holds it; Redis is shared, so it opens at any time.
    """
    chosen = {k: v for k, v in settings.items() if k not in ("fronts", "backfill_workers")}
    store = open_store(ServerConfig(listen="localhost:0", data_dir=data, **chosen))  # type: ignore[arg-type]
    try:
        yield store
    finally:
        store.close()


def view_id(store: Store, name: str) -> int:
    """The store id of a view."""
    found = store.get_view(name)
    assert found is not None, name
    return found[0]


def iso(micros: int) -> str:
    """RFC 3339 of a time in microseconds."""
    return dt.datetime.fromtimestamp(micros / 1e6, dt.UTC).isoformat().replace("+00:00", "Z")


def push(
    running: Running, events: Sequence[tuple[str, int, int]], request_id: str = ""
) -> ingest_service_pb2.PushResponse:
    """Push (user, event time in microseconds, clicked) events to ad_impressions."""
    rows = [{"user_id": u, "timestamp": iso(t), "clicked": c} for u, t, c in events]
    response: ingest_service_pb2.PushResponse = running.ingest.Push(
        rows_request({"ad_impressions": rows}, request_id=request_id)
    )
    return response


def read(
    running: Running,
    users: Sequence[str],
    as_of: int | None = None,
    *,
    view_name: str = "clicks",
    service: str = "",
) -> tuple[list[str], list[list[tuple[str, Any]]]]:
    """Feature names and, per user, (status, value) per feature."""
    request = fvs_pb2.GetViewFeaturesRequest(keys=[{"user_id": u} for u in users])
    if service:
        request.feature_service = service
    else:
        request.feature_view = view_name
    if as_of is not None:
        request.as_of.FromMicroseconds(as_of)
    response = stub(running).GetViewFeatures(request)
    names = [f.name for f in response.features]
    out = []
    for vector in response.results:
        row = []
        for v in vector.values:
            status = "PRESENT" if v.status == 1 else "MISSING"
            row.append((status, json_format.MessageToDict(v)["value"] if v.HasField("value") else None))
        out.append(row)
    return names, out


def brute(agg: Aggregate, values: list[tuple[int, int]], as_of: int, interval: int) -> Any:
    """An aggregate of raw (time, value) events as a read's JSON; None when none lie in the window."""
    end = as_of // interval * interval
    window = int(agg.time_window.total_seconds() * 1_000_000)
    inside = [(t, v) for t, v in values if end - window <= t < end]
    if not inside:
        return None
    vs = [v for _, v in inside]
    fn = agg.function
    if fn == "count":
        return str(len(vs))
    if fn == "sum":
        return str(sum(vs))
    if fn == "mean":
        return sum(vs) / len(vs)
    if fn == "min":
        return str(min(vs))
    if fn == "max":
        return str(max(vs))
    if fn == "stddev":
        mean = sum(vs) / len(vs)
        return math.sqrt(sum((v - mean) ** 2 for v in vs) / len(vs))
    ordered = sorted(inside)
    if fn == "last_n":
        return [str(v) for _, v in ordered[::-1][: agg.n]]
    if fn == "first_n":
        return [str(v) for _, v in ordered[: agg.n]]
    if fn == "last_distinct_n":
        latest: dict[int, int] = {}
        for t, v in ordered:
            latest[v] = t
        return [str(v) for v, _ in sorted(latest.items(), key=lambda x: (x[1], x[0]), reverse=True)[: agg.n]]
    assert fn == "approx_count_distinct"
    return str(len(set(vs)))


def same(got: Any, want: Any) -> bool:
    """Equal, floats within a relative 1e-9."""
    if isinstance(want, float) and isinstance(got, float):
        return math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-9)
    return bool(got == want)
