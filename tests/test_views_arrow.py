"""The Arrow form of GetViewFeatures: the same values, statuses and window ends as the Struct form."""

from __future__ import annotations

import datetime as dt
import math
import time
from typing import Any

from conftest import VIEW_STORES, Running
from views_helpers import MINUTE, VIEW_SCHEMA, Aggregate, apply, push, stub, view

from featurepush import Client, FeatureService
from featurepush.v1 import feature_view_service_pb2 as fvs_pb2

M = 60_000_000


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b) and type(a) is type(b)


def _check(client: Client, keys: list[dict[str, str]], **target: Any) -> int:
    """Read both forms; assert they agree value by value; return how many values were PRESENT."""
    rows = client.get_view_features(keys, **target)
    table = client.get_view_features_arrow(keys, **target)
    assert table.num_rows == len(keys)
    names = list(rows[0])
    assert table.column_names == [c for n in names for c in (n, f"{n}:status", f"{n}:effective_time")]
    present = 0
    for i, row in enumerate(rows):
        for name, feature in row.items():
            value = table.column(name)[i].as_py()
            status = table.column(f"{name}:status")[i].as_py()
            assert status == (1 if feature.status == "PRESENT" else 2), (name, i)
            assert table.column(f"{name}:effective_time")[i].as_py() == feature.effective_time
            assert _same(value, feature.value), (name, i, value, feature.value)
            present += feature.status == "PRESENT"
    return present


@VIEW_STORES
def test_every_function_reads_alike_in_both_forms(running: Running) -> None:
    for front in running.fronts:
        assert front.server.batch_sources is not None
        front.server.batch_sources.allow_post_processors("views_helpers")
    apply(running, view())
    numbers = [
        Aggregate(column, fn, 60 * MINUTE, n=2 if fn.endswith("_n") else 0)
        for column in ("amount", "label")
        for fn in ("count", "sum", "mean", "min", "max", "stddev", "last_n", "first_n", "last_distinct_n")
        if column == "amount" or fn in ("count", "last_n", "first_n", "last_distinct_n")
    ]
    apply(
        running,
        view(
            "amounts",
            schema=VIEW_SCHEMA,
            transformation="views_helpers:amount",
            aggregations=[*numbers, Aggregate("label", "approx_count_distinct", 60 * MINUTE)],
        ),
    )
    base = time.time_ns() // 1000 // M * M - 30 * M
    events = [("u1", base + i * 7_000_000 + (i % 5) * M, (i * 37) % 11) for i in range(40)]
    events += [("u2", base + 3 * M, 4)]
    push(running, events)
    service = FeatureService(
        name="both", features=[("clicks", ["clicked_count_10m", "clicked_last_n_1h"]), "amounts"]
    )
    stub(running).ApplyFeatureService(fvs_pb2.ApplyFeatureServiceRequest(service=service.to_proto()))
    keys = [{"user_id": u} for u in ("u1", "u2", "nobody")]
    with Client(running.target) as client:
        for at in (None, dt.datetime.fromtimestamp((base + 4 * M + 1) / 1e6, tz=dt.UTC)):
            assert _check(client, keys, view="clicks", as_of=at) > 0
            assert _check(client, keys, view="amounts", as_of=at) > 0
            assert _check(client, keys, service="both", as_of=at) > 0
        # One entity, and none present.
        assert _check(client, keys[:1], view="amounts") > 0
        assert _check(client, [{"user_id": "nobody"}], view="clicks") == 0
