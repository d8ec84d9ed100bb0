"""The codec between Python values and the wire JSON records (google.protobuf.Struct)."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import functools
import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from google.protobuf import struct_pb2

from featurepush import types as t

__all__ = [
    "EncodingError",
    "decode_record",
    "decode_value",
    "fill_struct",
    "format_timestamp",
    "key_to_struct",
    "parse_timestamp",
    "record_to_struct",
]

# Integers up to 2**53 survive a JSON double exactly; larger ones go as decimal strings, as proto3 JSON does.
_MAX_EXACT_INT = 2**53
_NONFINITE_TO_JSON = {math.inf: "Infinity", -math.inf: "-Infinity"}
_NONFINITE_FROM_JSON = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


class EncodingError(Exception):
    """A value the Struct encoder cannot take: where it is (`path`) and what is wrong (`problem`)."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path or 'record'}: {problem}")
        self.path = path or "record"
        self.problem = problem


class _EncodingTypeError(EncodingError, TypeError):
    """A value of a type the encoder does not take."""


class _EncodingValueError(EncodingError, ValueError):
    """A value of a type the encoder takes, but not this value (a naive datetime)."""


def format_timestamp(value: dt.datetime) -> str:
    """Returns an aware datetime as canonical RFC 3339 in UTC: "Z" and 0, 3 or 6 fractional digits."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"datetime {value.isoformat()} is naive; give it a timezone")
    utc = value.astimezone(dt.UTC)
    # strftime's %Y leaves years below 1000 short of the four digits RFC 3339 requires.
    base = f"{utc.year:04d}-{utc.month:02d}-{utc.day:02d}T{utc.hour:02d}:{utc.minute:02d}:{utc.second:02d}"
    micros = utc.microsecond
    if micros == 0:
        return base + "Z"
    if micros % 1000 == 0:
        return f"{base}.{micros // 1000:03d}Z"
    return f"{base}.{micros:06d}Z"


def parse_timestamp(text: str) -> dt.datetime:
    """Returns the aware UTC datetime of an RFC 3339 string with an offset; raises ValueError otherwise."""
    # fromisoformat also takes dates and naive times, which RFC 3339 does not; insist on time and offset.
    if len(text) < 20 or text[10] not in "Tt ":
        raise ValueError(f"{text!r} is not an RFC 3339 timestamp")
    if text[-1] in "zZ":
        text = text[:-1] + "+00:00"
    head, dot, rest = text.partition(".")
    if dot:
        # Python keeps microseconds; RFC 3339 allows any number of fractional digits.
        digits = len(rest) - len(rest.lstrip("0123456789"))
        if digits > 6:
            rest = rest[:6] + rest[digits:]
        text = f"{head}.{rest}"
    parsed = dt.datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        raise ValueError(f"{text!r} has no UTC offset")
    return parsed.astimezone(dt.UTC)


def _join(path: str, key: str) -> str:
    if key.isidentifier():
        return f"{path}.{key}" if path else key
    return f'{path}["{key}"]'


# Each setter writes one Python value into a struct_pb2.Value in place, so a record is encoded in a single
# pass with no intermediate JSON-like dict.
def _set_str(target: struct_pb2.Value, value: Any, path: str) -> None:
    target.string_value = value


def _set_bool(target: struct_pb2.Value, value: Any, path: str) -> None:
    target.bool_value = value


def _set_none(target: struct_pb2.Value, value: Any, path: str) -> None:
    target.null_value = struct_pb2.NULL_VALUE


def _set_int(target: struct_pb2.Value, value: Any, path: str) -> None:
    if -_MAX_EXACT_INT <= value <= _MAX_EXACT_INT:
        target.number_value = value
    else:
        target.string_value = str(int(value))


def _set_float(target: struct_pb2.Value, value: Any, path: str) -> None:
    if math.isfinite(value):
        target.number_value = value
    elif math.isnan(value):
        target.string_value = "NaN"
    else:
        target.string_value = _NONFINITE_TO_JSON[value]


def _set_bytes(target: struct_pb2.Value, value: Any, path: str) -> None:
    target.string_value = base64.b64encode(value).decode("ascii")


def _set_datetime(target: struct_pb2.Value, value: Any, path: str) -> None:
    if value.tzinfo is None or value.utcoffset() is None:
        raise _EncodingValueError(path, f"datetime {value.isoformat()} is naive; give it a timezone")
    target.string_value = format_timestamp(value)


def _set_mapping(target: struct_pb2.Value, value: Any, path: str) -> None:
    struct = target.struct_value
    struct.SetInParent()
    fill_struct(struct, value, path)


def _set_sequence(target: struct_pb2.Value, value: Any, path: str) -> None:
    values = target.list_value.values
    target.list_value.SetInParent()
    for index, item in enumerate(value):
        _set_value(values.add(), item, f"{path}[{index}]")


_Setter = Callable[[struct_pb2.Value, Any, str], None]
_SETTERS: dict[type, _Setter] = {
    str: _set_str,
    bool: _set_bool,
    type(None): _set_none,
    int: _set_int,
    float: _set_float,
    bytes: _set_bytes,
    bytearray: _set_bytes,
    dt.datetime: _set_datetime,
    dict: _set_mapping,
    list: _set_sequence,
    tuple: _set_sequence,
}


def _setter_for_subclass(value: Any, path: str) -> _Setter:
    # Exact types hit _SETTERS directly; this handles subclasses and numeric types such as numpy's.
    if isinstance(value, str):
        return _set_str
    if isinstance(value, bool):
        return _set_bool
    if isinstance(value, dt.datetime):
        return _set_datetime
    if isinstance(value, dt.date):
        raise _EncodingTypeError(path, "a date is not a timestamp; pass an aware datetime")
    if isinstance(value, numbers.Integral):
        return lambda target, v, p: _set_int(target, int(v), p)
    if isinstance(value, numbers.Real):
        return lambda target, v, p: _set_float(target, float(v), p)
    if isinstance(value, bytes | bytearray | memoryview):
        return lambda target, v, p: _set_bytes(target, bytes(v), p)
    if isinstance(value, Mapping):
        return _set_mapping
    if isinstance(value, list | tuple):
        return _set_sequence
    raise _EncodingTypeError(path, f"cannot encode {type(value).__name__} {value!r}")


def _set_value(target: struct_pb2.Value, value: Any, path: str) -> None:
    setter = _SETTERS.get(type(value))
    if setter is None:
        setter = _setter_for_subclass(value, path)
    setter(target, value, path)


def fill_struct(struct: struct_pb2.Struct, record: Mapping[str, Any], path: str = "") -> None:
    """Encodes record into struct in place (e.g. a message from rows.add()); see record_to_struct."""
    fields = struct.fields
    for key, value in record.items():
        if not isinstance(key, str):
            raise _EncodingTypeError(path, f"keys must be str, got {type(key).__name__} {key!r}")
        _set_value(fields[key], value, _join(path, key))


def record_to_struct(record: Mapping[str, Any]) -> struct_pb2.Struct:
    """Encodes a record schema-free for pushing.

    str, bool and None map to themselves; an int is a JSON number up to 2**53 in magnitude, else a decimal
    string; a non-finite float is "NaN", "Infinity" or "-Infinity"; an aware datetime is RFC 3339 in UTC
    (a naive one raises ValueError, a date raises TypeError); bytes are standard base64; lists and tuples
    are lists; mappings are objects. Anything else raises TypeError naming the field path.
    """
    struct = struct_pb2.Struct()
    fill_struct(struct, record)
    return struct


def key_to_struct(key: Any, entity_keys: Sequence[str]) -> struct_pb2.Struct:
    """Encodes an entity key: a mapping goes as is; a tuple or scalar is matched to entity_keys in order."""
    if isinstance(key, Mapping):
        return record_to_struct(key)
    parts = key if isinstance(key, tuple) else (key,)
    if len(parts) != len(entity_keys):
        raise ValueError(
            f"key {key!r} has {len(parts)} part(s) but the source's entity keys are {list(entity_keys)}"
        )
    return record_to_struct(dict(zip(entity_keys, parts, strict=True)))


def _fail(path: str, expected: str, value: struct_pb2.Value) -> ValueError:
    kind = value.WhichOneof("kind") or "nothing"
    return ValueError(f"{path}: expected {expected}, got {kind}")


def _decode_float(value: struct_pb2.Value, path: str) -> float:
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        return value.number_value
    if kind == "string_value" and value.string_value in _NONFINITE_FROM_JSON:
        return _NONFINITE_FROM_JSON[value.string_value]
    raise _fail(path, 'a number or "NaN", "Infinity", "-Infinity"', value)


# The server's rule: one alphabet, standard or URL-safe; padding to a multiple of four or none.
_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}|[A-Za-z0-9\-_]*={0,2}")


def _decode_bytes(text: str, path: str) -> bytes:
    body = text.rstrip("=")
    pad = len(text) - len(body)
    if not _BASE64.fullmatch(text) or len(body) % 4 == 1 or (pad and (len(body) + pad) % 4):
        raise ValueError(f"{path}: invalid base64: {text[:40]!r}")
    urlsafe = "-" in body or "_" in body
    padded = body + "=" * (-len(body) % 4)
    try:
        raw = base64.urlsafe_b64decode(padded) if urlsafe else base64.b64decode(padded, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"{path}: invalid base64: {exc}") from None
    again = base64.urlsafe_b64encode(raw) if urlsafe else base64.b64encode(raw)
    if again.decode().rstrip("=") != body:
        raise ValueError(f"{path}: invalid base64: nonzero bits after the last byte")
    return raw


# A decoder reads one Value of its type, null as None, and names `path` in a ValueError when it does not fit.
_Decoder = Callable[[struct_pb2.Value, str], Any]


def _decode_string(value: struct_pb2.Value, path: str) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "null_value" or kind is None:
        return None
    raise _fail(path, "a string", value)


def _decode_integer(value: struct_pb2.Value, path: str) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        try:
            return int(value.string_value)
        except ValueError:
            raise ValueError(f"{path}: {value.string_value!r} is not a decimal integer") from None
    if kind == "number_value":
        number = value.number_value
        if number.is_integer():
            return int(number)
    elif kind == "null_value" or kind is None:
        return None
    raise _fail(path, "an integer", value)


def _decode_number(value: struct_pb2.Value, path: str) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        return value.number_value
    if kind == "null_value" or kind is None:
        return None
    return _decode_float(value, path)


def _decode_boolean(value: struct_pb2.Value, path: str) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "bool_value":
        return value.bool_value
    if kind == "null_value" or kind is None:
        return None
    raise _fail(path, "a boolean", value)


# The lengths of RFC 3339 in UTC with 0, 3 or 6 fractional digits, as the server writes timestamps.
_CANONICAL_LENGTHS = frozenset((20, 24, 27))


def _decode_timestamp(value: struct_pb2.Value, path: str) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "null_value" or kind is None:
        return None
    if kind != "string_value":
        raise _fail(path, "a Timestamp string", value)
    text = value.string_value
    if len(text) in _CANONICAL_LENGTHS and text[-1] == "Z" and text[10] == "T":
        # The server's canonical form, which fromisoformat reads as is, already in UTC.
        try:
            parsed: dt.datetime | None = dt.datetime.fromisoformat(text)
        except ValueError:
            parsed = None  # not a real date: parse_timestamp below words the refusal
        if parsed is not None and parsed.tzinfo is dt.UTC:
            return parsed
    try:
        return parse_timestamp(text)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def _decode_base64(value: struct_pb2.Value, path: str) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "null_value" or kind is None:
        return None
    if kind != "string_value":
        raise _fail(path, "a Bytes string", value)
    return _decode_bytes(value.string_value, path)


_SCALAR_DECODERS: dict[t.DataType, _Decoder] = {
    t.String: _decode_string,
    t.Int64: _decode_integer,
    t.Int32: _decode_integer,
    t.Float64: _decode_number,
    t.Float32: _decode_number,
    t.Bool: _decode_boolean,
    t.Timestamp: _decode_timestamp,
    t.Bytes: _decode_base64,
}


def _array_decoder(dtype: t.Array) -> _Decoder:
    element = _decoder(dtype.element_type)

    def decode(value: struct_pb2.Value, path: str) -> Any:
        kind = value.WhichOneof("kind")
        if kind == "null_value" or kind is None:
            return None
        if kind != "list_value":
            raise _fail(path, "a list", value)
        return [element(item, f"{path}[{i}]") for i, item in enumerate(value.list_value.values)]

    return decode


def _object_decoder(dtype: t.DataType) -> _Decoder:
    if isinstance(dtype, t.Map):
        values = _decoder(dtype.value_type)

        def read(struct: struct_pb2.Struct, path: str) -> Any:
            return {k: values(v, f'{path}["{k}"]') for k, v in struct.fields.items()}

    elif isinstance(dtype, t.Struct):
        fields = _fields_decoder(dtype.fields)

        def read(struct: struct_pb2.Struct, path: str) -> Any:
            return fields(struct, path)

    else:

        def read(struct: struct_pb2.Struct, path: str) -> Any:
            raise TypeError(f"{path}: unknown type {dtype!r}")

    def decode(value: struct_pb2.Value, path: str) -> Any:
        kind = value.WhichOneof("kind")
        if kind == "null_value" or kind is None:
            return None
        if kind != "struct_value":
            raise _fail(path, "an object", value)
        return read(value.struct_value, path)

    return decode


def _unknown_scalar_decoder(dtype: t.DataType) -> _Decoder:
    def decode(value: struct_pb2.Value, path: str) -> Any:
        kind = value.WhichOneof("kind")
        if kind == "null_value" or kind is None:
            return None
        if kind != "string_value":
            raise _fail(path, f"a {dtype!r} string", value)
        return _decode_bytes(value.string_value, path)

    return decode


@functools.lru_cache(maxsize=1024)
def _decoder(dtype: t.DataType) -> _Decoder:
    """The decoder of a type, worked out once: no comparison of types runs per value."""
    scalar = _SCALAR_DECODERS.get(dtype)
    if scalar is not None:
        return scalar
    if isinstance(dtype, t.ScalarType):
        return _unknown_scalar_decoder(dtype)
    if isinstance(dtype, t.Array):
        return _array_decoder(dtype)
    return _object_decoder(dtype)


def decode_value(value: struct_pb2.Value, dtype: t.DataType, path: str = "value") -> Any:
    """Decodes one canonical JSON value of type dtype into Python; null becomes None."""
    return _decoder(dtype)(value, path)


_FieldsDecoder = Callable[[struct_pb2.Struct, str], dict[str, Any]]


def _fields_decoder(fields: Sequence[t.Field]) -> _FieldsDecoder:
    """The decoder of a record of `fields`: per field its name, its decoder and its path's last part."""
    plan = [(f.name, _decoder(f.dtype)) for f in fields]
    top = [(name, decode, _join("", name)) for name, decode in plan]

    def decode_fields(struct: struct_pb2.Struct, path: str) -> dict[str, Any]:
        raw = struct.fields
        out: dict[str, Any] = {}
        if path:
            for name, decode in plan:
                # An absent nullable field reads as null, as the server writes every field anyway.
                value = raw.get(name)
                out[name] = None if value is None else decode(value, _join(path, name))
        else:
            # A record's paths are its fields' names, joined once when the decoder is built.
            for name, decode, field_path in top:
                value = raw.get(name)
                out[name] = None if value is None else decode(value, field_path)
        return out

    return decode_fields


# Record decoders by the identity of their schema (a definition's tuple, read after read), then by value.
_RECORDS_BY_ID: dict[int, tuple[Sequence[t.Field], _FieldsDecoder]] = {}
_RECORDS: dict[tuple[t.Field, ...], _FieldsDecoder] = {}


def _record_decoder(schema: Sequence[t.Field]) -> _FieldsDecoder:
    cached = _RECORDS_BY_ID.get(id(schema))
    if cached is not None and cached[0] is schema:
        return cached[1]
    fields = tuple(schema)
    decoder = _RECORDS.get(fields)
    if decoder is None:
        if len(_RECORDS) >= 256:
            _RECORDS.clear()
        decoder = _RECORDS[fields] = _fields_decoder(fields)
    if isinstance(schema, tuple):
        # Only a tuple is kept by identity: a list may change or be one of many built per call.
        if len(_RECORDS_BY_ID) >= 256:
            _RECORDS_BY_ID.clear()
        _RECORDS_BY_ID[id(schema)] = (schema, decoder)
    return decoder


def decode_record(struct: struct_pb2.Struct, schema: Sequence[t.Field]) -> dict[str, Any]:
    """Decodes a canonical JSON record into Python values by schema, one key per schema field in order.

    Int32/Int64 become int, Float32/Float64 float (with nan and infinities), Timestamp an aware UTC
    datetime, Bytes bytes, Array a list, Map a dict, Struct a dict of its fields; null becomes None.
    Raises ValueError naming the path of a value that does not match its type.
    """
    return _record_decoder(schema)(struct, "")
