"""A stateful test: random sequences of applies, changes, deletes, pushes and reads against a plain model.

The model keeps, per source and entity, the record with the newest event time (an equal time replaces);
after every step each source's reads must equal it, and every push's counts must be the model's.
"""

from __future__ import annotations

import datetime as dt
import itertools
import math
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pyarrow as pa
import pytest
from conftest import Running, keys_request, rich_error, rows_request, start
from google.protobuf import json_format
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from featurepush.v1 import ingest_service_pb2, online_service_pb2, registry_service_pb2

# A field's type, by the names used here: the scalars and arrays of them.
TYPES = {
    "STRING": pa.string(),
    "INT64": pa.int64(),
    "FLOAT64": pa.float64(),
    "BOOL": pa.bool_(),
    "TIMESTAMP": pa.timestamp("us", tz="UTC"),
    "ARRAY_STRING": pa.list_(pa.string()),
    "ARRAY_INT64": pa.list_(pa.int64()),
}

# Event times in microseconds, few so that ties and out-of-order arrivals are common; before 1970 too.
# With a ttl of a day every one but the last two is expired; with a century only the first two. None lies
# near a boundary, so a read's status does not depend on when it runs.
TIMES = [
    -631_152_000_000_000,  # 1950
    -1,  # 1969-12-31T23:59:59.999999Z
    978_307_200_123_000,  # 2001, milliseconds
    1_577_836_800_000_001,  # 2020, microseconds
    3_786_912_000_000_000,  # 2090
    4_102_444_799_999_999,  # 2099-12-31T23:59:59.999999Z
]
DAY_S = 86_400
TTLS: list[int | None] = [None, DAY_S, 36_500 * DAY_S]

VALUES: dict[str, list[Any]] = {
    "STRING": ["", "a", "été", "x" * 40],
    "INT64": [0, -1, 2**62, 9_007_199_254_740_993],
    "FLOAT64": [0.5, -2.0, 1e300, math.inf],
    "BOOL": [True, False],
    "TIMESTAMP": TIMES[:4],
    "ARRAY_STRING": [[], ["a"], ["b", "", "a"]],
    "ARRAY_INT64": [[], [1], [-(2**63), 0, 2**63 - 1]],
}
# Values each type refuses in a row, so that a push holding one is refused whole.
INVALID: dict[str, list[Any]] = {
    "STRING": [3, True],
    "INT64": [3.5, "1.0", True],
    "FLOAT64": [True, "abc"],
    "BOOL": ["yes", 1],
    "TIMESTAMP": ["2020-01-01", "2020-01-01T00:00:00"],
    "ARRAY_STRING": ["a", [1]],
    "ARRAY_INT64": [[1.5], 7],
}


@dataclass(frozen=True)
class Field:
    """One field of a schema as the model knows it."""

    name: str
    type: str
    nullable: bool = False


# Two fixed schemas: one with arrays (its pushes become Arrow tables), one of scalars only (a few rows of it
# stay Python lists on the server). The entity key comes first, the event time second.
KINDS: dict[str, list[Field]] = {
    "wide": [
        Field("k", "STRING"),
        Field("ts", "TIMESTAMP"),
        Field("n", "INT64"),
        Field("x", "FLOAT64", True),
        Field("flag", "BOOL", True),
        Field("tags", "ARRAY_STRING", True),
    ],
    "flat": [
        Field("id", "INT64"),
        Field("ts", "TIMESTAMP"),
        Field("s", "STRING"),
        Field("seen", "TIMESTAMP", True),
        Field("ok", "BOOL", True),
    ],
}
KEYS: dict[str, list[Any]] = {"wide": ["u1", "u2", "", "é"], "flat": [0, -1, 2**40, 7]}
# Fields a compatible change adds, nullable.
EXTRA = [
    Field("e_str", "STRING", True),
    Field("e_ints", "ARRAY_INT64", True),
    Field("e_time", "TIMESTAMP", True),
]
# A retyped field per kind: an incompatible change.
RETYPED = {"wide": Field("n", "STRING"), "flat": Field("s", "INT64")}


def rfc3339(micros: int) -> str:
    """A time as GetFeatures writes it: UTC, with 0, 3 or 6 fractional digits."""
    at = dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=micros)
    digits = (
        "seconds" if micros % 1_000_000 == 0 else "milliseconds" if micros % 1000 == 0 else "microseconds"
    )
    return at.isoformat(timespec=digits).replace("+00:00", "Z")


def row_value(type_: str, value: Any, *, read: bool = False) -> Any:
    """A value in the JSON form a row carries, or with `read` the canonical form GetFeatures returns.

    A row carries an Int64 as a number where a double holds it exactly; a read always as a decimal string.
    """
    if value is None:
        return None
    if type_ == "TIMESTAMP":
        return rfc3339(value)
    if type_ == "INT64":
        return str(value) if read or abs(value) > 2**53 else value
    if type_ == "FLOAT64" and math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    if type_ == "ARRAY_INT64":
        return [str(v) for v in value]
    return value


@dataclass
class ModelSource:
    """A source as the model knows it: its fields, ttl, and latest record per entity key."""

    name: str
    kind: str
    fields: list[Field]
    ttl: int | None
    rows: dict[Any, dict[str, Any]] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.fields[0].name

    def definition(self) -> dict[str, object]:
        """The source's proto3 JSON form."""
        fields: list[dict[str, object]] = []
        for f in self.fields:
            if f.type.startswith("ARRAY_"):
                type_: dict[str, object] = {"array": {"elementType": {"scalar": f"SCALAR_TYPE_{f.type[6:]}"}}}
            else:
                type_ = {"scalar": f"SCALAR_TYPE_{f.type}"}
            fields.append({"name": f.name, "type": type_, "nullable": f.nullable})
        doc: dict[str, object] = {
            "name": self.name,
            "schema": {"fields": fields},
            "entityKeys": [self.key],
            "timestampField": "ts",
        }
        if self.ttl is not None:
            doc["onlineTtl"] = f"{self.ttl}s"
        return doc

    def expected(self, key: Any, now_micros: int) -> dict[str, object]:
        """What GetFeatures should answer for one key, in proto3 JSON form."""
        record = self.rows.get(key)
        if record is None:
            return {"status": "FEATURE_STATUS_MISSING"}
        event = record["ts"]
        if self.ttl is not None and event < now_micros - self.ttl * 1_000_000:
            return {"status": "FEATURE_STATUS_EXPIRED", "eventTime": rfc3339(event)}
        values = {f.name: row_value(f.type, record.get(f.name), read=True) for f in self.fields}
        return {"status": "FEATURE_STATUS_PRESENT", "eventTime": rfc3339(event), "features": values}


def records_strategy(source: ModelSource) -> st.SearchStrategy[list[dict[str, Any]]]:
    """One to five records of a source, keys and times from small pools; nullable fields left out at times."""
    required: dict[str, st.SearchStrategy[Any]] = {source.key: st.sampled_from(KEYS[source.kind])}
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for f in source.fields[1:]:
        values = st.sampled_from(TIMES if f.name == "ts" else VALUES[f.type])
        if f.nullable:
            optional[f.name] = st.one_of(st.none(), values)
        else:
            required[f.name] = values
    return st.lists(st.fixed_dictionaries(required, optional=optional), min_size=1, max_size=5)


def json_rows(source: ModelSource, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records in the JSON form of PushRequest rows."""
    types = {f.name: f.type for f in source.fields}
    return [{name: row_value(types[name], value) for name, value in r.items()} for r in records]


def arrow_stream(source: ModelSource, records: list[dict[str, Any]]) -> bytes:
    """Records as an Arrow IPC stream of the source's schema (fields left out are null columns)."""
    columns = {f.name: pa.array([r.get(f.name) for r in records], TYPES[f.type]) for f in source.fields}
    table = pa.table(columns)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def apply_counts(source: ModelSource, records: list[dict[str, Any]], write: bool) -> tuple[int, int, int]:
    """Accepted, written and superseded for a push of `records`, written into the model if `write`.

    Of several records of one entity in a push only the newest (the later on a tie) can be written, and
    only if no newer event is stored.
    """
    best: dict[Any, dict[str, Any]] = {}
    for r in records:
        key = r[source.key]
        if key not in best or r["ts"] >= best[key]["ts"]:
            best[key] = r
    written = 0
    for key, r in best.items():
        stored = source.rows.get(key)
        if stored is None or r["ts"] >= stored["ts"]:
            written += 1
            if write:
                source.rows[key] = r
    return len(records), written, len(records) - written


@dataclass
class Remembered:
    """A request id's first successful push: what it carried and what it answered."""

    records: dict[str, list[dict[str, Any]]]
    counts: dict[str, tuple[int, int, int]]
    # Each source's field names then: where the same sources' fields changed since, the server cannot tell
    # other records from the same ones (their stored form differs) and answers the id as a replay.
    fields: dict[str, list[str]]
    # ...and their types: the same records are sent again only while those hold.
    types: dict[str, list[Any]]
    # The sources as they were: one deleted and applied again since is another object, its rows gone.
    sources: dict[str, ModelSource]


class ServerModel(RuleBasedStateMachine):
    """Drives a running server through its gRPC API and holds it to the model."""

    running: Running

    def __init__(self) -> None:
        super().__init__()
        # Fresh names keep examples apart on one server.
        self.prefix = f"m{uuid.uuid4().hex[:8]}"
        self.names = itertools.count()
        self.sources: dict[str, ModelSource] = {}
        self.deleted: dict[str, ModelSource] = {}
        self.request_ids: dict[str, Remembered] = {}
        # Ids sent only with refused pushes or dry runs, which must not have kept them.
        self.free_ids: list[str] = []

    def via(self, data: st.DataObject) -> Running:
        """One of the server's fronts (the only one without fronts): each must answer as the others."""
        fronts = self.running.fronts
        return fronts[data.draw(st.integers(0, len(fronts) - 1), label="front")]

    def pick(self, data: st.DataObject) -> ModelSource:
        return self.sources[data.draw(st.sampled_from(sorted(self.sources)), label="source")]

    @rule(kind=st.sampled_from(sorted(KINDS)), ttl=st.sampled_from(TTLS), data=st.data())
    def apply_source(self, kind: str, ttl: int | None, data: st.DataObject) -> None:
        source = ModelSource(f"{self.prefix}_{next(self.names)}", kind, list(KINDS[kind]), ttl)
        assert self.via(data).apply(source.definition()).changed
        self.sources[source.name] = source

    @precondition(lambda self: self.deleted)
    @rule(data=st.data())
    def apply_deleted_again(self, data: st.DataObject) -> None:
        """A source applied again under a deleted one's name starts with no rows."""
        old = self.deleted.pop(data.draw(st.sampled_from(sorted(self.deleted)), label="deleted"))
        source = ModelSource(old.name, old.kind, list(KINDS[old.kind]), old.ttl)
        assert self.via(data).apply(source.definition()).changed
        self.sources[source.name] = source

    @precondition(lambda self: self.sources)
    @rule(data=st.data())
    def compatible_change(self, data: st.DataObject) -> None:
        source = self.pick(data)
        names = {f.name for f in source.fields}
        extra = [f for f in EXTRA if f.name not in names]
        if data.draw(st.booleans(), label="add a field") and extra:
            source.fields.append(data.draw(st.sampled_from(extra), label="field"))
        else:
            source.ttl = data.draw(st.sampled_from([t for t in TTLS if t != source.ttl]), label="ttl")
        assert self.via(data).apply(source.definition()).changed

    @precondition(lambda self: self.sources)
    @rule(data=st.data())
    def incompatible_change(self, data: st.DataObject) -> None:
        """A field retyped or a required one added: refused while the source holds rows, applied otherwise."""
        source = self.pick(data)
        retyped = RETYPED[source.kind]
        if data.draw(st.booleans(), label="retype"):
            # Back and forth: a field retyped by an earlier change gets its first type back.
            original = next(f for f in KINDS[source.kind] if f.name == retyped.name)
            fields = [
                (original if f == retyped else retyped) if f.name == retyped.name else f
                for f in source.fields
            ]
        else:
            fields = [*source.fields, Field(f"req{len(source.fields)}", "BOOL")]
        changed = ModelSource(source.name, source.kind, fields, source.ttl)
        try:
            self.via(data).apply(changed.definition())
        except grpc.RpcError as e:
            assert source.rows, f"refused without rows: {e}"
            assert e.code() == grpc.StatusCode.FAILED_PRECONDITION, e
            return
        assert not source.rows, "an incompatible change applied over stored rows"
        source.fields = fields

    @precondition(lambda self: self.sources)
    @rule(data=st.data())
    def delete_source(self, data: st.DataObject) -> None:
        source = self.pick(data)
        self.via(data).registry.DeleteSource(registry_service_pb2.DeleteSourceRequest(name=source.name))
        del self.sources[source.name]
        self.deleted[source.name] = source

    def request(
        self, records: dict[str, list[dict[str, Any]]], arrow: set[str], **fields: object
    ) -> ingest_service_pb2.PushRequest:
        """A PushRequest of the given records, as rows, or as Arrow for the sources in `arrow`."""
        sources = {**self.deleted, **self.sources}
        request = rows_request(
            {name: json_rows(sources[name], rs) for name, rs in records.items() if name not in arrow},
            **fields,
        )
        for name in arrow:
            request.records[name].arrow_ipc = arrow_stream(sources[name], records[name])
        return request

    def draw_records(self, data: st.DataObject) -> dict[str, list[dict[str, Any]]]:
        """Valid records for one or two live sources."""
        names = data.draw(
            st.lists(st.sampled_from(sorted(self.sources)), min_size=1, max_size=2, unique=True)
        )
        return {name: data.draw(records_strategy(self.sources[name]), label=name) for name in names}

    @precondition(lambda self: self.sources)
    @rule(data=st.data())
    def push(self, data: st.DataObject) -> None:
        """A valid push to one or two sources, as rows or Arrow, maybe a dry run, maybe with a request id."""
        records = self.draw_records(data)
        names = list(records)
        arrow = {name for name in names if data.draw(st.booleans(), label=f"{name} as arrow")}
        dry_run = data.draw(st.booleans(), label="dry run")
        request_id = ""
        if data.draw(st.booleans(), label="with a request id"):
            known = sorted(self.request_ids)
            fresh = f"{self.prefix}-r{next(self.names)}"
            request_id = data.draw(st.sampled_from([fresh, *self.free_ids, *known]), label="request id")
            first = self.request_ids.get(request_id)
            if first is not None and data.draw(st.booleans(), label="same records"):
                if all(
                    # A field added since is null in them; a retyped one, or a required one added (a
                    # source deleted and applied again takes such a change), would make them invalid.
                    name in self.sources
                    and [f.type for f in self.sources[name].fields][: len(first.types[name])]
                    == first.types[name]
                    and all(f.nullable for f in self.sources[name].fields[len(first.types[name]) :])
                    for name in first.records
                ):
                    records = first.records
                    arrow = {name for name in records if data.draw(st.booleans(), label=f"{name} as arrow")}
        self.send(data, records, arrow, dry_run, request_id)

    def send(
        self,
        data: st.DataObject,
        records: dict[str, list[dict[str, Any]]],
        arrow: set[str],
        dry_run: bool,
        request_id: str,
    ) -> None:
        """Push and check the answer against the model; the model takes what the push wrote."""
        request = self.request(records, arrow, dryRun=dry_run, requestId=request_id)
        first = self.request_ids.get(request_id) if request_id else None
        if first is not None and any(
            name in first.sources and self.sources.get(name) is not first.sources[name] for name in records
        ):
            # A source of the first push was deleted and applied again: its record no longer answers.
            first = None
        fields = {name: [f.name for f in self.sources[name].fields] for name in records}
        checked = first is not None and (first.fields.keys() != fields.keys() or first.fields == fields)
        try:
            response = self.via(data).ingest.Push(request)
        except grpc.RpcError as e:
            code, _, reason = rich_error(e)
            assert first is not None and checked and first.records != records, f"refused: {e}"
            assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "REQUEST_ID_REUSED"), e
            return
        counts = {name: (c.accepted, c.written, c.superseded) for name, c in response.counts.items()}
        if first is not None:
            if checked:
                assert first.records == records, f"request id {request_id} with other records was answered"
            assert response.replayed and counts == first.counts
            return
        assert not response.replayed and response.dry_run == dry_run
        expected = {name: apply_counts(self.sources[name], rs, not dry_run) for name, rs in records.items()}
        assert counts == expected
        if request_id and not dry_run:
            types = {name: [f.type for f in self.sources[name].fields] for name in records}
            kept = {name: self.sources[name] for name in records}
            self.request_ids[request_id] = Remembered(records, counts, fields, types, kept)
            if request_id in self.free_ids:
                self.free_ids.remove(request_id)
        elif request_id and request_id not in self.free_ids and request_id not in self.request_ids:
            self.free_ids.append(request_id)

    def spoiled(self, data: st.DataObject) -> tuple[dict[str, list[dict[str, Any]]], grpc.StatusCode]:
        """Rows for one or two sources with one bad value among them or a deleted source's, and the code."""
        records = self.draw_records(data)
        rows = {name: json_rows(self.sources[name], rs) for name, rs in records.items()}
        if data.draw(st.booleans(), label="to a deleted source") and self.deleted:
            gone = self.deleted[data.draw(st.sampled_from(sorted(self.deleted)), label="deleted")]
            rows[gone.name] = json_rows(gone, data.draw(records_strategy(gone), label="deleted records"))
            return rows, grpc.StatusCode.NOT_FOUND
        name = data.draw(st.sampled_from(sorted(rows)), label="bad source")
        source = self.sources[name]
        row = data.draw(st.sampled_from(rows[name]), label="bad row")
        bad = data.draw(st.sampled_from(source.fields), label="bad field")
        choices = [*INVALID[bad.type], *([] if bad.nullable else [None])]
        row[bad.name] = data.draw(st.sampled_from(choices), label="bad value")
        if data.draw(st.booleans(), label="unknown field"):
            row["nope"] = 1
        return rows, grpc.StatusCode.INVALID_ARGUMENT

    @precondition(lambda self: self.sources)
    @rule(data=st.data())
    def refused_push(self, data: st.DataObject) -> None:
        """A push with one bad value or a deleted source among valid records: nothing at all is written."""
        rows, expected = self.spoiled(data)
        request_id = f"{self.prefix}-r{next(self.names)}" if data.draw(st.booleans(), label="with id") else ""
        request = rows_request(rows, requestId=request_id)
        with pytest.raises(grpc.RpcError) as refused:
            self.via(data).ingest.Push(request)
        assert refused.value.code() == expected, refused.value
        if request_id:
            # Nothing of a refused push is recorded, its id included: a later push may take it as new.
            self.free_ids.append(request_id)

    @precondition(lambda self: self.sources)
    @rule(data=st.data())
    def push_stream(self, data: st.DataObject) -> None:
        """A stream of batches, acknowledged in order: each good one as a push, a bad one failing alone."""
        batches: list[ingest_service_pb2.PushStreamRequest] = []
        outcomes: list[dict[str, tuple[int, int, int]] | grpc.StatusCode] = []
        for seq in range(data.draw(st.integers(1, 3), label="batches")):
            if data.draw(st.booleans(), label="bad batch"):
                rows, code = self.spoiled(data)
                batches.append(
                    ingest_service_pb2.PushStreamRequest(sequence_id=seq, request=rows_request(rows))
                )
                outcomes.append(code)
                continue
            records = self.draw_records(data)
            arrow = {name for name in records if data.draw(st.booleans(), label=f"{name} as arrow")}
            request = self.request(records, arrow)
            batches.append(ingest_service_pb2.PushStreamRequest(sequence_id=seq, request=request))
            # Batches are written in order, so the model takes each before the next is counted.
            outcomes.append(
                {name: apply_counts(self.sources[name], rs, True) for name, rs in records.items()}
            )
        acks = list(self.via(data).ingest.PushStream(iter(batches)))
        assert [a.sequence_id for a in acks] == list(range(len(batches)))
        for ack, outcome in zip(acks, outcomes, strict=True):
            if isinstance(outcome, grpc.StatusCode):
                assert ack.WhichOneof("result") == "error" and ack.error.code == outcome.value[0], ack
            else:
                counts = {n: (c.accepted, c.written, c.superseded) for n, c in ack.response.counts.items()}
                assert ack.WhichOneof("result") == "response" and counts == outcome, ack

    @precondition(lambda self: self.deleted)
    @rule(data=st.data())
    def read_deleted(self, data: st.DataObject) -> None:
        gone = self.deleted[data.draw(st.sampled_from(sorted(self.deleted)), label="deleted")]
        with pytest.raises(grpc.RpcError) as refused:
            self.via(data).online.GetFeatures(keys_request(gone.name, {gone.key: KEYS[gone.kind][0]}))
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND

    @precondition(lambda self: self.sources)
    @rule(data=st.data())
    def read_arrow(self, data: st.DataObject) -> None:
        """The Arrow form of a read holds the same statuses, times and values as the model."""
        source = self.pick(data)
        keys = KEYS[source.kind]
        request = keys_request(
            source.name, *({source.key: row_value("INT64", k) if source.kind == "flat" else k} for k in keys)
        )
        request.response_format = online_service_pb2.RESPONSE_FORMAT_ARROW
        now = now_micros()
        reply = self.via(data).online.GetFeatures(request)
        table = pa.ipc.open_stream(reply.arrow_ipc).read_all()
        for i, key in enumerate(keys):
            want = source.expected(key, now)
            row = {name: table.column(name)[i].as_py() for name in table.column_names}
            status = {1: "FEATURE_STATUS_PRESENT", 2: "FEATURE_STATUS_MISSING", 3: "FEATURE_STATUS_EXPIRED"}
            assert status[row["status"]] == want["status"], (key, row, want)
            stored = source.rows.get(key)
            if stored is None:
                assert row["event_time"] is None
                continue
            assert micros_of(row["event_time"]) == stored["ts"], (key, row, stored)
            for f in source.fields[1:]:
                value = row[f.name]
                expect = stored.get(f.name) if want["status"] == "FEATURE_STATUS_PRESENT" else None
                if f.type == "TIMESTAMP" and value is not None:
                    value = micros_of(value)
                assert value == expect, (key, f.name, row, stored)

    @invariant()
    def reads_match_the_model(self) -> None:
        """Every source's every key reads as the model says, through each front."""
        for source in self.sources.values():
            keys = KEYS[source.kind]
            request = keys_request(
                source.name,
                *({source.key: row_value("INT64", k) if source.kind == "flat" else k} for k in keys),
            )
            for front in self.running.fronts:
                now = now_micros()
                reply = front.online.GetFeatures(request)
                got = [json_format.MessageToDict(r) for r in reply.results]
                want = [source.expected(k, now) for k in keys]
                assert [normalized(g) for g in got] == want, source.name


def now_micros() -> int:
    return int(dt.datetime.now(dt.UTC).timestamp() * 1_000_000)


def micros_of(at: dt.datetime) -> int:
    return (at - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(microseconds=1)


def normalized(result: dict[str, Any]) -> dict[str, Any]:
    """A read result with its event time in GetFeatures' canonical form (MessageToDict writes nanos)."""
    out = dict(result)
    if "eventTime" in out:
        at = dt.datetime.fromisoformat(out["eventTime"].replace("Z", "+00:00"))
        out["eventTime"] = rfc3339(micros_of(at))
    return out


# Kept short for the suite; FEATUREPUSH_MODEL_EXAMPLES=500 runs a deeper search.
MODEL_SETTINGS = settings(
    max_examples=int(os.environ.get("FEATUREPUSH_MODEL_EXAMPLES", "15")),
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


@pytest.mark.parametrize("store_settings", ["rocksdb", "processes", "redis"], indirect=True)
def test_server_follows_the_model(tmp_path: Path, store_settings: dict[str, object]) -> None:
    settings_: dict[str, object] = {"expired_sweep_interval_s": 0, **store_settings}
    if "store" in store_settings:
        # Redis drops a row its ttl and grace have passed as it is written; a grace of three centuries keeps
        # every pooled time, as RocksDB with its sweep off keeps them.
        settings_["redis_expiry_grace_s"] = 300 * 365 * DAY_S
    running = start(tmp_path / "data", **settings_)  # type: ignore[arg-type]
    try:
        machine = type("Machine", (ServerModel,), {"running": running})
        run_state_machine_as_test(machine, settings=MODEL_SETTINGS)
    finally:
        running.close()
