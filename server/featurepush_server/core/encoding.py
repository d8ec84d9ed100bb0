"""Column-at-a-time encoding of conformed Arrow tables into online-store keys and values.

A stored value is an event-time header (`framing.py`), then the payload: the tail of the FeatureVector a
read returns: its `event_time` field and its `features` field, the
record serialized as a google.protobuf.Struct in canonical JSON form (Int64 as decimal strings,
Timestamps as RFC 3339 in UTC, Bytes as base64, non-finite floats as "NaN"/"Infinity"). A read then
only prepends the status. The
wire bytes are built with numpy and Arrow kernels, so no Python code runs per scalar value; only Bytes
and nested types fall back to per-row Python.

Before the payload, a stored value holds the row's columns, which Arrow reads decode for many rows at
once with numpy: a 2-byte field count, then per field in name order an 8-byte little-endian slot (the
value as int64 for Int32, Int64, Bool and Timestamp in microseconds, as float64 for Float32 and
Float64, else the byte length of its variable part), then one validity byte per field, then the
variable parts in field order (String as UTF-8, Bytes as they are, Array, Map and Struct as their
serialized google.protobuf.Value); a null's slot is zero and its variable part empty.
"""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from google.protobuf import struct_pb2

from .framing import frame, head_matrix, time_header
from .rows import stored_value
from .schema import DType, FieldSpec, Kind
from .times import MIN_SECONDS
from .wire import (
    FEATURE_VECTOR_EVENT_TIME,
    FEATURE_VECTOR_FEATURES,
    STRUCT_ENTRY_KEY,
    STRUCT_ENTRY_VALUE,
    STRUCT_FIELD,
    TIMESTAMP_NANOS,
    TIMESTAMP_SECONDS,
    VALUE_BOOL,
    VALUE_NULL,
    VALUE_NUMBER,
    VALUE_STRING,
    read_varint,
    varint,
)

_NULL = VALUE_NULL + b"\x00"  # Value{null_value: NULL_VALUE}
_SPECIAL = {
    "NaN": struct_pb2.Value(string_value="NaN").SerializeToString(),
    "Infinity": struct_pb2.Value(string_value="Infinity").SerializeToString(),
    "-Infinity": struct_pb2.Value(string_value="-Infinity").SerializeToString(),
}


def _binary_from_matrix(mat: np.ndarray) -> pa.Array:
    """A binary array whose row i is the bytes of row i of a (n, width) uint8 matrix."""
    n, width = mat.shape
    offsets = np.arange(0, (n + 1) * width, width, dtype=np.int32)[: n + 1]
    data = np.ascontiguousarray(mat, dtype=np.uint8)
    return pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def varint_sizes(values: np.ndarray) -> np.ndarray:
    """How many bytes the protobuf varint of each non-negative integer takes."""
    n = np.asarray(values, dtype=np.uint64)
    sizes = np.ones(len(n), dtype=np.int64)
    top = int(n.max()) if len(n) else 0
    for i in range(1, 10):
        if top < 1 << (7 * i):
            break
        sizes += n >= np.uint64(1 << (7 * i))
    return sizes


def varints(lengths: np.ndarray) -> pa.Array:
    """A binary array of the protobuf varints of each non-negative integer."""
    n = np.asarray(lengths, dtype=np.uint64)
    if len(n) == 0 or n.max() < 0x80:
        # The common case, short strings and small messages: one byte each.
        return _binary_from_matrix(n.astype(np.uint8).reshape(-1, 1))
    nbytes = varint_sizes(n)
    width = int(nbytes.max())
    cols = np.arange(width)
    shifts = (cols * 7).astype(np.uint64)
    mat = ((n[:, None] >> shifts[None, :]) & np.uint64(0x7F)).astype(np.uint8)
    mat |= (cols[None, :] < (nbytes[:, None] - 1)).astype(np.uint8) << 7
    data = mat[cols[None, :] < nbytes[:, None]]
    offsets = np.zeros(len(n) + 1, dtype=np.int32)
    np.cumsum(nbytes, out=offsets[1:])
    return pa.Array.from_buffers(pa.binary(), len(n), [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def _cast(arr: pa.Array, target: pa.DataType) -> pa.Array:
    """`arr` as `target`: itself if it is already, a zero-copy view where the layouts agree, else a cast.

    Each pc.cast call has a fixed cost of tens of microseconds, which for a push of 1,000 rows adds up
    over a few dozen calls, most of them between types with the same bytes.
    """
    if arr.type == target:
        return arr
    if (pa.types.is_string(arr.type) and target == pa.binary()) or (
        pa.types.is_timestamp(arr.type) and target == pa.int64()
    ):
        return arr.view(target)
    return pc.cast(arr, target)


def _filled(arr: pa.Array, value: object) -> pa.Array:
    """`arr` with nulls replaced by `value`; the array itself when it has none."""
    return pc.fill_null(arr, value) if arr.null_count else arr


def _join(*parts: pa.Array | bytes) -> pa.Array:
    """Each row's parts one after another, in one kernel call; constant parts side by side merge first."""
    merged: list[pa.Array | bytes] = []
    for part in parts:
        if isinstance(part, bytes) and merged and isinstance(merged[-1], bytes):
            merged[-1] += part
        else:
            merged.append(part)
    args = [pa.scalar(p, pa.binary()) if isinstance(p, bytes) else p for p in merged]
    return pc.binary_join_element_wise(*args, b"")


def _length_delimited(tag: bytes, body: pa.Array) -> pa.Array:
    return _join(tag, varints(pc.binary_length(body).to_numpy(zero_copy_only=False)), body)


def _numbers(values: np.ndarray) -> pa.Array:
    mat = np.empty((len(values), 9), dtype=np.uint8)
    mat[:, 0] = VALUE_NUMBER[0]  # a fixed64
    mat[:, 1:] = np.ascontiguousarray(values, dtype="<f8").view(np.uint8).reshape(-1, 8)
    return _binary_from_matrix(mat)


def _strings(text: pa.Array) -> pa.Array:
    return _length_delimited(VALUE_STRING, _cast(text, pa.binary()))


def _floats(arr: pa.Array) -> pa.Array:
    values = _filled(_cast(arr, pa.float64()), 0.0).to_numpy(zero_copy_only=False)
    out = _numbers(values)
    if not np.isfinite(values).all():
        nan = pa.array(np.isnan(values))
        pos = pa.array(np.isposinf(values))
        neg = pa.array(np.isneginf(values))
        out = pc.if_else(nan, pa.scalar(_SPECIAL["NaN"], pa.binary()), out)
        out = pc.if_else(pos, pa.scalar(_SPECIAL["Infinity"], pa.binary()), out)
        out = pc.if_else(neg, pa.scalar(_SPECIAL["-Infinity"], pa.binary()), out)
    return out


def _civil(days: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Year, month and day of days since 1970-01-01 in the proleptic Gregorian calendar."""
    z = days + 719468
    era = np.floor_divide(z, 146097)
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = np.where(mp < 10, mp + 3, mp - 9)
    year = yoe + era * 400 + (month <= 2)
    return year, month, day


def timestamp_strings(micros: np.ndarray) -> pa.Array:
    """RFC 3339 strings in UTC with 0, 3 or 6 fractional digits, as proto3's JSON writes them."""
    micros = np.asarray(micros, dtype=np.int64)
    secs = np.floor_divide(micros, 1_000_000)
    frac = micros - secs * 1_000_000
    days = np.floor_divide(secs, 86400)
    in_day = secs - days * 86400
    year, month, day = _civil(days)
    mat = np.zeros((len(micros), 27), dtype=np.uint8)

    def digits(col: int, width: int, value: np.ndarray) -> None:
        for k in range(width):
            mat[:, col + width - 1 - k] = 48 + (value // 10**k) % 10

    digits(0, 4, year)
    digits(5, 2, month)
    digits(8, 2, day)
    digits(11, 2, in_day // 3600)
    digits(14, 2, in_day // 60 % 60)
    digits(17, 2, in_day % 60)
    digits(20, 6, frac)
    mat[:, [4, 7]] = ord("-")
    mat[:, 10] = ord("T")
    mat[:, [13, 16]] = ord(":")
    mat[:, 19] = ord(".")
    # Whole seconds end at 20 characters, whole milliseconds at 24, anything finer at 27.
    lengths = np.where(frac == 0, 20, np.where(frac % 1000 == 0, 24, 27))
    mat[np.arange(len(micros)), lengths - 1] = ord("Z")
    data = mat[np.arange(27)[None, :] < lengths[:, None]]
    offsets = np.zeros(len(micros) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.Array.from_buffers(pa.binary(), len(micros), [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def timestamp_string(micros: int) -> str:
    """The canonical RFC 3339 form of one timestamp."""
    secs, frac = divmod(micros, 1_000_000)
    text = datetime.fromtimestamp(secs, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    if secs < MIN_SECONDS + 1 or len(text) < 19:
        text = text.zfill(19)
    if frac == 0:
        return text + "Z"
    if frac % 1000 == 0:
        return f"{text}.{frac // 1000:03d}Z"
    return f"{text}.{frac:06d}Z"


def canonical(value: Any, dtype: DType) -> Any:
    """The canonical JSON value (as Python) of one Arrow-decoded value."""
    if value is None:
        return None
    kind = dtype.kind
    if kind is Kind.INT64:
        return str(value)
    if kind in (Kind.INT32, Kind.STRING, Kind.BOOL):
        return value
    if kind in (Kind.FLOAT32, Kind.FLOAT64):
        if math.isfinite(value):
            return float(value)
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if kind is Kind.TIMESTAMP:
        return timestamp_string(_micros(value))
    if kind is Kind.BYTES:
        return base64.b64encode(value).decode("ascii")
    if kind is Kind.ARRAY:
        assert dtype.element is not None
        return [canonical(v, dtype.element) for v in value]
    if kind is Kind.MAP:
        assert dtype.element is not None
        return {k: canonical(v, dtype.element) for k, v in value}
    return {f.name: canonical(value.get(f.name), f.dtype) for f in dtype.fields}


def _set_value(msg: struct_pb2.Value, value: Any) -> None:
    if value is None:
        msg.null_value = struct_pb2.NULL_VALUE
    elif isinstance(value, bool):
        msg.bool_value = value
    elif isinstance(value, str):
        msg.string_value = value
    elif isinstance(value, int | float):
        msg.number_value = value
    elif isinstance(value, list):
        lst = msg.list_value
        lst.SetInParent()
        for item in value:
            _set_value(lst.values.add(), item)
    else:
        st = msg.struct_value
        st.SetInParent()
        for k, item in value.items():
            _set_value(st.fields[k], item)


def _python_values(arr: pa.Array, dtype: DType) -> pa.Array:
    out = []
    for item in arr.to_pylist():
        if item is None:
            out.append(_NULL)
            continue
        msg = struct_pb2.Value()
        _set_value(msg, canonical(item, dtype))
        out.append(msg.SerializeToString(deterministic=True))
    return pa.array(out, pa.binary())


def value_messages(arr: pa.Array, dtype: DType) -> pa.Array:
    """The serialized google.protobuf.Value of every element, null where the element is null."""
    kind = dtype.kind
    if kind is Kind.STRING:
        body = _strings(_filled(arr, ""))
    elif kind is Kind.INT64:
        body = _strings(pc.cast(_filled(arr, 0), pa.string()))
    elif kind is Kind.INT32:
        body = _numbers(_filled(_cast(arr, pa.float64()), 0.0).to_numpy(zero_copy_only=False))
    elif kind in (Kind.FLOAT32, Kind.FLOAT64):
        body = _floats(arr)
    elif kind is Kind.BOOL:
        body = pc.if_else(
            _filled(arr, False),
            pa.scalar(VALUE_BOOL + b"\x01", pa.binary()),
            pa.scalar(VALUE_BOOL + b"\x00", pa.binary()),
        )
    elif kind is Kind.TIMESTAMP:
        micros = _filled(_cast(arr, pa.int64()), 0).to_numpy(zero_copy_only=False)
        body = _length_delimited(VALUE_STRING, timestamp_strings(micros))
    else:
        return _python_values(arr, dtype)
    if arr.null_count:
        body = pc.if_else(pc.is_valid(arr), body, pa.scalar(_NULL, pa.binary()))
    return body


def _entry_key(name: str) -> bytes:
    """The start of a Struct map entry for `name`: the key (field 1), then the Value's tag (field 2)."""
    raw = name.encode()
    return STRUCT_ENTRY_KEY + varint(len(raw)) + raw + STRUCT_ENTRY_VALUE


def null_entry(name: str) -> bytes:
    """The bytes of a field holding null in a serialized google.protobuf.Struct."""
    entry = _entry_key(name) + varint(len(_NULL)) + _NULL
    return STRUCT_FIELD + varint(len(entry)) + entry


def struct_entries(value: bytes, start: int) -> list[tuple[bytes, bytes]]:
    """(name, bytes) of each field of the features Struct that follows a stored payload's event_time.

    `start` is where the features field begins; the entries' bytes joined are the Struct again. ValueError
    where the Struct is not entries of a key then a Value, each inside its entry and the entries filling
    the Struct (a damaged value): its names would be misread, or entries sliced past their ends.
    """
    try:
        length, pos = read_varint(value, start + 1)
        end = pos + length
        if end > len(value):
            raise ValueError("a stored Struct runs past its value")
        entries: list[tuple[bytes, bytes]] = []
        while pos < end:
            entry_length, body = read_varint(value, pos + 1)
            entry_end = body + entry_length
            if value[pos] != STRUCT_FIELD[0] or entry_end > end or value[body] != STRUCT_ENTRY_KEY[0]:
                raise ValueError("a stored Struct entry is damaged")
            name_length, name = read_varint(value, body + 1)
            after = name + name_length
            if value[after : after + 1] != STRUCT_ENTRY_VALUE:
                raise ValueError("a stored Struct entry is damaged")
            # The Value is the entry's last field, so that the name read is the one protobuf reads.
            value_length, value_at = read_varint(value, after + 1)
            if value_at + value_length != entry_end:
                raise ValueError("a stored Struct entry is damaged")
            entries.append((value[name:after], value[pos:entry_end]))
            pos = entry_end
    except IndexError:
        # A varint or a tag past the end of the value.
        raise ValueError("a stored Struct is cut short") from None
    return entries


def with_late_nulls(body: bytes, late: dict[bytes, bytes]) -> bytes:
    """A stored payload (event_time, features), with a null entry for each late field the row lacks.

    `late` maps the names of fields added after the source held rows to their null Struct entries.
    """
    start = event_time_length(body)
    entries = struct_entries(body, start)
    missing = late.keys() - {name for name, _ in entries}
    if not missing:
        return body
    # Entries stay in name order, as the encoder writes them for rows stored with every field.
    entries += [(name, late[name]) for name in missing]
    entries.sort()
    joined = b"".join(entry for _, entry in entries)
    return body[:start] + FEATURE_VECTOR_FEATURES + varint(len(joined)) + joined


def field_entries(table: pa.Table, fields: Sequence[FieldSpec]) -> tuple[list[pa.Array | bytes], np.ndarray]:
    """The pieces of every row's serialized google.protobuf.Struct of its fields, and each row's length.

    Joined in order the pieces are the Struct: per field, in name order, a map entry (key as field 1,
    Value as field 2) inside `fields` (field 1), so its length prefixes are computed from the Value's
    length. Where a field's Values all have one length, the bytes before them are one constant piece.
    """
    parts: list[pa.Array | bytes] = []
    total = np.zeros(table.num_rows, dtype=np.int64)
    for f in sorted(fields, key=lambda f: f.name.encode()):
        values = value_messages(table.column(f.name).combine_chunks(), f.dtype)
        value_len = pc.binary_length(values).to_numpy(zero_copy_only=False).astype(np.int64)
        key = _entry_key(f.name)
        if len(value_len) and value_len.min() == value_len.max():
            size = int(value_len[0])
            entry = len(key) + len(varint(size)) + size
            parts += [STRUCT_FIELD + varint(entry) + key + varint(size), values]
            total += 1 + len(varint(entry)) + entry
        else:
            entry_len = len(key) + varint_sizes(value_len) + value_len
            parts += [STRUCT_FIELD, varints(entry_len), key, varints(value_len), values]
            total += 1 + varint_sizes(entry_len) + entry_len
    return parts, total


def event_time_field(micros: int) -> bytes:
    """FeatureVector.event_time (field 2): a Timestamp of seconds (field 1) and nanos (field 2)."""
    seconds, rest = divmod(micros, 1_000_000)
    # Negative seconds are written as 64-bit two's complement, as protobuf does for int64.
    body = (TIMESTAMP_SECONDS + varint(seconds % (1 << 64)) if seconds else b"") + (
        TIMESTAMP_NANOS + varint(rest * 1000) if rest else b""
    )
    return FEATURE_VECTOR_EVENT_TIME + varint(len(body)) + body


def event_time_fields(micros: np.ndarray) -> pa.Array:
    """event_time_field of every element, column at a time."""
    return _join(*event_time_parts(micros))


def event_time_parts(micros: np.ndarray) -> list[pa.Array | bytes]:
    """The pieces of every element's event_time_field, joined in order; constant where all rows agree."""
    seconds = np.floor_divide(micros, 1_000_000)
    nanos = (micros - seconds * 1_000_000) * 1000
    # Negative seconds are written as 64-bit two's complement, as protobuf does for int64.
    unsigned = seconds.view(np.uint64)
    parts: list[pa.Array | bytes] = []
    body_len = np.zeros(len(micros), dtype=np.int64)
    for tag, value in ((TIMESTAMP_SECONDS, unsigned), (TIMESTAMP_NANOS, nanos)):
        # A zero field is left out, as protobuf leaves out defaults.
        present = value != 0
        if not present.any():
            continue
        body_len += np.where(present, 1 + varint_sizes(value), 0)
        field = [tag, varints(value)]
        parts += field if present.all() else [pc.if_else(pa.array(present), _join(*field), b"")]
    return [FEATURE_VECTOR_EVENT_TIME, varints(body_len), *parts]


def payload_whole(payload: bytes) -> bool:
    """Whether a stored payload is whole: its event_time field, then its features field up to its end.

    A value cut short would otherwise read as a vector without features, or reach a caller as a reply that
    does not parse.
    """
    if len(payload) < 2 or payload[0] != FEATURE_VECTOR_EVENT_TIME[0]:
        return False
    at = event_time_length(payload)
    if payload[at : at + 1] != FEATURE_VECTOR_FEATURES:
        return False
    try:
        size, end = read_varint(payload, at + 1)
    except IndexError:
        return False
    return end + size == len(payload)


def event_time_length(payload: bytes) -> int:
    """The length of the event_time field that starts a stored payload (it is under 128 bytes)."""
    return 2 + payload[1]


def key_text(arr: pa.Array) -> pa.Array:
    """Entity key values as text: strings as they are, integers in decimal."""
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        return _cast(arr, pa.binary())
    return _cast(pc.cast(arr, pa.string()), pa.binary())


def encode_keys(columns: Sequence[pa.Array], prefix: bytes) -> pa.Array:
    """Store keys: the prefix, then each key part (length-prefixed when there are several)."""
    texts = [key_text(c) for c in columns]
    if len(texts) == 1:
        return _join(prefix, texts[0])
    parts: list[pa.Array | bytes] = [prefix]
    for t in texts:
        parts.append(varints(pc.binary_length(t).to_numpy(zero_copy_only=False)))
        parts.append(t)
    return _join(*parts)


def key_part(value: str | int) -> bytes:
    """One entity key value as the store writes it: strings as they are, integers in decimal."""
    return value.encode() if isinstance(value, str) else str(value).encode()


def python_key(parts: Sequence[bytes], prefix: bytes) -> bytes:
    """The store key of one entity, as encode_keys writes it for a column."""
    if len(parts) == 1:
        return prefix + parts[0]
    return prefix + b"".join(varint(len(p)) + p for p in parts)


# Below this many rows, plain Python beats the fixed cost of the column kernels.
SMALL_BATCH = 16


def _encode_small(
    table: pa.Table,
    fields: Sequence[FieldSpec],
    entity_keys: Sequence[str],
    timestamp_field: str,
    prefix: bytes,
) -> tuple[list[bytes], list[bytes]]:
    """The same keys and values as the column path, built row by row for a handful of rows."""
    # A list per column costs less than Table.to_pylist's dict per row, and each row's event time is taken
    # from its datetime rather than by a cast kernel: for a handful of rows the fixed costs dominate.
    by_name = dict(zip(table.column_names, (column.to_pylist() for column in table.columns), strict=True))
    for f in fields:
        if f.dtype.kind is Kind.TIMESTAMP:
            by_name[f.name] = [None if t is None else _micros(t) for t in by_name[f.name]]
    return encode_python(by_name, fields, entity_keys, timestamp_field, prefix)


def encode_python(
    columns: Mapping[str, Sequence[Any]],
    fields: Sequence[FieldSpec],
    entity_keys: Sequence[str],
    timestamp_field: str,
    prefix: bytes,
) -> tuple[list[bytes], list[bytes]]:
    """Keys and stored values of a few rows given as Python values, column by column, as Arrow decodes them.

    Top-level Timestamps are microseconds since the epoch and Float32 values already float32; nested
    values are as `Array.to_pylist` gives them. The bytes are those the column path writes.
    """
    names = [f.name for f in fields]
    by_row = zip(*(columns[name] for name in names), strict=True)
    rows = [dict(zip(names, values, strict=True)) for values in by_row]
    ordered = _ordered_entries(fields)
    count = _FIELD_COUNT.pack(len(ordered))
    keys: list[bytes] = []
    values: list[bytes] = []
    for row in rows:
        keys.append(python_key([key_part(row[k]) for k in entity_keys], prefix))
        # Entries are written by hand in name order: protobuf's own deterministic map order differs.
        out = []
        slots: list[bytes] = []
        valid = bytearray()
        variable: list[bytes] = []
        for f, key in ordered:
            item = row[f.name]
            value = _value_message(item, f.dtype)
            entry = key + varint(len(value)) + value
            out.append(STRUCT_FIELD + varint(len(entry)) + entry)
            slot, part = (0, b"") if item is None else _cell(item, f.dtype, value)
            slots.append(_SLOT_F64.pack(slot) if isinstance(slot, float) else _SLOT_I64.pack(slot))
            valid.append(item is not None)
            variable.append(part)
        payload = b"".join(out)
        columns_part = count + b"".join(slots) + bytes(valid) + b"".join(variable)
        t = row[timestamp_field]
        features = event_time_field(t) + FEATURE_VECTOR_FEATURES + varint(len(payload)) + payload
        values.append(frame(time_header(t), columns_part, features))
    return keys, values


# Kinds whose canonical JSON value is always a string (the floats' is one only when not finite).
_TEXT_VALUES = frozenset((Kind.STRING, Kind.INT64, Kind.TIMESTAMP, Kind.BYTES))


# Each schema's ordered entries, by the identity of its fields' tuple (a source's spec holds one): hashing
# the fields themselves (frozen dataclasses, hashed member by member in Python) cost more than ordering
# them. The tuple is kept beside its entries, so its id cannot be reused while it is cached.
_ORDERED: dict[int, tuple[tuple[FieldSpec, ...], list[tuple[FieldSpec, bytes]]]] = {}


def _ordered_entries(fields: Sequence[FieldSpec]) -> list[tuple[FieldSpec, bytes]]:
    """A schema's fields in the stored Struct's order (by name's bytes), each with its entry's start."""
    known = _ORDERED.get(id(fields))
    if known is not None and known[0] is fields:
        return known[1]
    entries = [(f, _entry_key(f.name)) for f in sorted(fields, key=lambda f: f.name.encode())]
    if isinstance(fields, tuple):
        if len(_ORDERED) >= 256:
            _ORDERED.clear()
        _ORDERED[id(fields)] = (fields, entries)
    return entries


def _value_message(item: Any, dtype: DType) -> bytes:
    """The serialized google.protobuf.Value of one value as encode_python takes it, as value_messages writes.

    Scalars are written by hand, as the column path writes them; nested values go through the message.
    """
    if item is None:
        return _NULL
    kind = dtype.kind
    if kind in _TEXT_VALUES:
        text: bytes = (timestamp_string(item) if kind is Kind.TIMESTAMP else canonical(item, dtype)).encode()
        return VALUE_STRING + varint(len(text)) + text
    if kind is Kind.INT32:
        return VALUE_NUMBER + _SLOT_F64.pack(item)
    if kind in _FLOAT_SLOTS:
        if math.isfinite(item):
            return VALUE_NUMBER + _SLOT_F64.pack(item)
        return _SPECIAL["NaN" if math.isnan(item) else ("Infinity" if item > 0 else "-Infinity")]
    if kind is Kind.BOOL:
        return VALUE_BOOL + (b"\x01" if item else b"\x00")
    message = struct_pb2.Value()
    _set_value(message, canonical(item, dtype))
    serialized: bytes = message.SerializeToString(deterministic=True)
    return serialized


def encode_rows(
    table: pa.Table,
    fields: Sequence[FieldSpec],
    entity_keys: Sequence[str],
    timestamp_field: str,
    prefix: bytes,
    *,
    small_batch: int = SMALL_BATCH,
    by_key: bool = False,
) -> tuple[list[bytes], list[bytes]]:
    """Keys and stored values (header, event time, features) of every row of a conformed table.

    In row order, or with `by_key` in key order where the column path runs (rows of one key keep their
    order): RocksDB puts a write batch's rows in its memtable faster in key order.
    """
    if table.num_rows == 0:
        return [], []
    if table.num_rows <= small_batch:
        return _encode_small(table, fields, entity_keys, timestamp_field, prefix)
    keys = encode_keys([table.column(k).combine_chunks() for k in entity_keys], prefix)
    micros = pc.cast(table.column(timestamp_field), pa.int64()).to_numpy()
    parts, payload_len = field_entries(table, fields)
    features = [FEATURE_VECTOR_FEATURES, varints(payload_len), *parts]
    fixed, variable, variable_len = column_parts(table, fields)
    # The header, the columns' length and the columns' fixed part are fixed-width: one matrix.
    head = np.concatenate([head_matrix(micros, fixed.shape[1] + variable_len), fixed], axis=1)
    # One join of every piece: each row's bytes are copied once.
    values = _join(_binary_from_matrix(head), *variable, *event_time_parts(micros), *features)
    if by_key:
        # A stable sort in Arrow's C++ code, which lets other threads run: 0.15 us a row, for about 8% of
        # a store owner's CPU per row (1,000-row pushes of random entities, 2-core).
        order = pc.sort_indices(keys)
        keys, values = keys.take(order), values.take(order)
    return binary_list(keys), binary_list(values)


def binary_list(arr: pa.Array) -> list[bytes]:
    """The elements of a binary array without nulls as bytes objects, made in Arrow's C++ code.

    `to_pylist` makes a Python scalar per element first, which costs about four times as much.
    """
    items: list[bytes] = arr.to_numpy(zero_copy_only=False).tolist()
    return items


# The columns' field count, and the slots of integer-like and float values.
_FIELD_COUNT = struct.Struct("<H")
_SLOT_I64 = struct.Struct("<q")
_SLOT_F64 = struct.Struct("<d")
_INTEGER_SLOTS = frozenset((Kind.INT32, Kind.INT64, Kind.BOOL, Kind.TIMESTAMP))
_FLOAT_SLOTS = frozenset((Kind.FLOAT32, Kind.FLOAT64))
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _micros(when: datetime) -> int:
    """An aware datetime's microseconds since the epoch, exactly."""
    delta = when - _EPOCH
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


def _cell(item: Any, dtype: DType, value: bytes) -> tuple[int | float, bytes]:
    """One non-null value's slot and variable part as encode_columns writes them; `value` is its Value."""
    kind = dtype.kind
    if kind in _INTEGER_SLOTS:
        return int(item), b""
    if kind in _FLOAT_SLOTS:
        return float(item), b""
    part = item.encode() if kind is Kind.STRING else item if kind is Kind.BYTES else value
    return len(part), part


def encode_columns(table: pa.Table, fields: Sequence[FieldSpec]) -> pa.Array:
    """Every row's columns (see the module's docstring), column at a time."""
    fixed, variable, _ = column_parts(table, fields)
    return _join(_binary_from_matrix(fixed), *variable)


def column_parts(
    table: pa.Table, fields: Sequence[FieldSpec]
) -> tuple[np.ndarray, list[pa.Array], np.ndarray]:
    """Every row's columns in pieces: the fixed part as an (n, 2 + 9 * fields) matrix, the variable parts
    in field order, and each row's variable length."""
    ordered = sorted(fields, key=lambda f: f.name.encode())
    n, width = table.num_rows, len(ordered)
    fixed = np.zeros((n, 2 + 9 * width), dtype=np.uint8)
    fixed[:, :2] = np.frombuffer(_FIELD_COUNT.pack(width), dtype=np.uint8)
    variable: list[pa.Array] = []
    variable_len = np.zeros(n, dtype=np.int64)
    for j, f in enumerate(ordered):
        arr = table.column(f.name).combine_chunks()
        valid = pc.is_valid(arr).to_numpy(zero_copy_only=False) if arr.null_count else True
        fixed[:, 2 + 8 * width + j] = valid
        kind = f.dtype.kind
        if kind in _FLOAT_SLOTS:
            slot = _filled(_cast(arr, pa.float64()), 0.0).to_numpy(zero_copy_only=False).astype("<f8")
        elif kind in _INTEGER_SLOTS:
            slot = _filled(_cast(arr, pa.int64()), 0).to_numpy(zero_copy_only=False).astype("<i8")
        else:
            if kind is Kind.STRING or kind is Kind.BYTES:
                part = _filled(_cast(arr, pa.binary()), b"")
            else:
                part = value_messages(arr, f.dtype)
                if arr.null_count:
                    part = pc.if_else(pc.is_valid(arr), part, pa.scalar(b"", pa.binary()))
            variable.append(part)
            slot = pc.binary_length(part).to_numpy(zero_copy_only=False).astype("<i8")
            variable_len += slot
        fixed[:, 2 + 8 * j : 10 + 8 * j] = np.ascontiguousarray(slot).view(np.uint8).reshape(n, 8)
    return fixed, variable, variable_len


# How decode_columns reads a field's slot.
_READ_FLOAT64, _READ_FLOAT32, _READ_BOOL, _READ_INT32, _READ_INT64, _READ_BINARY, _READ_NESTED = range(7)


@dataclass(frozen=True)
class ColumnsPlan:
    """What decoding rows' columns needs of a schema, worked out once: fields in name order, their reads."""

    fields: tuple[FieldSpec, ...]
    reads: tuple[int, ...]
    arrow_types: tuple[pa.DataType, ...]
    varying: tuple[int, ...]

    @classmethod
    def of(cls, fields: Sequence[FieldSpec]) -> ColumnsPlan:
        ordered = tuple(sorted(fields, key=lambda f: f.name.encode()))
        reads = tuple(_read_of(f.dtype.kind) for f in ordered)
        varying = tuple(j for j, r in enumerate(reads) if r in (_READ_BINARY, _READ_NESTED))
        return cls(ordered, reads, tuple(f.dtype.to_arrow() for f in ordered), varying)


def _read_of(kind: Kind) -> int:
    if kind is Kind.FLOAT64:
        return _READ_FLOAT64
    if kind is Kind.FLOAT32:
        return _READ_FLOAT32
    if kind is Kind.BOOL:
        return _READ_BOOL
    if kind is Kind.INT32:
        return _READ_INT32
    if kind in _INTEGER_SLOTS:
        return _READ_INT64
    return _READ_BINARY if kind in (Kind.STRING, Kind.BYTES) else _READ_NESTED


def decode_columns(
    blob: np.ndarray, starts: np.ndarray, lengths: np.ndarray, plan: ColumnsPlan
) -> dict[str, pa.Array] | None:
    """The plan's fields from rows' columns, at `starts` with `lengths` in `blob` (see framing.locate).

    None when a row was stored with other fields (before some were added); the caller reads the payload.
    Every row is decoded at once with numpy: no Python runs per row but for Array, Map and Struct values.
    """
    n, width = len(starts), len(plan.fields)
    fixed_width = 2 + 9 * width
    if (lengths < fixed_width).any():
        return None
    fixed = blob[starts[:, None] + np.arange(fixed_width)]
    if (fixed[:, :2].copy().view("<u2").ravel() != width).any():
        return None
    slots = np.ascontiguousarray(fixed[:, 2 : 2 + 8 * width]).view("<i8")
    valid = fixed[:, 2 + 8 * width :].astype(bool)
    all_valid: np.ndarray = np.asarray(valid.all(axis=0))
    if plan.varying:
        sizes = slots[:, plan.varying]
        # Parts that do not fill the columns exactly (a value cut short, a damaged size) would be read from
        # a neighbouring row, or sized in terabytes: the payload says what the row holds.
        if (sizes < 0).any() or (sizes.sum(axis=1) != lengths - fixed_width).any():
            return None
        # Each row's variable parts follow its fixed part, one after another in field order.
        part_starts = (starts + fixed_width)[:, None] + np.cumsum(sizes, axis=1) - sizes
    out: dict[str, pa.Array] = {}
    for j, (f, read, arrow_type) in enumerate(zip(plan.fields, plan.reads, plan.arrow_types, strict=True)):
        mask = None if all_valid[j] else ~valid[:, j]
        validity = None if mask is None else pa.array(valid[:, j]).buffers()[1]
        if read == _READ_BOOL:
            out[f.name] = pa.array(slots[:, j] != 0, mask=mask)
        elif read != _READ_BINARY and read != _READ_NESTED:
            column = slots[:, j]
            if read == _READ_FLOAT64:
                column = column.view("<f8")
            elif read == _READ_FLOAT32:
                column = column.view("<f8").astype(np.float32)
            elif read == _READ_INT32:
                column = column.astype(np.int32)
            # The slots are the values' own bytes: the array wraps them as they are.
            data = pa.py_buffer(np.ascontiguousarray(column))
            out[f.name] = pa.Array.from_buffers(arrow_type, n, [validity, data])
        else:
            k = plan.varying.index(j)
            size = sizes[:, k]
            offsets = np.zeros(n + 1, dtype=np.int64)
            np.cumsum(size, out=offsets[1:])
            # The bytes of this field's parts, gathered from every row into one buffer.
            data = blob[np.repeat(part_starts[:, k] - offsets[:-1], size) + np.arange(offsets[-1])]
            if read == _READ_BINARY:
                buffers = [validity, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(data)]
                out[f.name] = pa.Array.from_buffers(arrow_type, n, buffers)
            else:
                raw = data.tobytes()
                nested = [
                    stored_value(raw[offsets[i] : offsets[i + 1]], f.dtype) if valid[i, j] else None
                    for i in range(n)
                ]
                out[f.name] = pa.array(nested, arrow_type)
    return out
