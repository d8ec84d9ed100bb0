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
from typing import Any

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
# Powers of ten from 10^18 down to 1: the place of each of a positive int64's 19 digits.
_PLACES = 10 ** np.arange(18, -1, -1, dtype=np.int64)
# Powers of ten from 10 up to 10^18: how many a magnitude reaches is its digit count less one.
_TENS = _PLACES[-2::-1].copy()
# Entries shorter than this have one-byte lengths; longer Values go the one-by-one way.
_SHORT = 128
# Below this many entities, writing each value in Python beats the fixed cost of the array operations.
_SMALL = 8
_DOUBLE = struct.Struct("<d").pack
_NON_FINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


@dataclass(frozen=True)
class Feature:
    """One feature of every entity: whether its window holds events, its end, and its values.

    A numeric feature has `numbers`, set where `has`, written as `kind` says: INT64 as decimal
    strings, INT32 as whole numbers, others as numbers. Any other has its Values serialized in `values`.
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


def python_value(value: float, kind: Kind) -> bytes:
    """A serialized Value of a numeric feature's value, written one by one."""
    if kind is Kind.INT64:
        return _string(str(int(value)))
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


def _decimals(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each int64 but the smallest as a string_value Value in decimal, as str(int) writes it.

    Returns bytes, mask and lengths, 3 + digits wide: only the places the largest magnitude needs are
    computed, and most features' values have a few digits.
    """
    negative = values < 0
    magnitude = np.abs(values)
    largest = int(magnitude.max()) if magnitude.size else 0
    places = _PLACES[len(_PLACES) - len(str(largest)) :]
    digits = (magnitude[..., None] // places) % 10
    shown = magnitude[..., None] >= places
    shown[..., -1] = True
    # As many digits as shown; a search of the powers of ten is cheaper than a sum along the last axis.
    lengths = np.searchsorted(_TENS, magnitude, side="right") + 1 + negative
    width = 3 + len(places)
    data = np.empty((*values.shape, width), dtype=np.uint8)
    mask = np.empty((*values.shape, width), dtype=bool)
    data[..., 0] = VALUE_STRING[0]
    data[..., 1] = lengths
    data[..., 2] = ord("-")
    data[..., 3:] = digits.astype(np.uint8) + ord("0")
    mask[..., :2] = True
    mask[..., 2] = negative
    mask[..., 3:] = shown
    return data, mask, lengths + 2


def _columns(arrays: list[np.ndarray], dtype: type) -> np.ndarray:
    """Arrays of one value per row as the columns of one C-ordered array; cheaper than np.stack."""
    found: np.ndarray = np.array(arrays, dtype=dtype).T.copy()
    return found


# Entries of rows: padded bytes, the mask of those that count, and each row's count of them. The first
# _LEAD columns are left out by the mask, room for the results entry's tag and length (_assemble).
_Padded = tuple[np.ndarray, np.ndarray, np.ndarray]
_LEAD = 5


def _numeric(features: Sequence[Feature], rows: int) -> _Padded | None:
    """The ViewFeatureValue entries of numeric features as (rows, bytes) and its mask; None if one is long."""
    numbers = _columns([_set(f.numbers) for f in features], np.float64)
    has = _columns([_set(f.has) for f in features], bool)
    present = _columns([f.present for f in features], bool)
    decimal = np.array([f.kind is Kind.INT64 for f in features])
    whole = np.array([f.kind is Kind.INT32 for f in features])
    # Values numpy does not write as Python does: non-finite floats, integers of 2^63 and more in size.
    odd = has & np.where(decimal, ~(np.abs(numbers) < 2.0**63), ~np.isfinite(numbers))
    plain = np.where(has & ~odd, numbers, 0.0)
    plain[:, whole] = plain[:, whole].astype(np.int64).astype(np.float64)
    odd_values = []
    if odd.any():
        odd_values = [
            (i, j, python_value(float(numbers[i, j]), features[j].kind)) for i, j in np.argwhere(odd).tolist()
        ]
    any_decimal = bool(decimal.any())
    all_decimal = bool(decimal.all())
    if any_decimal:
        data, mask, lengths = _decimals(plain[:, decimal].astype(np.int64))
    # As wide as the longest value: a number's tag and 8 bytes, the widest decimal, an odd value, a null.
    widths = [2, 0 if all_decimal else 9, data.shape[-1] if any_decimal else 0]
    width = max([*widths, *(len(v) for _, _, v in odd_values)])
    tail, tail_mask, tail_lengths = _tails(tuple(f.end for f in features))
    tail_width = tail.shape[1]
    if 4 + width + tail_width >= _SHORT:
        return None
    size = 6 + width + tail_width
    out = np.empty((rows, _LEAD + len(features) * size), dtype=np.uint8)
    out_mask = np.empty(out.shape, dtype=bool)
    out_mask[:, :_LEAD] = False
    # Views of the entries in place (splitting the last axis needs no copy; numpy would raise if it did).
    entry = out[:, _LEAD:].reshape((rows, len(features), size), copy=False)
    entry_mask = out_mask[:, _LEAD:].reshape((rows, len(features), size), copy=False)
    value = entry[..., 6 : 6 + width]
    value_mask = entry_mask[..., 6 : 6 + width]
    value_mask[...] = False
    # Each value's length: a number's tag and 8 bytes unless a decimal (or null, or odd) below.
    value_lengths = np.full((rows, len(features)), 9, dtype=np.int64)
    if any_decimal:
        value[:, decimal, : data.shape[-1]] = data
        value_mask[:, decimal, : data.shape[-1]] = mask
        value_lengths[:, decimal] = lengths
    if not all_decimal:
        value[:, ~decimal, 0] = VALUE_NUMBER[0]
        value[:, ~decimal, 1:9] = plain[:, ~decimal, None].astype("<f8").view(np.uint8)
        value_mask[:, ~decimal, :9] = True
    missing = ~has
    value[missing, :2] = np.frombuffer(VALUE_NULL + b"\x00", dtype=np.uint8)
    value_mask[missing] = False
    value_mask[missing, :2] = True
    value_lengths[missing] = 2
    for i, j, written in odd_values:
        value[i, j, : len(written)] = np.frombuffer(written, dtype=np.uint8)
        value_mask[i, j] = np.arange(width) < len(written)
        value_lengths[i, j] = len(written)
    # Status, the value's tag and length, the value, the effective time: all short, one-byte lengths.
    bodies = 4 + value_lengths + tail_lengths
    entry[..., 0] = VIEW_VECTOR_VALUE[0]
    entry[..., 1] = bodies
    entry[..., 2] = VIEW_VALUE_STATUS[0]
    entry[..., 3] = np.where(present, _PRESENT, _MISSING)
    entry[..., 4] = VIEW_VALUE_VALUE[0]
    entry[..., 5] = value_lengths
    entry[..., 6 + width :] = tail
    entry_mask[..., :6] = True
    entry_mask[..., 6 + width :] = tail_mask
    return out, out_mask, (bodies + 2).sum(axis=1)


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
    heads = {
        True: VIEW_VALUE_STATUS + bytes([_PRESENT]) + VIEW_VALUE_VALUE,
        False: VIEW_VALUE_STATUS + bytes([_MISSING]) + VIEW_VALUE_VALUE,
    }
    out = []
    for value, present in zip(values, feature.present.tolist(), strict=True):
        body = heads[present] + varint(len(value)) + value + tail
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
    lengths = np.zeros(rows, dtype=np.uint64)
    for part in parts:
        lengths += part[2].astype(np.uint64)
    if len(parts) == 1:
        # The tag and length go in the part's own leading columns.
        whole, whole_mask, _ = parts[0]
    else:
        whole = np.hstack([np.empty((rows, _LEAD), dtype=np.uint8), *(p[0] for p in parts)])
        whole_mask = np.hstack([np.empty((rows, _LEAD), dtype=bool), *(p[1] for p in parts)])
    # The vector's tag and length (a varint of up to 4 bytes: below 2^28, far above any reply gRPC sends).
    shifts = np.arange(4, dtype=np.uint64) * np.uint64(7)
    groups = (lengths[:, None] >> shifts) & np.uint64(0x7F)
    used = (lengths[:, None] >> shifts) > 0
    used[:, 0] = True
    more = np.zeros_like(used)
    more[:, :-1] = used[:, 1:]
    whole[:, 0] = VIEW_FEATURES_RESULT[0]
    whole[:, 1:_LEAD] = groups | (more.astype(np.uint64) << np.uint64(7))
    whole_mask[:, 0] = True
    whole_mask[:, 1:_LEAD] = used
    result: bytes = whole[whole_mask].tobytes()
    return result


def arrow_vectors(features: Sequence[Feature], fields: Sequence[pa.Field]) -> bytes:
    """GetViewFeaturesResponse.arrow_ipc: per feature its values, status and window end; a row per entity."""
    columns: list[pa.Array] = []
    names: list[str] = []
    for feature, field in zip(features, fields, strict=True):
        rows = len(feature.present)
        if feature.objects is not None:
            values = pa.array(feature.objects, type=field.type)
        else:
            assert feature.numbers is not None and feature.has is not None
            absent = ~(feature.has & feature.present)
            # An absent entity's slot may hold NaN or an infinity, which no integer type takes.
            numbers = np.where(absent, 0, feature.numbers).astype(field.type.to_pandas_dtype())
            values = pa.array(numbers, mask=absent, type=field.type)
        status = np.where(feature.present, np.int8(_PRESENT), np.int8(_MISSING))
        ends = pa.array(np.full(rows, feature.end, dtype=np.int64), type=pa.timestamp("us", tz="UTC"))
        columns += [values, pa.array(status, type=pa.int8()), ends]
        names += [field.name, f"{field.name}:status", f"{field.name}:effective_time"]
    batch = pa.record_batch(columns, names=names)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return bytes(sink.getvalue())
