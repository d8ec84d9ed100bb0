"""The Struct form of GetFeatures written from stored rows: the same bytes as writing each result in turn."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence

from conftest import Running, keys_request, rows_request, scalar
from hypothesis import given, settings
from hypothesis import strategies as st
from test_properties import KEY, TS, batches, schemas, to_struct

from featurepush import Field, Int64, StreamSource, String, Timestamp
from featurepush.v1 import online_service_pb2
from featurepush_server.core.encoding import encode_rows, event_time_length, payload_whole
from featurepush_server.core.framing import header_micros, payload
from featurepush_server.core.rows import rows_to_table
from featurepush_server.core.schema import compile_source
from featurepush_server.core.struct_reply import EXPIRED, MISSING_RESULT, PRESENT, struct_results
from featurepush_server.core.wire import GET_FEATURES_RESULT, varint


def one_by_one(stored: Sequence[bytes | None], cutoff: int | None) -> bytes:
    """Each result written in turn from the payload's own checks: what struct_results must equal."""
    out = []
    for value in stored:
        if value is None:
            out.append(MISSING_RESULT)
            continue
        body = payload(value)
        if not payload_whole(body):
            raise ValueError("not whole")
        if cutoff is not None and header_micros(value) < cutoff:
            vector = EXPIRED + body[: event_time_length(body)]
        else:
            vector = PRESENT + body
        out.append(GET_FEATURES_RESULT + varint(len(vector)) + vector)
    return b"".join(out)


def outcome(
    stored: Sequence[bytes | None],
    cutoff: int | None,
    write: Callable[[Sequence[bytes | None], int | None], bytes],
) -> bytes | str:
    """The reply, or "damaged" where a payload is refused."""
    try:
        return write(stored, cutoff)
    except ValueError:
        return "damaged"


@st.composite
def stored_rows(draw: st.DrawFn) -> tuple[list[bytes], list[int]]:
    """Stored values of random records of a random schema, some long enough for 3-byte payload lengths."""
    schema = draw(schemas())
    spec = compile_source(
        StreamSource(name="s", schema=schema, entity_keys=[KEY], timestamp_field=TS).to_proto()
    )
    records = [record for record, _ in draw(batches(schema))]
    # A key of 20 KB makes a payload longer than two varint bytes can say.
    sizes = draw(st.lists(st.sampled_from([0, 100, 20_000]), min_size=len(records), max_size=len(records)))
    rows = [
        to_struct({**r, KEY: f"{r[KEY]}-{i}-" + "k" * n})
        for i, (r, n) in enumerate(zip(records, sizes, strict=True))
    ]
    table, violations, _ = rows_to_table(rows, spec.fields, spec.arrow_schema, "records")
    assert table is not None, violations
    values = encode_rows(table, spec.fields, spec.entity_keys, spec.timestamp_field, b"r\0\0\0\1")[1]
    return values, [header_micros(v) for v in values]


def damaged(draw: st.DrawFn, value: bytes) -> bytes:
    """The value cut short, grown, or with one byte changed, mostly among its framing's lengths and tags."""
    how = draw(st.sampled_from(["cut", "grow", "flip", "flip"]))
    if how == "cut":
        return value[: draw(st.integers(0, len(value) - 1))]
    if how == "grow":
        return value + draw(st.binary(min_size=1, max_size=3))
    start = 12 + int.from_bytes(value[8:12], "big")
    features = start + 2 + value[start + 1]
    # The columns' length, the payload's tags and lengths (the features' varint up to three bytes), or
    # anywhere.
    framing = [8, 9, 10, 11, start, start + 1, features, features + 1, features + 2, features + 3]
    at = draw(st.one_of(st.sampled_from(framing), st.integers(0, len(value) - 1)))
    return value[:at] + bytes([draw(st.integers(0, 255))]) + value[at + 1 :]


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_struct_results_match_results_written_one_by_one(data: st.DataObject) -> None:
    values, times = data.draw(stored_rows())
    stored: list[bytes | None] = []
    for value in values:
        kind = data.draw(st.sampled_from(["row", "row", "missing", "damaged"]))
        stored.append(
            None if kind == "missing" else damaged(data.draw, value) if kind == "damaged" else value
        )
    cutoff = data.draw(st.one_of(st.none(), st.sampled_from(times), st.integers(-(2**62), 2**62)))
    assert outcome(stored, cutoff, struct_results) == outcome(stored, cutoff, one_by_one)


def test_every_change_to_a_framing_byte_is_refused_or_read_as_one_by_one() -> None:
    schema = [
        Field("user_id", String),
        Field("ts", Timestamp),
        Field("n", Int64),
        Field("note", String),
    ]
    spec = compile_source(
        StreamSource(name="s", schema=schema, entity_keys=["user_id"], timestamp_field="ts").to_proto()
    )
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    # Notes of 0, 200 and 20,000 bytes: features lengths of one, two and three varint bytes.
    rows = [
        to_struct({"user_id": f"u{n}", "ts": t0.isoformat(), "n": n, "note": "x" * n})
        for n in (0, 200, 20_000)
    ]
    table, violations, _ = rows_to_table(rows, spec.fields, spec.arrow_schema, "records")
    assert table is not None, violations
    values = encode_rows(table, spec.fields, spec.entity_keys, spec.timestamp_field, b"r\0\0\0\1")[1]
    cutoffs = [None, header_micros(values[0]) + 1]
    for value in values:
        start = 12 + int.from_bytes(value[8:12], "big")
        features = start + 2 + value[start + 1]
        for at in [8, 9, 10, 11, start, start + 1, features, features + 1, features + 2, features + 3]:
            for byte in {0, 0x7F, 0x80, 0xFF, value[at] ^ 1, (value[at] + 1) % 256, (value[at] - 1) % 256}:
                changed = value[:at] + bytes([byte]) + value[at + 1 :]
                for cutoff in cutoffs:
                    stored = [values[0], changed, None]
                    assert outcome(stored, cutoff, struct_results) == outcome(stored, cutoff, one_by_one)


def test_a_read_of_many_keys_answers_present_missing_and_expired_in_key_order(running: Running) -> None:
    running.apply(
        {
            "name": "clicks",
            "schema": {
                "fields": [
                    {"name": "user_id", "type": scalar("STRING")},
                    {"name": "ts", "type": scalar("TIMESTAMP")},
                    {"name": "n", "type": scalar("INT64")},
                ]
            },
            "entityKeys": ["user_id"],
            "timestampField": "ts",
            "onlineTtl": "3600s",
        }
    )
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    pushed = {}
    for i in range(300):
        # Every fifth entity is never pushed (missing); every third of the others is two hours old (expired).
        if i % 5 != 4:
            pushed[i] = now - dt.timedelta(hours=2 if i % 3 == 0 else 0, seconds=i)
    rows = [{"user_id": f"u{i}", "ts": at.isoformat(), "n": i} for i, at in pushed.items()]
    running.ingest.Push(rows_request({"clicks": rows}))
    reply = running.online.GetFeatures(keys_request("clicks", *({"user_id": f"u{i}"} for i in range(300))))
    assert len(reply.results) == 300
    for i, vector in enumerate(reply.results):
        if i not in pushed:
            assert vector.status == online_service_pb2.FEATURE_STATUS_MISSING
            assert not vector.HasField("event_time") and not vector.HasField("features")
            continue
        assert vector.event_time.ToDatetime(tzinfo=dt.UTC) == pushed[i]
        if i % 3 == 0:
            assert vector.status == online_service_pb2.FEATURE_STATUS_EXPIRED
            assert not vector.HasField("features")
        else:
            assert vector.status == online_service_pb2.FEATURE_STATUS_PRESENT
            assert vector.features.fields["user_id"].string_value == f"u{i}"
