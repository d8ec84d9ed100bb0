"""The column encoder and the row-by-row encoder of small batches write the very same bytes."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pytest
from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st
from test_properties import KEY, SCALARS, TS, batches, schemas, to_struct, wrong_scalars

from featurepush import StreamSource
from featurepush import types as t
from featurepush.v1 import online_service_pb2
from featurepush_server.core.encoding import (
    _set_value,
    _value_message,
    canonical,
    encode_python,
    encode_rows,
    null_entry,
    struct_entries,
    timestamp_string,
    timestamp_strings,
    varints,
    with_late_nulls,
)
from featurepush_server.core.framing import header_micros, payload
from featurepush_server.core.rows import (
    BULK_MIN_ROWS,
    FLOAT32_MAX,
    MAX_MICROS,
    MIN_MICROS,
    ConvertedRows,
    convert_rows,
    rows_to_table,
)
from featurepush_server.core.schema import DType, FieldSpec, Kind, compile_source
from featurepush_server.core.wire import FEATURE_VECTOR_FEATURES, varint


@settings(max_examples=120, deadline=None)
@given(data=st.data())
def test_both_encoders_agree_byte_for_byte(data: st.DataObject) -> None:
    schema = data.draw(schemas())
    spec = compile_source(
        StreamSource(name="enc", schema=schema, entity_keys=[KEY], timestamp_field=TS).to_proto()
    )
    records = [record for record, _ in data.draw(batches(schema))]
    # Repeat the batch with long keys so lengths need several varint bytes.
    rows = [to_struct({**r, KEY: f"{r[KEY]}-{i}-" + "k" * (i * 37)}) for i in range(9) for r in records]
    table, violations, _ = rows_to_table(rows, spec.fields, spec.arrow_schema, "records")
    assert table is not None, violations
    columns = encode_rows(
        table, spec.fields, spec.entity_keys, spec.timestamp_field, b"r\0\0\0\1", small_batch=0
    )
    by_row = encode_rows(
        table, spec.fields, spec.entity_keys, spec.timestamp_field, b"r\0\0\0\1", small_batch=10**9
    )
    assert columns == by_row
    # In key order, the same rows; Python's sort is stable, as the encoder's must be.
    order = sorted(range(len(rows)), key=columns[0].__getitem__)
    assert encode_rows(
        table, spec.fields, spec.entity_keys, spec.timestamp_field, b"r\0\0\0\1", small_batch=0, by_key=True
    ) == ([columns[0][i] for i in order], [columns[1][i] for i in order])
    for value in columns[1]:
        vector = online_service_pb2.FeatureVector.FromString(payload(value))
        assert set(vector.features.fields) == {f.name for f in spec.fields}
        assert vector.event_time.ToMicroseconds() == header_micros(value)


def test_rows_of_one_entity_keep_their_order_when_sorted_by_key() -> None:
    # The store keeps the later of two rows of one entity with one event time: sorting must not swap them.
    spec = compile_source(
        StreamSource(
            name="enc",
            schema=[t.Field(KEY, t.String), t.Field(TS, t.Timestamp), t.Field("n", t.Int64)],
            entity_keys=[KEY],
            timestamp_field=TS,
        ).to_proto()
    )
    entities = "bababcab" * 4
    rows = [to_struct({KEY: k, TS: "2026-01-01T00:00:00Z", "n": n}) for n, k in enumerate(entities)]
    table, violations, _ = rows_to_table(rows, spec.fields, spec.arrow_schema, "records")
    assert table is not None, violations
    keys, values = encode_rows(table, spec.fields, (KEY,), TS, b"p", small_batch=0, by_key=True)
    by_row = encode_rows(table, spec.fields, (KEY,), TS, b"p", small_batch=0)[1]
    # Python's sort is stable: rows of one entity stay in the order they came in.
    order = sorted(range(len(entities)), key=entities.__getitem__)
    assert keys == [b"p" + entities[i].encode() for i in order]
    assert values == [by_row[i] for i in order]


_SCALAR_VALUES = {
    Kind.STRING: st.text(),
    Kind.INT32: st.integers(-(2**31), 2**31 - 1),
    Kind.INT64: st.integers(-(2**63), 2**63 - 1),
    Kind.FLOAT32: st.floats(width=32),
    Kind.FLOAT64: st.floats(),
    Kind.BOOL: st.booleans(),
    # Top-level Timestamps reach the encoder as microseconds since the epoch.
    Kind.TIMESTAMP: st.integers(MIN_MICROS, MAX_MICROS),
    Kind.BYTES: st.binary(),
}


@settings(max_examples=600, deadline=None)
@given(data=st.data())
def test_a_scalar_value_written_by_hand_is_the_one_protobuf_serializes(data: st.DataObject) -> None:
    kind = data.draw(st.sampled_from(sorted(_SCALAR_VALUES, key=lambda k: k.value)))
    item = data.draw(st.none() | _SCALAR_VALUES[kind])
    dtype = DType(kind)
    message = struct_pb2.Value()
    decoded = item
    if kind is Kind.TIMESTAMP and item is not None:
        decoded = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=item)
    _set_value(message, canonical(decoded, dtype))
    assert _value_message(item, dtype) == message.SerializeToString(deterministic=True)


def _same_table(a: pa.Table, b: pa.Table) -> bool:
    """Tables equal in schema and values, a NaN equal to a NaN (Table.equals holds NaN unequal to itself)."""
    if not a.schema.equals(b.schema):
        return False
    left, right = a.to_pylist(), b.to_pylist()
    return len(left) == len(right) and all(
        _same_value(x[k], y[k]) for x, y in zip(left, right, strict=True) for k in x
    )


def _same_value(x: object, y: object) -> bool:
    if isinstance(x, float) and isinstance(y, float) and x != x and y != y:
        return True
    return x == y


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_a_few_rows_kept_as_python_values_are_stored_and_refused_as_their_table_is(
    data: st.DataObject,
) -> None:
    # Schemas of scalars only, whose few rows stay Python values, and any others.
    schema = data.draw(schemas(st.sampled_from(SCALARS)) | schemas())
    spec = compile_source(
        StreamSource(name="enc", schema=schema, entity_keys=[KEY], timestamp_field=TS).to_proto()
    )
    records = [record for record, _ in data.draw(batches(schema))]
    # Float32 fields also get doubles that float32 cannot hold exactly, which Arrow rounds.
    for record in records:
        for f in schema:
            if f.dtype == t.Float32 and record.get(f.name) is not None and data.draw(st.booleans()):
                record[f.name] = data.draw(st.floats(-FLOAT32_MAX, FLOAT32_MAX))
    rows = [to_struct(r) for r in records] * data.draw(st.integers(1, 4))
    if data.draw(st.booleans()):
        at = data.draw(st.integers(0, len(rows) - 1))
        f = data.draw(st.sampled_from([f for f in schema if isinstance(f.dtype, t.ScalarType)]))
        wrong = data.draw(st.sampled_from(wrong_scalars(f.dtype) + ([] if f.nullable else [None])))
        rows[at] = to_struct({**records[at % len(records)], f.name: wrong})
    rows = rows[: data.draw(st.integers(1, BULK_MIN_ROWS))]
    kept, violations, count = convert_rows(rows, spec.fields, spec.arrow_schema, "records", 3)
    table, want_violations, want_count = rows_to_table(rows, spec.fields, spec.arrow_schema, "records", 3)
    assert (violations, count) == (want_violations, want_count)
    assert (kept is None) == (table is None)
    if table is None:
        return
    scalar = all(isinstance(f.dtype, t.ScalarType) for f in schema)
    assert isinstance(kept, ConvertedRows) == scalar
    prefix = b"r\0\0\0\1"
    want = encode_rows(table, spec.fields, spec.entity_keys, spec.timestamp_field, prefix, small_batch=0)
    if isinstance(kept, ConvertedRows):
        assert kept.num_rows == table.num_rows
        assert (
            encode_python(kept.columns, spec.fields, spec.entity_keys, spec.timestamp_field, prefix) == want
        )
        assert _same_table(kept.table(), table)


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_a_row_stored_before_fields_were_added_reads_like_one_stored_with_them_null(
    data: st.DataObject,
) -> None:
    schema = data.draw(schemas())
    spec = compile_source(
        StreamSource(name="enc", schema=schema, entity_keys=[KEY], timestamp_field=TS).to_proto()
    )
    added = data.draw(st.sets(st.sampled_from([f.name for f in spec.fields if f.name not in (KEY, TS)])))
    now = tuple(replace(f, nullable=True) if f.name in added else f for f in spec.fields)
    before = tuple(f for f in now if f.name not in added)
    records = [{k: v for k, v in r.items() if k not in added} for r, _ in data.draw(batches(schema))]
    small = data.draw(st.sampled_from([0, 10**9]))

    def stored(fields: tuple[FieldSpec, ...]) -> list[bytes]:
        arrow_schema = pa.schema([f.to_arrow() for f in fields])
        table, violations, _ = rows_to_table([to_struct(r) for r in records], fields, arrow_schema, "records")
        assert table is not None, violations
        return encode_rows(table, fields, (KEY,), TS, b"r\0\0\0\1", small_batch=small)[1]

    late = {name.encode(): null_entry(name) for name in added}
    old, new = stored(before), stored(now)
    assert [with_late_nulls(payload(v), late) for v in old] == [payload(v) for v in new]
    # A row stored with every field is returned as it is.
    assert [with_late_nulls(payload(v), late) for v in new] == [payload(v) for v in new]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(MIN_MICROS, MAX_MICROS), min_size=1, max_size=50))
def test_timestamp_strings_match_the_single_formatter(micros: list[int]) -> None:
    edges = [MIN_MICROS, MAX_MICROS, 0, -1, 1, 1000, -1000, 951782400_000_000]
    values = micros + edges
    got = [b.decode() for b in timestamp_strings(np.array(values, dtype=np.int64)).to_pylist()]
    assert got == [timestamp_string(m) for m in values]
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    for text, m in zip(got, values, strict=True):
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
        assert parsed == epoch + timedelta(microseconds=m)


@given(st.lists(st.integers(0, 2**64 - 1), max_size=40))
def test_varints_match_protobuf(numbers: list[int]) -> None:
    from featurepush_server.core.encoding import varint

    assert varints(np.array(numbers, dtype=np.uint64)).to_pylist() == [varint(n) for n in numbers]


@given(st.integers(MIN_MICROS, MAX_MICROS))
def test_event_times_are_encoded_as_protobuf_does(micros: int) -> None:
    from google.protobuf import timestamp_pb2

    from featurepush_server.core.encoding import event_time_field, event_time_fields

    stamp = timestamp_pb2.Timestamp(seconds=micros // 1_000_000, nanos=micros % 1_000_000 * 1000)
    body = stamp.SerializeToString()
    assert event_time_field(micros) == b"\x12" + bytes([len(body)]) + body
    assert event_time_fields(np.array([micros], dtype=np.int64)).to_pylist() == [event_time_field(micros)]


@given(st.integers(0, 2**64 - 1))
def test_varint_matches_protobuf(n: int) -> None:
    from featurepush_server.core.encoding import varint

    assert b"\x08" + varint(n) == timestamp_pb2_seconds(n)


def timestamp_pb2_seconds(n: int) -> bytes:
    """A message whose only field is a varint of n (Timestamp.seconds as its 64-bit pattern)."""
    from google.protobuf import timestamp_pb2

    signed = n - (1 << 64) if n >= 1 << 63 else n
    return timestamp_pb2.Timestamp(seconds=signed).SerializeToString() if n else b"\x08\x00"


_STRUCT_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(allow_nan=False),
    st.text(max_size=5),
    st.lists(st.integers(-5, 5), max_size=3),
)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.text(max_size=4), _STRUCT_VALUES, min_size=1, max_size=4), st.data())
def test_struct_entries_of_a_damaged_struct_are_protobufs_entries_or_value_error(
    fields: dict[str, object], data: st.DataObject
) -> None:
    """A Struct flipped or cut inside its intact length reads as protobuf reads its entries, or ValueError."""
    struct = struct_pb2.Struct()
    struct.update(fields)
    raw = bytearray(struct.SerializeToString())
    if data.draw(st.booleans()):
        for _ in range(data.draw(st.integers(1, 3))):
            raw[data.draw(st.integers(0, len(raw) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    else:
        del raw[data.draw(st.integers(0, len(raw) - 1)) :]
    # The features field of a stored payload, its length that of the damaged Struct.
    body = FEATURE_VECTOR_FEATURES + varint(len(raw)) + bytes(raw)
    try:
        entries = struct_entries(body, 0)
    except ValueError:
        return
    assert b"".join(entry for _, entry in entries) == bytes(raw)
    for name, entry in entries:
        try:
            parsed = struct_pb2.Struct.FromString(entry)
        except DecodeError:
            # A damaged Value inside an intact entry: protobuf refuses the whole Struct alike.
            with pytest.raises(DecodeError):
                struct_pb2.Struct.FromString(bytes(raw))
            continue
        assert list(parsed.fields) == [name.decode()]
