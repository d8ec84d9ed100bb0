"""The GetViewFeatures reply's vectors, serialized for every entity at once with numpy.

The numeric features of a read are written together: one (entities, features, bytes) array holds every
ViewFeatureValue, with a mask of the bytes that count, and a few dozen array operations fill it whatever
the number of entities and features. Features whose Values are built one by one in Python (lists,
sketches), and every feature of a read of a handful of entities, are written value by value. Every
reply is byte for byte what protobuf writes of the same message.
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
from google.protobuf import timestamp_pb2

from featurepush.v1 import online_service_pb2

from .schema import Kind
from .wire import (
    VALUE_NULL,
    VALUE_NUMBER,
    VALUE_STRING,
    VIEW_FEATURES_RESULT,
    VIEW_VALUE_EFFECTIVE_TIME,
    VIEW_VALUE_STATUS,
    VIEW_VALUE_VALUE,
    VIEW_VECTOR_VALUE,
    varint,
)

_PRESENT = online_service_pb2.FEATURE_STATUS_PRESENT
_MISSING = online_service_pb2.FEATURE_STATUS_MISSING
# Powers of ten from 1 up to 10^18, the place of a digit counted from the right, then a divisor that
# leaves 0 of any magnitude written in numpy (below 2^63 - 1024): the place left of a 19-digit number.
_POWERS = np.array([10**e for e in range(19)] + [2**63 - 1], dtype=np.int64)
# Powers of ten from 10 up to 10^18: how many a magnitude reaches is its digit count less one.
_TENS = _POWERS[1:-1].copy()
_NULL = np.frombuffer(VALUE_NULL + b"\x00", dtype=np.uint8)
# The places of a varint's four 7-bit groups.
_SHIFTS = np.arange(0, 28, 7, dtype=np.int64)
# Entries shorter than this have one-byte lengths; longer Values go the one-by-one way.
_SHORT = 128
# Below this many entities, writing each value in Python beats the fixed cost of the array operations.
_SMALL = 8
_DOUBLE = struct.Struct("<d").pack
# The Int64 range: a float64 sum of integers can pass it (and its largest float64 is 2^63), and a value
# of an Int64 feature is never written outside it.
_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
_NON_FINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


class Feature(NamedTuple):
    """One feature of every entity: whether its window holds events, its end, and its values.

    A numeric feature has `numbers`, set where `has`, written as `kind` says: INT64 as decimal
    strings, INT32 as whole numbers, others as numbers. Any other has its Values serialized in `values`.
    A tuple rather than a dataclass: a read makes one per feature, and a tuple is quicker to make.
    """

    present: np.ndarray
    end: int
    numbers: np.ndarray | None = None
    has: np.ndarray | None = None
    kind: Kind = Kind.FLOAT64
    values: Sequence[bytes] | None = None
    # The same values as Python objects (None where absent), for the Arrow form; beside `values`.
    objects: Sequence[Any] | None = None


def _string(text: str) -> bytes:
    data = text.encode()
    return VALUE_STRING + varint(len(data)) + data


def number_value(value: float) -> bytes:
    """A serialized Value of a float; non-finite floats have no JSON number, so they go as strings."""
    if math.isfinite(value):
        return VALUE_NUMBER + _DOUBLE(value)
    return _string(_NON_FINITE[repr(value)])


def int64_text(value: float) -> str:
    """An Int64 feature's value in decimal, past the Int64 range the range's end."""
    return str(min(max(int(value), _INT64_MIN), _INT64_MAX))


def python_value(value: float, kind: Kind) -> bytes:
    """A serialized Value of a numeric feature's value, written one by one."""
    if kind is Kind.INT64:
        return _string(int64_text(value))
    if kind is Kind.INT32:
        return number_value(float(int(value)))
    return number_value(value)


def _set(array: np.ndarray | None) -> np.ndarray:
    """A numeric feature's array, which it always has."""
    assert array is not None
    return array


@functools.lru_cache(maxsize=256)
def _tail(end: int) -> bytes:
    """A ViewFeatureValue's effective_time field."""
    stamp = timestamp_pb2.Timestamp()
    stamp.FromMicroseconds(end)
    when = stamp.SerializeToString()
    return VIEW_VALUE_EFFECTIVE_TIME + varint(len(when)) + when


@functools.lru_cache(maxsize=64)
def _tails(ends: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The effective_time fields of features ending at `ends`, padded, their mask, and their lengths.

    Kept for the next reads, which mostly end at the same tiles: the arrays are read-only.
    """
    tails = [_tail(end) for end in ends]
    width = max(len(t) for t in tails)
    tail = np.zeros((len(tails), width), dtype=np.uint8)
    mask = np.zeros((len(tails), width), dtype=bool)
    for j, t in enumerate(tails):
        tail[j, : len(t)] = np.frombuffer(t, dtype=np.uint8)
        mask[j, : len(t)] = True
    lengths = np.array([len(t) for t in tails], dtype=np.int64)
    for array in (tail, mask, lengths):
        array.setflags(write=False)
    return tail, mask, lengths


@dataclass(frozen=True)
class _Plan:
    """What every read of one run of numeric features shares: their kinds' columns and their tails."""

    decimal: np.ndarray
    numbers: np.ndarray
    whole: np.ndarray
    # Above these magnitudes (or NaN) numpy does not write a value as Python does: 2^63 for decimals.
    limits: np.ndarray
    # Each feature's padded effective_time field, its mask, and its length.
    tails: tuple[np.ndarray, np.ndarray, np.ndarray]
    templates: dict[int, tuple[np.ndarray, np.ndarray]]


@functools.lru_cache(maxsize=64)
def _plan(kinds: tuple[Kind, ...], ends: tuple[int, ...]) -> _Plan:
    """The plan of a run of numeric features of these kinds and window ends; kept, its arrays read-only."""
    decimal = np.array([k is Kind.INT64 for k in kinds])
    plan = _Plan(
        decimal=np.flatnonzero(decimal),
        numbers=np.flatnonzero(~decimal),
        whole=np.flatnonzero([k is Kind.INT32 for k in kinds]),
        limits=np.where(decimal, 2.0**63, np.inf)[:, None],
        tails=_tails(ends),
        templates={},
    )
    for array in (plan.decimal, plan.numbers, plan.whole, plan.limits):
        array.setflags(write=False)
    return plan


def _templates(plan: _Plan, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Every entry's bytes that its feature, status and value length decide, for values `width` wide.

    Indexed by (feature * 2 + present) * (width + 1) + value length: the entry's bytes, with a null
    for a value of 2 bytes, a decimal string's length, and each value's tag; and the mask of those that
    count. Only the number's or the characters' own bytes are left to write.
    """
    found = plan.templates.get(width)
    if found is None:
        tail, tail_mask, tail_lengths = plan.tails
        count = len(tail)
        size = 6 + width + tail.shape[1]
        shape = (count, 2, width + 1, size)
        template = np.zeros(shape, dtype=np.uint8)
        mask = np.zeros(shape, dtype=bool)
        lengths = np.arange(width + 1)
        template[..., 0] = VIEW_VECTOR_VALUE[0]
        template[..., 1] = 4 + lengths + tail_lengths[:, None, None]
        template[..., 2] = VIEW_VALUE_STATUS[0]
        template[:, 0, :, 3] = _MISSING
        template[:, 1, :, 3] = _PRESENT
        template[..., 4] = VIEW_VALUE_VALUE[0]
        template[..., 5] = lengths
        template[plan.numbers, ..., 6] = VALUE_NUMBER[0]
        template[plan.decimal, ..., 6] = VALUE_STRING[0]
        template[plan.decimal, ..., 7] = np.maximum(lengths - 2, 0)
        template[:, :, 2, 6:8] = _NULL
        template[..., 6 + width :] = tail[:, None, None, :]
        mask[...] = np.arange(size) < 6 + lengths[:, None]
        mask[..., 6 + width :] = tail_mask[:, None, None, :]
        found = (template.reshape(-1, size), mask.reshape(-1, size))
        for array in found:
            array.setflags(write=False)
        # One assignment: a reader on another thread sees both tables or neither.
        plan.templates[width] = found
    return found


def _digits(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each int64 but the smallest in decimal, as str(int) writes it: its characters, padded, and their count.

    Only the places the longest needs are computed: most features' values have a few digits.
    """
    negative = values < 0
    magnitude = np.abs(values)
    lengths = np.searchsorted(_TENS, magnitude, side="right") + 1 + negative
    # The character at place p of a string of n is the digit of 10^(n - 1 - p); places past the end
    # clip to 10^0, and a sign's place gets a 0 digit, which becomes '-' below ('0' - 3).
    exponents = lengths[..., None] - 1 - np.arange(int(lengths.max()) if lengths.size else 1)
    digits = magnitude[..., None] // np.take(_POWERS, exponents, mode="clip") % 10
    digits[..., 0] -= 3 * negative
    chars = (digits + ord("0")).astype(np.uint8)
    return chars, lengths


# The decimals of the small integers most features hold (counts, sums and extremes of small columns),
# looked up rather than computed: [_FEWEST, _MOST).
_FEWEST = -9999
_MOST = 100_000
_SMALL_CHARS, _SMALL_LENGTHS = _digits(np.arange(_FEWEST, _MOST, dtype=np.int64))
# Each at most 5 characters: a byte each is enough.
_SMALL_LENGTHS = _SMALL_LENGTHS.astype(np.uint8)
_SMALL_CHARS.setflags(write=False)
_SMALL_LENGTHS.setflags(write=False)


def _decimals(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """As _digits, from the table of small integers when every value is in it."""
    if values.size and _FEWEST <= values.min() and values.max() < _MOST:
        at = values - _FEWEST
        lengths = _SMALL_LENGTHS[at]
        chars: np.ndarray = _SMALL_CHARS[at]
        return chars[..., : lengths.max()], lengths
    return _digits(values)


# Entries of rows: padded bytes, the mask of those that count, and each row's count of them. The first
# _LEAD columns are left out by the mask, room for the results entry's tag and length (_assemble).
_Padded = tuple[np.ndarray, np.ndarray, np.ndarray]
_LEAD = 5


def _numeric(features: Sequence[Feature], rows: int) -> _Padded | None:
    """The ViewFeatureValue entries of numeric features as (rows, bytes) and its mask; None if one is long.

    Works feature by row, (features, rows): each feature's arrays stack without a copy per row.
    """
    plan = _plan(tuple(f.kind for f in features), tuple(f.end for f in features))
    count = len(features)
    numbers = np.array([_set(f.numbers) for f in features], dtype=np.float64)
    has = np.array([_set(f.has) for f in features], dtype=bool)
    present = np.array([f.present for f in features], dtype=bool)
    # Values numpy does not write as Python does: non-finite floats, integers of 2^63 and more in size.
    odd = has & ~(np.abs(numbers) < plan.limits)
    plain = np.where(has & ~odd, numbers, 0.0)
    if plan.whole.size:
        plain[plan.whole] = plain[plan.whole].astype(np.int64).astype(np.float64)
    odd_values = []
    if np.count_nonzero(odd):
        odd_values = [
            (j, i, python_value(float(numbers[j, i]), features[j].kind)) for j, i in np.argwhere(odd).tolist()
        ]
    # Each value's length: a number's tag and 8 bytes, a decimal's tag, length and characters, or a null.
    lengths = np.full((count, rows), 9, dtype=np.int64)
    # As wide as the longest value: a number, the widest decimal, an odd value, a null.
    width = max([2, 9 if len(plan.numbers) else 0, *(len(v) for _, _, v in odd_values)])
    if len(plan.decimal):
        chars, sizes = _decimals(plain[plan.decimal].astype(np.int64))
        lengths[plan.decimal] = sizes + 2
        width = max(width, 2 + chars.shape[-1])
    lengths[~has] = 2
    for j, i, written in odd_values:
        lengths[j, i] = len(written)
    tail = plan.tails[0]
    size = 6 + width + tail.shape[1]
    if size - 2 >= _SHORT:
        return None
    templates, masks = _templates(plan, width)
    which = (np.arange(0, 2 * count, 2)[:, None] + present) * (width + 1) + lengths
    out = np.empty((rows, _LEAD + count * size), dtype=np.uint8)
    out_mask = np.empty(out.shape, dtype=bool)
    out_mask[:, :_LEAD] = False
    # Views of the entries in place (splitting the last axis needs no copy; numpy would raise if it did).
    np.take(templates, which.T, axis=0, out=out[:, _LEAD:].reshape((rows, count, size), copy=False))
    np.take(masks, which.T, axis=0, out=out_mask[:, _LEAD:].reshape((rows, count, size), copy=False))
    # Feature by row; a null's second byte is 0, as its number's first (plain is 0.0 where not set).
    entry = out[:, _LEAD:].reshape((rows, count, size), copy=False).transpose(1, 0, 2)
    if len(plan.numbers):
        entry[plan.numbers, :, 7:15] = plain[plan.numbers].astype("<f8").view(np.uint8).reshape((-1, rows, 8))
    if len(plan.decimal):
        entry[plan.decimal, :, 8 : 8 + chars.shape[-1]] = chars
    for j, i, written in odd_values:
        entry[j, i, 6 : 6 + len(written)] = np.frombuffer(written, dtype=np.uint8)
    # Each entry is its tag, length byte, and body: status, the value's tag and length, value, tail.
    return out, out_mask, (lengths + (6 + plan.tails[2][:, None])).sum(axis=0)


# A ViewFeatureValue's status and its value's tag, by whether the window holds events.
_HEADS = {
    True: VIEW_VALUE_STATUS + bytes([_PRESENT]) + VIEW_VALUE_VALUE,
    False: VIEW_VALUE_STATUS + bytes([_MISSING]) + VIEW_VALUE_VALUE,
}


def _one_by_one(feature: Feature) -> list[bytes]:
    """A feature's ViewFeatureValue entries, each built in Python."""
    if feature.values is not None:
        values = list(feature.values)
    else:
        assert feature.numbers is not None and feature.has is not None
        values = [
            python_value(v, feature.kind) if h else VALUE_NULL + b"\x00"
            for v, h in zip(feature.numbers.tolist(), feature.has.tolist(), strict=True)
        ]
    tail = _tail(feature.end)
    out = []
    for value, present in zip(values, feature.present.tolist(), strict=True):
        body = _HEADS[present] + varint(len(value)) + value + tail
        out.append(VIEW_VECTOR_VALUE + varint(len(body)) + body)
    return out


def vectors(features: Sequence[Feature], rows: int) -> bytes:
    """GetViewFeaturesResponse.results entries, one per row, each the row's feature values in order."""
    # Runs of numeric features as padded (rows, bytes) arrays; the others, one entry per row in Python.
    parts: list[_Padded | list[bytes]] = []
    run: list[Feature] = []
    for feature in [*features, None]:
        if feature is not None and feature.values is None:
            run.append(feature)
            continue
        if run:
            padded = _numeric(run, rows) if rows >= _SMALL else None
            if padded is not None:
                parts.append(padded)
            else:
                parts.extend(_one_by_one(f) for f in run)
            run = []
        if feature is not None:
            parts.append(_one_by_one(feature))
    if all(isinstance(p, tuple) for p in parts):
        return _assemble([p for p in parts if isinstance(p, tuple)], rows)
    # Some entries are Python bytes: join them row by row.
    row_parts: list[list[bytes]] = [[] for _ in range(rows)]
    for part in parts:
        if isinstance(part, tuple):
            data, mask, lengths = part
            flat = data[mask].tobytes()
            at = 0
            for i, length in enumerate(lengths.tolist()):
                row_parts[i].append(flat[at : at + length])
                at += length
        else:
            for i, entry in enumerate(part):
                row_parts[i].append(entry)
    out = []
    for pieces in row_parts:
        vector = b"".join(pieces)
        out.append(VIEW_FEATURES_RESULT + varint(len(vector)) + vector)
    return b"".join(out)


def _assemble(parts: Sequence[_Padded], rows: int) -> bytes:
    """The results entries of rows made of padded parts only, gathered in one step."""
    lengths = sum((part[2] for part in parts), np.zeros(rows, dtype=np.int64))
    if len(parts) == 1:
        # The tag and length go in the part's own leading columns.
        whole, whole_mask, _ = parts[0]
    else:
        whole = np.hstack([np.empty((rows, _LEAD), dtype=np.uint8), *(p[0] for p in parts)])
        whole_mask = np.hstack([np.empty((rows, _LEAD), dtype=bool), *(p[1] for p in parts)])
    # The vector's tag and length (a varint of up to 4 bytes: below 2^28, far above any reply gRPC sends):
    # each group of 7 bits, with the high bit set where a group follows.
    groups = lengths[:, None] >> _SHIFTS
    whole[:, 0] = VIEW_FEATURES_RESULT[0]
    whole[:, 1:_LEAD] = (groups & 0x7F) | ((groups > 0x7F) << 7)
    whole_mask[:, 0] = True
    np.greater(groups, 0, out=whole_mask[:, 1:_LEAD])
    whole_mask[:, 1] = True
    result: bytes = whole[whole_mask].tobytes()
    return result


def _int64s(plain: np.ndarray) -> np.ndarray:
    """Whole float64s as int64s; past the Int64 range (where a cast wraps around) the range's end.

    As the Struct form writes them (python_value): a sum of many large integers may pass the range.
    """
    high, low = plain >= 2.0**63, plain < -(2.0**63)
    numbers = np.where(high | low, 0.0, plain).astype(np.int64)
    numbers[high] = _INT64_MAX
    numbers[low] = _INT64_MIN
    return numbers


def arrow_columns(features: Sequence[Feature], fields: Sequence[pa.Field]) -> list[pa.Array]:
    """Per feature its values, status and window end, a row per entity: the Arrow form's columns."""
    columns: list[pa.Array] = []
    for feature, field in zip(features, fields, strict=True):
        rows = len(feature.present)
        if feature.objects is not None:
            values = pa.array(feature.objects, type=field.type)
        else:
            assert feature.numbers is not None and feature.has is not None
            absent = ~(feature.has & feature.present)
            # An absent entity's slot may hold NaN or an infinity, which no integer type takes.
            plain = np.where(absent, 0, feature.numbers)
            if field.type == pa.int64():
                numbers = _int64s(plain)
            else:
                numbers = plain.astype(field.type.to_pandas_dtype())
            values = pa.array(numbers, mask=absent, type=field.type)
        status = np.where(feature.present, np.int8(_PRESENT), np.int8(_MISSING))
        ends = pa.array(np.full(rows, feature.end, dtype=np.int64), type=pa.timestamp("us", tz="UTC"))
        columns += [values, pa.array(status, type=pa.int8()), ends]
    return columns


def arrow_vectors(parts: list[list[pa.Array]], fields: Sequence[pa.Field]) -> pa.Buffer:
    """GetViewFeaturesResponse.arrow_ipc: one record batch of the columns of `parts`, rows part by part.

    `parts` is emptied as its columns are joined, so that no part's arrays outlive their joined copy.
    """
    names: list[str] = []
    for field in fields:
        names += [field.name, f"{field.name}:status", f"{field.name}:effective_time"]
    columns: list[pa.Array] = []
    for i in range(len(names)):
        found = [part[i] for part in parts]
        for part in parts:
            part[i] = None
        columns.append(found[0] if len(found) == 1 else pa.concat_arrays(found))
    parts.clear()
    batch = pa.record_batch(columns, names=names)
    del columns
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    buffer: pa.Buffer = sink.getvalue()
    return buffer
