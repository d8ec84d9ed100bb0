"""GetFeatures as Arrow: the columns read exactly what the Struct form reads, for every type and status."""

from __future__ import annotations

import asyncio
import datetime as dt
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import pyarrow as pa
import pytest
import rocksdict
from conftest import Running, start
from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st
from test_properties import (
    BATCH_COPIES,
    KEY,
    SCALARS,
    SETTINGS,
    TS,
    apply_source,
    batches,
    field_names,
    push,
    replicate,
    schemas,
    unique_source_name,
)

from featurepush import Client, DataLossError, FeatureResult, FeatureStatus, reads
from featurepush import types as t
from featurepush.aio import AsyncClient
from featurepush.batch import read_batch, read_schema
from featurepush.definitions import StreamSource
from featurepush.reads import (
    SMALL_READ_KEYS,
    FeatureResults,
    _batch_length,
    columns_schema,
    parse_reply,
    read_reply,
    wants_arrow,
)
from featurepush.v1 import feature_view_service_pb2 as fvs_pb2
from featurepush.v1 import online_service_pb2
from featurepush.values import parse_timestamp
from featurepush.views import view_table, view_vectors
from featurepush_server.core.arrow_reply import _bitmap, reply_stream
from featurepush_server.core.online import arrow_stream, read_layout
from featurepush_server.core.wire import read_varint

T = TypeVar("T")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """One server for the module; every test applies a source of its own."""
    r = start(Path(tmp_path_factory.mktemp("reads")) / "data", fsync="never")
    try:
        yield r
    finally:
        r.close()


@pytest.fixture(scope="module")
def client(server: Running) -> Client:
    """A Client over the module server's channel."""
    return Client.from_channel(server.channel)


def same(a: Any, b: Any) -> bool:
    """Equality where NaN equals NaN, through results, dicts and lists."""
    if isinstance(a, FeatureResult) and isinstance(b, FeatureResult):
        return a.status == b.status and a.event_time == b.event_time and same(a.features, b.features)
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b) and type(a) is type(b)


def both_forms(client: Client, source: str, keys: Sequence[Any]) -> tuple[FeatureResults, FeatureResults]:
    """The same read as Arrow and as Structs; asserts they agree, as rows and as columns."""
    columns = client.get_features(source, keys, columnar=True)
    structs = client.get_features(source, keys, columnar=False)
    assert len(columns) == len(structs) == len(keys)
    for got, want in zip(columns, structs, strict=True):
        assert same(got, want), (got, want)
    assert columns.to_arrow().schema.equals(structs.to_arrow().schema)
    # Map entries come in key order from the server, in the Struct's order otherwise.
    rows = [r.to_arrow().to_pylist(maps_as_pydicts="strict") for r in (columns, structs)]
    assert same(*rows)
    return columns, structs


@BATCH_COPIES
@SETTINGS
@given(data=st.data())
def test_arrow_reads_what_structs_read(
    client: Client, server: Running, data: st.DataObject, copies: int
) -> None:
    """Random schemas and values (NaN, infinities, years 1 to 9999, nesting, nulls) read alike both ways."""
    schema = data.draw(schemas(), "schema")
    batch = replicate(data.draw(batches(schema), "batch"), copies)
    source = apply_source(client, schema)
    assert push(server, source, [r for r, _ in batch]).counts[source].accepted == len(batch)
    keys = [c[KEY] for _, c in batch]
    columns, _ = both_forms(client, source, [*keys, "nobody"])
    assert [r.status for r in columns] == [FeatureStatus.PRESENT] * len(keys) + [FeatureStatus.MISSING]
    assert columns[-1] == FeatureResult(FeatureStatus.MISSING, None, None)


def test_expired_and_missing_read_alike(client: Client) -> None:
    name = unique_source_name()
    schema = [t.Field(KEY, t.String), t.Field(TS, t.Timestamp), t.Field("score", t.Float64)]
    client.apply(
        StreamSource(
            name=name, schema=schema, entity_keys=[KEY], timestamp_field=TS, online_ttl=dt.timedelta(days=1)
        )
    )
    now = dt.datetime.now(dt.UTC)
    old = dt.datetime(2001, 2, 3, 4, 5, 6, 7, tzinfo=dt.UTC)
    client.push(name, [{KEY: "fresh", TS: now, "score": 1.5}, {KEY: "stale", TS: old, "score": 2.5}])
    columns, _ = both_forms(client, name, ["fresh", "stale", "nobody"])
    assert [r.status for r in columns] == [
        FeatureStatus.PRESENT,
        FeatureStatus.EXPIRED,
        FeatureStatus.MISSING,
    ]
    assert columns[1] == FeatureResult(FeatureStatus.EXPIRED, old, None)
    table = columns.to_arrow()
    assert table.column("status").to_pylist() == [1, 3, 2]
    assert table.column("event_time").to_pylist()[1:] == [old, None]
    assert table.column("score").to_pylist() == [1.5, None, None]


def test_fields_added_later_read_as_null_in_old_rows(client: Client) -> None:
    name = unique_source_name()
    schema = [t.Field(KEY, t.String), t.Field(TS, t.Timestamp), t.Field("n", t.Int64)]
    client.apply(StreamSource(name=name, schema=schema, entity_keys=[KEY], timestamp_field=TS))
    when = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    client.push(name, [{KEY: f"old{i}", TS: when, "n": i} for i in range(20)])
    late = [
        t.Field("tags", t.Array(t.String), nullable=True),
        t.Field("attrs", t.Map(t.String, t.Struct([t.Field("x", t.Float32, nullable=True)])), nullable=True),
    ]
    client.apply(StreamSource(name=name, schema=[*late, *schema], entity_keys=[KEY], timestamp_field=TS))
    client.push(name, [{KEY: "new", TS: when, "n": 7, "tags": ["a"], "attrs": {"k": {"x": 0.5}}}])
    only_old, _ = both_forms(client, name, ["old0", "old19"])
    assert only_old[0].features == {"tags": None, "attrs": None, KEY: "old0", TS: when, "n": 0}
    mixed, _ = both_forms(client, name, ["old3", "new"])
    assert mixed[1].features == {"tags": ["a"], "attrs": {"k": {"x": 0.5}}, KEY: "new", TS: when, "n": 7}


@st.composite
def flat_schemas(draw: st.DrawFn) -> list[t.Field]:
    """A source schema of scalar fields only, which the reply writes straight from stored columns."""
    others = draw(
        st.lists(
            st.tuples(
                field_names.filter(lambda n: n not in (KEY, TS)), st.sampled_from(SCALARS), st.booleans()
            ),
            max_size=7,
            unique_by=lambda f: f[0],
        )
    )
    fields = [t.Field(KEY, t.String), t.Field(TS, t.Timestamp)] + [t.Field(*f) for f in others]
    draw(st.randoms()).shuffle(fields)
    return fields


@st.composite
def key_lists(draw: st.DrawFn, stored: list[str]) -> list[str]:
    """Stored keys in any order, repeated or left out, among keys that have nothing stored."""
    pool = [*stored, "nobody", "ñobody-é", "🙂"]
    return draw(st.lists(st.sampled_from(pool), min_size=1, max_size=12))


@BATCH_COPIES
@SETTINGS
@given(data=st.data())
def test_flat_schemas_read_alike_with_missing_and_expired_keys(
    client: Client, server: Running, data: st.DataObject, copies: int
) -> None:
    """Scalar schemas with a ttl: present, expired (event times from year 1 to 9999) and missing keys."""
    schema = data.draw(flat_schemas(), "schema")
    batch = replicate(data.draw(batches(schema), "batch"), copies)
    if data.draw(st.booleans(), "non-ASCII keys"):
        batch = [(dict(r, **{KEY: r[KEY] + "-é"}), dict(c, **{KEY: c[KEY] + "-é"})) for r, c in batch]
    name = unique_source_name()
    ttl = data.draw(st.sampled_from([None, dt.timedelta(days=1)]), "ttl")
    client.apply(
        StreamSource(name=name, schema=schema, entity_keys=[KEY], timestamp_field=TS, online_ttl=ttl)
    )
    assert push(server, name, [r for r, _ in batch]).counts[name].accepted == len(batch)
    keys = data.draw(key_lists([c[KEY] for _, c in batch]), "keys")
    both_forms(client, name, keys)


@SETTINGS
@given(data=st.data())
def test_the_direct_reply_is_the_general_one(server: Running, client: Client, data: st.DataObject) -> None:
    """reply_stream writes, for flat schemas, the very columns that the pyarrow path builds, at any cutoff."""
    schema = data.draw(flat_schemas(), "schema")
    batch = data.draw(batches(schema), "batch")
    name = unique_source_name()
    client.apply(StreamSource(name=name, schema=schema, entity_keys=[KEY], timestamp_field=TS))
    assert push(server, name, [r for r, _ in batch]).counts[name].accepted == len(batch)
    keys = data.draw(key_lists([c[KEY] for _, c in batch]), "keys")
    core = server.server
    source = core.registry.get(name)
    prefix = core.store.row_prefix(source.id)
    stored = core.store.read([prefix + k.encode() for k in keys])
    # No cutoff, or one just after a stored event time: the rows before it read as expired.
    epoch, micro = dt.datetime(1970, 1, 1, tzinfo=dt.UTC), dt.timedelta(microseconds=1)
    times = [(parse_timestamp(c[TS]) - epoch) // micro for _, c in batch]
    cutoff = data.draw(st.sampled_from([None, *(m + 1 for m in times)]), "cutoff")
    layout = read_layout(source.spec)
    assert layout.reply is not None
    direct = reply_stream(layout.reply, keys, stored, cutoff)
    assert direct is not None
    got = pa.ipc.open_stream(direct).read_all()
    got.validate(full=True)
    want = pa.ipc.open_stream(arrow_stream(source.spec, [keys], stored, cutoff)).read_all()
    assert got.schema.equals(want.schema, check_metadata=True)
    assert same(got.to_pylist(), want.to_pylist())
    statuses = got.column(1).to_pylist()
    assert statuses.count(2) == sum(k not in {c[KEY] for _, c in batch} for k in keys)


@given(st.binary(min_size=1, max_size=300))
def test_flags_pack_as_numpy_packs_them(flags: bytes) -> None:
    """The bitmap of flag bytes sets a bit for every byte that is not zero, first value lowest."""
    want = np.packbits(np.frombuffer(flags, np.uint8).astype(bool), bitorder="little").tobytes()
    assert _bitmap(flags) == want


def test_a_flat_field_added_later_reads_as_null_in_old_rows(client: Client) -> None:
    name = unique_source_name()
    schema = [t.Field(KEY, t.String), t.Field(TS, t.Timestamp), t.Field("n", t.Int64)]
    client.apply(StreamSource(name=name, schema=schema, entity_keys=[KEY], timestamp_field=TS))
    when = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    client.push(name, [{KEY: f"old{i}", TS: when, "n": i} for i in range(20)])
    late = t.Field("score", t.Float64, nullable=True)
    client.apply(StreamSource(name=name, schema=[*schema, late], entity_keys=[KEY], timestamp_field=TS))
    client.push(name, [{KEY: "new", TS: when, "n": 7, "score": math.nan}])
    columns, _ = both_forms(client, name, ["old3", "new", "nobody", "old19"])
    assert columns[0].features == {KEY: "old3", TS: when, "n": 3, "score": None}
    assert math.isnan(columns[1].features["score"])
    assert columns.to_arrow().column("n").to_pylist() == [3, 7, None, 19]


def test_entity_keys_of_several_types_are_typed_columns(client: Client) -> None:
    name = unique_source_name()
    schema = [
        t.Field("region", t.String),
        t.Field("shard", t.Int32),
        t.Field("user", t.Int64),
        t.Field(TS, t.Timestamp),
        t.Field("status", t.String, nullable=True),
        t.Field("event_time", t.Bytes, nullable=True),
    ]
    client.apply(
        StreamSource(name=name, schema=schema, entity_keys=["region", "shard", "user"], timestamp_field=TS)
    )
    when = dt.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=dt.UTC)
    big = 2**63 - 1
    client.push(
        name, [{"region": "eu", "shard": -3, "user": big, TS: when, "status": "ok", "event_time": b"\0"}]
    )
    keys = [("eu", -3, big), {"region": "us", "shard": 1, "user": -(2**63)}]
    columns, _ = both_forms(client, name, keys)
    table = columns.to_arrow()
    assert table.schema.names == [
        "region", "shard", "user", "_status", "_event_time", TS, "status", "event_time",
    ]  # fmt: skip
    assert table.schema.field("shard").type == pa.int32() and table.schema.field("user").type == pa.int64()
    assert table.column("user").to_pylist() == [big, -(2**63)]
    assert table.column("_status").to_pylist() == [1, 2]
    assert columns[0].features == {
        "region": "eu", "shard": -3, "user": big, TS: when, "status": "ok", "event_time": b"\0",
    }  # fmt: skip


def test_pandas_and_polars_round_trips(client: Client) -> None:
    pandas = pytest.importorskip("pandas")
    polars = pytest.importorskip("polars")
    name = unique_source_name()
    schema = [t.Field(KEY, t.String), t.Field(TS, t.Timestamp), t.Field("clicks", t.Int64, nullable=True)]
    client.apply(StreamSource(name=name, schema=schema, entity_keys=[KEY], timestamp_field=TS))
    when = dt.datetime(2026, 5, 6, 7, 8, 9, 123456, tzinfo=dt.UTC)
    big = 2**60 + 1  # float64 would round it
    client.push(name, [{KEY: "a", TS: when, "clicks": big}, {KEY: "b", TS: when, "clicks": None}])
    results = client.get_features(name, ["a", "b", "c"])
    frame = results.to_pandas()
    assert list(frame.columns) == [KEY, "status", "event_time", TS, "clicks"]
    assert frame[KEY].tolist() == ["a", "b", "c"]
    # A MISSING entity's null leaves the Int64 column integers, not float64.
    assert str(frame["clicks"].dtype) == "Int64"
    assert frame["clicks"].iloc[0] == big and frame["clicks"].isna().tolist() == [False, True, True]
    assert frame["event_time"].iloc[0] == pandas.Timestamp(when)
    table = results.to_arrow()
    assert pa.Table.from_pandas(frame, schema=table.schema, preserve_index=False).equals(table)
    pl = results.to_polars()
    assert pl.columns == [KEY, "status", "event_time", TS, "clicks"]
    assert pl["clicks"].to_list() == [big, None, None]
    assert polars.from_arrow(table).equals(pl)
    # The frame pushes back as it reads, once the read's own columns are dropped.
    present = frame[frame["status"] == 1].drop(columns=["status", "event_time"]).reset_index(drop=True)
    assert client.push(name, present).counts[name].accepted == 2


def test_the_result_is_still_a_list_of_results(client: Client) -> None:
    name = unique_source_name()
    schema = [t.Field(KEY, t.String), t.Field(TS, t.Timestamp)]
    client.apply(StreamSource(name=name, schema=schema, entity_keys=[KEY], timestamp_field=TS))
    results = client.get_features(name, ["x"])
    assert results == [FeatureResult(FeatureStatus.MISSING, None, None)]
    assert list(results[0:1]) == list(results) and len(results) == 1


def test_an_unknown_response_format_is_refused(server: Running, client: Client) -> None:
    name = unique_source_name()
    client.apply(
        StreamSource(
            name=name,
            schema=[t.Field(KEY, t.String), t.Field(TS, t.Timestamp)],
            entity_keys=[KEY],
            timestamp_field=TS,
        )
    )
    request = online_service_pb2.GetFeaturesRequest(source=name, response_format=9)  # type: ignore[arg-type]
    request.keys.add().update({KEY: "x"})
    with pytest.raises(grpc.RpcError) as e:
        server.online.GetFeatures(request)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "response_format" in (e.value.details() or "")


def test_the_async_client_reads_the_same_columns(server: Running, client: Client) -> None:
    name = unique_source_name()
    xs = t.Field("xs", t.Array(t.Int32), nullable=True)
    schema = [t.Field(KEY, t.String), t.Field(TS, t.Timestamp), xs]
    client.apply(StreamSource(name=name, schema=schema, entity_keys=[KEY], timestamp_field=TS))
    when = dt.datetime(1000, 1, 1, tzinfo=dt.UTC)
    client.push(name, [{KEY: "a", TS: when, "xs": [1, -2]}, {KEY: "b", TS: when, "xs": None}])
    keys = ["a", "b", "c"]

    async def read() -> tuple[FeatureResults, FeatureResults]:
        async with AsyncClient(server.target) as aio:
            columns = await aio.get_features(name, keys, columnar=True)
            return columns, await aio.get_features(name, keys, columnar=False)

    columns, structs = asyncio.run(read())
    assert columns.to_arrow().equals(client.get_features(name, keys).to_arrow())
    assert list(columns) == list(structs) == list(client.get_features(name, keys))
    assert columns[0].features == {KEY: "a", TS: when, "xs": [1, -2]}


def test_reads_pick_their_form_by_key_count_and_read_alike(client: Client) -> None:
    assert not wants_arrow(None, SMALL_READ_KEYS) and wants_arrow(None, SMALL_READ_KEYS + 1)
    assert wants_arrow(True, 1) and not wants_arrow(False, 100)
    name = unique_source_name()
    schema = [t.Field(KEY, t.String), t.Field(TS, t.Timestamp), t.Field("n", t.Int64, nullable=True)]
    client.apply(StreamSource(name=name, schema=schema, entity_keys=[KEY], timestamp_field=TS))
    when = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    # Keys written as bytes by their length, one past the prefixes the client keeps, and non-ASCII.
    keys = ["a", "k" * 300 + "é", "ключ", *(f"e{i}" for i in range(SMALL_READ_KEYS))]
    client.push(name, [{KEY: k, TS: when, "n": i} for i, k in enumerate(keys)])
    for some in (keys[:1], keys[1:2], keys[:SMALL_READ_KEYS], [*keys, "nobody"], [*keys, "nobody"]):
        default = client.get_features(name, some)
        columns = client.get_features(name, some, columnar=True)
        structs = client.get_features(name, some, columnar=False)
        assert list(default) == list(columns) == list(structs)
        present = [r.features["n"] for r in default if r.features is not None]
        assert present == [keys.index(k) for k in some if k != "nobody"]
        tables = [r.to_arrow().to_pylist() for r in (default, columns, structs)]
        assert tables[0] == tables[1] == tables[2]


def test_an_arrow_reply_of_several_batches_is_read_whole() -> None:
    schema = [t.Field(KEY, t.String), t.Field(TS, t.Timestamp)]
    definition = StreamSource(name="batches", schema=schema, entity_keys=[KEY], timestamp_field=TS)
    columns = columns_schema(definition)
    when = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)

    def reply(*batches: list[str]) -> online_service_pb2.GetFeaturesResponse:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, columns) as writer:
            for keys in batches:
                rows = [{KEY: k, "status": 1, "event_time": when, TS: when} for k in keys]
                writer.write_batch(pa.RecordBatch.from_pylist(rows, schema=columns))
        return online_service_pb2.GetFeaturesResponse(arrow_ipc=sink.getvalue().to_pybytes())

    # The first reply makes its schema known; the second, with the same schema, comes in two batches.
    assert len(read_reply(reply(["a"]), definition, ["a"])) == 1
    results = read_reply(reply(["a"], ["b"]), definition, ["a", "b"])
    assert [r.features[KEY] for r in results if r.features is not None] == ["a", "b"]


@given(st.binary(max_size=300), st.lists(st.sampled_from([1, 2, 3]), max_size=3), st.binary(max_size=20))
def test_a_reply_is_parsed_as_protobuf_parses_it(stream: bytes, statuses: list[int], junk: bytes) -> None:
    """An Arrow reply's stream is a view of its bytes; other replies and bytes parse as protobuf does."""
    response = online_service_pb2.GetFeaturesResponse(arrow_ipc=stream)
    response.results.extend(online_service_pb2.FeatureVector(status=s) for s in statuses)
    for data in (response.SerializeToString(), junk, response.SerializeToString() + junk):
        try:
            want = online_service_pb2.GetFeaturesResponse.FromString(data)
        except DecodeError:
            with pytest.raises(DecodeError):
                parse_reply(data)
            continue
        got = parse_reply(data)
        if isinstance(got, memoryview):
            assert got.tobytes() == want.arrow_ipc and not want.results
        else:
            assert got == want


@given(st.integers(0, 300), st.lists(st.sampled_from([pa.int64(), pa.string(), pa.bool_()]), max_size=4))
def test_a_batch_length_is_read_from_its_message(rows: int, types: list[pa.DataType]) -> None:
    """The row count of any record batch message, read from its metadata; None for other messages."""
    schema = pa.schema([pa.field(f"c{i}", kind) for i, kind in enumerate(types)])
    batch = pa.RecordBatch.from_pylist([{}] * rows, schema=schema) if types else pa.record_batch([], schema)
    if not types:
        assert batch.num_rows == 0
    assert _batch_length(memoryview(batch.serialize().to_pybytes())) == batch.num_rows
    assert _batch_length(memoryview(schema.serialize().to_pybytes())) is None
    assert _batch_length(memoryview(batch.serialize().to_pybytes()[:12])) is None


def test_a_reply_batch_that_does_not_read_fails_on_first_use() -> None:
    schema = [t.Field(KEY, t.String), t.Field(TS, t.Timestamp)]
    definition = StreamSource(name="late", schema=schema, entity_keys=[KEY], timestamp_field=TS)
    columns = columns_schema(definition)
    when = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    rows = [{KEY: k, "status": 1, "event_time": when, TS: when} for k in ("a", "b")]
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, columns) as writer:
        writer.write_batch(pa.RecordBatch.from_pylist(rows, schema=columns))
    stream = sink.getvalue().to_pybytes()
    reply = online_service_pb2.GetFeaturesResponse(arrow_ipc=stream).SerializeToString()
    assert read_reply(parse_reply(reply), definition, ["a", "b"]).to_arrow().num_rows == 2
    # The schema is known now: the batch's metadata says two rows, but its body is cut short.
    cut = online_service_pb2.GetFeaturesResponse(arrow_ipc=stream[:-40]).SerializeToString()
    results = read_reply(parse_reply(cut), definition, ["a", "b"])
    assert len(results) == 2
    with pytest.raises(ValueError, match="could not be read"):
        results.to_arrow()


# --- Replies from a broken or hostile server: refused with ValueError (or DecodeError), never misread.

_HOSTILE = StreamSource(
    name="hostile",
    schema=[t.Field(KEY, t.String), t.Field(TS, t.Timestamp), t.Field("s", t.String, nullable=True)],
    entity_keys=[KEY],
    timestamp_field=TS,
)
_WHEN = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def _hostile_stream(*batches: Sequence[str]) -> bytes:
    """An Arrow reply's stream of `batches`, each the given keys' rows."""
    columns = columns_schema(_HOSTILE)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, columns) as writer:
        for keys in batches:
            rows = [{KEY: k, "status": 1, "event_time": _WHEN, TS: _WHEN, "s": k * 3} for k in keys]
            writer.write_batch(pa.RecordBatch.from_pylist(rows, schema=columns))
    return bytes(sink.getvalue())


def _reply(stream: bytes) -> bytes:
    return online_service_pb2.GetFeaturesResponse(arrow_ipc=stream).SerializeToString()


def _read(data: bytes, keys: Sequence[str]) -> pa.Table:
    return read_reply(parse_reply(data), _HOSTILE, keys).to_arrow()


def test_a_batch_followed_by_more_batches_is_read_whole() -> None:
    keys = ["a", "b"]
    assert _read(_reply(_hostile_stream(keys)), keys).num_rows == 2  # the schema is known from now on
    # A row per key in the first batch, and more after it: the fast path took the first batch alone.
    with pytest.raises(ValueError, match="3 rows for 2 keys"):
        _read(_reply(_hostile_stream(keys, ["c"])), keys)
    assert _read(_reply(_hostile_stream(keys, [])), keys).column(KEY).to_pylist() == keys


@pytest.mark.parametrize("batches", [[["a"]], [["a", "b", "c"]], [["a"], ["b"], ["c"]], [[]]])
def test_a_reply_of_another_number_of_rows_than_keys_is_refused(batches: list[list[str]]) -> None:
    keys = ["a", "b"]
    _read(_reply(_hostile_stream(keys)), keys)
    rows = sum(map(len, batches))
    with pytest.raises(ValueError, match=f"{rows} rows for 2 keys"):
        _read(_reply(_hostile_stream(*batches)), keys)
    vectors = online_service_pb2.GetFeaturesResponse(
        results=[online_service_pb2.FeatureVector(status=online_service_pb2.FEATURE_STATUS_MISSING)] * rows
    )
    with pytest.raises(ValueError, match=f"{rows} feature vectors for 2 keys"):
        read_reply(parse_reply(vectors.SerializeToString()), _HOSTILE, keys)


def _offsets_at(stream: bytes, keys: Sequence[str]) -> int:
    """Where the `s` column's offsets are in a stream of one batch of `keys`."""
    offsets = np.cumsum([0] + [3 * len(k) for k in keys]).astype("<i4").tobytes()
    assert stream.count(offsets) == 1
    return stream.index(offsets)


@pytest.mark.parametrize("known", [False, True])
@pytest.mark.parametrize("middle", [1_000_000, -5, 13, 2**31 - 1])
def test_a_string_offset_past_its_data_is_refused_not_read_from_memory(known: bool, middle: int) -> None:
    """The IPC reader checks only the first and last offsets: one in the middle was read as it was."""
    keys = ["aa", "bb", "cc"]
    stream = _hostile_stream(keys)
    reads._STREAM_SCHEMAS.clear()
    if known:
        _read(_reply(stream), keys)
    at = _offsets_at(stream, keys) + 4
    bad = stream[:at] + middle.to_bytes(4, "little", signed=True) + stream[at + 4 :]
    with pytest.raises(ValueError, match="could not be read"):
        list(read_reply(parse_reply(_reply(bad)), _HOSTILE, keys))


_INTERESTING = [0, 1, -1, 7, 8, 255, 2**15, 2**16 - 1, 2**31 - 1, -(2**31), 2**32 - 1, 2**63 - 1, -(2**63)]


@settings(SETTINGS, max_examples=300)
@given(
    keys=st.lists(st.text(max_size=4), min_size=1, max_size=5),
    known=st.booleans(),
    ops=st.lists(
        st.tuples(
            st.sampled_from(["flip", "cut", "int32", "int64"]), st.integers(0, 10**6), st.integers(0, 255)
        ),
        min_size=1,
        max_size=3,
    ),
)
def test_a_mutated_arrow_reply_reads_as_pyarrow_reads_it_or_is_refused(
    keys: list[str], known: bool, ops: list[tuple[str, int, int]]
) -> None:
    """Whatever is done to a reply's stream, the rows read are what pyarrow reads, or ValueError."""
    stream = bytearray(_hostile_stream(keys))
    reads._STREAM_SCHEMAS.clear()
    if known:
        _read(_reply(bytes(stream)), keys)
    for kind, where, value in ops:
        if not stream:
            break
        at = where % len(stream)
        if kind == "flip":
            stream[at] ^= 1 << (value % 8)
        elif kind == "cut":
            del stream[at:]
        else:
            width = 4 if kind == "int32" else 8
            at -= at % width
            number = _INTERESTING[value % len(_INTERESTING)] & ((1 << (8 * width)) - 1)
            stream[at : at + width] = number.to_bytes(width, "little")
    try:
        want = pa.ipc.open_stream(pa.py_buffer(bytes(stream))).read_all()
        want.validate(full=True)
        fits = want.schema.equals(columns_schema(_HOSTILE)) and want.num_rows == len(keys)
    except (pa.ArrowException, OSError, ValueError):
        # pyarrow refuses it: ArrowInvalid, ArrowNotImplementedError for a forged type, or a field name
        # that is not UTF-8.
        fits = False
    try:
        got = read_reply(parse_reply(_reply(bytes(stream))), _HOSTILE, keys)
        table = got.to_arrow()
        rows = list(got)
    except ValueError:
        return
    assert fits, "a reply pyarrow refuses, or of other columns or rows, was read"
    assert table.equals(want) and len(rows) == len(keys)


def test_every_int32_of_a_replys_metadata_overwritten_reads_as_pyarrow_reads_it_or_is_refused() -> None:
    """Each field of the schema's and the batch's flatbuffers forged in turn: ValueError, nothing else.

    A forged integer width, for one, raised pyarrow's ArrowNotImplementedError through the client.
    """
    keys = ["a", "b"]
    stream = _hostile_stream(keys)
    schema_size = len(columns_schema(_HOSTILE).serialize())
    batch_meta = schema_size + 8 + int.from_bytes(stream[schema_size + 4 : schema_size + 8], "little")
    for known in (False, True):
        for at in range(8, batch_meta, 4):
            for value in (0, 3, 65, -1, 2**31 - 1):
                forged = stream[:at] + value.to_bytes(4, "little", signed=True) + stream[at + 4 :]
                reads._STREAM_SCHEMAS.clear()
                if known:
                    _read(_reply(stream), keys)
                try:
                    got = read_reply(parse_reply(_reply(forged)), _HOSTILE, keys)
                    table, rows = got.to_arrow(), list(got)
                except ValueError:
                    continue
                want = pa.ipc.open_stream(pa.py_buffer(forged)).read_all()
                assert table.equals(want) and len(rows) == 2, (at, value)


def test_an_event_time_past_the_years_of_datetime_is_refused() -> None:
    keys = ["a"]
    _read(_reply(_hostile_stream(keys)), keys)
    columns = columns_schema(_HOSTILE)
    micros = pa.array([2**62], pa.int64()).view(pa.timestamp("us", tz="UTC"))
    row = pa.RecordBatch.from_pylist([{KEY: "a", "status": 1}], schema=columns)
    batch = row.set_column(3, columns.field(3), micros)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, columns) as writer:
        writer.write_batch(batch)
    results = read_reply(parse_reply(_reply(bytes(sink.getvalue()))), _HOSTILE, keys)
    with pytest.raises(ValueError, match="datetime"):
        list(results)


def test_a_vtable_before_the_metadata_is_no_batch_length() -> None:
    message = bytearray(_hostile_stream(["a"])[len(columns_schema(_HOSTILE).serialize()) :])
    size = int.from_bytes(message[4:8], "little")
    assert _batch_length(memoryview(bytes(message))) == 1
    at = 8 + int.from_bytes(message[8:12], "little")
    # The root table's offset to its vtable, moved back by the metadata's length: the vtable is now before
    # the metadata, which struct, counting a negative offset from the end, read as the very same vtable.
    soffset = int.from_bytes(message[at : at + 4], "little", signed=True)
    message[at : at + 4] = (soffset + size).to_bytes(4, "little", signed=True)
    assert _batch_length(memoryview(bytes(message))) is None
    with pytest.raises((pa.ArrowInvalid, OSError)):
        pa.ipc.read_message(pa.py_buffer(bytes(message)))


def test_batch_history_and_view_replies_with_a_string_offset_past_its_data_are_refused() -> None:
    """ReadBatchSource's batches and GetViewFeatures' Arrow replies are validated as GetFeatures' are."""
    keys = ["aa", "bb", "cc"]
    stream = _hostile_stream(keys)
    at = _offsets_at(stream, keys) + 4
    bad = stream[:at] + (2**31 - 1).to_bytes(4, "little") + stream[at + 4 :]
    schema = columns_schema(_HOSTILE)
    message = stream[len(schema.serialize()) :]
    assert read_batch(message, schema).num_rows == 3
    with pytest.raises(ValueError):
        read_batch(bad[len(schema.serialize()) :], schema)
    assert view_table(fvs_pb2.GetViewFeaturesResponse(arrow_ipc=stream), 3).num_rows == 3
    with pytest.raises(ValueError):
        view_table(fvs_pb2.GetViewFeaturesResponse(arrow_ipc=bad), 3)


def test_view_replies_of_another_number_of_rows_than_keys_are_refused() -> None:
    """A vector or row more or fewer than the keys asked for could only be paired with the wrong keys."""
    stream = _hostile_stream(["aa", "bb", "cc"])
    with pytest.raises(ValueError, match="3 rows for 2 keys"):
        view_table(fvs_pb2.GetViewFeaturesResponse(arrow_ipc=stream), 2)
    reply = fvs_pb2.GetViewFeaturesResponse()
    reply.results.add()
    assert view_vectors(reply, 1) == [{}]
    with pytest.raises(ValueError, match="1 vectors for 2 keys"):
        view_vectors(reply, 2)


def test_arrow_that_pyarrow_refuses_with_another_error_is_a_value_error() -> None:
    """pyarrow refuses some messages with OSError or ArrowNotImplementedError, not a ValueError."""
    schema = pa.schema([("x", pa.int64())])
    message = pa.record_batch([pa.array([1, 2])], schema=schema).serialize().to_pybytes()
    # The same bytes read under a schema whose type needs more buffers than the message has.
    other = pa.schema([("x", pa.list_view(pa.int64()))])
    with pytest.raises(OSError):
        pa.ipc.read_record_batch(pa.py_buffer(message), other)
    with pytest.raises(ValueError, match="could not be read"):
        read_batch(message, other)
    with pytest.raises(ValueError, match="could not be read"):
        read_schema(message)
    assert read_schema(schema.serialize().to_pybytes()) == schema


def _unkeyed(result: FeatureResult) -> tuple[Any, ...]:
    features = None if result.features is None else {k: v for k, v in result.features.items() if k != KEY}
    return result.status, result.event_time, features


def _row_of_a(db: rocksdict.Rdict) -> tuple[bytes, bytes]:
    """The stored row key and value of the entity "a" (the other one pushed is "bb")."""
    [(key, value)] = [
        (k, v) for k, v in db.items() if k[:1] == b"r" and k.endswith(b"a") and not k.endswith(b"bb")
    ]
    return key, value


def _stored_a_and_bb(
    data: Path, source: StreamSource, fields: Callable[[str], dict[str, Any]], read: Callable[[Client], T]
) -> T:
    """Push rows of the entities "a" and "bb" of `source` (`fields` of each key) to a server on `data`, then
    `read` through it and stop it."""
    running = start(data, fsync="never")
    try:
        client = Client.from_channel(running.channel)
        client.apply(source)
        when = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
        client.push(source.name, [{KEY: k, TS: when, **fields(k)} for k in ("a", "bb")])
        return read(client)
    finally:
        running.close()


def test_a_stored_value_cut_short_reads_whole_or_as_damaged_never_as_other_values(tmp_path: Path) -> None:
    """A value cut anywhere reads as it was (where the form read lies before the cut) or fails plainly."""
    data = tmp_path / "data"
    schema = [
        t.Field(KEY, t.String),
        t.Field(TS, t.Timestamp),
        t.Field("s", t.String, nullable=True),
        t.Field("b", t.Bytes, nullable=True),
        t.Field("n", t.Int64, nullable=True),
    ]
    source = StreamSource(name="cut", schema=schema, entity_keys=[KEY], timestamp_field=TS)

    def read(client: Client) -> dict[bool, list[FeatureResult]]:
        return {
            columnar: list(client.get_features("cut", ["a", "bb"], columnar=columnar))
            for columnar in (True, False)
        }

    want = _stored_a_and_bb(data, source, lambda k: {"s": k * 5, "b": b"\x00" * 3, "n": 7}, read)
    db = rocksdict.Rdict(str(data / "online"), rocksdict.Options(raw_mode=True))
    try:
        key, value = _row_of_a(db)
        # Every cut of the value, each under a key of its own, all holding the row of "a".
        for cut in range(len(value)):
            db[key[:-1] + b"cut%d" % cut] = value[:cut]
    finally:
        db.close()
    running = start(data, fsync="never")
    try:
        client = Client.from_channel(running.channel)
        for cut in range(len(value)):
            for columnar in (True, False):
                # With an intact key on either side, so that a cut row cannot borrow its neighbour's bytes.
                keys = ["bb", f"cut{cut}", "bb"]
                try:
                    results = list(client.get_features("cut", keys, columnar=columnar))
                except DataLossError as e:
                    assert "damaged" in str(e) and e.reason == "DAMAGED_ROW", (cut, columnar)
                    # The row read as Structs is named by its key's place; an Arrow read names it where the
                    # row is too short for its columns.
                    assert e.metadata.get("key_index", "1") == "1", (cut, columnar)
                    assert columnar or "keys[1]" in str(e), cut
                    continue
                # Arrow replies name each row by the key asked for, Structs by the key stored.
                expected = [want[columnar][1], want[columnar][0], want[columnar][1]]
                assert list(map(_unkeyed, results)) == list(map(_unkeyed, expected)), (cut, columnar)
        assert list(client.get_features("cut", ["a", "bb"])) == want[False]
    finally:
        running.close()


def test_a_stored_struct_flipped_inside_its_length_reads_or_fails_as_damaged(tmp_path: Path) -> None:
    """A flip inside a stored row's Struct, read with a field added since: an answer or DATA_LOSS, never
    an internal error, and the server keeps serving."""
    data = tmp_path / "data"
    schema = [
        t.Field(KEY, t.String),
        t.Field(TS, t.Timestamp),
        t.Field("s", t.String, nullable=True),
        t.Field("n", t.Int64, nullable=True),
    ]
    source = StreamSource(name="flip", schema=schema, entity_keys=[KEY], timestamp_field=TS)

    def read(client: Client) -> list[FeatureResult]:
        # A field added after the rows were stored: Struct reads add a null entry for it to each row.
        late = StreamSource(
            name="flip",
            schema=[*schema, t.Field("late", t.Int64, nullable=True)],
            entity_keys=[KEY],
            timestamp_field=TS,
        )
        client.apply(late)
        return list(client.get_features("flip", ["a", "bb"], columnar=False))

    want = _stored_a_and_bb(data, source, lambda k: {"s": k * 3, "n": 7}, read)
    db = rocksdict.Rdict(str(data / "online"), rocksdict.Options(raw_mode=True))
    try:
        key, value = _row_of_a(db)
        # The Struct: after the header, the columns, the event_time field and the features field's tag.
        body = 12 + int.from_bytes(value[8:12], "big")
        at = body + 2 + value[body + 1] + 1
        _, struct_at = read_varint(value, at)
        planted: list[bytes] = []
        for pos in range(struct_at, len(value)):
            for bit in range(8):
                flipped = bytearray(value)
                flipped[pos] ^= 1 << bit
                db[key[:-1] + b"flip%d" % len(planted)] = bytes(flipped)
                planted.append(bytes(flipped))
    finally:
        db.close()
    running = start(data, fsync="never")
    try:
        client = Client.from_channel(running.channel)
        # Struct replies as bytes: the server passes a stored Struct on unparsed, as protobuf would read it.
        raw_call = running.channel.unary_unary("/featurepush.v1.OnlineService/GetFeatures")
        damaged = 0
        for j in range(len(planted)):
            keys = ["bb", f"flip{j}", "bb"]
            try:
                results = list(client.get_features("flip", keys, columnar=True))
            except DataLossError as e:
                assert "damaged" in str(e), j
                damaged += 1
            else:
                # A flip inside a Value reads as another value: only the intact neighbours are known.
                assert list(map(_unkeyed, [results[0], results[2]])) == [_unkeyed(want[1])] * 2, j
            request = online_service_pb2.GetFeaturesRequest(source="flip", keys=[{KEY: k} for k in keys])
            try:
                reply = raw_call(request.SerializeToString())
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.DATA_LOSS and "damaged" in str(e.details()), j
                damaged += 1
                continue
            try:
                vectors = online_service_pb2.GetFeaturesResponse.FromString(reply).results
            except DecodeError:
                # The stored Struct itself does not parse: protobuf refuses it alike.
                with pytest.raises(DecodeError):
                    struct_pb2.Struct.FromString(planted[j][struct_at:])
                continue
            assert vectors[0] == vectors[2] and vectors[0].features["s"] == "bbbbbb", j
        assert damaged
        assert list(client.get_features("flip", ["a", "bb"], columnar=False)) == want
    finally:
        running.close()
