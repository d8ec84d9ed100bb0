"""Push rows read from their wire bytes give what parsing them as Structs gives, for any bytes at all."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pyarrow as pa
import pytest
from conftest import AD_IMPRESSIONS, Running, keys_request, start
from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_properties import KEY, TS, batches, schemas

from featurepush import Field, Float64, StreamSource, String, Timestamp
from featurepush.v1 import ingest_service_pb2, online_service_pb2
from featurepush_server.core.rows import BULK_MIN_ROWS, rows_to_table
from featurepush_server.core.schema import SourceSpec, compile_source
from featurepush_server.core.struct_rows import BOOL, NUMBER, STRING, WireRows, read_columns
from featurepush_server.servicers.ingest import parse_push

SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Running]:
    """A server with the seed's ad_impressions source applied."""
    r = start(tmp_path / "data")
    try:
        r.apply(AD_IMPRESSIONS)
        yield r
    finally:
        r.close()


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _delimited(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + _varint(len(body)) + body


def row_bytes(entries: list[tuple[str, Any]]) -> bytes:
    """A Struct's wire bytes with its entries in the given order (protobuf would choose its own)."""
    out = b""
    for key, value in entries:
        holder = struct_pb2.Struct()
        holder.update({key: value})
        body = _delimited(0x0A, key.encode()) + _delimited(0x12, holder.fields[key].SerializeToString())
        out += _delimited(0x0A, body)
    return out


def both(raw: list[bytes], spec: SourceSpec) -> tuple[Any, Any]:
    """What rows_to_table gives for the rows parsed as Structs and for the rows read from their bytes.

    Each is the table (as Python values) or the violations, or "undecodable" where parsing fails.
    """

    def outcome(rows: Any) -> Any:
        table, violations, count = rows_to_table(rows, spec.fields, spec.arrow_schema, "records")
        # repr, so that NaN equals NaN and every value's type is compared too.
        return ("table", repr(table.to_pylist())) if table is not None else ("bad", violations, count)

    try:
        parsed = [struct_pb2.Struct.FromString(r) for r in raw]
    except DecodeError:
        with pytest.raises(DecodeError):
            WireRows(raw, min_rows=BULK_MIN_ROWS)
        return "undecodable", "undecodable"
    return outcome(parsed), outcome(WireRows(raw, min_rows=BULK_MIN_ROWS))


def _spec(schema: Any) -> SourceSpec:
    return compile_source(
        StreamSource(name="s", schema=schema, entity_keys=[KEY], timestamp_field=TS).to_proto()
    )


# Values of every JSON form, to put where a schema expects another or to add as unknown fields.
ODD_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70).map(float),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["2026-01-01T00:00:00Z", "12", "-3", "NaN", "", "x" * 200, "é" * 70]),
    st.lists(st.integers(0, 3), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(0, 3), max_size=2),
)


@st.composite
def pushes(draw: st.DrawFn) -> tuple[SourceSpec, list[bytes]]:
    """A schema and the bytes of 17 or more rows: valid records repeated, then perhaps spoiled."""
    schema = draw(schemas())
    spec = _spec(schema)
    base = [record for record, _ in draw(batches(schema))]
    n = draw(st.integers(BULK_MIN_ROWS + 1, 40))
    rows: list[dict[str, Any]] = []
    for i in range(n):
        record = dict(base[i % len(base)])
        record[KEY] = f"k{i}-" + "x" * draw(st.sampled_from([0, 0, 3, 150]))
        rows.append(record)
    orders = [list(rows[0])] * n
    spoil = draw(st.sampled_from(["none", "none", "value", "drop", "add", "order", "bytes"]))
    at = draw(st.integers(0, n - 1))
    if spoil == "value":
        name = draw(st.sampled_from(list(rows[at])))
        rows[at][name] = draw(ODD_VALUES)
    elif spoil == "drop":
        name = draw(st.sampled_from(list(rows[at])))
        del rows[at][name]
    elif spoil == "add":
        rows[at][draw(st.text(min_size=1, max_size=5))] = draw(ODD_VALUES)
    elif spoil == "order" and len(rows[0]) > 1:
        shuffled = list(rows[at])
        random.Random(draw(st.integers())).shuffle(shuffled)
        orders[at] = shuffled
    raw = [
        row_bytes([(k, row[k]) for k in order if k in row] + [(k, row[k]) for k in row if k not in order])
        for row, order in zip(rows, orders, strict=True)
    ]
    if spoil == "bytes":
        data = bytearray(raw[at])
        for _ in range(draw(st.integers(1, 3))):
            if data:
                i = draw(st.integers(0, len(data) - 1))
                data[i] = draw(st.integers(0, 255))
        raw[at] = bytes(data)
    return spec, raw


@SETTINGS
@given(pushes())
def test_rows_read_from_bytes_convert_exactly_as_parsed_rows(push: tuple[SourceSpec, list[bytes]]) -> None:
    spec, raw = push
    parsed, from_bytes = both(raw, spec)
    assert from_bytes == parsed
    # Read a few rows at a time, the columns come out the same as read at once.
    whole, chunked = read_columns(raw), read_columns(raw, chunk=5)
    assert (whole is None) == (chunked is None)
    if whole is not None and chunked is not None:
        assert chunked.forms == whole.forms
        for name, values in whole.values.items():
            got = chunked.values[name]
            if isinstance(values, pa.Array):
                assert isinstance(got, pa.Array) and got.equals(values)
            else:
                assert np.asarray(got).tobytes() == values.tobytes()


@SETTINGS
@given(st.lists(st.binary(max_size=40), min_size=BULK_MIN_ROWS + 1, max_size=24))
def test_arbitrary_bytes_are_refused_exactly_when_protobuf_refuses_them(raw: list[bytes]) -> None:
    spec = _spec([Field(KEY, String), Field(TS, Timestamp), Field("n", Float64)])
    parsed, from_bytes = both(raw, spec)
    assert from_bytes == parsed


def test_a_usual_push_is_read_column_by_column() -> None:
    rows = [
        [("id", f"user-{i}"), ("n", float(i)), ("ok", i % 2 == 0), ("note", "é" * (i * 40))]
        for i in range(20)
    ]
    columns = read_columns([row_bytes(r) for r in rows])
    assert columns is not None
    assert columns.forms == {"id": STRING, "n": NUMBER, "ok": BOOL, "note": STRING}
    assert columns.values["id"].to_pylist() == [f"user-{i}" for i in range(20)]
    assert list(columns.values["n"]) == [float(i) for i in range(20)]
    assert list(columns.values["ok"]) == [i % 2 == 0 for i in range(20)]
    # Strings of 2-byte lengths (over 127 bytes) included.
    assert columns.values["note"].to_pylist() == ["é" * (i * 40) for i in range(20)]


@pytest.mark.parametrize(
    "spoil",
    [
        "another key order",
        "a null",
        "a nested value",
        "a string of 16 KiB",
        "invalid UTF-8",
        "an extra entry",
    ],
)
def test_unusual_rows_are_declined(spoil: str) -> None:
    rows = [[("id", f"user-{i}"), ("n", float(i))] for i in range(20)]
    raw = [row_bytes(r) for r in rows]
    if spoil == "another key order":
        raw[7] = row_bytes(rows[7][::-1])
    elif spoil == "a null":
        raw[3] = row_bytes([("id", None), ("n", 3.0)])
    elif spoil == "a nested value":
        raw[3] = row_bytes([("id", "u"), ("n", [1.0])])
    elif spoil == "a 16 KiB string":
        raw[5] = row_bytes([("id", "x" * (1 << 14)), ("n", 5.0)])
    elif spoil == "invalid UTF-8":
        raw[9] = raw[9].replace(b"user-9", b"user-\xff")
    else:
        raw[9] = raw[9] + row_bytes([("extra", 1.0)])
    assert read_columns(raw) is None


def test_a_push_with_a_row_of_invalid_utf8_is_undecodable(server: Running) -> None:
    rows = b"".join(
        _delimited(
            0x0A, row_bytes([("user_id", f"u{i}"), ("timestamp", "2026-01-01T00:00:00Z"), ("clicked", 1.0)])
        )
        for i in range(40)
    ).replace(b"u39", b"u\xff9")
    entry = _delimited(0x0A, b"ad_impressions") + _delimited(0x12, rows)
    body = _delimited(0x0A, entry)
    with pytest.raises(DecodeError):
        parse_push(body)
    with pytest.raises(grpc.RpcError) as caught:
        server.channel.unary_unary("/featurepush.v1.IngestService/Push")(body, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "could not be decoded" in (caught.value.details() or "")


def test_a_stream_batch_with_a_row_of_invalid_utf8_ends_the_stream_after_the_batches_before_it(
    server: Running,
) -> None:
    def batch(sequence_id: int, prefix: str, spoil: bool) -> bytes:
        when = "2026-01-01T00:00:00Z"
        rows = b"".join(
            _delimited(0x0A, row_bytes([("user_id", f"{prefix}{i}"), ("timestamp", when), ("clicked", 1.0)]))
            for i in range(40)
        )
        if spoil:
            rows = rows.replace(f"{prefix}39".encode(), f"{prefix}\xff9".encode("latin-1"))
        entry = _delimited(0x0A, b"ad_impressions") + _delimited(0x12, rows)
        return b"\x08" + bytes([sequence_id]) + _delimited(0x12, _delimited(0x0A, entry))

    # The stream reads its batches' rows only as it writes them; a bad row ends it there, as a message
    # that does not decode at all would, and neither that batch nor any after it is written.
    items = [batch(1, "first-", False), batch(2, "bad-", True), batch(3, "after-", False)]
    stream = server.channel.stream_stream("/featurepush.v1.IngestService/PushStream")
    acks = []
    with pytest.raises(grpc.RpcError) as caught:
        for raw in stream(iter(items), timeout=10):
            acks.append(ingest_service_pb2.PushStreamResponse.FromString(raw))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "could not be decoded" in (caught.value.details() or "")
    assert [(a.sequence_id, a.WhichOneof("result")) for a in acks] == [(1, "response")]
    for prefix, stored in (("first-", 40), ("bad-", 0), ("after-", 0)):
        keys = [{"user_id": f"{prefix}{i}"} for i in range(40)]
        results = server.online.GetFeatures(keys_request("ad_impressions", *keys)).results
        assert sum(r.status == online_service_pb2.FEATURE_STATUS_PRESENT for r in results) == stored


@pytest.mark.parametrize("method", ["Push", "PushStream"])
def test_a_push_read_from_bytes_stores_what_a_parsed_push_stores(server: Running, method: str) -> None:
    def request(prefix: str, reorder: bool) -> bytes:
        rows = b""
        for i in range(50):
            when = f"2026-01-01T00:00:{i:02d}.5+01:00"
            row = [("user_id", f"{prefix}{i}"), ("timestamp", when), ("clicked", float(i - 25))]
            # One row in another key order: the whole batch is parsed as messages.
            rows += _delimited(0x0A, row_bytes(row[::-1] if reorder and i == 7 else row))
        entry = _delimited(0x0A, b"ad_impressions") + _delimited(0x12, rows)
        return _delimited(0x0A, entry)

    assert parse_push(request("a-", False)).records["ad_impressions"].rows.columns is not None
    assert parse_push(request("b-", True)).records["ad_impressions"].rows.columns is None
    for prefix, reorder in (("wire-", False), ("parsed-", True)):
        body = request(prefix, reorder)
        if method == "Push":
            server.channel.unary_unary("/featurepush.v1.IngestService/Push")(body, timeout=10)
        else:
            item = b"\x08\x01" + _delimited(0x12, body)  # sequence_id 1, then the request
            stream = server.channel.stream_stream("/featurepush.v1.IngestService/PushStream")
            acks = [
                ingest_service_pb2.PushStreamResponse.FromString(a) for a in stream(iter([item]), timeout=10)
            ]
            assert acks[0].WhichOneof("result") == "response"
    got = {}
    for prefix in ("wire-", "parsed-"):
        keys = [{"user_id": f"{prefix}{i}"} for i in range(50)]
        results = server.online.GetFeatures(keys_request("ad_impressions", *keys)).results
        for r in results:
            del r.features.fields["user_id"]
        got[prefix] = [r.SerializeToString(deterministic=True) for r in results]
    assert got["wire-"] == got["parsed-"]
    assert len(got["wire-"]) == 50
