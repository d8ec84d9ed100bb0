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
import struct
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from google.protobuf import struct_pb2

from .errors import Violation
from .schema import DType, FieldSpec, Kind
from .struct_rows import BOOL, NUMBER, STRING, WireColumns, WireRows
from .times import MAX_MICROS, MIN_MICROS

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
    result = secs * 1_000_000 + micros
    if not MIN_MICROS <= result <= MAX_MICROS:
        raise BadValue(f"{s!r} falls outside years 0001 to 9999 in UTC")
    return result


def _timestamp(v: struct_pb2.Value) -> int:
    if v.WhichOneof("kind") != "string_value":
        raise BadValue(f"expected a Timestamp as an RFC 3339 string, got {_describe(v)}")
    return parse_timestamp_micros(v.string_value)


# One alphabet per value, standard or URL-safe, then padding to a multiple of four or none (proto3 JSON
# accepts both); the decoded bytes must encode back to the same text, so unused low bits are zero.
_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}|[A-Za-z0-9\-_]*={0,2}")


def strict_base64(s: str) -> bytes:
    """Decode standard or URL-safe base64, padded or not; raise ValueError for anything else."""
    if not _BASE64.fullmatch(s):
        raise ValueError("a character outside the base64 alphabet")
    body = s.rstrip("=")
    pad = len(s) - len(body)
    if len(body) % 4 == 1 or (pad and (len(body) + pad) % 4):
        raise ValueError("wrong length or padding")
    urlsafe = "-" in body or "_" in body
    text = body + "=" * (-len(body) % 4)
    raw = base64.urlsafe_b64decode(text) if urlsafe else base64.b64decode(text, validate=True)
    again = (base64.urlsafe_b64encode(raw) if urlsafe else base64.b64encode(raw)).decode().rstrip("=")
    if again != body:
        raise ValueError("nonzero bits after the last byte")
    return raw


def _bytes(v: struct_pb2.Value) -> bytes:
    if v.WhichOneof("kind") != "string_value":
        raise BadValue(f"expected Bytes as a base64 string, got {_describe(v)}")
    try:
        return strict_base64(v.string_value)
    except (binascii.Error, ValueError) as e:
        raise BadValue(f"expected Bytes as standard or URL-safe base64 ({e}), got {_describe(v)}") from None


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


def stored_value(value: bytes, dtype: DType) -> Any:
    """A serialized Value the server stored (so already valid), in the form pa.array takes for `dtype`."""
    return _nested(struct_pb2.Value.FromString(value), dtype, lambda: "", _Ctx(0))


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


_FAST_TIMESTAMP = (
    r"^\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])T([01]\d|2[0-3]):[0-5]\d:[0-5]\d(\.\d{1,6})?"
    r"(Z|[+-]([01]\d|2[0-3]):[0-5]\d)$"
)
_FAST_INT = r"^-?(0|[1-9]\d{0,18})$"
_EXPECTED_KIND = {
    Kind.STRING: "string_value",
    Kind.BOOL: "bool_value",
    Kind.FLOAT64: "number_value",
    Kind.FLOAT32: "number_value",
    Kind.TIMESTAMP: "string_value",
}
# Below this many rows the fixed cost of Arrow kernels outweighs converting value by value.
BULK_MIN_ROWS = 16
_NUMERIC_KINDS = frozenset((Kind.INT32, Kind.INT64, Kind.FLOAT32, Kind.FLOAT64))
_FAST_KINDS = frozenset(
    (Kind.STRING, Kind.BOOL, Kind.FLOAT32, Kind.FLOAT64, Kind.TIMESTAMP, Kind.INT32, Kind.INT64)
)
_INT_BOUNDS = {Kind.INT32: (float(INT32_MIN), float(INT32_MAX)), Kind.INT64: (-(2.0**63), 2.0**63)}


def _fast_column(
    values: list[struct_pb2.Value], kinds: Sequence[str | None], f: FieldSpec
) -> pa.Array | None:
    """Convert a column whose values all have the common JSON form, in bulk; None means "go value by value".

    It only ever accepts what the value-by-value rules accept, and returns None for anything unusual
    (mixed forms, nulls where not allowed, a bad value), so errors are always described by those rules.
    `kinds` holds each value's JSON form, None where the field is absent.
    """
    kind = f.dtype.kind
    forms = set(kinds)
    nulls = None in forms or "null_value" in forms
    if nulls:
        if not f.nullable:
            return None
        forms.discard(None)
        forms.discard("null_value")
    if len(forms) > 1:
        return None
    if not forms:
        return pa.nulls(len(values), f.dtype.to_arrow())
    form = forms.pop()
    present: list[struct_pb2.Value | None] = list(values)
    if nulls:
        present = [v if k == form else None for v, k in zip(values, kinds, strict=True)]
    if form == "number_value" and kind in _NUMERIC_KINDS:
        x = np.array([v.number_value if v is not None else 0.0 for v in present], dtype=np.float64)
        mask = np.array([v is None for v in present]) if nulls else None
        return _from_numbers(x, mask, f)
    if form == "string_value" and kind in (Kind.STRING, Kind.TIMESTAMP, Kind.INT32, Kind.INT64):
        text = pa.array([v.string_value if v is not None else None for v in present], pa.string())
        return text if kind is Kind.STRING else _from_strings(text, f)
    if form == "bool_value" and kind is Kind.BOOL:
        return pa.array([v.bool_value if v is not None else None for v in present], pa.bool_())
    return None


def _uniform_column(values: list[struct_pb2.Value], f: FieldSpec) -> pa.Array | None:
    """Convert a column whose values all have the usual JSON form, checking forms only where needed.

    Reading a field of the wrong form gives its default ("", 0.0, false), so only values that read as
    the default are asked for their form. None means "not that simple": the caller looks at every form.
    """
    kind = f.dtype.kind
    if kind in (Kind.STRING, Kind.TIMESTAMP):
        texts = [v.string_value for v in values]
        suspects = [i for i, text in enumerate(texts) if not text]
        if any(values[i].WhichOneof("kind") != "string_value" for i in suspects):
            return None
        return _from_strings(pa.array(texts, pa.string()), f) if kind is Kind.TIMESTAMP else pa.array(texts)
    if kind is Kind.BOOL:
        flags = [v.bool_value for v in values]
        if any(values[i].WhichOneof("kind") != "bool_value" for i, b in enumerate(flags) if not b):
            return None
        return pa.array(flags, pa.bool_())
    numbers = [v.number_value for v in values]
    if any(values[i].WhichOneof("kind") != "number_value" for i, x in enumerate(numbers) if x == 0.0):
        return None
    return _from_numbers(np.array(numbers, dtype=np.float64), None, f)


def _from_numbers(x: np.ndarray, mask: np.ndarray | None, f: FieldSpec) -> pa.Array | None:
    """A numeric column from JSON numbers (zeros where masked), or None if one does not fit the type."""
    kind = f.dtype.kind
    if kind in _INT_BOUNDS:
        lo, hi = _INT_BOUNDS[kind]
        in_range = np.all(x <= hi) if kind is Kind.INT32 else np.all(x < hi)
        # Whole numbers in range only; NaN and infinities fail every comparison.
        if not (np.all(np.floor(x) == x) and np.all(x >= lo) and in_range):
            return None
        return pa.array(x.astype(np.int64), f.dtype.to_arrow(), mask=mask)
    if kind is Kind.FLOAT32:
        if np.any(np.abs(x[np.isfinite(x)]) > FLOAT32_MAX):
            return None
        return pa.array(x.astype(np.float32), pa.float32(), mask=mask)
    return pa.array(x, pa.float64(), mask=mask)


def _from_strings(text: pa.Array, f: FieldSpec) -> pa.Array | None:
    """A Timestamp or integer column from JSON strings, or None if one does not fit the type."""
    if f.dtype.kind is Kind.TIMESTAMP:
        if pc.all(pc.match_substring_regex(text, _FAST_TIMESTAMP)).as_py() is False:
            return None
        try:
            stamps = pc.cast(text, f.dtype.to_arrow(), safe=True)
        except pa.ArrowInvalid:
            return None
        lo, hi = pc.min_max(pc.cast(stamps, pa.int64())).values()
        if lo.is_valid and (lo.as_py() < MIN_MICROS or hi.as_py() > MAX_MICROS):
            return None
        return stamps
    if pc.all(pc.match_substring_regex(text, _FAST_INT)).as_py() is False:
        return None
    try:
        return pc.cast(text, f.dtype.to_arrow(), safe=True)
    except pa.ArrowInvalid:
        return None


def _slow_column(
    f: FieldSpec, values: list[struct_pb2.Value], kinds: Sequence[str | None], path_prefix: str, ctx: _Ctx
) -> list[Any]:
    """Convert a column value by value, recording a violation for each bad value."""
    name = f.name
    col: list[Any] = []
    append = col.append
    scalar = _SCALARS.get(f.dtype.kind)
    for i, (v, form) in enumerate(zip(values, kinds, strict=True)):
        if form is None or form == "null_value":
            if not f.nullable:
                problem = "is required" if form is None else "must not be null"
                detail = f" ({f.dtype}, not nullable)" if form is None else ""
                ctx.add(_row_at(path_prefix, i, name), f"{name} {problem}{detail}")
            append(None)
        elif scalar is not None:
            try:
                append(scalar(v))
            except BadValue as e:
                ctx.add(_row_at(path_prefix, i, name), str(e))
                append(None)
        else:
            append(_nested(v, f.dtype, _row_at(path_prefix, i, name), ctx))
    return col


def _wire_column(form: str, values: np.ndarray | pa.Array, f: FieldSpec) -> pa.Array | None:
    """A column of values read off the wire in one form, by the rules of _fast_column; None: not in bulk."""
    kind = f.dtype.kind
    if form == NUMBER and kind in _NUMERIC_KINDS:
        return _from_numbers(np.asarray(values), None, f)
    if form == STRING and kind is Kind.STRING:
        return values
    if form == STRING and kind in (Kind.TIMESTAMP, Kind.INT32, Kind.INT64):
        return _from_strings(values, f)
    if form == BOOL and kind is Kind.BOOL:
        return pa.array(values, pa.bool_())
    return None


def _table_from_wire(columns: WireColumns, fields: Sequence[FieldSpec], schema: pa.Schema) -> pa.Table | None:
    """The table of rows whose every field came off the wire in its usual form; None: convert row by row."""
    if columns.forms.keys() != {f.name for f in fields}:
        return None
    arrays = []
    for f in fields:
        array = _wire_column(columns.forms[f.name], columns.values[f.name], f)
        if array is None:
            return None
        arrays.append(array)
    return pa.Table.from_arrays(arrays, schema=schema)


class ConvertedRows:
    """A few valid rows as their fields' converters returned them, column by column; Arrow only if asked.

    Every field is a scalar: Timestamps are microseconds since the epoch and Float32 values are rounded to
    float32, so these are the values the table's `to_pylist` would give, bar the Timestamps' type.
    """

    __slots__ = ("columns", "schema", "num_rows", "_table")

    def __init__(self, columns: dict[str, list[Any]], schema: pa.Schema, num_rows: int):
        self.columns = columns
        self.schema = schema
        self.num_rows = num_rows
        self._table: pa.Table | None = None

    def table(self) -> pa.Table:
        """The rows as a table of the source's schema, made once."""
        if self._table is None:
            self._table = pa.Table.from_arrays(
                [pa.array(self.columns[f.name], type=f.type) for f in self.schema], schema=self.schema
            )
        return self._table


_F32 = struct.Struct("<f")


def _float32(x: float | None) -> float | None:
    """A double rounded to the nearest float32, as Arrow rounds it into a Float32 column."""
    return x if x is None else _F32.unpack(_F32.pack(x))[0]


def convert_rows(
    rows: Sequence[struct_pb2.Struct],
    fields: Sequence[FieldSpec],
    schema: pa.Schema,
    path_prefix: str,
    max_violations: int = 100,
) -> tuple[pa.Table | ConvertedRows | None, list[Violation], int]:
    """rows_to_table, but a few rows of a schema of scalars stay Python values (ConvertedRows).

    A push of one event costs more in making its Arrow arrays than in anything else it does; most
    pushes of a few rows never need the table (see materialize.py).
    """
    if len(rows) > BULK_MIN_ROWS or not all(f.dtype.kind in _SCALARS for f in fields):
        return rows_to_table(rows, fields, schema, path_prefix, max_violations)
    return _convert(rows, fields, schema, path_prefix, max_violations, python=True)


def rows_to_table(
    rows: Sequence[struct_pb2.Struct],
    fields: Sequence[FieldSpec],
    schema: pa.Schema,
    path_prefix: str,
    max_violations: int = 100,
) -> tuple[pa.Table | None, list[Violation], int]:
    """Convert rows column by column; return the table, or None with the violations and their total count."""
    if isinstance(rows, WireRows) and rows.columns is not None:
        table = _table_from_wire(rows.columns, fields, schema)
        if table is not None:
            return table, [], 0
    converted, violations, count = _convert(rows, fields, schema, path_prefix, max_violations, python=False)
    assert not isinstance(converted, ConvertedRows)
    return converted, violations, count


def _convert(
    rows: Sequence[struct_pb2.Struct],
    fields: Sequence[FieldSpec],
    schema: pa.Schema,
    path_prefix: str,
    max_violations: int,
    *,
    python: bool,
) -> tuple[pa.Table | ConvertedRows | None, list[Violation], int]:
    """The rows as a table, or with `python` (a few rows, bulk paths never taken) as ConvertedRows."""
    ctx = _Ctx(max_violations)
    arrays: list[pa.Array] = []
    columns: dict[str, list[Any]] = {}
    row_fields = [r.fields for r in rows]
    # Sizes are taken first: reading an absent key of a message map inserts an empty Value there. Lists,
    # not arrays: a push of one row paid more for numpy's calls than for its whole conversion.
    sizes = [len(m) for m in row_fields]
    missing = [0] * len(rows)
    for j, f in enumerate(fields):
        name = f.name
        values = [m[name] for m in row_fields]
        bulk = f.dtype.kind in _FAST_KINDS and len(values) > BULK_MIN_ROWS
        fast = _uniform_column(values, f) if bulk else None
        if fast is not None:
            arrays.append(fast)
            continue
        # An empty Value (absent, or sent with no kind) has no form: it counts as absent.
        kinds = [v.WhichOneof("kind") for v in values]
        if None in kinds:
            missing = [gone + (k is None) for gone, k in zip(missing, kinds, strict=True)]
        fast = _fast_column(values, kinds, f) if bulk else None
        if fast is None:
            col = _slow_column(f, values, kinds, path_prefix, ctx)
            if python:
                columns[name] = list(map(_float32, col)) if f.dtype.kind is Kind.FLOAT32 else col
                continue
            if not ctx.count:
                fast = pa.array(col, type=schema.field(j).type)
        arrays.append(fast)
    known = {f.name for f in fields}
    # A row holds an unknown field exactly when it has more keys than the schema fields it carries.
    width = len(known)
    for i in [i for i, (size, gone) in enumerate(zip(sizes, missing, strict=True)) if size > width - gone]:
        for key in sorted(row_fields[i]):
            if key not in known:
                ctx.add(
                    _row_at(path_prefix, i, key),
                    f"unknown field {key!r}; the schema has {', '.join(sorted(known))}",
                )
    if ctx.count:
        return None, ctx.violations, ctx.count
    if python:
        return ConvertedRows(columns, schema, len(rows)), [], 0
    return pa.Table.from_arrays(arrays, schema=schema), [], 0
