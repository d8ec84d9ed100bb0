"""Push source definitions (StreamSource, PushConfig, FileConfig) and the loader for definitions files."""

from __future__ import annotations

import datetime as dt
import importlib.util
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from google.protobuf import duration_pb2, timestamp_pb2

from featurepush.types import Field
from featurepush.v1 import schema_pb2, source_pb2

__all__ = [
    "DefinitionError",
    "FileConfig",
    "FileFormat",
    "PushConfig",
    "StreamSource",
    "load_definitions",
]

FileFormat = Literal["parquet", "csv", "arrow_ipc"]

_FORMAT_TO_WIRE: dict[str, source_pb2.FileFormat] = {
    "parquet": source_pb2.FILE_FORMAT_PARQUET,
    "csv": source_pb2.FILE_FORMAT_CSV,
    "arrow_ipc": source_pb2.FILE_FORMAT_ARROW_IPC,
}
_FORMAT_FROM_WIRE: dict[int, FileFormat] = {
    source_pb2.FILE_FORMAT_PARQUET: "parquet",
    source_pb2.FILE_FORMAT_CSV: "csv",
    source_pb2.FILE_FORMAT_ARROW_IPC: "arrow_ipc",
}


class DefinitionError(Exception):
    """A definitions file could not be loaded; the message names the file and the cause."""


@dataclass(frozen=True)
class PushConfig:
    """How pushed records are handled: log_offline also appends every acknowledged record offline."""

    log_offline: bool = False

    def to_proto(self) -> source_pb2.PushConfig:
        return source_pb2.PushConfig(log_offline=self.log_offline)

    @classmethod
    def from_proto(cls, message: source_pb2.PushConfig) -> PushConfig:
        return cls(log_offline=message.log_offline)


def _post_processor_reference(value: str | Callable[..., Any]) -> str:
    if isinstance(value, str):
        module, sep, function = value.partition(":")
        if not sep or not module or not function:
            raise ValueError(f'post_processor {value!r} must be a "package.module:function" reference')
        return value
    if not callable(value):
        raise TypeError(f"post_processor must be a str or a function, got {value!r}")
    module_name = getattr(value, "__module__", None)
    qualname = getattr(value, "__qualname__", None)
    if not module_name or not qualname or module_name == "__main__" or "<" in qualname:
        raise ValueError(
            f"post_processor {value!r} must be importable by the server: define it at the top level of a "
            "module (not a lambda, a nested function or __main__), or pass 'package.module:function'"
        )
    return f"{module_name}:{qualname}"


@dataclass(frozen=True)
class FileConfig:
    """A batch source: files at uri in file_format; a post_processor function is kept as "module:qualname"."""

    uri: str
    file_format: FileFormat = "parquet"
    timestamp_field: str | None = None
    post_processor: str | Callable[..., Any] | None = None
    hive_partitioning: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.uri, str) or not self.uri:
            raise ValueError(f"FileConfig uri must be a non-empty str, got {self.uri!r}")
        if self.file_format not in _FORMAT_TO_WIRE:
            raise ValueError(
                f"file_format must be one of {sorted(_FORMAT_TO_WIRE)}, got {self.file_format!r}"
            )
        if self.post_processor is not None:
            object.__setattr__(self, "post_processor", _post_processor_reference(self.post_processor))

    def to_proto(self) -> source_pb2.BatchConfig:
        return source_pb2.BatchConfig(
            uri=self.uri,
            file_format=_FORMAT_TO_WIRE[self.file_format],
            timestamp_field=self.timestamp_field or "",
            post_processor=str(self.post_processor or ""),
            hive_partitioning=self.hive_partitioning,
        )

    @classmethod
    def from_proto(cls, message: source_pb2.BatchConfig) -> FileConfig:
        try:
            file_format = _FORMAT_FROM_WIRE[message.file_format]
        except KeyError:
            raise ValueError(f"unknown or unspecified file format {message.file_format}") from None
        return cls(
            uri=message.uri,
            file_format=file_format,
            timestamp_field=message.timestamp_field or None,
            post_processor=message.post_processor or None,
            hive_partitioning=message.hive_partitioning,
        )


@dataclass(frozen=True)
class StreamSource:
    """A push source definition, as Tecton's StreamSource with a PushConfig.

    Only Python types are checked here; the server validates the definition (keys, names, limits) on
    apply and reports every problem at once. create_time and update_time are set by the server and take no
    part in equality.
    """

    name: str
    schema: Sequence[Field]
    entity_keys: Sequence[str]
    timestamp_field: str
    stream_config: PushConfig = field(default_factory=PushConfig)
    batch_config: FileConfig | None = None
    online_ttl: dt.timedelta | None = None
    description: str = ""
    owner: str = ""
    tags: Mapping[str, str] = field(default_factory=dict, hash=False)
    create_time: dt.datetime | None = field(default=None, compare=False, repr=False)
    update_time: dt.datetime | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        # Sequences are frozen into tuples so an equal definition compares equal however it was built.
        if isinstance(self.entity_keys, str):
            raise TypeError(f"entity_keys must be a list of field names, got the str {self.entity_keys!r}")
        object.__setattr__(self, "schema", tuple(self.schema))
        object.__setattr__(self, "entity_keys", tuple(self.entity_keys))
        object.__setattr__(self, "tags", dict(self.tags))
        for item in self.schema:
            if not isinstance(item, Field):
                raise TypeError(f"StreamSource {self.name!r} schema items must be Field, got {item!r}")
        if not isinstance(self.stream_config, PushConfig):
            raise TypeError(f"stream_config must be a PushConfig, got {self.stream_config!r}")
        if self.batch_config is not None and not isinstance(self.batch_config, FileConfig):
            raise TypeError(f"batch_config must be a FileConfig or None, got {self.batch_config!r}")
        if self.online_ttl is not None and not isinstance(self.online_ttl, dt.timedelta):
            raise TypeError(f"online_ttl must be a timedelta or None, got {self.online_ttl!r}")

    def to_proto(self) -> source_pb2.PushSource:
        message = source_pb2.PushSource(
            name=self.name,
            description=self.description,
            owner=self.owner,
            tags=dict(self.tags),
            schema=schema_pb2.Schema(fields=[f.to_proto() for f in self.schema]),
            entity_keys=list(self.entity_keys),
            timestamp_field=self.timestamp_field,
            push_config=self.stream_config.to_proto(),
        )
        if self.batch_config is not None:
            message.batch_config.CopyFrom(self.batch_config.to_proto())
        if self.online_ttl is not None:
            ttl = duration_pb2.Duration()
            ttl.FromTimedelta(self.online_ttl)
            message.online_ttl.CopyFrom(ttl)
        if self.create_time is not None:
            message.create_time.FromDatetime(self.create_time)
        if self.update_time is not None:
            message.update_time.FromDatetime(self.update_time)
        return message

    @classmethod
    def from_proto(cls, message: source_pb2.PushSource) -> StreamSource:
        online_ttl: dt.timedelta | None = None
        # Zero means "forever", the same as absent, so both read back as None.
        if message.HasField("online_ttl") and (message.online_ttl.seconds or message.online_ttl.nanos):
            online_ttl = message.online_ttl.ToTimedelta()
        return cls(
            name=message.name,
            schema=[Field.from_proto(f) for f in message.schema.fields],
            entity_keys=list(message.entity_keys),
            timestamp_field=message.timestamp_field,
            stream_config=PushConfig.from_proto(message.push_config),
            batch_config=FileConfig.from_proto(message.batch_config)
            if message.HasField("batch_config")
            else None,
            online_ttl=online_ttl,
            description=message.description,
            owner=message.owner,
            tags=dict(message.tags),
            create_time=_time_or_none(message, "create_time"),
            update_time=_time_or_none(message, "update_time"),
        )

    @property
    def field_names(self) -> list[str]:
        """The schema's field names, in order."""
        return [f.name for f in self.schema]


def _time_or_none(message: source_pb2.PushSource, name: str) -> dt.datetime | None:
    if not message.HasField(name):
        return None
    stamp: timestamp_pb2.Timestamp = getattr(message, name)
    return stamp.ToDatetime(tzinfo=dt.UTC)


def load_definitions(path: str | Path) -> list[StreamSource]:
    """Runs a Python definitions file as a module and returns its module-level StreamSources in order.

    The module is named after the file stem and registered in sys.modules, and the file's folder is put on
    sys.path, so post_processor functions defined in it are referenced as "<stem>:<function>" and the server
    can import them. Raises DefinitionError naming the file if it is missing, fails to run, or its stem
    would shadow an unrelated module that is already imported.
    """
    file = Path(path).resolve()
    if not file.is_file():
        raise DefinitionError(f"{file}: no such definitions file")
    module_name = file.stem
    existing = sys.modules.get(module_name)
    if existing is not None and getattr(existing, "__file__", None) != str(file):
        raise DefinitionError(
            f"{file}: module name {module_name!r} is already taken by {existing!r}; rename the file"
        )
    spec = importlib.util.spec_from_file_location(module_name, file)
    if spec is None or spec.loader is None:
        raise DefinitionError(f"{file}: cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    folder = str(file.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        sys.modules.pop(module_name, None)
        if not isinstance(exc, Exception):
            raise
        raise DefinitionError(f"{file}: {type(exc).__name__}: {exc}") from exc
    seen: set[int] = set()
    sources: list[StreamSource] = []
    for value in vars(module).values():
        if isinstance(value, StreamSource) and id(value) not in seen:
            seen.add(id(value))
            sources.append(value)
    return sources
