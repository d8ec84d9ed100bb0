"""Strict conformance of Arrow data to a source's schema: casts that lose information are refused by row."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .errors import Violation
from .rows import _RFC3339, FLOAT32_MAX
from .schema import DType, FieldSpec, Kind
from .times import MAX_MICROS, MIN_MICROS


def _family_error(src: pa.DataType, dtype: DType) -> str | None:
    """Why Arrow type `src` can never hold `dtype` values faithfully, or None when a checked cast may."""
    k = dtype.kind
    t = pa.types
    if pa.types.is_dictionary(src):
        return _family_error(src.value_type, dtype)
    if k in (Kind.INT32, Kind.INT64):
        ok = t.is_integer(src) or t.is_floating(src) or t.is_string(src) or t.is_large_string(src)
    elif k in (Kind.FLOAT32, Kind.FLOAT64):
        ok = t.is_integer(src) or t.is_floating(src)
    elif k is Kind.STRING:
        ok = t.is_string(src) or t.is_large_string(src)
    elif k is Kind.BOOL:
        ok = t.is_boolean(src)
    elif k is Kind.TIMESTAMP:
        if t.is_timestamp(src) and src.tz is None:
            return "has no time zone; Timestamps must be UTC-aware (cast it with a tz, such as 'UTC')"
        ok = t.is_timestamp(src) or t.is_string(src) or t.is_large_string(src)
    elif k is Kind.BYTES:
        ok = t.is_binary(src) or t.is_large_binary(src) or t.is_fixed_size_binary(src)
    elif k is Kind.ARRAY:
        assert dtype.element is not None
        if not (t.is_list(src) or t.is_large_list(src) or t.is_fixed_size_list(src)):
            return f"is {src}, not a list"
        inner = _family_error(src.value_type, dtype.element)
        return None if inner is None else f"has elements that {inner}"
    elif k is Kind.MAP:
        assert dtype.element is not None
        if not t.is_map(src):
            return f"is {src}, not a map"
        if not (t.is_string(src.key_type) or t.is_large_string(src.key_type)):
            return "has non-string map keys"
        inner = _family_error(src.item_type, dtype.element)
        return None if inner is None else f"has map values that {inner}"
    else:
        if not t.is_struct(src):
            return f"is {src}, not a struct"
        names = {src.field(i).name for i in range(src.num_fields)}
        want = {f.name for f in dtype.fields}
        if names != want:
            missing, extra = sorted(want - names), sorted(names - want)
            return f"has struct fields that differ (missing {missing}, unknown {extra})"
        for f in dtype.fields:
            inner = _family_error(src.field(f.name).type, f.dtype)
            if inner is not None:
                return f"has a field {f.name} that {inner}"
        return None
    return None if ok else f"is {src}, which cannot hold {dtype} values without loss"


def cast_problem(src: pa.DataType, dtype: DType) -> str | None:
    """Why a column of Arrow type `src` can never be cast to `dtype` without loss, or None."""
    return _family_error(src, dtype)


def _casts(part: pa.Array, target: pa.DataType) -> bool:
    """Whether a safe cast of `part` to `target` succeeds."""
    try:
        pc.cast(part, target, safe=True)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return False
    return True


def _shown(value: pa.Scalar) -> str:
    """A value for a message; Arrow's own text where Python cannot hold it (a timestamp past year 9999)."""
    try:
        return repr(value.as_py())
    except (OverflowError, ValueError):
        return f"a {value.type} value out of Python's range"


def _bad_rows(col: pa.ChunkedArray | pa.Array, target: pa.DataType, limit: int) -> list[tuple[int, str]]:
    """Find the rows whose values fail a safe cast, by casting small slices and then single values."""
    out: list[tuple[int, str]] = []
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    step = 1024
    for start in range(0, len(arr), step):
        part = arr.slice(start, step)
        if _casts(part, target):
            continue
        for j in range(len(part)):
            try:
                pc.cast(part.slice(j, 1), target, safe=True)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                out.append((start + j, f"{_shown(part[j])} cannot be held by {target} without loss: {e}"))
                if len(out) >= limit:
                    return out
    return out


def _null_rows(
    arr: pa.Array,
    dtype: DType,
    nullable: bool,
    rows: np.ndarray,
    path: str,
    out: list[tuple[int, str, str]],
    limit: int,
) -> None:
    """Record rows where a non-nullable value, element or struct field is null."""
    if not nullable and arr.null_count:
        for idx in np.flatnonzero(pc.is_null(arr).to_numpy(zero_copy_only=False))[:limit]:
            out.append((int(rows[idx]), path, "must not be null"))
    if dtype.kind in (Kind.ARRAY, Kind.MAP) and len(arr):
        assert dtype.element is not None
        if dtype.kind is Kind.MAP:
            # list_parent_indices and list_flatten abort the process on map arrays in pyarrow 26; the
            # offsets give the same parents without them.
            offsets = arr.offsets.to_numpy()
            parents = np.repeat(rows, np.diff(offsets))
            flat = arr.items.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
        else:
            parents = rows[pc.list_parent_indices(arr).to_numpy()]
            flat = pc.list_flatten(arr)
        _null_rows(flat, dtype.element, dtype.element_nullable, parents, path + "[]", out, limit)
    elif dtype.kind is Kind.STRUCT and len(arr):
        valid = rows if arr.null_count == 0 else rows[pc.is_valid(arr).to_numpy(zero_copy_only=False)]
        keep = pc.drop_null(arr) if arr.null_count else arr
        for f in dtype.fields:
            _null_rows(keep.field(f.name), f.dtype, f.nullable, valid, f"{path}.{f.name}", out, limit)


def conform(
    data: pa.Table,
    fields: Sequence[FieldSpec],
    path_prefix: str,
    *,
    allow_extra_columns: bool = False,
    max_violations: int = 100,
) -> tuple[pa.Table | None, list[Violation]]:
    """Cast `data` to the schema exactly; return the table, or None and violations by row and column."""
    violations: list[Violation] = []
    names = set(data.column_names)
    if len(names) != data.num_columns:
        violations.append(Violation(path_prefix, "the data has duplicate column names"))
        return None, violations
    if not allow_extra_columns:
        known = {f.name for f in fields}
        for name in data.column_names:
            if name not in known:
                violations.append(Violation(f"{path_prefix}.{name}", f"unknown column {name!r}"))
    arrays: list[pa.ChunkedArray] = []
    for f in fields:
        fpath = f"{path_prefix}.{f.name}"
        target = f.dtype.to_arrow()
        if f.name not in names:
            if f.nullable:
                arrays.append(pa.chunked_array([pa.nulls(data.num_rows, target)], type=target))
            else:
                violations.append(Violation(fpath, f"column {f.name} ({f.dtype}, not nullable) is missing"))
            continue
        col = data.column(f.name)
        why = _family_error(col.type, f.dtype)
        if why is not None:
            violations.append(Violation(fpath, f"column {f.name} {why}"))
            continue
        if pa.types.is_dictionary(col.type):
            col = pc.cast(col, col.type.value_type)
        is_text = pa.types.is_string(col.type) or pa.types.is_large_string(col.type)
        if f.dtype.kind is Kind.TIMESTAMP and is_text:
            ok = pc.match_substring_regex(col, _RFC3339.pattern)
            bad = np.flatnonzero(~pc.fill_null(ok, True).to_numpy(zero_copy_only=False))
            for idx in bad[:max_violations]:
                violations.append(
                    Violation(
                        f"{path_prefix}[{idx}].{f.name}",
                        f"{col[int(idx)].as_py()!r} is not an RFC 3339 timestamp",
                    )
                )
            if len(bad):
                continue
        if f.dtype.kind is Kind.FLOAT32 and pa.types.is_floating(col.type):
            over = pc.and_(pc.is_finite(col), pc.greater(pc.abs(col), FLOAT32_MAX))
            bad = np.flatnonzero(pc.fill_null(over, False).to_numpy(zero_copy_only=False))
            for idx in bad[:max_violations]:
                violations.append(
                    Violation(
                        f"{path_prefix}[{idx}].{f.name}",
                        f"{col[int(idx)].as_py()!r} is out of range for Float32",
                    )
                )
            if len(bad):
                continue
        if col.type != target:
            try:
                col = pc.cast(col, target, safe=True)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                for row, why in _bad_rows(col, target, max_violations):
                    violations.append(Violation(f"{path_prefix}[{row}].{f.name}", why))
                continue
        if f.dtype.kind is Kind.TIMESTAMP and len(col) - col.null_count:
            lo, hi = pc.min_max(pc.cast(col, pa.int64())).values()
            if lo.as_py() < MIN_MICROS or hi.as_py() > MAX_MICROS:
                violations.append(Violation(fpath, "timestamps must lie in years 0001 to 9999"))
                continue
        found: list[tuple[int, str, str]] = []
        flat = col.combine_chunks()
        _null_rows(flat, f.dtype, f.nullable, np.arange(len(flat)), "", found, max_violations)
        for row, sub, what in sorted(found)[:max_violations]:
            violations.append(Violation(f"{path_prefix}[{row}].{f.name}{sub}", what))
        if found:
            continue
        arrays.append(col if isinstance(col, pa.ChunkedArray) else pa.chunked_array([col]))
    if violations:
        return None, violations[:max_violations]
    schema = pa.schema([f.to_arrow() for f in fields])
    return pa.Table.from_arrays(arrays, schema=schema), []
