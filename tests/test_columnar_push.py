"""Records sent as Arrow by the client get exactly the server's answer to their Struct form."""

from __future__ import annotations

import datetime as dt
import itertools
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pyarrow as pa
import pytest
from conftest import Running, start
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from featurepush import Client, InvalidArgumentError
from featurepush import types as t
from featurepush.columnar import records_to_batch
from featurepush.definitions import StreamSource
from featurepush.errors import FeaturepushError, from_rpc_error
from featurepush.payload import PushSchema, push_request
from featurepush.v1 import ingest_service_pb2_grpc, online_service_pb2, online_service_pb2_grpc
from featurepush.values import record_to_struct

SCALARS = [t.String, t.Int32, t.Int64, t.Float32, t.Float64, t.Bool, t.Timestamp, t.Bytes]
ZONES = [dt.UTC, dt.timezone(dt.timedelta(hours=5, minutes=30)), dt.timezone(dt.timedelta(hours=-8))]
# Values of the wrong type or out of range, of the kinds pyarrow would coerce or that the row rules refuse.
ODD: list[Any] = [
    None,
    3.9,
    3.0,
    True,
    "12",
    "NaN",
    "2026-01-01T00:00:00Z",
    "AAEC",
    2**31,
    2**53 + 1,
    2**63,
    -(2**63) - 1,
    10**400,
    1e39,
    -math.inf,
    math.nan,
    b"\x00\x01",
    dt.datetime(2026, 1, 1),
    dt.datetime(1, 1, 1, 0, 30, tzinfo=dt.timezone(dt.timedelta(hours=1))),
    [],
    [1, None],
    {},
    {"a": 1},
]


def dtypes(depth: int = 2) -> st.SearchStrategy[t.DataType]:
    scalars = st.sampled_from(SCALARS)
    if depth == 0:
        return scalars
    inner = dtypes(depth - 1)
    return st.one_of(
        scalars,
        st.builds(t.Array, inner, st.booleans()),
        st.builds(lambda v, n: t.Map(t.String, v, n), inner, st.booleans()),
        st.lists(st.tuples(inner, st.booleans()), min_size=1, max_size=3).map(
            lambda items: t.Struct([t.Field(f"s{i}", d, n) for i, (d, n) in enumerate(items)])
        ),
    )


def valid(dtype: t.DataType, odd: bool) -> st.SearchStrategy[Any]:
    """Values the row form accepts for dtype (nearly always)."""
    if dtype == t.String:
        return st.text(max_size=8)
    if dtype == t.Int32:
        return st.integers(-(2**31), 2**31 - 1)
    if dtype == t.Int64:
        return st.integers(-(2**63), 2**63 - 1)
    if dtype in (t.Float32, t.Float64):
        width = 32 if dtype == t.Float32 else 64
        return st.one_of(
            st.floats(width=width), st.floats() if odd else st.floats(width=width), st.integers()
        )
    if dtype == t.Bool:
        return st.booleans()
    if dtype == t.Timestamp:
        return st.datetimes(
            min_value=dt.datetime(1, 1, 2),
            max_value=dt.datetime(9999, 12, 30),
            timezones=st.sampled_from(ZONES),
        )
    if dtype == t.Bytes:
        return st.binary(max_size=8)
    if isinstance(dtype, t.Array):
        element = value(dtype.element_type, dtype.element_nullable, odd)
        return st.one_of(st.lists(element, max_size=3), st.lists(element, max_size=3).map(tuple))
    if isinstance(dtype, t.Map):
        return st.dictionaries(
            st.text(max_size=3), value(dtype.value_type, dtype.value_nullable, odd), max_size=3
        )
    assert isinstance(dtype, t.Struct)
    return record(dtype.fields, odd)


def value(dtype: t.DataType, nullable: bool, odd: bool) -> st.SearchStrategy[Any]:
    """Mostly a valid value, sometimes null; with `odd`, sometimes a value of the wrong type or range."""

    def pick(roll: int) -> st.SearchStrategy[Any]:
        if roll == 0 and odd:
            return st.sampled_from(ODD)
        if roll == 1 and nullable:
            return st.none()
        return valid(dtype, odd)

    return st.integers(0, 19).flatmap(pick)


def record(fields: tuple[t.Field, ...] | list[t.Field], odd: bool) -> st.SearchStrategy[dict[str, Any]]:
    """A dict of the fields, where a nullable field may be absent; with `odd`, rarely a required field is
    absent or an unknown key is added."""

    def part(f: t.Field) -> st.SearchStrategy[dict[str, Any] | None]:
        present = value(f.dtype, f.nullable, odd).map(lambda v: {f.name: v})
        if f.nullable:
            return st.one_of(st.none(), present)
        # A required field is almost always there: its absence fails the whole push.
        return st.integers(0, 49).flatmap(lambda roll: st.none() if roll == 0 and odd else present)

    parts = [part(f) for f in fields]
    extra = st.integers(0, 49).map(lambda roll: {"zz_extra": 1} if roll == 0 and odd else {})
    return st.tuples(*parts, extra).map(lambda items: {k: v for d in items if d for k, v in d.items()})


def schemas() -> st.SearchStrategy[list[t.Field]]:
    fields = st.lists(st.tuples(dtypes(), st.booleans()), min_size=0, max_size=4).map(
        lambda items: [t.Field(f"f{i}", d, n) for i, (d, n) in enumerate(items)]
    )
    return fields.map(lambda rest: [t.Field("k", t.String), t.Field("ts", t.Timestamp), *rest])


def keyed(fields: list[t.Field], odd: bool) -> st.SearchStrategy[list[dict[str, Any]]]:
    """Rows over a few entities, so that some supersede others."""
    rows = st.lists(record(fields, odd), min_size=1, max_size=24)
    keys = st.lists(st.sampled_from(["a", "b", "c", "d"]), min_size=24, max_size=24)

    def rekey(pair: tuple[list[dict[str, Any]], list[str]]) -> list[dict[str, Any]]:
        return [{**r, "k": k} if type(r.get("k")) is str else r for r, k in zip(*pair, strict=False)]

    return st.tuples(rows, keys).map(rekey)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    running = start(Path(tmp_path_factory.mktemp("columnar")) / "data")
    try:
        yield running
    finally:
        running.close()


_names = itertools.count()


def outcome(call: Any) -> tuple[object, ...]:
    """What a push came to: counts, or the error's code, message and violations, or a client exception."""
    try:
        result = call()
    except FeaturepushError as e:
        violations = [(v.field, v.description) for v in getattr(e, "violations", ())]
        return ("error", e.code, e.message, e.reason, violations)
    except (TypeError, ValueError, OverflowError) as e:
        return ("client", type(e).__name__, str(e))
    return ("ok", result)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(data=st.data(), fields=schemas())
def test_arrow_and_struct_forms_get_the_same_answer_and_store_the_same_bytes(
    server: Running, data: st.DataObject, fields: list[t.Field]
) -> None:
    rows = data.draw(keyed(fields, data.draw(st.booleans())))
    n = next(_names)
    sources = {form: StreamSource(f"{form}{n}", fields, ["k"], "ts") for form in ("arrow", "rows")}
    ingest = ingest_service_pb2_grpc.IngestServiceStub(server.channel)

    def push(form: str) -> object:
        name = sources[form].name
        schema = {name: PushSchema.of(fields)} if form == "arrow" else {}
        request, columnar = push_request({name: rows}, schema, dry_run=False, request_id=None)
        if form == "arrow":
            # The batch went as Arrow exactly when the converter found every value exact.
            assert bool(columnar) == (records_to_batch(rows, fields) is not None)
            event("sent as Arrow" if columnar else "sent as Structs")
        try:
            response = ingest.Push(request)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        return dict(response.counts[name].ListFields())

    with Client(server.target) as client:
        client.apply(*sources.values())
        got = {form: outcome(lambda form=form: push(form)) for form in sources}
        # Client.push takes the Arrow form when it can and falls back to Structs on a refusal.
        through_client = outcome(
            lambda: dict(vars(client.push(sources["arrow"].name, rows).counts[sources["arrow"].name]))
        )

    def plain(o: tuple[object, ...], name: str) -> str:
        return repr(o).replace(name, "SRC")

    assert plain(got["arrow"], sources["arrow"].name) == plain(got["rows"], sources["rows"].name)
    if got["arrow"][0] == "ok":
        assert through_client[0] == "ok"
        online = online_service_pb2_grpc.OnlineServiceStub(server.channel)
        keys = [record_to_struct({"k": k}) for k in "abcd"]
        stored = {
            form: online.GetFeatures(online_service_pb2.GetFeaturesRequest(source=s.name, keys=keys))
            for form, s in sources.items()
        }
        assert stored["arrow"].SerializeToString(deterministic=True) == stored["rows"].SerializeToString(
            deterministic=True
        )
    else:
        assert plain(through_client, sources["arrow"].name) == plain(got["rows"], sources["rows"].name)


def test_typical_records_do_go_as_arrow() -> None:
    fields = [t.Field("k", t.String), t.Field("n", t.Int64), t.Field("x", t.Float32, nullable=True)]
    batch = records_to_batch([{"k": "a", "n": 1, "x": 0.5}, {"k": "b", "n": 2**60}], fields)
    assert batch is not None and batch.column(2).to_pylist() == [0.5, None]


@pytest.mark.parametrize(
    ("field", "bad"),
    [
        (t.Field("n", t.Int64), 3.9),
        (t.Field("n", t.Int64), True),
        (t.Field("n", t.Int64), "12"),
        (t.Field("n", t.Int32), 2**31),
        (t.Field("n", t.Int64), 2**63),
        (t.Field("x", t.Float32), 1e39),
        (t.Field("x", t.Float64), "NaN"),
        (t.Field("x", t.Float64), 10**400),
        (t.Field("b", t.Bytes), "AAEC"),
        (t.Field("s", t.Timestamp), dt.datetime(2026, 1, 1)),
        (t.Field("s", t.Timestamp), "2026-01-01T00:00:00Z"),
        (t.Field("s", t.Timestamp), dt.datetime(1, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=1)))),
        (t.Field("m", t.Map(t.String, t.Int64)), {"a": 1.5}),
        (t.Field("a", t.Array(t.Int64)), [1, None]),
        (t.Field("r", t.Struct([t.Field("x", t.Int64)])), {"x": 1, "y": 2}),
        (t.Field("n", t.Int64), None),
    ],
)
def test_values_arrow_would_coerce_go_as_structs(field: t.Field, bad: object) -> None:
    assert records_to_batch([{field.name: bad}], [field]) is None


def test_years_before_1000_are_stored_alike_as_arrow_and_as_structs(server: Running) -> None:
    fields = [t.Field("k", t.String), t.Field("ts", t.Timestamp), t.Field("at", t.Timestamp, nullable=True)]
    plus_one = dt.timezone(dt.timedelta(hours=1))
    times = [
        dt.datetime(1, 1, 1, tzinfo=dt.UTC),
        dt.datetime(5, 6, 7, 8, 9, 10, 11, tzinfo=dt.UTC),
        dt.datetime(999, 12, 31, 23, 59, 59, 500000, tzinfo=plus_one),
        dt.datetime(1000, 1, 1, 0, 30, tzinfo=plus_one),
    ]
    rows = [{"k": str(i), "ts": when, "at": when} for i, when in enumerate(times)]
    assert records_to_batch(rows, fields) is not None
    with Client(server.target) as client:
        stored = {}
        for form in ("arrow", "rows"):
            name = f"early_{form}"
            client.apply(StreamSource(name, fields, ["k"], "ts"))
            schema = {name: PushSchema.of(fields)} if form == "arrow" else {}
            request, columnar = push_request({name: rows}, schema, dry_run=False, request_id=None)
            assert bool(columnar) == (form == "arrow")
            ingest_service_pb2_grpc.IngestServiceStub(server.channel).Push(request)
            results = client.get_features(name, [r["k"] for r in rows])
            assert [r.features["at"] for r in results if r.features is not None] == times
            stored[form] = results.to_arrow().drop_columns(["k"])
        assert stored["arrow"].equals(stored["rows"])


def test_unknown_and_missing_fields_go_as_structs() -> None:
    fields = [t.Field("k", t.String), t.Field("n", t.Int64)]
    assert records_to_batch([{"k": "a", "n": 1, "extra": 2}], fields) is None
    assert records_to_batch([{"k": "a"}], fields) is None
    # As many keys as the schema has fields, one of them unknown.
    assert records_to_batch([{"k": "a", "n": 1}, {"k": "b", "extra": 2}], fields) is None
    assert records_to_batch([{"k": "a", "n": 1}, {"k": "b", "n": 2}], fields) is not None


def test_a_rejected_arrow_push_is_described_by_the_row_rules(server: Running) -> None:
    fields = [t.Field("k", t.String), t.Field("ts", t.Timestamp), t.Field("n", t.Int64, nullable=True)]
    with Client(server.target) as client:
        client.apply(StreamSource("stale", fields, ["k"], "ts"))
        now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
        client.push("stale", [{"k": "a", "ts": now, "n": 1}])
        # Another client makes n a String: the cached schema is stale, and the Arrow push is refused.
        with Client(server.target) as other:
            fields[2] = t.Field("n", t.String, nullable=True)
            other.delete_source("stale")
            other.apply(StreamSource("stale", fields, ["k"], "ts"))
        with pytest.raises(InvalidArgumentError) as caught:
            client.push("stale", [{"k": "a", "ts": now, "n": 2}])
        assert [(v.field, v.description) for v in caught.value.violations] == [
            ('records["stale"][0].n', "expected a String, got the number 2.0")
        ]
        # The stale schema was dropped: the next push uses the new one and goes as Arrow.
        assert client.push("stale", [{"k": "a", "ts": now, "n": "x"}]).counts["stale"].accepted == 1


def test_arrow_and_polars_and_indexed_pandas_frames(server: Running) -> None:
    pd = pytest.importorskip("pandas")
    pl = pytest.importorskip("polars")
    fields = [t.Field("k", t.String), t.Field("ts", t.Timestamp), t.Field("n", t.Int64)]
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    rows = [{"k": "a", "ts": now, "n": 1}, {"k": "b", "ts": now, "n": 2}]
    with Client(server.target) as client:
        client.apply(StreamSource("frames", fields, ["k"], "ts"))
        assert client.push("frames", pl.DataFrame(rows)).counts["frames"].accepted == 2
        indexed = pd.DataFrame(rows).set_index("k")
        assert client.push("frames", indexed).counts["frames"].accepted == 2
        assert client.push("frames", pd.DataFrame(rows).set_index(["k", "n"])).counts["frames"].accepted == 2
        with pytest.raises(ValueError, match="unnamed index that is not a plain RangeIndex"):
            client.push("frames", pd.DataFrame(rows, index=[5, 7]))
        with pytest.raises(ValueError, match=r"index levels \['user'\] are not all fields"):
            client.push("frames", pd.DataFrame(rows).set_index("k").rename_axis("user"))
        assert client.push("frames", pa.Table.from_pylist(rows)).counts["frames"].accepted == 2
