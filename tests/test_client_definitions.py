"""Tests for StreamSource definitions, their wire form, and loading definitions files."""

from __future__ import annotations

import datetime as dt
import importlib
import re
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from featurepush.definitions import (
    DefinitionError,
    FileConfig,
    PushConfig,
    StreamSource,
    load_definitions,
)
from featurepush.types import Array, Field, Float64, Int64, Map, String, Struct, Timestamp
from featurepush.v1 import source_pb2


def scale_clicks(table: Any) -> Any:
    """A module-level post processor, importable by the server."""
    return table


def _impressions(**overrides: Any) -> StreamSource:
    arguments: dict[str, Any] = {
        "name": "ad_impressions",
        "schema": [
            Field("user_id", String),
            Field("ad_id", Int64),
            Field("timestamp", Timestamp),
            Field("clicked", Int64, nullable=True, description="1 if clicked"),
            Field("extras", Map(String, Array(Float64)), nullable=True),
            Field("geo", Struct([Field("lat", Float64), Field("lon", Float64)]), nullable=True),
        ],
        "entity_keys": ["user_id", "ad_id"],
        "timestamp_field": "timestamp",
    }
    arguments.update(overrides)
    return StreamSource(**arguments)


FULL = _impressions(
    stream_config=PushConfig(log_offline=True),
    batch_config=FileConfig(
        "s3://bucket/impressions/",
        file_format="arrow_ipc",
        timestamp_field="event_ts",
        post_processor="pipelines.impressions:clean",
        hive_partitioning=True,
    ),
    online_ttl=dt.timedelta(days=2, microseconds=5),
    description="Sample push source",
    owner="ads-team@example.com",
    tags={"release": "production"},
)


@pytest.mark.parametrize("source", [FULL, _impressions()], ids=["full", "minimal"])
def test_stream_source_round_trips_through_proto(source: StreamSource) -> None:
    message = source.to_proto()
    wire = source_pb2.PushSource.FromString(message.SerializeToString())
    assert StreamSource.from_proto(wire) == source


def test_stream_source_proto_fields() -> None:
    message = FULL.to_proto()
    assert list(message.entity_keys) == ["user_id", "ad_id"]
    assert [f.name for f in message.schema.fields][:3] == ["user_id", "ad_id", "timestamp"]
    assert message.push_config.log_offline
    assert message.batch_config.file_format == source_pb2.FILE_FORMAT_ARROW_IPC
    assert message.batch_config.post_processor == "pipelines.impressions:clean"
    assert message.online_ttl.seconds == 2 * 86400 and message.online_ttl.nanos == 5000
    assert dict(message.tags) == {"release": "production"}
    minimal = _impressions().to_proto()
    assert not minimal.HasField("batch_config") and not minimal.HasField("online_ttl")


def test_zero_ttl_reads_back_as_none() -> None:
    message = _impressions().to_proto()
    message.online_ttl.SetInParent()
    assert StreamSource.from_proto(message).online_ttl is None


def test_server_times_do_not_affect_equality() -> None:
    message = FULL.to_proto()
    message.create_time.FromDatetime(dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    stored = StreamSource.from_proto(message)
    assert stored.create_time == dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    assert stored.update_time is None
    assert stored == FULL


def test_sequences_are_frozen_so_equal_definitions_compare_equal() -> None:
    tuple_built = _impressions(entity_keys=("user_id", "ad_id"), schema=tuple(_impressions().schema))
    assert tuple_built == _impressions()
    assert isinstance(tuple_built.schema, tuple)
    assert _impressions().field_names[:2] == ["user_id", "ad_id"]


@pytest.mark.parametrize("file_format", ["parquet", "csv", "arrow_ipc"])
def test_file_formats_round_trip(file_format: Any) -> None:
    config = FileConfig("data/", file_format=file_format)
    assert FileConfig.from_proto(config.to_proto()) == config


def test_function_post_processor_becomes_an_import_reference() -> None:
    config = FileConfig("data/", post_processor=scale_clicks)
    assert config.post_processor == f"{__name__}:scale_clicks"
    assert config.to_proto().post_processor == f"{__name__}:scale_clicks"


def _nested() -> Callable[[Any], Any]:
    def inner(table: Any) -> Any:
        return table

    return inner


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: FileConfig("d", post_processor=lambda t: t), ValueError, "must be importable by the server"),
        (lambda: FileConfig("d", post_processor=_nested()), ValueError, "must be importable by the server"),
        (lambda: FileConfig("d", post_processor="no_function"), ValueError, '"package.module:function"'),
        (lambda: FileConfig("d", post_processor=":f"), ValueError, '"package.module:function"'),
        (lambda: FileConfig("d", post_processor=42), TypeError, "must be a str or a function"),
        (lambda: FileConfig("d", file_format="orc"), ValueError, "file_format must be one of"),
        (lambda: FileConfig(""), ValueError, "uri must be a non-empty str"),
        (lambda: _impressions(entity_keys="user_id"), TypeError, "entity_keys must be a list"),
        (lambda: _impressions(schema=[("user_id", String)]), TypeError, "schema items must be Field"),
        (lambda: _impressions(stream_config={}), TypeError, "stream_config must be a PushConfig"),
        (lambda: _impressions(batch_config="s3://x"), TypeError, "batch_config must be a FileConfig"),
        (lambda: _impressions(online_ttl=60), TypeError, "online_ttl must be a timedelta"),
    ],
)
def test_bad_definitions_raise(build: Callable[[], object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=re.escape(match)):
        build()


def test_unspecified_file_format_from_proto_raises() -> None:
    with pytest.raises(ValueError, match="unspecified file format"):
        FileConfig.from_proto(source_pb2.BatchConfig(uri="x"))


@pytest.fixture
def definitions_file(tmp_path: Path) -> Iterator[Path]:
    """A path for a definitions file with a unique stem; its module and sys.path entry are removed after."""
    path = tmp_path / f"defs_{uuid.uuid4().hex}.py"
    saved_path = list(sys.path)
    try:
        yield path
    finally:
        sys.modules.pop(path.stem, None)
        sys.path[:] = saved_path


DEFINITIONS = textwrap.dedent(
    """
    from datetime import timedelta

    from featurepush import Field, FileConfig, Int64, PushConfig, StreamSource, String, Timestamp

    def add_clicks(table):
        return table

    schema = [Field("user_id", String), Field("timestamp", Timestamp), Field("clicked", Int64)]

    clicks = StreamSource(
        name="clicks",
        schema=schema,
        entity_keys=["user_id"],
        timestamp_field="timestamp",
        batch_config=FileConfig("history/", post_processor=add_clicks),
    )
    not_a_source = {"name": "ignored"}
    views = StreamSource(
        name="views",
        schema=schema,
        entity_keys=["user_id"],
        timestamp_field="timestamp",
        stream_config=PushConfig(log_offline=True),
        online_ttl=timedelta(hours=1),
    )
    clicks_again = clicks
    """
)


def test_load_definitions_returns_sources_in_order(definitions_file: Path) -> None:
    definitions_file.write_text(DEFINITIONS)
    sources = load_definitions(definitions_file)
    assert [s.name for s in sources] == ["clicks", "views"]
    assert sources[1].online_ttl == dt.timedelta(hours=1)
    reference = sources[0].batch_config.post_processor if sources[0].batch_config else None
    assert reference == f"{definitions_file.stem}:add_clicks"
    # The reference resolves the way the server will resolve it.
    module_name, _, function = str(reference).partition(":")
    assert callable(getattr(importlib.import_module(module_name), function))
    assert str(definitions_file.parent) in sys.path


def test_load_definitions_can_reload_the_same_file(definitions_file: Path) -> None:
    definitions_file.write_text(DEFINITIONS)
    load_definitions(definitions_file)
    definitions_file.write_text(DEFINITIONS.replace('name="views"', 'name="page_views"'))
    assert [s.name for s in load_definitions(str(definitions_file))] == ["clicks", "page_views"]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("x = (\n", "SyntaxError"),
        ("1 / 0\n", "ZeroDivisionError: division by zero"),
        ("from featurepush import NoSuchName\n", "ImportError"),
        ("from featurepush import Field, Int64\nf = Field('a', int)\n", "TypeError: Field 'a' dtype"),
    ],
)
def test_load_definitions_names_the_file_on_error(definitions_file: Path, text: str, match: str) -> None:
    definitions_file.write_text(text)
    with pytest.raises(DefinitionError, match=re.escape(definitions_file.name) + ".*" + match):
        load_definitions(definitions_file)
    assert definitions_file.stem not in sys.modules


def test_load_definitions_rejects_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DefinitionError, match="no such definitions file"):
        load_definitions(tmp_path / "absent.py")


def test_load_definitions_will_not_shadow_an_imported_module(tmp_path: Path) -> None:
    path = tmp_path / "json.py"
    path.write_text("x = 1\n")
    with pytest.raises(DefinitionError, match="module name 'json' is already taken"):
        load_definitions(path)
    assert sys.modules["json"].__file__ != str(path)
