"""Tests for the codec between Python values and the wire JSON records."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

import pytest
from google.protobuf import json_format, struct_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from featurepush.types import (
    Array,
    Bool,
    Bytes,
    DataType,
    Field,
    Float32,
    Float64,
    Int32,
    Int64,
    Map,
    ScalarType,
    String,
    Struct,
    Timestamp,
)
from featurepush.values import (
    decode_record,
    decode_value,
    format_timestamp,
    key_to_struct,
    parse_timestamp,
    record_to_struct,
)

UTC = dt.UTC


def _json(struct: struct_pb2.Struct) -> Any:
    return json_format.MessageToDict(struct)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("text", "text"),
        ("", ""),
        (True, True),
        (False, False),
        (None, None),
        (0, 0),
        (-17, -17),
        (2**53, 2**53),
        (-(2**53), -(2**53)),
        (2**53 + 1, "9007199254740993"),
        (-(2**63), "-9223372036854775808"),
        (2**63 - 1, "9223372036854775807"),
        (0.25, 0.25),
        (math.nan, "NaN"),
        (math.inf, "Infinity"),
        (-math.inf, "-Infinity"),
        (dt.datetime(2026, 11, 25, 10, 0, tzinfo=UTC), "2026-11-25T10:00:00Z"),
        (dt.datetime(2026, 11, 25, 10, 0, 0, 120000, tzinfo=UTC), "2026-11-25T10:00:00.120Z"),
        (dt.datetime(2026, 11, 25, 10, 0, 0, 123, tzinfo=UTC), "2026-11-25T10:00:00.000123Z"),
        (
            dt.datetime(2026, 11, 25, 12, 30, tzinfo=dt.timezone(dt.timedelta(hours=2, minutes=30))),
            "2026-11-25T10:00:00Z",
        ),
        (b"\xff\x00", "/wA="),
        (bytearray(b"hi"), "aGk="),
        (memoryview(b"abc"), "YWJj"),
        ([1, "a", None], [1, "a", None]),
        ((1, 2), [1, 2]),
        ([], []),
        ({}, {}),
        ({"k": [{"x": 2**60}]}, {"k": [{"x": "1152921504606846976"}]}),
    ],
    ids=repr,
)
def test_record_to_struct_encodes_each_python_type(value: Any, expected: Any) -> None:
    assert _json(record_to_struct({"v": value})) == {"v": expected}


def test_record_to_struct_keeps_int_and_float_kinds() -> None:
    struct = record_to_struct({"i": 3, "f": 3.5, "b": True})
    assert struct.fields["i"].number_value == 3
    assert struct.fields["b"].WhichOneof("kind") == "bool_value"


@pytest.mark.parametrize(
    ("record", "error", "match"),
    [
        ({"ts": dt.datetime(2026, 1, 1)}, ValueError, r"^ts: datetime 2026-01-01T00:00:00 is naive"),
        ({"day": dt.date(2026, 1, 1)}, TypeError, r"^day: a date is not a timestamp"),
        ({"a": {"b": [1, object()]}}, TypeError, r"^a\.b\[1\]: cannot encode object"),
        ({"s": {1, 2}}, TypeError, r"^s: cannot encode set"),
        ({"d": Decimal("1.5")}, TypeError, r"^d: cannot encode Decimal"),
        ({"m": {1: "x"}}, TypeError, r"^m: keys must be str, got int 1"),
        ({"odd key": {"x": object()}}, TypeError, r'^\["odd key"\]\.x: cannot encode'),
    ],
    ids=repr,
)
def test_record_to_struct_rejects_what_it_cannot_encode(
    record: Mapping[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        record_to_struct(record)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-25T10:00:00Z", dt.datetime(2026, 11, 25, 10, 0, tzinfo=UTC)),
        ("2026-11-25T10:00:00.120Z", dt.datetime(2026, 11, 25, 10, 0, 0, 120000, tzinfo=UTC)),
        ("2026-11-25T10:00:00.000123Z", dt.datetime(2026, 11, 25, 10, 0, 0, 123, tzinfo=UTC)),
        ("2026-11-25T10:00:00.123456789Z", dt.datetime(2026, 11, 25, 10, 0, 0, 123456, tzinfo=UTC)),
        ("2026-11-25T12:00:00+02:00", dt.datetime(2026, 11, 25, 10, 0, tzinfo=UTC)),
        ("2026-11-25t10:00:00.5z", dt.datetime(2026, 11, 25, 10, 0, 0, 500000, tzinfo=UTC)),
    ],
)
def test_parse_timestamp_accepts_rfc3339(text: str, expected: dt.datetime) -> None:
    parsed = parse_timestamp(text)
    assert parsed == expected
    assert parsed.tzinfo is UTC


@pytest.mark.parametrize("text", ["2026-11-25", "2026-11-25T10:00:00", "yesterday", "2026-11-25T10:00:00+"])
def test_parse_timestamp_rejects_non_rfc3339(text: str) -> None:
    with pytest.raises(ValueError):
        parse_timestamp(text)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (dt.datetime(1, 1, 1, tzinfo=UTC), "0001-01-01T00:00:00Z"),
        (dt.datetime(5, 6, 7, 8, 9, 10, 11, tzinfo=UTC), "0005-06-07T08:09:10.000011Z"),
        (dt.datetime(999, 12, 31, 23, 59, 59, 120000, tzinfo=UTC), "0999-12-31T23:59:59.120Z"),
        (dt.datetime(1000, 1, 1, 0, 30, tzinfo=dt.timezone(dt.timedelta(hours=1))), "0999-12-31T23:30:00Z"),
        (dt.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), "9999-12-31T23:59:59.999999Z"),
    ],
)
def test_format_timestamp_writes_four_digit_years(value: dt.datetime, text: str) -> None:
    assert format_timestamp(value) == text
    assert parse_timestamp(text) == value


def test_format_timestamp_rejects_naive() -> None:
    with pytest.raises(ValueError, match="naive"):
        format_timestamp(dt.datetime(2026, 1, 1))


SCHEMA = [
    Field("user_id", String),
    Field("count32", Int32),
    Field("count64", Int64),
    Field("ratio32", Float32),
    Field("ratio64", Float64, nullable=True),
    Field("clicked", Bool),
    Field("ts", Timestamp),
    Field("blob", Bytes, nullable=True),
    Field("history", Array(Int64, element_nullable=True)),
    Field("weights", Map(String, Float64)),
    Field("address", Struct([Field("city", String), Field("zip", Int32, nullable=True)]), nullable=True),
    Field("absent", String, nullable=True),
]


def test_decode_record_reads_the_canonical_form() -> None:
    canonical = json_format.ParseDict(
        {
            "user_id": "u1",
            "count32": 7,
            "count64": "9223372036854775807",
            "ratio32": 0.10000000149011612,
            "ratio64": "-Infinity",
            "clicked": True,
            "ts": "2026-11-25T10:00:00.000123Z",
            "blob": "/wA=",
            "history": ["1", None, "-3"],
            "weights": {"a": 1.5, "b": "NaN"},
            "address": {"city": "Oslo", "zip": None},
        },
        struct_pb2.Struct(),
    )
    decoded = decode_record(canonical, SCHEMA)
    assert list(decoded) == [f.name for f in SCHEMA]
    assert math.isnan(decoded["weights"].pop("b"))
    assert decoded == {
        "user_id": "u1",
        "count32": 7,
        "count64": 2**63 - 1,
        "ratio32": 0.10000000149011612,
        "ratio64": -math.inf,
        "clicked": True,
        "ts": dt.datetime(2026, 11, 25, 10, 0, 0, 123, tzinfo=UTC),
        "blob": b"\xff\x00",
        "history": [1, None, -3],
        "weights": {"a": 1.5},
        "address": {"city": "Oslo", "zip": None},
        "absent": None,
    }
    assert isinstance(decoded["count64"], int) and isinstance(decoded["count32"], int)


@pytest.mark.parametrize(
    ("dtype", "wire", "expected"),
    [
        (Int64, 12, 12),
        (Int64, "-5", -5),
        (Int32, "42", 42),
        (Float64, 1, 1.0),
        (Float32, "Infinity", math.inf),
        (Bytes, "-_8", b"\xfb\xff"),
        (Bytes, "aGk", b"hi"),
        (Timestamp, "2026-01-01T00:00:00-01:00", dt.datetime(2026, 1, 1, 1, tzinfo=UTC)),
    ],
    ids=repr,
)
def test_decode_record_accepts_other_valid_input_forms(dtype: DataType, wire: Any, expected: Any) -> None:
    struct = json_format.ParseDict({"v": wire}, struct_pb2.Struct())
    assert decode_record(struct, [Field("v", dtype)]) == {"v": expected}


@pytest.mark.parametrize(
    ("dtype", "wire", "match"),
    [
        (String, 1, r"^v: expected a string, got number_value"),
        (Int64, 1.5, r"^v: expected an integer"),
        (Int32, True, r"^v: expected an integer, got bool_value"),
        (Float64, "1.5", r"^v: expected a number"),
        (Bool, "true", r"^v: expected a boolean"),
        (Timestamp, "2026-11-25", r"^v: .* is not an RFC 3339 timestamp"),
        (Timestamp, 1700000000, r"^v: expected a Timestamp string"),
        (Bytes, "a*b=", r"^v: invalid base64"),
        (Array(Int64), {"a": 1}, r"^v: expected a list"),
        (Array(Int64), [1, "x"], r"^v\[1\]: "),
        (Map(String, Int64), [1], r"^v: expected an object"),
        (Map(String, Bool), {"k": 1}, r'^v\["k"\]: expected a boolean'),
        (Struct([Field("inner", Int32)]), {"inner": "x"}, r"^v\.inner: "),
    ],
    ids=repr,
)
def test_decode_record_names_the_path_of_a_bad_value(dtype: DataType, wire: Any, match: str) -> None:
    struct = json_format.ParseDict({"v": wire}, struct_pb2.Struct())
    with pytest.raises(ValueError, match=match):
        decode_record(struct, [Field("v", dtype)])


def test_decode_record_keeps_each_schemas_order_and_paths() -> None:
    struct = json_format.ParseDict({"a": 1, "b c": "x", "d": None}, struct_pb2.Struct())
    schema = (Field("a", Int64), Field("b c", String), Field("d", Bool, nullable=True))
    for _ in range(2):
        assert decode_record(struct, schema) == {"a": 1, "b c": "x", "d": None}
        assert list(decode_record(struct, schema[::-1])) == ["d", "b c", "a"]
        assert list(decode_record(struct, list(schema))) == ["a", "b c", "d"]
    assert decode_record(struct, [Field("e", Int64, nullable=True)]) == {"e": None}
    with pytest.raises(ValueError, match=r'^\["b c"\]: .x. is not a decimal integer'):
        decode_record(struct, (Field("b c", Int64),))


@pytest.mark.parametrize(
    ("key", "entity_keys", "expected"),
    [
        ("u1", ["user_id"], {"user_id": "u1"}),
        (7, ["ad_id"], {"ad_id": 7}),
        (("u1", 7), ["user_id", "ad_id"], {"user_id": "u1", "ad_id": 7}),
        ({"ad_id": 7, "user_id": "u1"}, ["user_id", "ad_id"], {"user_id": "u1", "ad_id": 7}),
        ({"anything": "goes"}, ["user_id"], {"anything": "goes"}),
        (2**62, ["id"], {"id": str(2**62)}),
    ],
    ids=repr,
)
def test_key_to_struct(key: Any, entity_keys: list[str], expected: dict[str, Any]) -> None:
    assert _json(key_to_struct(key, entity_keys)) == expected


@pytest.mark.parametrize(
    ("key", "entity_keys"),
    [("u1", ["user_id", "ad_id"]), (("u1", 7, 9), ["user_id", "ad_id"]), ((), ["user_id"])],
)
def test_key_to_struct_rejects_a_wrong_number_of_parts(key: Any, entity_keys: list[str]) -> None:
    with pytest.raises(ValueError, match=r"part\(s\) but the source's entity keys are"):
        key_to_struct(key, entity_keys)


# Property test: any Python record that fits a schema survives record_to_struct then decode_record, up to
# canonicalization (datetimes in UTC, tuples as lists, bytearrays as bytes, absent nullables as None).

_names = st.from_regex(r"[a-z_][a-z0-9_]{0,6}", fullmatch=True)
_SCALARS: list[ScalarType] = [String, Int32, Int64, Float32, Float64, Bool, Timestamp, Bytes]
_offsets = st.integers(min_value=-23 * 60, max_value=23 * 60).map(
    lambda minutes: dt.timezone(dt.timedelta(minutes=minutes))
)


def _scalar_values(dtype: ScalarType) -> st.SearchStrategy[Any]:
    if dtype == String:
        return st.text()
    if dtype == Int32:
        return st.integers(min_value=-(2**31), max_value=2**31 - 1)
    if dtype == Int64:
        return st.integers(min_value=-(2**63), max_value=2**63 - 1)
    if dtype == Float32:
        return st.floats(width=32)
    if dtype == Float64:
        return st.floats()
    if dtype == Bool:
        return st.booleans()
    if dtype == Timestamp:
        return st.datetimes(
            min_value=dt.datetime(1900, 1, 2), max_value=dt.datetime(2200, 1, 1), timezones=_offsets
        )
    return st.one_of(st.binary(), st.binary().map(bytearray))


def _fields() -> st.SearchStrategy[list[Field]]:
    dtypes: st.SearchStrategy[DataType] = st.recursive(
        st.sampled_from(_SCALARS),
        lambda inner: st.one_of(
            st.builds(Array, inner, st.booleans()),
            st.builds(Map, st.just(String), inner, st.booleans()),
            st.lists(
                st.builds(Field, _names, inner, st.booleans()), max_size=3, unique_by=lambda f: f.name
            ).map(Struct),
        ),
        max_leaves=6,
    )
    return st.lists(st.builds(Field, _names, dtypes, st.booleans()), max_size=5, unique_by=lambda f: f.name)


def _values(dtype: DataType, nullable: bool) -> st.SearchStrategy[Any]:
    if isinstance(dtype, ScalarType):
        strategy = _scalar_values(dtype)
    elif isinstance(dtype, Array):
        element = _values(dtype.element_type, dtype.element_nullable)
        strategy = st.one_of(st.lists(element, max_size=3), st.lists(element, max_size=3).map(tuple))
    elif isinstance(dtype, Map):
        strategy = st.dictionaries(
            st.text(max_size=4), _values(dtype.value_type, dtype.value_nullable), max_size=3
        )
    else:
        assert isinstance(dtype, Struct)
        strategy = _records(list(dtype.fields))
    return st.one_of(st.none(), strategy) if nullable else strategy


def _records(fields: list[Field]) -> st.SearchStrategy[dict[str, Any]]:
    required = {f.name: _values(f.dtype, f.nullable) for f in fields if not f.nullable}
    optional = {f.name: _values(f.dtype, f.nullable) for f in fields if f.nullable}
    return st.fixed_dictionaries(required, optional=optional)


def _canonical(value: Any, dtype: DataType) -> Any:
    if value is None:
        return None
    if isinstance(dtype, Array):
        return [_canonical(v, dtype.element_type) for v in value]
    if isinstance(dtype, Map):
        return {k: _canonical(v, dtype.value_type) for k, v in value.items()}
    if isinstance(dtype, Struct):
        return {f.name: _canonical(value.get(f.name), f.dtype) for f in dtype.fields}
    if dtype == Timestamp:
        return value.astimezone(UTC)
    if dtype == Bytes:
        return bytes(value)
    if isinstance(value, float) and math.isnan(value):
        return "nan"  # nan != nan; compare a marker instead
    return value


def _nan_to_marker(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, list):
        return [_nan_to_marker(v) for v in value]
    if isinstance(value, dict):
        return {k: _nan_to_marker(v) for k, v in value.items()}
    return value


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_records_round_trip_through_the_codec(data: st.DataObject) -> None:
    fields = data.draw(_fields())
    record = data.draw(_records(fields))
    struct = struct_pb2.Struct.FromString(record_to_struct(record).SerializeToString())
    decoded = decode_record(struct, fields)
    expected = _canonical(record, Struct(fields))
    assert _nan_to_marker(decoded) == expected


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=40))
def test_the_server_accepts_the_bytes_the_client_writes(raw: bytes) -> None:
    from featurepush_server.core.rows import strict_base64

    text = record_to_struct({"v": raw})["v"]
    assert strict_base64(text) == raw
    assert decode_value(record_to_struct({"v": raw}).fields["v"], Bytes) == raw
