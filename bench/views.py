"""Feature view scenarios: pushes that also update two views' tiles, and reads of a 10-feature vector."""

from __future__ import annotations

import datetime as dt
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import grpc

from bench.common import start_serve
from featurepush import Aggregate, Client, Field, Float64, Int64, StreamFeatureView
from featurepush.v1 import feature_view_service_pb2 as fv_pb
from featurepush.v1 import ingest_service_pb2 as ingest_pb
from featurepush.values import fill_struct

PUSH = "/featurepush.v1.IngestService/Push"
GET_VIEW = "/featurepush.v1.FeatureViewService/GetViewFeatures"
DAY = dt.timedelta(days=1)
HOUR = dt.timedelta(hours=1)
CLIENTS = 2


def _view(name: str, aggregations: list[Aggregate]) -> StreamFeatureView:
    return StreamFeatureView(
        name=name,
        source="ad_impressions",
        entities=["user_id"],
        schema=[Field("clicked", Int64), Field("bid", Float64)],
        aggregations=aggregations,
        aggregation_interval=HOUR,
    )


# Two views of three aggregations each, the push scenario's.
PUSH_VIEWS = [
    _view("clicks", [Aggregate("clicked", f, DAY) for f in ("count", "sum", "max")]),
    _view("bids", [Aggregate("bid", f, w) for f, w in (("mean", HOUR), ("min", DAY), ("max", 7 * DAY))]),
]
# Ten features of one-day windows over one-hour tiles, the read scenario's.
READ_VIEW = _view(
    "vector",
    [Aggregate("clicked", f, DAY) for f in ("count", "sum", "mean", "min", "max", "stddev")]
    + [Aggregate("bid", f, DAY) for f in ("sum", "mean", "min", "max")],
)


def _push_payload(worker: int, n: int, now: dt.datetime, users: int) -> bytes:
    """A PushRequest of n impressions of recent hours, as Structs."""
    from bench.run import SOURCE

    request = ingest_pb.PushRequest()
    target = request.records[SOURCE].rows
    for i in range(n):
        fill_struct(
            target.add(),
            {
                "user_id": f"w{worker}-u{i % users}",
                "timestamp": now - dt.timedelta(minutes=(i * 7) % (24 * 60)),
                "clicked": i % 7,
                "ad_id": f"ad-{i % 1000}",
                "campaign_id": 10_000_000_000 + i % 50,
                "position": i % 10,
                "bid": 0.25 + i % 100 / 1000,
                "viewed": i % 2 == 0,
            },
        )
    return request.SerializeToString()


def _get_payload(worker: int, n: int) -> bytes:
    request = fv_pb.GetViewFeaturesRequest(feature_view="vector")
    for i in range(n):
        request.keys.add().update({"user_id": f"w{worker}-u{i}"})
    return request.SerializeToString()


def _loop(target: str, method_name: str, payload: bytes, per_call: int, seconds: float) -> tuple[int, float]:
    with grpc.insecure_channel(target) as channel:
        method = channel.unary_unary(method_name)
        method(payload)
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            method(payload)
            calls += 1
        return calls * per_call, time.perf_counter() - start


def _throughput(
    pool: ProcessPoolExecutor, target: str, payloads: list[bytes], method: str, per_call: int, seconds: float
) -> float:
    jobs = [pool.submit(_loop, target, method, p, per_call, seconds) for p in payloads]
    done = [j.result() for j in jobs]
    return sum(n for n, _ in done) / max(t for _, t in done)


def scenarios(seconds: float, latency_calls: int) -> list[dict[str, Any]]:
    """push_rows_with_views against push_rows of the same run and server, and get_features_view."""
    from bench.run import AD_IMPRESSIONS

    now = dt.datetime.now(dt.UTC)
    out: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryDirectory(prefix="featurepush-bench-views-") as tmp,
        ProcessPoolExecutor(CLIENTS, mp_context=get_context("spawn")) as pool,
    ):
        process, target = start_serve(Path(tmp) / "data", "always")
        try:
            with Client(target) as client:
                client.apply(AD_IMPRESSIONS)
            pushes = [_push_payload(w, 1000, now, 1000) for w in range(CLIENTS)]
            plain = _throughput(pool, target, pushes, PUSH, 1000, seconds)
            with Client(target) as client:
                client.apply_views(*PUSH_VIEWS)
            with_views = _throughput(pool, target, pushes, PUSH, 1000, seconds)
            with Client(target) as client:
                client.apply_views(READ_VIEW)
            out.append(
                {
                    "name": "push_rows_with_views",
                    "value": round(with_views, 3),
                    "unit": "rows/s",
                    "ceiling": round(plain, 3),
                    "ratio": round(with_views / plain, 3),
                }
            )
            # Every entity has events in all 24 one-hour tiles of its one-day windows.
            with grpc.insecure_channel(target) as channel:
                push = channel.unary_unary(PUSH)
                for w in range(CLIENTS):
                    for _ in range(3):
                        push(_push_payload(w, 4000, now, 100))
                get = channel.unary_unary(GET_VIEW)
                one = _get_payload(0, 1)
                get(one)
                times = []
                for _ in range(latency_calls):
                    start = time.perf_counter()
                    get(one)
                    times.append((time.perf_counter() - start) * 1000)
            p99 = statistics.quantiles(times, n=100)[98]
            out.append(
                {
                    "name": "get_features_view_p99_ms",
                    "value": round(p99, 3),
                    "unit": "ms",
                    "ceiling": 2.0,
                    "ratio": round(2.0 / p99, 3),
                }
            )
            entities = _throughput(
                pool, target, [_get_payload(w, 100) for w in range(CLIENTS)], GET_VIEW, 100, seconds
            )
            out.append(
                {
                    "name": "get_features_view",
                    "value": round(entities, 3),
                    "unit": "keys/s",
                    "ceiling": 50_000.0,
                    "ratio": round(entities / 50_000, 3),
                }
            )
        finally:
            process.terminate()
            process.wait(30)
    return out


if __name__ == "__main__":
    for row in scenarios(3.0, 1000):
        print(row)
