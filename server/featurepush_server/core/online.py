"""The read path: entity keys to the latest stored records, with status and event time."""

from __future__ import annotations

import time
from collections.abc import Sequence

from google.protobuf import struct_pb2

from featurepush.v1 import online_service_pb2

from .encoding import event_time_length, key_part, null_entry, python_key, with_late_nulls
from .errors import InvalidInput, LimitExceeded, Violation
from .framing import header_micros, payload
from .registry import Registry
from .rows import BadValue, scalar_converter
from .schema import Kind, SourceSpec
from .stores.base import LatestRows
from .wire import FEATURE_VECTOR_STATUS, GET_FEATURES_RESULT, varint

_MISSING = FEATURE_VECTOR_STATUS + bytes([online_service_pb2.FEATURE_STATUS_MISSING])
_PRESENT = FEATURE_VECTOR_STATUS + bytes([online_service_pb2.FEATURE_STATUS_PRESENT])
_EXPIRED = FEATURE_VECTOR_STATUS + bytes([online_service_pb2.FEATURE_STATUS_EXPIRED])


class OnlineReader:
    """Reads the latest rows of one source for many entity keys."""

    def __init__(self, registry: Registry, store: LatestRows, *, max_keys: int = 10_000):
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
        prefix = self._store.row_prefix(source.id)
        store_keys = self._string_keys(keys, spec, prefix)
        if store_keys is None:
            store_keys = self._checked_keys(keys, spec, prefix)
        stored = self._store.read(store_keys)
        cutoff = time.time_ns() // 1000 - spec.ttl_micros if spec.ttl_micros else None
        late = {name.encode(): null_entry(name) for name in source.late_fields}
        out = []
        for value in stored:
            # A stored payload is the vector's event_time and features fields.
            if value is None:
                vector = _MISSING
            elif cutoff is not None and header_micros(value) < cutoff:
                body = payload(value)
                vector = _EXPIRED + body[: event_time_length(body)]
            elif late:
                vector = _PRESENT + with_late_nulls(payload(value), late)
            else:
                vector = _PRESENT + payload(value)
            out.append(GET_FEATURES_RESULT + varint(len(vector)) + vector)
        return b"".join(out)

    @staticmethod
    def _string_keys(
        keys: Sequence[struct_pb2.Struct], spec: SourceSpec, prefix: bytes
    ) -> list[bytes] | None:
        """Store keys of the common case, one String entity key given as a string; None otherwise."""
        if len(spec.entity_keys) != 1 or spec.field(spec.entity_keys[0]).dtype.kind is not Kind.STRING:
            return None
        name = spec.entity_keys[0]
        maps = [k.fields for k in keys]
        if any(len(m) != 1 for m in maps):
            return None
        values = [m.get(name) for m in maps]
        texts = [v.string_value for v in values if v is not None and v.WhichOneof("kind") == "string_value"]
        if len(texts) != len(values):
            return None
        return [prefix + text.encode() for text in texts]

    @staticmethod
    def _checked_keys(keys: Sequence[struct_pb2.Struct], spec: SourceSpec, prefix: bytes) -> list[bytes]:
        """Store keys of any entity keys, or InvalidInput naming every bad one."""
        source_name = spec.name
        names = spec.entity_keys
        converters = [scalar_converter(spec.field(k).dtype.kind) for k in names]
        violations: list[Violation] = []
        store_keys: list[bytes] = []
        for i, key in enumerate(keys):
            fields = key.fields
            parts: list[bytes] = []
            for name, convert in zip(names, converters, strict=True):
                if name not in fields:
                    violations.append(Violation(f"keys[{i}].{name}", f"entity key {name} is required"))
                    continue
                try:
                    parts.append(key_part(convert(fields[name])))
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
        return store_keys
