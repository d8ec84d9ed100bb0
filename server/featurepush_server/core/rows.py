"""Strict conversion of JSON-like rows (google.protobuf.Struct) into an Arrow table of a source's schema.

The rules follow proto3's JSON mapping and never coerce silently: an Int64 comes from an integral number
or a decimal string, never from 3.9; a Timestamp from an RFC 3339 string with an offset; Bytes from
base64; a float also from "NaN" and "Infinity"; null only where the field is nullable; an unknown field
is an error.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import pyarrow as pa
from google.protobuf import struct_pb2

from .errors import Violation
from .schema import DType, FieldSpec, Kind

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
FLOAT32_MAX = 3.4028234663852886e38
# Timestamps are kept to the microsecond in years 0001-9999, the range RFC 3339 can write.
_RFC3339 = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(?:([Zz])|([+-])(\d{2}):(\d{2}))$"
)
_INT_RE = re.compile(r"^-?(?:0|[1-9][0-9]*)$")
_FLOAT_RE = re.compile(r"^-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?$")
_SPECIAL_FLOATS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_EPOCH_ORDINAL = datetime(1970, 1, 1).toordinal()


class BadValue(Exception):
    """One value does not fit its type; carries the description."""


def _describe(v: struct_pb2.Value) -> str:
    kind = v.WhichOneof("kind")
    if kind == "number_value":
        return f"the number {v.number_value!r}"
    if kind == "string_value":
        s = v.string_value
        return f"the string {s[:40]!r}{'...' if len(s) > 40 else ''}"
    if kind == "bool_value":
        return f"the boolean {str(v.bool_value).lower()}"
    if kind == "struct_value":
        return "an object"
    if kind == "list_value":
        return "a list"
    return "null"


def _int(lo: int, hi: int, name: str) -> Callable[[struct_pb2.Value], int]:
    def convert(v: struct_pb2.Value) -> int:
        kind = v.WhichOneof("kind")
        if kind == "number_value":
            x = v.number_value
            if not x.is_integer():
                raise BadValue(f"expected an {name}, got {_describe(v)}, which is not a whole number")
            if not lo <= x <= hi:
                raise BadValue(f"{x:g} is out of range for {name} ({lo} to {hi})")
            n = int(x)
        elif kind == "string_value":
            s = v.string_value
            if not _INT_RE.match(s):
                raise BadValue(f"expected an {name} as a number or a decimal string, got {_describe(v)}")
            # Anything longer than 20 characters is out of range; checking first keeps int() cheap.
            n = int(s) if len(s) <= 20 else hi + 1
            if not lo <= n <= hi:
                raise BadValue(
                    f"{s[:30]}{'...' if len(s) > 30 else ''} is out of range for {name} ({lo} to {hi})"
                )
        else:
            raise BadValue(f"expected an {name}, got {_describe(v)}")
        return n

    return convert


def _float(single: bool) -> Callable[[struct_pb2.Value], float]:
    name = "Float32" if single else "Float64"

    def convert(v: struct_pb2.Value) -> float:
        kind = v.WhichOneof("kind")
        if kind == "number_value":
            x = v.number_value
        elif kind == "string_value":
            s = v.string_value
            special = _SPECIAL_FLOATS.get(s)
            if special is not None:
                return special
            if not _FLOAT_RE.match(s):
                raise BadValue(
                    f'expected a {name}: a number, "NaN", "Infinity" or "-Infinity", got {_describe(v)}'
                )
            x = float(s)
            if math.isinf(x):
                raise BadValue(f"{s} is out of range for {name}")
        else:
            raise BadValue(f"expected a {name}, got {_describe(v)}")
        if single and math.isfinite(x) and abs(x) > FLOAT32_MAX:
            raise BadValue(f"{x!r} is out of range for Float32 (at most {FLOAT32_MAX:.7g} in magnitude)")
        return x

    return convert


def _string(v: struct_pb2.Value) -> str:
    if v.WhichOneof("kind") != "string_value":
        raise BadValue(f"expected a String, got {_describe(v)}")
    return v.string_value


def _bool(v: struct_pb2.Value) -> bool:
    if v.WhichOneof("kind") != "bool_value":
        raise BadValue(f"expected a Bool (true or false), got {_describe(v)}")
    return v.bool_value


def parse_timestamp_micros(s: str) -> int:
    """Microseconds since the epoch of an RFC 3339 string; raise BadValue if it is not one."""
    m = _RFC3339.match(s)
    if m is None:
        raise BadValue(
            f'expected a Timestamp as an RFC 3339 string such as "2026-11-25T10:00:00Z" '
            f"(date, time and offset), got {s[:40]!r}"
        )
    year, month, day, hour, minute, second = (int(g) for g in m.group(1, 2, 3, 4, 5, 6))
    frac = m.group(7) or ""
    if len(frac) > 6 and frac[6:].strip("0"):
        raise BadValue(f"{s!r} is finer than the microsecond precision Timestamps keep")
    if second == 60:
        raise BadValue(f"{s!r} has a leap second, which Timestamps cannot hold")
    try:
        day_ordinal = datetime(year, month, day, hour, minute, second).toordinal()
    except ValueError as e:
        raise BadValue(f"{s!r} is not a real date and time: {e}") from None
    micros = int((frac + "000000")[:6])
    offset = 0
    if m.group(9):
        oh, om = int(m.group(10)), int(m.group(11))
        if oh > 23 or om > 59:
            raise BadValue(f"{s!r} has an impossible UTC offset")
        offset = (oh * 60 + om) * 60 * (1 if m.group(9) == "+" else -1)
    secs = (day_ordinal - _EPOCH_ORDINAL) * 86400 + hour * 3600 + minute * 60 + second - offset
    return secs * 1_000_000 + micros


def _timestamp(v: struct_pb2.Value) -> int:
    if v.WhichOneof("kind") != "string_value":
        raise BadValue(f"expected a Timestamp as an RFC 3339 string, got {_describe(v)}")
    return parse_timestamp_micros(v.string_value)


def _bytes(v: struct_pb2.Value) -> bytes:
    if v.WhichOneof("kind") != "string_value":
        raise BadValue(f"expected Bytes as a base64 string, got {_describe(v)}")
    s = v.string_value
    try:
        if "-" in s or "_" in s:
            return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))
        return base64.b64decode(s + "=" * (-len(s) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise BadValue(f"expected Bytes as a base64 string, got {_describe(v)}") from None


_SCALARS: dict[Kind, Callable[[struct_pb2.Value], Any]] = {
    Kind.STRING: _string,
    Kind.INT32: _int(INT32_MIN, INT32_MAX, "Int32"),
    Kind.INT64: _int(INT64_MIN, INT64_MAX, "Int64"),
    Kind.FLOAT32: _float(True),
    Kind.FLOAT64: _float(False),
    Kind.BOOL: _bool,
    Kind.TIMESTAMP: _timestamp,
    Kind.BYTES: _bytes,
}


def scalar_converter(kind: Kind) -> Callable[[struct_pb2.Value], Any]:
    """The strict converter of one JSON value to a scalar kind; raises BadValue."""
    return _SCALARS[kind]


class _Ctx:
    """Collects violations; stops adding detail once `limit` is reached so a huge bad batch stays cheap."""

    def __init__(self, limit: int) -> None:
        self.violations: list[Violation] = []
        self.limit = limit
        self.count = 0

    def add(self, path: Callable[[], str], description: str) -> None:
        self.count += 1
        if len(self.violations) < self.limit:
            self.violations.append(Violation(path(), description))


def _at(base: Callable[[], str], suffix: str) -> Callable[[], str]:
    """A path built only when a violation needs it."""
    return lambda: base() + suffix


def _row_at(prefix: str, row: int, name: str) -> Callable[[], str]:
    return lambda: f"{prefix}[{row}].{name}"


def _fmt_key(key: str) -> str:
    return '["' + key.replace("\\", "\\\\").replace('"', '\\"') + '"]'


def _nested(v: struct_pb2.Value, dtype: DType, path: Callable[[], str], ctx: _Ctx) -> Any:
    """Convert a value of any type, recording violations under `path`; returns None when it failed."""
    kind = dtype.kind
    if kind is Kind.ARRAY:
        if v.WhichOneof("kind") != "list_value":
            ctx.add(path, f"expected {dtype} as a list, got {_describe(v)}")
            return None
        element = dtype.element
        assert element is not None
        out: list[Any] = []
        for i, item in enumerate(v.list_value.values):
            if item.WhichOneof("kind") == "null_value":
                if not dtype.element_nullable:
                    ctx.add(_at(path, f"[{i}]"), "array elements must not be null")
                out.append(None)
            else:
                out.append(_nested(item, element, _at(path, f"[{i}]"), ctx))
        return out
    if kind is Kind.MAP:
        if v.WhichOneof("kind") != "struct_value":
            ctx.add(path, f"expected {dtype} as an object, got {_describe(v)}")
            return None
        element = dtype.element
        assert element is not None
        pairs: list[tuple[str, Any]] = []
        for key, item in sorted(v.struct_value.fields.items()):
            if item.WhichOneof("kind") == "null_value":
                if not dtype.element_nullable:
                    ctx.add(_at(path, _fmt_key(key)), "map values must not be null")
                pairs.append((key, None))
            else:
                pairs.append((key, _nested(item, element, _at(path, _fmt_key(key)), ctx)))
        return pairs
    if kind is Kind.STRUCT:
        if v.WhichOneof("kind") != "struct_value":
            ctx.add(path, f"expected a Struct as an object, got {_describe(v)}")
            return None
        return _struct(v.struct_value, dtype.fields, path, ctx)
    try:
        return _SCALARS[kind](v)
    except BadValue as e:
        ctx.add(path, str(e))
        return None


def _struct(
    s: struct_pb2.Struct, fields: Sequence[FieldSpec], path: Callable[[], str], ctx: _Ctx
) -> dict[str, Any]:
    values = s.fields
    out: dict[str, Any] = {}
    found = 0
    for f in fields:
        if f.name in values:
            found += 1
            v = values[f.name]
            if v.WhichOneof("kind") == "null_value":
                if not f.nullable:
                    ctx.add(_at(path, "." + f.name), f"{f.name} must not be null")
                out[f.name] = None
            else:
                out[f.name] = _nested(v, f.dtype, _at(path, "." + f.name), ctx)
        else:
            if not f.nullable:
                ctx.add(_at(path, "." + f.name), f"{f.name} is required ({f.dtype}, not nullable)")
            out[f.name] = None
    if found != len(values):
        known = {f.name for f in fields}
        for key in sorted(values):
            if key not in known:
                ctx.add(
                    _at(path, "." + key),
                    f"unknown field {key!r}; the schema has {', '.join(sorted(known))}",
                )
    return out


def rows_to_table(
    rows: Sequence[struct_pb2.Struct],
    fields: Sequence[FieldSpec],
    schema: pa.Schema,
    path_prefix: str,
    max_violations: int = 100,
) -> tuple[pa.Table | None, list[Violation], int]:
    """Convert rows column by column; return the table, or None with the violations and their total count."""
    ctx = _Ctx(max_violations)
    columns: list[list[Any]] = []
    row_fields = [r.fields for r in rows]
    for f in fields:
        name = f.name
        col: list[Any] = []
        append = col.append
        kind = f.dtype.kind
        scalar = _SCALARS.get(kind)
        for i, values in enumerate(row_fields):
            if name not in values:
                if not f.nullable:
                    ctx.add(
                        _row_at(path_prefix, i, name),
                        f"{name} is required ({f.dtype}, not nullable)",
                    )
                append(None)
                continue
            v = values[name]
            if v.WhichOneof("kind") == "null_value":
                if not f.nullable:
                    ctx.add(_row_at(path_prefix, i, name), f"{name} must not be null")
                append(None)
            elif scalar is not None:
                try:
                    append(scalar(v))
                except BadValue as e:
                    ctx.add(_row_at(path_prefix, i, name), str(e))
                    append(None)
            else:
                append(_nested(v, f.dtype, _row_at(path_prefix, i, name), ctx))
        columns.append(col)
    known = {f.name for f in fields}
    n_known = len(known)
    for i, values in enumerate(row_fields):
        if len(values) > n_known or not known.issuperset(values):
            for key in sorted(values):
                if key not in known:
                    ctx.add(
                        _row_at(path_prefix, i, key),
                        f"unknown field {key!r}; the schema has {', '.join(sorted(known))}",
                    )
    if ctx.count:
        return None, ctx.violations, ctx.count
    arrays = [pa.array(col, type=schema.field(j).type) for j, col in enumerate(columns)]
    return pa.Table.from_arrays(arrays, schema=schema), [], 0
