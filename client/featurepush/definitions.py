"""Definitions: push sources (StreamSource, PushConfig, FileConfig), stream feature views (StreamFeatureView,
Aggregate) and feature services (FeatureService), and the loader for definitions files."""

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
from featurepush.v1 import feature_view_pb2, schema_pb2, source_pb2

__all__ = [
    "Aggregate",
    "DefinitionError",
    "FeatureService",
    "FileConfig",
    "FileFormat",
    "PushConfig",
    "StreamFeatureView",
    "StreamSource",
    "load_definitions",
    "load_services",
    "load_views",
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


def _post_processor_reference(value: str | Callable[..., Any], what: str = "post_processor") -> str:
    if isinstance(value, str):
        module, sep, function = value.partition(":")
        if not sep or not module or not function:
            raise ValueError(f'{what} {value!r} must be a "package.module:function" reference')
        return value
    if not callable(value):
        raise TypeError(f"{what} must be a str or a function, got {value!r}")
    module_name = getattr(value, "__module__", None)
    qualname = getattr(value, "__qualname__", None)
    if not module_name or not qualname or module_name == "__main__" or "<" in qualname:
        raise ValueError(
            f"{what} {value!r} must be importable by the server: define it at the top level of a "
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


AggregateFunction = Literal[
    "count",
    "sum",
    "mean",
    "min",
    "max",
    "stddev",
    "last_n",
    "first_n",
    "last_distinct_n",
    "approx_count_distinct",
]
_FUNCTIONS: dict[str, int] = {
    name: getattr(feature_view_pb2, f"AGGREGATE_FUNCTION_{name.upper()}")
    for name in AggregateFunction.__args__  # type: ignore[attr-defined]
}
_FUNCTION_NAMES = {number: name for name, number in _FUNCTIONS.items()}


def _duration(value: dt.timedelta) -> duration_pb2.Duration:
    out = duration_pb2.Duration()
    out.FromTimedelta(value)
    return out


@dataclass(frozen=True)
class Aggregate:
    """One time-window aggregation of a view's column: function "last_n" and the like take `n`."""

    column: str
    function: AggregateFunction
    time_window: dt.timedelta
    name: str = ""
    n: int = 0

    def __post_init__(self) -> None:
        if self.function not in _FUNCTIONS:
            raise ValueError(f"function must be one of {sorted(_FUNCTIONS)}, got {self.function!r}")
        if not isinstance(self.time_window, dt.timedelta):
            raise TypeError(f"time_window must be a timedelta, got {self.time_window!r}")
        if not self.name:
            window = int(self.time_window.total_seconds())
            unit = next(
                (f"{window // s}{u}" for s, u in ((86400, "d"), (3600, "h"), (60, "m")) if window % s == 0),
                f"{window}s",
            )
            object.__setattr__(self, "name", f"{self.column}_{self.function}_{unit}")

    def to_proto(self) -> feature_view_pb2.Aggregate:
        return feature_view_pb2.Aggregate(
            column=self.column,
            function=_FUNCTIONS[self.function],  # type: ignore[arg-type]
            n=self.n,
            time_window=_duration(self.time_window),
            name=self.name,
        )

    @classmethod
    def from_proto(cls, message: feature_view_pb2.Aggregate) -> Aggregate:
        return cls(
            column=message.column,
            function=_FUNCTION_NAMES[message.function],  # type: ignore[arg-type]
            time_window=message.time_window.ToTimedelta(),
            name=message.name,
            n=message.n,
        )


@dataclass(frozen=True)
class StreamFeatureView:
    """Time-window aggregations of one push source's events per entity, as Tecton's StreamFeatureView.

    `transformation`, a function over a pyarrow.Table kept as "module:qualname", runs on pushed and
    backfilled batches alike; `schema` types the columns the aggregations read; `aggregation_interval`
    is the tile size.
    """

    name: str
    source: StreamSource | str
    entities: Sequence[str]
    schema: Sequence[Field]
    aggregations: Sequence[Aggregate]
    aggregation_interval: dt.timedelta = dt.timedelta(hours=1)
    transformation: str | Callable[..., Any] | None = None
    description: str = ""
    owner: str = ""
    tags: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if isinstance(self.entities, str):
            raise TypeError(f"entities must be a list of key names, got the str {self.entities!r}")
        object.__setattr__(self, "entities", tuple(self.entities))
        object.__setattr__(self, "schema", tuple(self.schema))
        object.__setattr__(self, "aggregations", tuple(self.aggregations))
        object.__setattr__(self, "tags", dict(self.tags))
        if isinstance(self.source, StreamSource):
            object.__setattr__(self, "source", self.source.name)
        if self.transformation is not None:
            object.__setattr__(
                self, "transformation", _post_processor_reference(self.transformation, "transformation")
            )
        for item in self.aggregations:
            if not isinstance(item, Aggregate):
                raise TypeError(
                    f"StreamFeatureView {self.name!r} aggregations must be Aggregate, got {item!r}"
                )

    def to_proto(self) -> feature_view_pb2.StreamFeatureView:
        return feature_view_pb2.StreamFeatureView(
            name=self.name,
            description=self.description,
            owner=self.owner,
            tags=dict(self.tags),
            source=str(self.source),
            entity_keys=list(self.entities),
            transformation=str(self.transformation or ""),
            schema=schema_pb2.Schema(fields=[f.to_proto() for f in self.schema]),
            aggregations=[a.to_proto() for a in self.aggregations],
            aggregation_interval=_duration(self.aggregation_interval),
        )

    @classmethod
    def from_proto(cls, message: feature_view_pb2.StreamFeatureView) -> StreamFeatureView:
        return cls(
            name=message.name,
            source=message.source,
            entities=list(message.entity_keys),
            schema=[Field.from_proto(f) for f in message.schema.fields],
            aggregations=[Aggregate.from_proto(a) for a in message.aggregations],
            aggregation_interval=message.aggregation_interval.ToTimedelta(),
            transformation=message.transformation or None,
            description=message.description,
            owner=message.owner,
            tags=dict(message.tags),
        )

    @property
    def feature_names(self) -> list[str]:
        """The names of the view's features, in order."""
        return [a.name for a in self.aggregations]


@dataclass(frozen=True)
class FeatureService:
    """A named list of features read together: each item a view (all its features) or (view, [names])."""

    name: str
    features: Sequence[StreamFeatureView | str | tuple[StreamFeatureView | str, Sequence[str]]]
    description: str = ""
    owner: str = ""
    tags: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", tuple(self.features))
        object.__setattr__(self, "tags", dict(self.tags))

    @property
    def references(self) -> list[tuple[str, list[str]]]:
        """(view name, feature names) per item; no names means every feature of the view."""
        refs: list[tuple[str, list[str]]] = []
        for item in self.features:
            view, names = item if isinstance(item, tuple) else (item, ())
            refs.append((view.name if isinstance(view, StreamFeatureView) else str(view), list(names)))
        return refs

    def to_proto(self) -> feature_view_pb2.FeatureService:
        return feature_view_pb2.FeatureService(
            name=self.name,
            description=self.description,
            owner=self.owner,
            tags=dict(self.tags),
            features=[
                feature_view_pb2.FeatureReference(view=view, features=names)
                for view, names in self.references
            ],
        )

    @classmethod
    def from_proto(cls, message: feature_view_pb2.FeatureService) -> FeatureService:
        return cls(
            name=message.name,
            features=[(r.view, list(r.features)) for r in message.features],
            description=message.description,
            owner=message.owner,
            tags=dict(message.tags),
        )


def load_views(path: str | Path) -> list[StreamFeatureView]:
    """The module-level StreamFeatureViews of a definitions file, in order (see load_definitions)."""
    return [v for v in _load_all(path) if isinstance(v, StreamFeatureView)]


def load_services(path: str | Path) -> list[FeatureService]:
    """The module-level FeatureServices of a definitions file, in order (see load_definitions)."""
    return [v for v in _load_all(path) if isinstance(v, FeatureService)]


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
    return [v for v in _unique(vars(module).values()) if isinstance(v, StreamSource)]


def _unique(values: Any) -> list[Any]:
    seen: set[int] = set()
    out: list[Any] = []
    for value in values:
        if isinstance(value, (StreamSource, StreamFeatureView, FeatureService)) and id(value) not in seen:
            seen.add(id(value))
            out.append(value)
    return out


def _load_all(path: str | Path) -> list[Any]:
    """Every definition of a file: it is run once, and later calls read the module it left behind."""
    file = Path(path).resolve()
    module = sys.modules.get(file.stem)
    if module is None or getattr(module, "__file__", None) != str(file):
        load_definitions(file)
        module = sys.modules[file.stem]
    return _unique(vars(module).values())
