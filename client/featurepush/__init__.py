"""featurepush: the client, the definitions DSL and typed errors for the featurepush ingest service.

Names resolve on first use, so that importing a submodule (the generated messages in `featurepush.v1`,
say) does not load the client and grpc with it; the server's core depends on that.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# The package version: pyproject.toml reads it from here, and `featurepush --version` prints it.
__version__ = "0.1.0"

if TYPE_CHECKING:
    from featurepush.client import ApplyResult, Client, FeatureResult, FeatureStatus, PushResult, SourceCounts
    from featurepush.definitions import (
        Aggregate,
        DefinitionError,
        FeatureService,
        FileConfig,
        FileFormat,
        PushConfig,
        StreamFeatureView,
        StreamSource,
        load_definitions,
    )
    from featurepush.errors import (
        AlreadyExistsError,
        DataLossError,
        DeadlineExceededError,
        FailedPreconditionError,
        FeaturepushError,
        InternalError,
        InvalidArgumentError,
        NotFoundError,
        PermissionDeniedError,
        ResourceExhaustedError,
        UnauthenticatedError,
        UnavailableError,
        Violation,
        from_rpc_error,
        from_status_proto,
    )
    from featurepush.types import (
        Array,
        Bool,
        Bytes,
        DataType,
        Field,
        Float32,
        Float64,
        Int32,
        Int64,
        Map,
        ScalarType,
        String,
        Struct,
        Timestamp,
        dtype_from_proto,
    )
    from featurepush.values import decode_record, key_to_struct, record_to_struct

# Each public name and the submodule that defines it.
_SOURCES = {
    "Aggregate": "featurepush.definitions",
    "FeatureService": "featurepush.definitions",
    "StreamFeatureView": "featurepush.definitions",
    "AlreadyExistsError": "featurepush.errors",
    "ApplyResult": "featurepush.client",
    "Array": "featurepush.types",
    "Bool": "featurepush.types",
    "Bytes": "featurepush.types",
    "Client": "featurepush.client",
    "DataLossError": "featurepush.errors",
    "DataType": "featurepush.types",
    "DeadlineExceededError": "featurepush.errors",
    "DefinitionError": "featurepush.definitions",
    "FailedPreconditionError": "featurepush.errors",
    "FeatureResult": "featurepush.client",
    "FeatureStatus": "featurepush.client",
    "FeaturepushError": "featurepush.errors",
    "Field": "featurepush.types",
    "FileConfig": "featurepush.definitions",
    "FileFormat": "featurepush.definitions",
    "Float32": "featurepush.types",
    "Float64": "featurepush.types",
    "Int32": "featurepush.types",
    "Int64": "featurepush.types",
    "InternalError": "featurepush.errors",
    "InvalidArgumentError": "featurepush.errors",
    "Map": "featurepush.types",
    "NotFoundError": "featurepush.errors",
    "PermissionDeniedError": "featurepush.errors",
    "PushConfig": "featurepush.definitions",
    "PushResult": "featurepush.client",
    "ResourceExhaustedError": "featurepush.errors",
    "ScalarType": "featurepush.types",
    "SourceCounts": "featurepush.client",
    "StreamSource": "featurepush.definitions",
    "String": "featurepush.types",
    "Struct": "featurepush.types",
    "Timestamp": "featurepush.types",
    "UnauthenticatedError": "featurepush.errors",
    "UnavailableError": "featurepush.errors",
    "Violation": "featurepush.errors",
    "decode_record": "featurepush.values",
    "dtype_from_proto": "featurepush.types",
    "from_rpc_error": "featurepush.errors",
    "from_status_proto": "featurepush.errors",
    "key_to_struct": "featurepush.values",
    "load_definitions": "featurepush.definitions",
    "record_to_struct": "featurepush.values",
}

__all__ = [
    "Aggregate",
    "FeatureService",
    "StreamFeatureView",
    "__version__",
    "AlreadyExistsError",
    "ApplyResult",
    "Array",
    "Bool",
    "Bytes",
    "Client",
    "DataLossError",
    "DataType",
    "DeadlineExceededError",
    "DefinitionError",
    "FailedPreconditionError",
    "FeatureResult",
    "FeatureStatus",
    "FeaturepushError",
    "Field",
    "FileConfig",
    "FileFormat",
    "Float32",
    "Float64",
    "Int32",
    "Int64",
    "InternalError",
    "InvalidArgumentError",
    "Map",
    "NotFoundError",
    "PermissionDeniedError",
    "PushConfig",
    "PushResult",
    "ResourceExhaustedError",
    "ScalarType",
    "SourceCounts",
    "StreamSource",
    "String",
    "Struct",
    "Timestamp",
    "UnauthenticatedError",
    "UnavailableError",
    "Violation",
    "decode_record",
    "dtype_from_proto",
    "from_rpc_error",
    "from_status_proto",
    "key_to_struct",
    "load_definitions",
    "record_to_struct",
]


def __getattr__(name: str) -> Any:
    """Import the submodule defining a public name on first use, and keep the name here."""
    module = _SOURCES.get(name)
    if module is None:
        raise AttributeError(f"module 'featurepush' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public names, loaded or not."""
    return sorted(set(globals()) | set(__all__))
