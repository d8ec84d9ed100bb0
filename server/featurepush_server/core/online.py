"""The read path: entity keys to the latest stored records, with status and event time."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError

from featurepush.v1 import online_service_pb2

from .arrow_reply import ReplyPlan, reply_stream
from .encoding import (
    ColumnsPlan,
    decode_columns,
    event_time_length,
    key_part,
    null_entry,
    payload_whole,
    python_key,
    with_late_nulls,
)
from .errors import DataLoss, InvalidInput, LimitExceeded, Violation
from .framing import header_micros, locate, payload
from .registry import Registry, Source
from .rows import BadValue, rows_to_table, scalar_converter
from .schema import ARROW_TIMESTAMP, FieldSpec, Kind, SourceSpec
from .stores.base import LatestRows
from .struct_reply import EXPIRED, MISSING_RESULT, PRESENT, result, struct_results
from .wire import (
    GET_FEATURES_ARROW_IPC,
    StringKeysRequest,
    single_string_keys,
    varint,
)

_LOGGER = logging.getLogger(__name__)
# The Arrow IPC end-of-stream marker: a continuation token and a zero length.
_END_OF_STREAM = b"\xff\xff\xff\xff\x00\x00\x00\x00"
_STATUS_PRESENT = online_service_pb2.FEATURE_STATUS_PRESENT
_STATUS_MISSING = online_service_pb2.FEATURE_STATUS_MISSING
_STATUS_EXPIRED = online_service_pb2.FEATURE_STATUS_EXPIRED
# Reads of at most this many keys visit the parsed keys: serializing the request costs more than it saves.
_PARSED_KEYS = 2


def damaged_row(source: str, at: int | None = None) -> DataLoss:
    """The error of a read that met a stored value cut short or otherwise damaged: DATA_LOSS, said plainly.

    `at` is the request's key whose row is damaged, where the read knows it, so the caller knows what to
    push again.
    """
    if at is None:
        return DataLoss(
            f"a stored row of {source} read by this request is damaged (cut short or overwritten); push the "
            "latest record of each entity it read again",
            reason="DAMAGED_ROW",
            metadata={"source": source},
        )
    return DataLoss(
        f"the stored row of {source} for keys[{at}] of this request is damaged (cut short or overwritten); "
        "push that entity's latest record again",
        reason="DAMAGED_ROW",
        metadata={"source": source, "key_index": str(at)},
    )


def _first_damaged(stored: Sequence[bytes | None]) -> int | None:
    """The position of the first stored value whose payload is not whole, if any; for error messages only."""
    return next((i for i, v in enumerate(stored) if v is not None and not payload_whole(payload(v))), None)


def struct_reply(source: str, stored: Sequence[bytes | None], cutoff: int | None) -> bytes:
    """struct_results of a source's stored rows, or DataLoss naming the key of the first damaged one."""
    try:
        return struct_results(stored, cutoff)
    except ValueError:
        raise damaged_row(source, _first_damaged(stored)) from None


def _late_results(
    source: str, stored: Sequence[bytes | None], cutoff: int | None, late_fields: Sequence[str]
) -> bytes:
    """struct_results for a source with fields added since some rows were stored: those read as null."""
    late = {name.encode(): null_entry(name) for name in late_fields}
    out = []
    for at, value in enumerate(stored):
        if value is None:
            out.append(MISSING_RESULT)
            continue
        body = payload(value)
        if not payload_whole(body):
            raise damaged_row(source, at)
        if cutoff is not None and header_micros(value) < cutoff:
            out.append(result(EXPIRED, body[: event_time_length(body)]))
            continue
        try:
            out.append(result(PRESENT, with_late_nulls(body, late)))
        except ValueError:
            raise damaged_row(source, at) from None
    return b"".join(out)


def check_key_count(count: int, max_keys: int) -> None:
    """Refuse a read of no entity keys (InvalidInput) or of more than `max_keys` (LimitExceeded)."""
    if not count:
        raise InvalidInput(
            "no keys were given", [Violation("keys", "name at least one entity key")], reason="NO_KEYS"
        )
    if count > max_keys:
        raise LimitExceeded(
            f"at most {max_keys} keys per request; split the request",
            reason="TOO_MANY_KEYS",
            metadata={"limit": str(max_keys)},
        )


class _Keys(NamedTuple):
    """A read's entity keys: the one String key's values as UTF-8, or each key field's values in key order."""

    raws: list[bytes] | None
    values: list[list[Any]] | None

    def columns(self) -> list[list[Any]]:
        """Each entity key field's values in key order."""
        if self.values is not None:
            return self.values
        assert self.raws is not None
        return [[raw.decode() for raw in self.raws]]


class OnlineReader:
    """Reads the latest rows of one source for many entity keys."""

    def __init__(self, registry: Registry, store: LatestRows, *, max_keys: int = 10_000):
        self._registry = registry
        self._store = store
        self.max_keys = max_keys

    def get_features(self, request: online_service_pb2.GetFeaturesRequest | StringKeysRequest) -> bytes:
        """The serialized GetFeaturesResponse for the request's keys, vectors in request order."""
        source, _, stored = self._read(request)
        spec = source.spec
        cutoff = time.time_ns() // 1000 - spec.ttl_micros if spec.ttl_micros else None
        if source.late_fields:
            return _late_results(spec.name, stored, cutoff, source.late_fields)
        return struct_reply(spec.name, stored, cutoff)

    def get_features_arrow(self, request: online_service_pb2.GetFeaturesRequest | StringKeysRequest) -> bytes:
        """The serialized GetFeaturesResponse for the request's keys as one Arrow IPC record batch."""
        source, keys, stored = self._read(request)
        spec = source.spec
        cutoff = time.time_ns() // 1000 - spec.ttl_micros if spec.ttl_micros else None
        layout = read_layout(spec)
        stream = None
        if layout.reply is not None and keys.raws is not None:
            stream = reply_stream(layout.reply, keys.raws, stored, cutoff)
        if stream is None:
            stream = arrow_stream(spec, keys.columns(), stored, cutoff)
        return GET_FEATURES_ARROW_IPC + varint(len(stream)) + stream

    def _read(
        self, request: online_service_pb2.GetFeaturesRequest | StringKeysRequest
    ) -> tuple[Source, _Keys, list[bytes | None]]:
        """The source, the request's entity keys, and the stored values of the keys."""
        if isinstance(request, StringKeysRequest):
            check_key_count(len(request.raws), self.max_keys)
            source = self._registry.get(request.source)
            spec = source.spec
            if spec.entity_keys == (request.name,) and spec.field(request.name).dtype.kind is Kind.STRING:
                prefix = self._store.row_prefix(source.id)
                stored = self._store.read([prefix + raw for raw in request.raws])
                return source, _Keys(request.raws, None), list(stored)
            # Keys of another field than the source's: the parsed keys say which are wrong.
            request = request.message
        keys = request.keys
        check_key_count(len(keys), self.max_keys)
        source = self._registry.get(request.source)
        spec = source.spec
        prefix = self._store.row_prefix(source.id)
        raws = self._string_keys(request, keys, spec)
        if raws is not None:
            found = _Keys(raws, None)
            store_keys = [prefix + raw for raw in raws]
        else:
            columns, store_keys = self._checked_keys(keys, spec, prefix)
            found = _Keys(None, columns)
        return source, found, list(self._store.read(store_keys))

    @staticmethod
    def _string_keys(
        request: online_service_pb2.GetFeaturesRequest, keys: Sequence[struct_pb2.Struct], spec: SourceSpec
    ) -> list[bytes] | None:
        """The request's `keys` as UTF-8 where each is one String entity key given as a string; else None."""
        if len(spec.entity_keys) != 1 or spec.field(spec.entity_keys[0]).dtype.kind is not Kind.STRING:
            return None
        name = spec.entity_keys[0]
        if len(keys) > _PARSED_KEYS:
            # Reading many keys back from the request's bytes costs a fraction of visiting each parsed key.
            serialized = request.SerializeToString()
            raws = single_string_keys(serialized, request.source, request.response_format, name)
            if raws is not None:
                return raws
        maps = [k.fields for k in keys]
        if any(len(m) != 1 for m in maps):
            return None
        values = [m.get(name) for m in maps]
        texts = [v.string_value for v in values if v is not None and v.WhichOneof("kind") == "string_value"]
        if len(texts) != len(values):
            return None
        return [text.encode() for text in texts]

    @staticmethod
    def _checked_keys(
        keys: Sequence[struct_pb2.Struct], spec: SourceSpec, prefix: bytes
    ) -> tuple[list[list[Any]], list[bytes]]:
        """Each entity key field's values and the store keys, or InvalidInput naming every bad key."""
        source_name = spec.name
        names = spec.entity_keys
        converters = [scalar_converter(spec.field(k).dtype.kind) for k in names]
        violations: list[Violation] = []
        store_keys: list[bytes] = []
        columns: list[list[Any]] = [[] for _ in names]
        for i, key in enumerate(keys):
            fields = key.fields
            parts: list[bytes] = []
            for name, convert, column in zip(names, converters, columns, strict=True):
                if name not in fields:
                    violations.append(Violation(f"keys[{i}].{name}", f"entity key {name} is required"))
                    continue
                try:
                    value = convert(fields[name])
                    parts.append(key_part(value))
                    column.append(value)
                except BadValue as e:
                    violations.append(Violation(f"keys[{i}].{name}", str(e)))
            if len(fields) > len(parts):
                for extra in sorted(set(fields) - set(names)):
                    violations.append(
                        Violation(
                            f"keys[{i}].{extra}",
                            f"{extra!r} is not an entity key of {source_name}; "
                            f"the keys are {', '.join(names)}",
                        )
                    )
            if not violations:
                store_keys.append(python_key(parts, prefix))
        if violations:
            raise InvalidInput(
                f"{len(violations)} invalid entity key value(s)", violations[:100], reason="INVALID_KEYS"
            )
        return columns, store_keys


def arrow_stream(
    spec: SourceSpec, key_columns: Sequence[Sequence[Any]], stored: Sequence[bytes | None], cutoff: int | None
) -> bytes:
    """The Arrow reply's IPC stream for any schema and stored rows, through pyarrow arrays.

    `key_columns` holds each entity key field's values in key order; rows with event times before
    `cutoff` (microseconds) read as expired. `arrow_reply.reply_stream` writes the same stream faster
    for flat schemas.
    """
    n = len(stored)
    found = [v for v in stored if v is not None]
    try:
        blob, found_micros, starts, lengths = locate(found)
    except ValueError:
        raise damaged_row(spec.name, _first_damaged(stored)) from None
    status = np.full(n, _STATUS_MISSING, dtype=np.int8)
    if len(found) == n:
        is_found = None
        micros = found_micros
        status[:] = _STATUS_PRESENT
    else:
        is_found = np.array([v is not None for v in stored], dtype=bool)
        micros = np.zeros(n, dtype=np.int64)
        micros[is_found] = found_micros
        status[is_found] = _STATUS_PRESENT
    keep = None
    if cutoff is not None:
        fresh = found_micros >= cutoff
        if not fresh.all():
            keep = fresh
            status[(status == _STATUS_PRESENT) & (micros < cutoff)] = _STATUS_EXPIRED
    present = np.flatnonzero(status == _STATUS_PRESENT)
    if keep is not None:
        found = [v for v, ok in zip(found, keep, strict=True) if ok]
        starts, lengths = starts[keep], lengths[keep]
    layout = read_layout(spec)
    features = _feature_arrays(found, blob, starts, lengths, spec, layout.plan) if found else {}
    gather = None
    if len(found) < n:
        # Rows without features take the null at the end of each present-row array.
        gather = np.full(n, len(found), dtype=np.int64)
        gather[present] = np.arange(len(found))
    arrays = [pa.array(k, layout.schema.field(i).type) for i, k in enumerate(key_columns)]
    arrays.append(pa.array(status, pa.int8()))
    arrays.append(pa.array(micros, ARROW_TIMESTAMP, mask=None if is_found is None else ~is_found))
    for f in layout.features:
        column = features.get(f.name)
        if column is None:
            arrays.append(pa.nulls(n, f.dtype.to_arrow()))
        elif gather is None:
            arrays.append(column)
        else:
            arrays.append(pa.concat_arrays([column, pa.nulls(1, column.type)]).take(gather))
    batch = pa.RecordBatch.from_arrays(arrays, schema=layout.schema)
    # An IPC stream is the schema's message, the batch's, then the end-of-stream marker.
    stream: bytes = layout.schema_message + batch.serialize().to_pybytes() + _END_OF_STREAM
    return stream


@dataclass(frozen=True)
class ReadLayout:
    """The columns of an Arrow read of one source: its schema, and the feature fields after the keys."""

    schema: pa.Schema
    features: tuple[FieldSpec, ...]
    plan: ColumnsPlan
    schema_message: bytes
    # How to write the reply straight from stored columns; None where the general path is needed.
    reply: ReplyPlan | None


# Layouts by the identity of their spec: hashing a spec walks its whole type tree, on every read.
_LAYOUTS: dict[int, tuple[SourceSpec, ReadLayout]] = {}


def read_layout(spec: SourceSpec) -> ReadLayout:
    """The Arrow read's columns: entity keys, status, event_time, then the other fields in schema order."""
    cached = _LAYOUTS.get(id(spec))
    if cached is not None and cached[0] is spec:
        return cached[1]
    layout = _layout(spec)
    if len(_LAYOUTS) >= 1024:
        _LAYOUTS.clear()
    _LAYOUTS[id(spec)] = (spec, layout)
    return layout


def _layout(spec: SourceSpec) -> ReadLayout:
    keys = [spec.field(name) for name in spec.entity_keys]
    features = tuple(f for f in spec.fields if f.name not in spec.entity_keys)
    taken = {f.name for f in spec.fields}

    def free(name: str) -> str:
        # A schema field keeps its name; the status or event_time column makes way.
        while name in taken:
            name = "_" + name
        taken.add(name)
        return name

    status, event_time = free("status"), free("event_time")
    fields = [pa.field(f.name, f.dtype.to_arrow(), nullable=False) for f in keys]
    fields.append(pa.field(status, pa.int8(), nullable=False))
    fields.append(pa.field(event_time, ARROW_TIMESTAMP))
    fields += [pa.field(f.name, f.dtype.to_arrow()) for f in features]
    schema = pa.schema(fields)
    message = schema.serialize().to_pybytes()
    reply = ReplyPlan.of(spec.fields, keys, features, message)
    return ReadLayout(schema, features, ColumnsPlan.of(spec.fields), message, reply)


def _feature_arrays(
    rows: Sequence[bytes],
    blob: np.ndarray,
    starts: np.ndarray,
    lengths: np.ndarray,
    spec: SourceSpec,
    plan: ColumnsPlan,
) -> dict[str, pa.Array]:
    """The fields of present stored rows, column at a time; from the payload when columns lack a field."""
    decoded = decode_columns(blob, starts, lengths, plan)
    if decoded is not None:
        return decoded
    # Rows stored before fields were added (or with damaged columns): their Structs, with the missing fields
    # as null.
    bodies = [payload(v) for v in rows]
    if not all(map(payload_whole, bodies)):
        raise damaged_row(spec.name)
    try:
        structs = [online_service_pb2.FeatureVector.FromString(body).features for body in bodies]
    except DecodeError:
        # A Struct flipped inside its intact length.
        raise damaged_row(spec.name) from None
    table, violations, _ = rows_to_table(structs, spec.fields, spec.arrow_schema, "stored")
    if table is None:
        # Every row was validated against the schema when it was written: a Value that no longer fits it
        # was damaged since.
        _LOGGER.warning("stored rows of %s do not fit its schema: %s", spec.name, violations[:3])
        raise damaged_row(spec.name)
    return {name: table.column(name).combine_chunks() for name in table.column_names}
