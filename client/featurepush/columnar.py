"""Python records to one Arrow record batch by a source's schema, only where the server would read them alike.

A push of dicts may travel as Arrow IPC instead of Structs when the result is exactly what the server's
row path would have made of the Structs. pyarrow coerces where the row rules refuse (3.9 into an Int64
becomes 3, a naive datetime is taken as UTC, keys outside the schema are dropped), so every value is
checked first, and anything short of exact returns None: the caller then sends Structs and the server's
row validator answers, with its own paths and descriptions.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable, Mapping, Sequence
from itertools import repeat
from operator import itemgetter, sub
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from featurepush import types as t

__all__ = ["arrow_schema", "arrow_type", "records_to_batch"]

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
FLOAT32_MAX = 3.4028234663852886e38
ARROW_TIMESTAMP = pa.timestamp("us", tz="UTC")
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MICROSECOND = dt.timedelta(microseconds=1)
# Years 0001 to 9999 in UTC: what RFC 3339 can write, so what the row form sends and the server keeps.
_MIN_MICROS = (dt.datetime(1, 1, 1, tzinfo=dt.UTC) - _EPOCH) // _MICROSECOND
_MAX_MICROS = (dt.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=dt.UTC) - _EPOCH) // _MICROSECOND
_NONE = type(None)
_DURATION = pa.duration("us")

_SCALAR_ARROW: dict[t.ScalarType, pa.DataType] = {
    t.String: pa.string(),
    t.Int32: pa.int32(),
    t.Int64: pa.int64(),
    t.Float32: pa.float32(),
    t.Float64: pa.float64(),
    t.Bool: pa.bool_(),
    t.Timestamp: ARROW_TIMESTAMP,
    t.Bytes: pa.binary(),
}


class NotExact(Exception):
    """A value that Arrow would not hold as the server's row rules read its Struct form."""


def arrow_type(dtype: t.DataType) -> pa.DataType:
    """The Arrow type the server keeps values of `dtype` in."""
    if isinstance(dtype, t.ScalarType):
        return _SCALAR_ARROW[dtype]
    if isinstance(dtype, t.Array):
        return pa.list_(pa.field("item", arrow_type(dtype.element_type), nullable=dtype.element_nullable))
    if isinstance(dtype, t.Map):
        value = pa.field("value", arrow_type(dtype.value_type), nullable=dtype.value_nullable)
        return pa.map_(pa.string(), value)
    if isinstance(dtype, t.Struct):
        return pa.struct([arrow_field(f) for f in dtype.fields])
    raise TypeError(f"unknown type {dtype!r}")


def arrow_field(field: t.Field) -> pa.Field:
    """The Arrow field of one schema field."""
    return pa.field(field.name, arrow_type(field.dtype), nullable=field.nullable)


def arrow_schema(fields: Sequence[t.Field]) -> pa.Schema:
    """The Arrow schema of a source's records."""
    return pa.schema([arrow_field(f) for f in fields])


def _micros(value: dt.datetime) -> int:
    # Subtracting from an aware epoch raises TypeError for a naive datetime, as the row form refuses it.
    micros = (value - _EPOCH) // _MICROSECOND
    if not _MIN_MICROS <= micros <= _MAX_MICROS:
        raise NotExact("timestamp outside what the row form writes")
    return micros


def _float(value: Any, single: bool) -> float:
    kind = type(value)
    if kind is int:
        # float() rounds as the server's float() of the row form's decimal string does; huge ints overflow.
        value = float(value)
    elif kind is not float:
        raise NotExact("not a float")
    if value != value:
        # The row form sends "NaN", which the server reads back as the one canonical NaN.
        return math.nan
    if single and abs(value) > FLOAT32_MAX and not math.isinf(value):
        raise NotExact("out of range for Float32")
    return float(value)


def _int_in(lo: int, hi: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if type(value) is not int or not lo <= value <= hi:
            raise NotExact("not an integer in range")
        return value

    return check


def _exact(kind: type) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if type(value) is not kind:
            raise NotExact(f"not a {kind.__name__}")
        return value

    return check


def _timestamp(value: Any) -> int:
    if type(value) is not dt.datetime:
        raise NotExact("not a datetime")
    return _micros(value)


_SCALAR_VALUE: dict[t.ScalarType, Callable[[Any], Any]] = {
    t.String: _exact(str),
    t.Bool: _exact(bool),
    t.Bytes: _exact(bytes),
    t.Int32: _int_in(INT32_MIN, INT32_MAX),
    t.Int64: _int_in(INT64_MIN, INT64_MAX),
    t.Float32: lambda v: _float(v, True),
    t.Float64: lambda v: _float(v, False),
    t.Timestamp: _timestamp,
}


def _value(value: Any, dtype: t.DataType, nullable: bool) -> Any:
    """One value in the form pa.array takes for arrow_type(dtype); raises NotExact."""
    if value is None:
        if not nullable:
            raise NotExact("null where not allowed")
        return None
    if isinstance(dtype, t.ScalarType):
        return _SCALAR_VALUE[dtype](value)
    if isinstance(dtype, t.Array):
        if type(value) is not list and type(value) is not tuple:
            raise NotExact("not a list")
        element, element_nullable = dtype.element_type, dtype.element_nullable
        return [_value(item, element, element_nullable) for item in value]
    if type(value) is not dict:
        raise NotExact("not a dict")
    if isinstance(dtype, t.Map):
        if not all(type(key) is str for key in value):
            raise NotExact("a map key that is not a str")
        # The server keeps map entries in key order, whatever order they were sent in.
        kind, value_nullable = dtype.value_type, dtype.value_nullable
        return [(key, _value(value[key], kind, value_nullable)) for key in sorted(value)]
    assert isinstance(dtype, t.Struct)
    if not {f.name for f in dtype.fields}.issuperset(value):
        raise NotExact("a key outside the struct's fields")
    return {f.name: _value(value.get(f.name), f.dtype, f.nullable) for f in dtype.fields}


def _scalar_column(column: Sequence[Any], dtype: t.ScalarType, nullable: bool) -> pa.Array:
    """A column of one scalar type, checked by the set of its value types rather than value by value."""
    kinds = set(map(type, column))
    has_null = _NONE in kinds
    if has_null:
        if not nullable:
            raise NotExact("null where not allowed")
        kinds.discard(_NONE)
    target = _SCALAR_ARROW[dtype]
    if not kinds:
        return pa.nulls(len(column), target)
    if dtype in (t.String, t.Bool, t.Bytes):
        want = str if dtype == t.String else bool if dtype == t.Bool else bytes
        if kinds != {want}:
            raise NotExact(f"not all {want.__name__}")
        return pa.array(column, target)
    if dtype in (t.Int32, t.Int64):
        if kinds != {int}:
            raise NotExact("not all int")
        # pyarrow refuses an int that does not fit the type (OverflowError or ArrowInvalid).
        return pa.array(column, target)
    if dtype in (t.Float32, t.Float64):
        if not kinds <= {float, int}:
            raise NotExact("not all float")
        single = dtype == t.Float32
        if kinds == {float} and not single:
            array = pa.array(column, target)
            # Only NaNs need rewriting to the canonical one; most columns have none.
            if not pc.any(pc.is_nan(array)).as_py():
                return array
        return pa.array([None if v is None else _float(v, single) for v in column], target)
    if kinds != {dt.datetime}:
        raise NotExact("not all datetime")
    # The distance from the aware epoch is exact to the microsecond whatever the offset, and a naive datetime
    # refuses the subtraction (TypeError), as the row form refuses it; pyarrow reads timedeltas several
    # times faster than aware datetimes, whose offsets it asks one by one.
    if has_null:
        deltas = [None if v is None else v - _EPOCH for v in column]
    else:
        deltas = list(map(sub, column, repeat(_EPOCH)))
    micros = pa.array(deltas, _DURATION).view(pa.int64())
    lo, hi = pc.min_max(micros).values()
    if lo.as_py() < _MIN_MICROS or hi.as_py() > _MAX_MICROS:
        raise NotExact("timestamp outside what the row form writes")
    return micros.view(target)


def _column(column: Sequence[Any], field: t.Field) -> pa.Array:
    dtype = field.dtype
    if isinstance(dtype, t.ScalarType):
        return _scalar_column(column, dtype, field.nullable)
    values = [_value(v, dtype, field.nullable) for v in column]
    return pa.array(values, arrow_type(dtype))


# What pyarrow may raise for a value it will not take; each means "send Structs instead".
_REFUSALS = (NotExact, pa.ArrowException, OverflowError, TypeError, ValueError)


def records_to_batch(
    records: Sequence[Mapping[str, Any]], fields: Sequence[t.Field], schema: pa.Schema | None = None
) -> pa.RecordBatch | None:
    """One record batch of `records` by `fields`, or None where the Struct form must go instead.

    None means the server's row path might answer differently from its Arrow path: a record that is not a
    dict, a key outside the schema, a null or absent non-nullable field, a value of another Python type
    than the one the field's type takes as is (a string for an Int64 or a Timestamp, a float for an
    integer, base64 text for Bytes), or a value out of range. An empty list also goes as Structs.
    """
    if not records:
        return None
    if set(map(type, records)) != {dict}:
        return None
    names = [f.name for f in fields]
    columns: list[Sequence[Any]]
    if set(map(len, records)) == {len(names)}:
        # The common case, every field in every record: a C loop per column gathers its values, making no
        # tuple per record for the garbage collector to scan. A record as long as the schema but missing one
        # of its fields holds a key outside it.
        try:
            columns = [list(map(itemgetter(name), records)) for name in names]
        except KeyError:
            return None
    else:
        if not all(map(set(names).issuperset, records)):
            return None
        columns = [[r.get(name) for r in records] for name in names]
    try:
        arrays = [_column(column, f) for column, f in zip(columns, fields, strict=True)]
        return pa.RecordBatch.from_arrays(arrays, schema=schema or arrow_schema(fields))
    except _REFUSALS:
        return None
