"""Columnar pushes: Arrow IPC is conformed strictly, and rows and Arrow land in the store identically."""

from __future__ import annotations

import datetime as dt
import re

import pyarrow as pa
import pytest
from conftest import Running, source_from_json
from google.protobuf import struct_pb2
from google.rpc import code_pb2, error_details_pb2
from grpc import RpcError, StatusCode
from grpc_status import rpc_status

from featurepush.v1 import ingest_service_pb2 as pb
from featurepush.v1 import online_service_pb2, registry_service_pb2
from featurepush_server.core.stores.rocksdb import row_prefix

UTC = dt.UTC


def wide_source(name: str) -> dict[str, object]:
    """A source with every scalar type and each kind of nesting."""

    def scalar(t: str) -> dict[str, object]:
        return {"scalar": f"SCALAR_TYPE_{t}"}

    return {
        "name": name,
        "schema": {
            "fields": [
                {"name": "user_id", "type": scalar("STRING")},
                {"name": "ts", "type": scalar("TIMESTAMP")},
                {"name": "clicks", "type": scalar("INT64")},
                {"name": "slot", "type": scalar("INT32"), "nullable": True},
                {"name": "ctr", "type": scalar("FLOAT32"), "nullable": True},
                {"name": "bid", "type": scalar("FLOAT64"), "nullable": True},
                {"name": "viewed", "type": scalar("BOOL"), "nullable": True},
                {"name": "blob", "type": scalar("BYTES"), "nullable": True},
                {"name": "tags", "type": {"array": {"elementType": scalar("STRING")}}, "nullable": True},
                {
                    "name": "scores",
                    "type": {"map": {"valueType": scalar("FLOAT64"), "valueNullable": True}},
                    "nullable": True,
                },
                {
                    "name": "geo",
                    "type": {
                        "struct": {
                            "fields": [
                                {"name": "country", "type": scalar("STRING")},
                                {"name": "seen", "type": scalar("TIMESTAMP"), "nullable": True},
                            ]
                        }
                    },
                    "nullable": True,
                },
            ]
        },
        "entityKeys": ["user_id"],
        "timestampField": "ts",
    }


ROWS: list[dict[str, object]] = [
    {
        "user_id": "u1",
        "ts": "2026-03-01T10:00:00.123456Z",
        "clicks": "9007199254740993",
        "slot": -2147483648,
        "ctr": 0.1,
        "bid": 1e300,
        "viewed": True,
        "blob": "AAEC/w==",
        "tags": ["a", "b"],
        "scores": {"x": 1.5, "y": None},
        "geo": {"country": "FR", "seen": "2026-03-01T09:00:00Z"},
    },
    {"user_id": "u2", "ts": "2026-03-01T11:00:00Z", "clicks": 0},
    {
        "user_id": "u3",
        "ts": "2026-03-01T12:00:00+02:00",
        "clicks": -5,
        "slot": None,
        "ctr": "NaN",
        "bid": "-Infinity",
        "viewed": False,
        "tags": [],
        "scores": {},
        "geo": {"country": "DE"},
    },
]


def arrow_table() -> pa.Table:
    """The same records as ROWS, built as typed Arrow columns."""
    geo = pa.struct([("country", pa.string()), ("seen", pa.timestamp("us", "UTC"))])
    return pa.table(
        {
            "user_id": ["u1", "u2", "u3"],
            "ts": pa.array(
                [
                    dt.datetime(2026, 3, 1, 10, 0, 0, 123456, UTC),
                    dt.datetime(2026, 3, 1, 11, tzinfo=UTC),
                    dt.datetime(2026, 3, 1, 10, tzinfo=UTC),
                ],
                pa.timestamp("us", "UTC"),
            ),
            "clicks": pa.array([9007199254740993, 0, -5], pa.int64()),
            "slot": pa.array([-2147483648, None, None], pa.int32()),
            "ctr": pa.array([0.1, None, float("nan")], pa.float32()),
            "bid": pa.array([1e300, None, float("-inf")], pa.float64()),
            "viewed": [True, None, False],
            "blob": pa.array([b"\x00\x01\x02\xff", None, None], pa.binary()),
            "tags": pa.array([["a", "b"], None, []], pa.list_(pa.string())),
            "scores": pa.array([[("x", 1.5), ("y", None)], None, []], pa.map_(pa.string(), pa.float64())),
            "geo": pa.array(
                [{"country": "FR", "seen": dt.datetime(2026, 3, 1, 9, tzinfo=UTC)}, None, {"country": "DE"}],
                geo,
            ),
        }
    )


def ipc(data: pa.Table) -> bytes:
    """An Arrow IPC stream of a table."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, data.schema) as writer:
        writer.write_table(data)
    return bytes(sink.getvalue().to_pybytes())


def apply(running: Running, name: str) -> None:
    running.registry.ApplySource(
        registry_service_pb2.ApplySourceRequest(source=source_from_json(wide_source(name)))
    )


def rows_request(name: str, rows: list[dict[str, object]]) -> pb.PushRequest:
    request = pb.PushRequest()
    for row in rows:
        request.records[name].rows.add().update(row)
    return request


def arrow_request(name: str, data: pa.Table) -> pb.PushRequest:
    request = pb.PushRequest()
    request.records[name].arrow_ipc = ipc(data)
    return request


def features(running: Running, name: str, users: list[str]) -> bytes:
    keys = [struct_pb2.Struct(fields={"user_id": struct_pb2.Value(string_value=u)}) for u in users]
    reply = running.online.GetFeatures(online_service_pb2.GetFeaturesRequest(source=name, keys=keys))
    return bytes(reply.SerializeToString(deterministic=True))


def test_rows_and_arrow_land_identically(running: Running) -> None:
    apply(running, "by_rows")
    apply(running, "by_arrow")
    by_rows = running.ingest.Push(rows_request("by_rows", ROWS))
    by_arrow = running.ingest.Push(arrow_request("by_arrow", arrow_table()))
    assert by_rows.counts["by_rows"].written == by_arrow.counts["by_arrow"].written == 3
    users = ["u1", "u2", "u3", "absent"]
    assert features(running, "by_rows", users) == features(running, "by_arrow", users)
    # The stored bytes agree too, not only their JSON rendering.
    registry = running.server.registry
    stores = running.server.store
    keys = {
        name: sorted(k for k, _ in _rows(stores, registry.get(name).id)) for name in ("by_rows", "by_arrow")
    }
    assert [k[5:] for k in keys["by_rows"]] == [k[5:] for k in keys["by_arrow"]]
    assert stores.read(keys["by_rows"]) == stores.read(keys["by_arrow"])


def _rows(store: object, source_id: int) -> list[tuple[bytes, bytes]]:
    db = store._db  # type: ignore[attr-defined]
    prefix = row_prefix(source_id)
    return [(k, v) for k, v in db.items(from_key=prefix) if k.startswith(prefix)]


def _violations(err: RpcError) -> list[str]:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    bad = error_details_pb2.BadRequest()
    assert any(d.Unpack(bad) for d in status.details)
    return [f"{v.field}: {v.description}" for v in bad.field_violations]


def _with(column: str, array: pa.Array) -> pa.Table:
    base = arrow_table()
    return base.set_column(base.schema.get_field_index(column), column, array)


LOSSY = [
    ("float_into_int64", _with("clicks", pa.array([1.0, 3.9, 2.0])), r"\[1\]\.clicks: 3\.9"),
    (
        "overflow_into_int32",
        _with("slot", pa.array([1, None, 2**31], pa.int64())),
        r"\[2\]\.slot: 2147483648",
    ),
    ("underflow_into_int32", _with("slot", pa.array([-(2**31) - 1, 0, 0], pa.int64())), r"\[0\]\.slot"),
    ("string_into_int64", _with("clicks", pa.array(["1", "x", "2"])), r"\[1\]\.clicks: 'x'"),
    ("bool_into_int64", _with("clicks", pa.array([True, False, True])), r"\.clicks: column clicks is bool"),
    ("int_into_bool", _with("viewed", pa.array([1, 0, 1])), r"\.viewed: column viewed is int64"),
    (
        "naive_timestamp",
        _with("ts", pa.array([dt.datetime(2026, 1, 1)] * 3, pa.timestamp("us"))),
        r"\.ts: column ts has no time zone",
    ),
    (
        "nanoseconds_lost",
        _with("ts", pa.array([1_700_000_000_000_000_001] * 3, pa.timestamp("ns", "UTC"))),
        r"\[0\]\.ts",
    ),
    (
        "null_in_non_null",
        _with("clicks", pa.array([1, None, 2], pa.int64())),
        r"\[1\]\.clicks: must not be null",
    ),
    ("float64_into_float32_range", _with("ctr", pa.array([1e39, 0.0, 0.0])), r"\[0\]\.ctr: .*out of range"),
    ("missing_non_null", arrow_table().drop_columns(["clicks"]), r'"\]\.clicks: column clicks .* is missing'),
    ("unknown_column", arrow_table().append_column("extra", pa.array([1, 2, 3])), r"\.extra: unknown column"),
    (
        "null_array_element",
        _with("tags", pa.array([["a", None], None, []], pa.list_(pa.string()))),
        r"\[0\]\.tags\[\]: must not be null",
    ),
    ("string_into_bytes", _with("blob", pa.array(["a", None, None])), r"\.blob: column blob is string"),
]


@pytest.mark.parametrize(("data", "match"), [(d, m) for _, d, m in LOSSY], ids=[n for n, _, _ in LOSSY])
def test_lossy_arrow_is_rejected_by_row_and_nothing_is_written(
    running: Running, data: pa.Table, match: str
) -> None:
    apply(running, "wide")
    with pytest.raises(RpcError) as caught:
        running.ingest.Push(arrow_request("wide", data))
    assert caught.value.code() == StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    violations = _violations(caught.value)
    assert any(re.search(match, v) for v in violations), violations
    assert all(v.startswith('records["wide"]') for v in violations)
    present = online_service_pb2.FEATURE_STATUS_PRESENT
    reply = running.online.GetFeatures(
        online_service_pb2.GetFeaturesRequest(
            source="wide", keys=[struct_pb2.Struct(fields={"user_id": struct_pb2.Value(string_value="u1")})]
        )
    )
    assert reply.results[0].status != present


def test_not_arrow_is_rejected(running: Running) -> None:
    request = pb.PushRequest()
    request.records["ad_impressions"].arrow_ipc = b"not arrow"
    with pytest.raises(RpcError) as caught:
        running.ingest.Push(request)
    assert rpc_status.from_call(caught.value).code == code_pb2.INVALID_ARGUMENT  # type: ignore[arg-type,union-attr]
