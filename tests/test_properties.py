"""Property tests against a real server: random schemas and records round-trip, bad ones are rejected."""

from __future__ import annotations

import base64
import datetime as dt
import itertools
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pyarrow.parquet as pq
import pytest
from conftest import Running, start
from google.protobuf import json_format, struct_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from featurepush import Client, InvalidArgumentError
from featurepush import types as t
from featurepush.definitions import PushConfig, StreamSource
from featurepush.v1 import (
    ingest_service_pb2,
    online_service_pb2,
    registry_service_pb2,
)
from featurepush_server.core.rows import BULK_MIN_ROWS

KEY = "entity_key"
TS = "event_ts"
SETTINGS = settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
_names = itertools.count()

SCALARS = [t.String, t.Int32, t.Int64, t.Float32, t.Float64, t.Bool, t.Timestamp, t.Bytes]
INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
UTC_MIN = dt.datetime(1, 1, 2, tzinfo=dt.UTC)
UTC_MAX = dt.datetime(9999, 12, 30, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """One server for the module; every example applies a source of its own."""
    r = start(Path(tmp_path_factory.mktemp("props")) / "data", fsync="never")
    try:
        yield r
    finally:
        r.close()


@pytest.fixture(scope="module")
def client(server: Running) -> Iterator[Client]:
    """A Client over the module server's channel."""
    yield Client.from_channel(server.channel)


def unique_source_name() -> str:
    """A source name no other example uses."""
    return f"prop_{next(_names)}"


# Schemas.

field_names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,12}", fullmatch=True)


def dtypes() -> st.SearchStrategy[t.DataType]:
    """Every type, nested a few levels deep."""

    def extend(inner: st.SearchStrategy[t.DataType]) -> st.SearchStrategy[t.DataType]:
        return st.one_of(
            st.builds(t.Array, inner, st.booleans()),
            st.builds(lambda v, n: t.Map(t.String, v, n), inner, st.booleans()),
            st.lists(
                st.tuples(field_names, inner, st.booleans()), min_size=1, max_size=3, unique_by=lambda f: f[0]
            ).map(lambda fs: t.Struct([t.Field(*f) for f in fs])),
        )

    return st.recursive(st.sampled_from(SCALARS), extend, max_leaves=6)


@st.composite
def schemas(draw: st.DrawFn, types: st.SearchStrategy[t.DataType] | None = None) -> list[t.Field]:
    """A source schema: a String entity key, a Timestamp event time and random other fields (of `types`)."""
    names = field_names.filter(lambda n: n not in (KEY, TS))
    others = draw(
        st.lists(
            st.tuples(names, dtypes() if types is None else types, st.booleans()),
            min_size=1,
            max_size=5,
            unique_by=lambda f: f[0],
        )
    )
    fields = [t.Field(KEY, t.String), t.Field(TS, t.Timestamp)] + [t.Field(*f) for f in others]
    draw(st.randoms()).shuffle(fields)
    return fields


def apply_source(client: Client, schema: list[t.Field]) -> str:
    """Apply a fresh source with `schema`; returns its name."""
    name = unique_source_name()
    client.apply(
        StreamSource(
            name=name,
            schema=schema,
            entity_keys=[KEY],
            timestamp_field=TS,
            stream_config=PushConfig(log_offline=True),
        )
    )
    return name


# Values: each strategy yields (the JSON value to push, its canonical JSON form).


def _rfc3339_utc(when: dt.datetime) -> str:
    base = (
        f"{when.year:04d}-{when.month:02d}-{when.day:02d}T{when.hour:02d}:{when.minute:02d}:{when.second:02d}"
    )
    micros = when.microsecond
    if micros == 0:
        return base + "Z"
    if micros % 1000 == 0:
        return f"{base}.{micros // 1000:03d}Z"
    return f"{base}.{micros:06d}Z"


@st.composite
def timestamps(draw: st.DrawFn) -> tuple[str, str]:
    """An RFC 3339 string at a random offset with a random fraction style, and its canonical UTC form."""
    utc = draw(st.datetimes(UTC_MIN.replace(tzinfo=None), UTC_MAX.replace(tzinfo=None))).replace(
        tzinfo=dt.UTC
    )
    offset_minutes = draw(st.integers(-(23 * 60 + 59), 23 * 60 + 59))
    local = utc + dt.timedelta(minutes=offset_minutes)
    date = f"{local.year:04d}-{local.month:02d}-{local.day:02d}"
    clock = f"{local.hour:02d}:{local.minute:02d}:{local.second:02d}"
    digits = f"{local.microsecond:06d}"
    style = draw(st.sampled_from(["short", "micro", "nano"]))
    frac = {"short": digits.rstrip("0"), "micro": digits, "nano": digits + "000"}[style]
    frac = f".{frac}" if frac else ""
    if offset_minutes == 0 and draw(st.booleans()):
        zone = draw(st.sampled_from(["Z", "z"]))
    else:
        sign = "-" if offset_minutes < 0 else "+"
        zone = f"{sign}{abs(offset_minutes) // 60:02d}:{abs(offset_minutes) % 60:02d}"
    sep = draw(st.sampled_from(["T", "t"]))
    return f"{date}{sep}{clock}{frac}{zone}", _rfc3339_utc(utc)


def _float_json(x: float, as_text: bool) -> Any:
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    return repr(x) if as_text else x


def _float_canonical(x: float) -> Any:
    return _float_json(x, as_text=False)


@st.composite
def scalar_values(draw: st.DrawFn, dtype: t.ScalarType) -> tuple[Any, Any]:
    """A valid JSON value of a scalar type and its canonical form."""
    if dtype == t.String:
        s = draw(st.text(max_size=12))
        return s, s
    if dtype in (t.Int32, t.Int64):
        lo, hi = INT32 if dtype == t.Int32 else INT64
        n = draw(st.integers(lo, hi))
        as_text = draw(st.booleans()) or abs(n) > 2**53
        return (str(n) if as_text else n), (n if dtype == t.Int32 else str(n))
    if dtype in (t.Float32, t.Float64):
        x = draw(st.floats(width=32 if dtype == t.Float32 else 64))
        return _float_json(x, draw(st.booleans())), _float_canonical(x)
    if dtype == t.Bool:
        b = draw(st.booleans())
        return b, b
    if dtype == t.Timestamp:
        return draw(timestamps())
    raw = draw(st.binary(max_size=12))
    style = draw(st.sampled_from(["standard", "unpadded", "urlsafe"]))
    text = base64.b64encode(raw).decode()
    if style == "unpadded":
        text = text.rstrip("=")
    elif style == "urlsafe":
        text = base64.urlsafe_b64encode(raw).decode()
    return text, base64.b64encode(raw).decode()


@st.composite
def values(draw: st.DrawFn, dtype: t.DataType) -> tuple[Any, Any]:
    """A valid JSON value of any type and its canonical form."""
    if isinstance(dtype, t.ScalarType):
        return draw(scalar_values(dtype))
    if isinstance(dtype, t.Array):
        item = values(dtype.element_type)
        if dtype.element_nullable:
            item = st.one_of(st.just((None, None)), item)
        items = draw(st.lists(item, max_size=3))
        return [i for i, _ in items], [c for _, c in items]
    if isinstance(dtype, t.Map):
        item = values(dtype.value_type)
        if dtype.value_nullable:
            item = st.one_of(st.just((None, None)), item)
        entries = draw(st.dictionaries(st.text(max_size=6), item, max_size=3))
        return {k: v for k, (v, _) in entries.items()}, {k: c for k, (_, c) in entries.items()}
    assert isinstance(dtype, t.Struct)
    return draw(records(list(dtype.fields)))


@st.composite
def records(draw: st.DrawFn, fields: list[t.Field]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A valid record of `fields`: nullable fields are null, absent or set; canonical has every field."""
    record: dict[str, Any] = {}
    canonical: dict[str, Any] = {}
    for f in fields:
        choice = draw(st.sampled_from(["value", "null", "absent"])) if f.nullable else "value"
        if choice == "value":
            record[f.name], canonical[f.name] = draw(values(f.dtype))
        else:
            if choice == "null":
                record[f.name] = None
            canonical[f.name] = None
    return record, canonical


@st.composite
def batches(draw: st.DrawFn, schema: list[t.Field]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """One to four valid records with distinct entity keys."""
    out = draw(st.lists(records(schema), min_size=1, max_size=4))
    for i, (record, canonical) in enumerate(out):
        record[KEY] = canonical[KEY] = f"entity-{i}"
    return out


# Calls on the raw wire, so the canonical JSON itself is compared.


def to_struct(record: dict[str, Any]) -> struct_pb2.Struct:
    """A Struct of a JSON-like dict."""
    s = struct_pb2.Struct()
    s.update(record)
    return s


def push(server: Running, source: str, rows: list[dict[str, Any]]) -> ingest_service_pb2.PushResponse:
    """Push rows to one source over the raw stub."""
    request = ingest_service_pb2.PushRequest()
    request.records[source].rows.extend(to_struct(r) for r in rows)
    return server.ingest.Push(request)


def read(server: Running, source: str, keys: list[str]) -> list[online_service_pb2.FeatureVector]:
    """The feature vectors of entity keys over the raw stub."""
    request = online_service_pb2.GetFeaturesRequest(source=source, keys=[to_struct({KEY: k}) for k in keys])
    return list(server.online.GetFeatures(request).results)


def same(got: Any, want: Any) -> bool:
    """Equality of JSON values where NaN equals NaN and 1.0 equals 1."""
    if isinstance(want, dict):
        return (
            isinstance(got, dict) and got.keys() == want.keys() and all(same(got[k], want[k]) for k in want)
        )
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(map(same, got, want))
    if isinstance(want, bool) or isinstance(got, bool):
        return type(got) is type(want) and got == want
    if isinstance(want, float) and isinstance(got, float) and math.isnan(want):
        return math.isnan(got)
    if isinstance(want, int | float) and isinstance(got, int | float):
        return got == want and math.copysign(1, got) == math.copysign(1, want)
    return type(got) is type(want) and got == want


def bad_request(err: grpc.RpcError) -> list[tuple[str, str]]:
    """The (field, description) pairs of the BadRequest in an error's status."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, err
    found = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            found.extend((v.field, v.description) for v in bad.field_violations)
    return found


# Round trips.


# Small batches are converted value by value; large ones column at a time: both must agree.
BATCH_COPIES = pytest.mark.parametrize("copies", [1, BULK_MIN_ROWS + 1], ids=["small", "large"])


def replicate(
    batch: list[tuple[dict[str, Any], dict[str, Any]]], copies: int
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The batch repeated `copies` times, each copy with entity keys of its own."""
    if copies == 1:
        return batch
    return [
        (dict(r, **{KEY: f"{r[KEY]}-{i}"}), dict(c, **{KEY: f"{c[KEY]}-{i}"}))
        for i in range(copies)
        for r, c in batch
    ]


@BATCH_COPIES
@SETTINGS
@given(data=st.data())
def test_valid_records_round_trip_exactly(
    server: Running, client: Client, data: st.DataObject, copies: int
) -> None:
    """Random valid records come back from GetFeatures as canonical JSON, and the client decodes them."""
    schema = data.draw(schemas(), "schema")
    batch = replicate(data.draw(batches(schema), "batch"), copies)
    source = apply_source(client, schema)
    response = push(server, source, [r for r, _ in batch])
    assert response.counts[source].accepted == len(batch)
    assert response.counts[source].written == len(batch)
    vectors = read(server, source, [c[KEY] for _, c in batch])
    for vector, (_, want) in zip(vectors, batch, strict=True):
        assert vector.status == online_service_pb2.FEATURE_STATUS_PRESENT
        got = json_format.MessageToDict(vector.features)
        assert same(got, want), (got, want)
        assert _rfc3339_utc(vector.event_time.ToDatetime(tzinfo=dt.UTC)) == want[TS]
    decoded = client.get_features(source, [c[KEY] for _, c in batch])
    assert [d.features[KEY] for d in decoded if d.features] == [c[KEY] for _, c in batch]
    # Whatever a push accepts, the offline log can write: none of it is quarantined, every record lands.
    log = server.server.offline_log
    assert log is not None
    quarantined = log.quarantined
    log.flush()
    assert log.quarantined == quarantined
    logged = pq.read_table(log.source_dir(source))
    assert sorted(logged.column(KEY).to_pylist()) == sorted(c[KEY] for _, c in batch)


# Invalid records: one value made wrong, at a random depth.


def _fmt_key(key: str) -> str:
    return '["' + key.replace("\\", "\\\\").replace('"', '\\"') + '"]'


def wrong_scalars(dtype: t.ScalarType) -> list[Any]:
    """Values of the wrong JSON type or out of range for a scalar type."""
    wrong: dict[Any, list[Any]] = {
        t.String: [1, True, [], {}],
        t.Int32: [True, "abc", 1.5, 2**31, -(2**31) - 1, "2147483648", [], 1e300],
        t.Int64: [True, "abc", 3.9, "1.5", 1e300, "9223372036854775808", {}],
        t.Float32: [True, "abc", 1e39, -1e300, [], "1e400"],
        t.Float64: [True, "abc", "nan", "1e400", {}],
        t.Bool: ["true", 1, 0, [], {}],
        t.Timestamp: [
            1,
            "yesterday",
            "2026-13-01T00:00:00Z",
            "2026-11-25T10:00:00",
            "2026-02-30T00:00:00Z",
            "2026-11-25T10:00:00.0000000001Z",
            "2026-11-25",
            True,
        ],
        t.Bytes: [1, "!!notbase64", "a", "ab$d", True, []],
    }
    return wrong[dtype]


@st.composite
def corruptions(draw: st.DrawFn, dtype: t.DataType, value: Any, nullable: bool) -> tuple[Any, str]:
    """A value made invalid at one place in it, and the path suffix of that place."""
    options = ["self"]
    if not nullable:
        options.append("null")
    if isinstance(dtype, t.Array) and value:
        options.append("element")
    if isinstance(dtype, t.Map) and value:
        options.append("entry")
    if isinstance(dtype, t.Struct):
        options += ["field", "unknown"]
    if value is None:
        options = ["self"]
    option = draw(st.sampled_from(options))
    if option == "null":
        return None, ""
    if option == "element":
        i = draw(st.integers(0, len(value) - 1))
        item, suffix = draw(corruptions(dtype.element_type, value[i], dtype.element_nullable))
        return [item if j == i else v for j, v in enumerate(value)], f"[{i}]{suffix}"
    if option == "entry":
        key = draw(st.sampled_from(sorted(value)))
        item, suffix = draw(corruptions(dtype.value_type, value[key], dtype.value_nullable))
        return {**value, key: item}, _fmt_key(key) + suffix
    if option in ("field", "unknown"):
        return draw(struct_corruptions(list(dtype.fields), value, option == "unknown"))
    if isinstance(dtype, t.ScalarType):
        return draw(st.sampled_from(wrong_scalars(dtype))), ""
    if isinstance(dtype, t.Array):
        return draw(st.sampled_from([{}, "[]", 1, True])), ""
    return draw(st.sampled_from([[], "{}", 1, True])), ""


@st.composite
def struct_corruptions(
    draw: st.DrawFn, fields: list[t.Field], record: dict[str, Any], unknown: bool, keep: str = ""
) -> tuple[dict[str, Any], str]:
    """A record with one field (other than `keep`) made invalid or an unknown field added, and the path."""
    if unknown:
        known = {f.name for f in fields}
        name = draw(field_names.filter(lambda n: n not in known))
        return {**record, name: draw(st.sampled_from([None, 1, "x", [], {}]))}, f".{name}"
    f = draw(st.sampled_from([f for f in fields if f.name != keep]))
    if f.name in record and record[f.name] is not None:
        item, suffix = draw(corruptions(f.dtype, record[f.name], f.nullable))
    elif f.nullable:
        item, suffix = draw(st.sampled_from(_first_wrong(f.dtype))), ""
    else:
        item, suffix = None, ""
    return {**record, f.name: item}, f".{f.name}{suffix}"


def _first_wrong(dtype: t.DataType) -> list[Any]:
    if isinstance(dtype, t.ScalarType):
        return wrong_scalars(dtype)
    return [True, 1] if isinstance(dtype, t.Array | t.Map | t.Struct) else [True]


@BATCH_COPIES
@SETTINGS
@given(data=st.data())
def test_one_invalid_value_is_rejected_by_path_and_nothing_is_written(
    server: Running, client: Client, data: st.DataObject, copies: int
) -> None:
    """One bad value among valid records fails the push INVALID_ARGUMENT naming its path; no record lands."""
    schema = data.draw(schemas(), "schema")
    batch = replicate(data.draw(batches(schema), "batch"), copies)
    source = apply_source(client, schema)
    rows = [r for r, _ in batch]
    target = data.draw(st.integers(0, len(rows) - 1), "bad record")
    # The entity key stays valid so the read-back can look for it.
    unknown = data.draw(st.booleans(), "unknown field")
    bad, suffix = data.draw(struct_corruptions(schema, rows[target], unknown, keep=KEY), "corruption")
    rows[target] = bad
    with pytest.raises(grpc.RpcError) as caught:
        push(server, source, rows)
    err = caught.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    path = f'records["{source}"][{target}]{suffix}'
    assert [field for field, _ in bad_request(err)] == [path]
    for vector in read(server, source, [c[KEY] for _, c in batch]):
        assert vector.status == online_service_pb2.FEATURE_STATUS_MISSING


def test_the_client_reports_the_same_violation(server: Running, client: Client) -> None:
    """The typed client error carries the violation path of a bad record."""
    source = apply_source(client, [t.Field(KEY, t.String), t.Field(TS, t.Timestamp), t.Field("n", t.Int32)])
    with pytest.raises(InvalidArgumentError) as caught:
        client.push(source, [{KEY: "a", TS: "2026-11-25T10:00:00Z", "n": 2**31}])
    assert [v.field for v in caught.value.violations] == [f'records["{source}"][0].n']


# Junk never crashes the server.

json_junk = st.recursive(
    st.none() | st.booleans() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=12,
)


def junk_struct(doc: dict[str, Any]) -> struct_pb2.Struct:
    """A Struct of arbitrary JSON, including NaN and infinities as numbers."""
    s = struct_pb2.Struct()
    for k, v in doc.items():
        _fill(s.fields[k], v)
    return s


def _fill(target: struct_pb2.Value, v: Any) -> None:
    if v is None:
        target.null_value = struct_pb2.NULL_VALUE
    elif isinstance(v, bool):
        target.bool_value = v
    elif isinstance(v, float):
        target.number_value = v
    elif isinstance(v, str):
        target.string_value = v
    elif isinstance(v, list):
        target.list_value.SetInParent()
        for item in v:
            _fill(target.list_value.values.add(), item)
    else:
        target.struct_value.SetInParent()
        for k, item in v.items():
            _fill(target.struct_value.fields[k], item)


@st.composite
def junk_records(draw: st.DrawFn, schema: list[t.Field]) -> dict[str, Any]:
    """Arbitrary JSON objects, some keyed by the schema's field names with arbitrary values."""
    names = st.sampled_from([f.name for f in schema]) | st.text(max_size=6)
    return draw(st.dictionaries(names, json_junk, max_size=6))


def health_status(server: Running) -> int:
    """The overall health status the server reports."""
    stub = health_pb2_grpc.HealthStub(server.channel)
    return int(stub.Check(health_pb2.HealthCheckRequest(service="")).status)


@SETTINGS
@given(data=st.data())
def test_junk_records_never_crash_the_server(server: Running, client: Client, data: st.DataObject) -> None:
    """Arbitrary Structs get OK or INVALID_ARGUMENT, never INTERNAL or UNKNOWN; the server still answers."""
    schema = data.draw(schemas(), "schema")
    source = apply_source(client, schema)
    rows = data.draw(st.lists(junk_records(schema), min_size=1, max_size=4), "rows")
    request = ingest_service_pb2.PushRequest(dry_run=data.draw(st.booleans(), "dry_run"))
    request.records[source].rows.extend(junk_struct(r) for r in rows)
    try:
        server.ingest.Push(request)
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    keys = [junk_struct(r) for r in data.draw(st.lists(junk_records(schema), min_size=1, max_size=3), "keys")]
    try:
        server.online.GetFeatures(online_service_pb2.GetFeaturesRequest(source=source, keys=keys))
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    assert health_status(server) == health_pb2.HealthCheckResponse.SERVING
    assert server.registry.GetSource(registry_service_pb2.GetSourceRequest(name=source)).source.name == source
