"""The read path: entity keys to the latest stored records, with status and event time."""

from __future__ import annotations

import time
from collections.abc import Sequence

import pyarrow as pa
from google.protobuf import struct_pb2, timestamp_pb2

from featurepush.v1 import online_service_pb2

from .encoding import encode_keys, header_micros, varint
from .errors import InvalidInput, LimitExceeded, Violation
from .registry import Registry
from .rows import BadValue, scalar_converter
from .store import OnlineStore, row_prefix

_MISSING = b"\x08" + bytes([online_service_pb2.FEATURE_STATUS_MISSING])
_PRESENT = b"\x08" + bytes([online_service_pb2.FEATURE_STATUS_PRESENT])
_EXPIRED = b"\x08" + bytes([online_service_pb2.FEATURE_STATUS_EXPIRED])


def _event_time(micros: int) -> bytes:
    ts = timestamp_pb2.Timestamp(seconds=micros // 1_000_000, nanos=(micros % 1_000_000) * 1000)
    body = ts.SerializeToString()
    return b"\x12" + varint(len(body)) + body


class OnlineReader:
    """Reads the latest rows of one source for many entity keys."""

    def __init__(self, registry: Registry, store: OnlineStore, *, max_keys: int = 10_000):
        self._registry = registry
        self._store = store
        self.max_keys = max_keys

    def get_features(self, source_name: str, keys: Sequence[struct_pb2.Struct]) -> bytes:
        """The serialized GetFeaturesResponse for `keys`, vectors in request order."""
        if not keys:
            raise InvalidInput(
                "no keys were given", [Violation("keys", "name at least one entity key")], reason="NO_KEYS"
            )
        if len(keys) > self.max_keys:
            raise LimitExceeded(
                f"at most {self.max_keys} keys per request; split the request",
                reason="TOO_MANY_KEYS",
                metadata={"limit": str(self.max_keys)},
            )
        source = self._registry.get(source_name)
        spec = source.spec
        violations: list[Violation] = []
        columns: list[list[object]] = []
        names = set(spec.entity_keys)
        for key_name in spec.entity_keys:
            convert = scalar_converter(spec.field(key_name).dtype.kind)
            col: list[object] = []
            for i, key in enumerate(keys):
                fields = key.fields
                if key_name not in fields:
                    violations.append(
                        Violation(f"keys[{i}].{key_name}", f"entity key {key_name} is required")
                    )
                    col.append(None)
                    continue
                try:
                    col.append(convert(fields[key_name]))
                except BadValue as e:
                    violations.append(Violation(f"keys[{i}].{key_name}", str(e)))
                    col.append(None)
            columns.append(col)
        for i, key in enumerate(keys):
            for extra in sorted(set(key.fields) - names):
                violations.append(
                    Violation(
                        f"keys[{i}].{extra}",
                        f"{extra!r} is not an entity key of {source_name}; "
                        f"the keys are {', '.join(spec.entity_keys)}",
                    )
                )
        if violations:
            raise InvalidInput(
                f"{len(violations)} invalid entity key value(s)", violations[:100], reason="INVALID_KEYS"
            )
        arrays = [
            pa.array(col, spec.field(k).dtype.to_arrow())
            for k, col in zip(spec.entity_keys, columns, strict=True)
        ]
        store_keys = encode_keys(arrays, row_prefix(source.id)).to_pylist()
        stored = self._store.read(store_keys)
        cutoff = time.time_ns() // 1000 - spec.ttl_micros if spec.ttl_micros else None
        out = []
        for value in stored:
            if value is None:
                vector = _MISSING
            else:
                micros = header_micros(value)
                if cutoff is not None and micros < cutoff:
                    vector = _EXPIRED + _event_time(micros)
                else:
                    payload = value[8:]
                    vector = _PRESENT + _event_time(micros) + b"\x1a" + varint(len(payload)) + payload
            out.append(b"\x0a" + varint(len(vector)) + vector)
        return b"".join(out)
