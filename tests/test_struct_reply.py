"""The Struct form of GetFeatures written from stored rows: the same bytes as writing each result in turn."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import rocksdict
from conftest import Running, keys_request, rows_request, scalar, start
from hypothesis import event, given, settings
from hypothesis import strategies as st
from test_properties import KEY, TS, batches, schemas, to_struct

from featurepush import Client, DataLossError, FeatureStatus, Field, Int64, StreamSource, String, Timestamp
from featurepush.v1 import online_service_pb2
from featurepush_server.core.encoding import encode_rows, event_time_length, payload_whole
from featurepush_server.core.errors import DataLoss
from featurepush_server.core.framing import frame, header_micros, payload, time_header
from featurepush_server.core.online import damaged_row, struct_reply
from featurepush_server.core.rows import rows_to_table
from featurepush_server.core.schema import compile_source
from featurepush_server.core.struct_reply import (
    _BODIES,
    _FEW_ROWS,
    _PREFIX_LENGTHS,
    _PREFIX_ROOM,
    _PREFIX_ROWS,
    EXPIRED,
    MISSING_RESULT,
    PRESENT,
    _many_results,
    struct_results,
)
from featurepush_server.core.wire import (
    FEATURE_VECTOR_EVENT_TIME,
    FEATURE_VECTOR_FEATURES,
    GET_FEATURES_RESULT,
    varint,
)


def per_row_reply(source: str, stored: Sequence[bytes | None], cutoff: int | None) -> bytes:
    """GetFeatures' Struct reply as it was written before it took all rows at once: what struct_reply must
    equal, DataLoss and the key it names included."""
    out = []
    for at, value in enumerate(stored):
        if value is None:
            out.append(MISSING_RESULT)
            continue
        body = payload(value)
        if not payload_whole(body):
            raise damaged_row(source, at)
        if cutoff is not None and header_micros(value) < cutoff:
            vector = EXPIRED + body[: event_time_length(body)]
        else:
            vector = PRESENT + body
        out.append(GET_FEATURES_RESULT + varint(len(vector)) + vector)
    return b"".join(out)


def reply_or_loss(
    stored: Sequence[bytes | None],
    cutoff: int | None,
    write: Callable[[str, Sequence[bytes | None], int | None], bytes],
) -> bytes | tuple[str, dict[str, str]]:
    """The reply, or the DataLoss' message and metadata."""
    try:
        return write("s", stored, cutoff)
    except DataLoss as e:
        return str(e), dict(e.metadata)


def one_by_one(stored: Sequence[bytes | None], cutoff: int | None) -> bytes:
    """Each result written in turn from the payload's own checks: what struct_results must equal."""
    try:
        return per_row_reply("s", stored, cutoff)
    except DataLoss:
        raise ValueError("not whole") from None


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
def stored_rows(draw: st.DrawFn, longest: int = 20_000) -> tuple[list[bytes], list[int]]:
    """Stored values of random records of a random schema, some long enough for 3-byte payload lengths."""
    schema = draw(schemas())
    spec = compile_source(
        StreamSource(name="s", schema=schema, entity_keys=[KEY], timestamp_field=TS).to_proto()
    )
    records = [record for record, _ in draw(batches(schema))]
    # A key of 20 KB makes a payload longer than two varint bytes can say.
    sizes = draw(st.lists(st.sampled_from([0, 100, longest]), min_size=len(records), max_size=len(records)))
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


def rows_of_three_lengths() -> list[bytes]:
    """Stored rows whose features' lengths take one, two and three varint bytes, a second apart."""
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
    rows = [
        to_struct(
            {"user_id": f"u{n}", "ts": (t0 + dt.timedelta(seconds=n)).isoformat(), "n": n, "note": "x" * n}
        )
        for n in (0, 200, 20_000)
    ]
    table, violations, _ = rows_to_table(rows, spec.fields, spec.arrow_schema, "records")
    assert table is not None, violations
    return list(encode_rows(table, spec.fields, spec.entity_keys, spec.timestamp_field, b"r\0\0\0\1")[1])


def test_every_change_to_a_framing_byte_is_refused_or_read_as_one_by_one() -> None:
    values = rows_of_three_lengths()
    # Expiring none, the first, or all of them.
    cutoffs = [None, header_micros(values[0]) + 1, header_micros(values[2]) + 1]
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


@st.composite
def many_stored(draw: st.DrawFn) -> tuple[list[bytes | None], int | None]:
    """Up to twice the rows of the fewest written at once: present, missing, cut, grown or flipped, and a
    cutoff that expires none, some or all of them."""
    # Rows of 20 KB take the loop.
    values, times = draw(stored_rows(draw(st.sampled_from([1000, 20_000]))))
    n = draw(st.one_of(st.integers(_FEW_ROWS, 2 * _FEW_ROWS), st.integers(1, _FEW_ROWS)))
    # Reads without damage, and with it at a few rows or many.
    mix = draw(
        st.sampled_from(
            [
                ["row"],
                ["row", "missing"],
                ["row"] * 80 + ["missing"] * 20 + ["damaged"],
                ["row"] * 6 + ["missing", "damaged"],
            ]
        )
    )
    kinds = draw(st.lists(st.sampled_from(mix), min_size=n, max_size=n))
    stored: list[bytes | None] = []
    for i, kind in enumerate(kinds):
        value = values[i % len(values)]
        stored.append(None if kind == "missing" else damaged(draw, value) if kind == "damaged" else value)
    cutoff = draw(st.one_of(st.none(), st.sampled_from(times), st.integers(-(2**62), 2**62)))
    return stored, cutoff


@settings(max_examples=300, deadline=None)
@given(many=many_stored())
def test_replies_of_many_rows_match_the_per_row_reply_damage_and_key_index_included(
    many: tuple[list[bytes | None], int | None],
) -> None:
    stored, cutoff = many
    want = reply_or_loss(stored, cutoff, per_row_reply)
    assert reply_or_loss(stored, cutoff, struct_reply) == want
    # The numpy path answers for every read it takes, and leaves damaged rows to the loop.
    at_once = _many_results(stored, cutoff)
    if isinstance(want, tuple):
        assert at_once is None
    elif all(v is None or len(payload(v)) < _BODIES for v in stored):
        event("written at once" if len(stored) >= _FEW_ROWS else "few")
        assert at_once == want


@pytest.mark.parametrize("place", ["first", "middle", "last"])
def test_a_row_cut_at_every_length_or_changed_in_its_framing_among_many_names_its_key(place: str) -> None:
    short, long, _ = rows_of_three_lengths()
    filler: list[bytes | None] = [short, None, long] * (_FEW_ROWS // 3 + 1)
    at = {"first": 0, "middle": len(filler) // 2, "last": len(filler)}[place]
    changes = [long[:cut] for cut in range(len(long))]
    start = 12 + int.from_bytes(long[8:12], "big")
    features = start + 2 + long[start + 1]
    for i in [8, 9, 10, 11, start, start + 1, features, features + 1, features + 2]:
        for byte in {0, 0x7F, 0x80, 0xFF, long[i] ^ 1, (long[i] + 1) % 256, (long[i] - 1) % 256}:
            changes.append(long[:i] + bytes([byte]) + long[i + 1 :])
    for changed in changes:
        stored = [*filler[:at], changed, *filler[at:]]
        for cutoff in (None, header_micros(long)):
            want = reply_or_loss(stored, cutoff, per_row_reply)
            assert reply_or_loss(stored, cutoff, struct_reply) == want
            if isinstance(want, tuple):
                assert want[1]["key_index"] == str(at)


def test_every_prefix_written_at_once_is_the_result_prefix_of_its_status_and_body_length() -> None:
    rows = _PREFIX_ROWS.tobytes()
    for code, length in enumerate(_PREFIX_LENGTHS.tolist()):
        status, body = divmod(code, _BODIES)
        vector = [PRESENT, EXPIRED, MISSING_RESULT[2:]][status]
        row = rows[code * _PREFIX_ROOM : (code + 1) * _PREFIX_ROOM]
        assert row[_PREFIX_ROOM - length :] == GET_FEATURES_RESULT + varint(body + len(vector)) + vector


def test_a_damaged_row_among_many_read_through_the_server_names_its_key(tmp_path: Path) -> None:
    data = tmp_path / "data"
    running = start(data, fsync="never")
    source = StreamSource(
        name="many",
        schema=[Field("user_id", String), Field("ts", Timestamp), Field("n", Int64)],
        entity_keys=["user_id"],
        timestamp_field="ts",
    )
    keys = [f"u{i}" for i in range(2 * _FEW_ROWS)]
    when = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    try:
        client = Client.from_channel(running.channel)
        client.apply(source)
        # Every seventh entity is never pushed.
        client.push("many", [{"user_id": k, "ts": when, "n": i} for i, k in enumerate(keys) if i % 7])
        assert [r.status for r in client.get_features("many", keys, columnar=False)] == [
            FeatureStatus.PRESENT if i % 7 else FeatureStatus.MISSING for i in range(len(keys))
        ]
    finally:
        running.close()
    db = rocksdict.Rdict(str(data / "online"), rocksdict.Options(raw_mode=True))
    try:
        # The rows of u90 and u100 lose their last byte.
        for k, v in list(db.items()):
            if k[:1] == b"r" and (k.endswith(b"u90") or k.endswith(b"u100")):
                db[k] = v[:-1]
    finally:
        db.close()
    running = start(data, fsync="never")
    try:
        client = Client.from_channel(running.channel)
        with pytest.raises(DataLossError) as caught:
            client.get_features("many", keys, columnar=False)
        assert caught.value.reason == "DAMAGED_ROW"
        assert caught.value.metadata["key_index"] == "90"
        assert "keys[90]" in str(caught.value)
        # Reads of the other keys are whole.
        rest = [k for k in keys if k not in ("u90", "u100")]
        assert len(list(client.get_features("many", rest, columnar=False))) == len(rest)
    finally:
        running.close()


def test_a_three_byte_length_is_never_read_as_its_first_two_bytes() -> None:
    short = rows_of_three_lengths()[0]
    event_time = FEATURE_VECTOR_EVENT_TIME + bytes([2]) + b"\x08\x01"
    # A length of 1 in three bytes (0x81 0x80 0x00), followed by as many bytes as its first two would say
    # with the second one's continuation bit taken as part of it: 1 + 128 * 128, the third byte included.
    body = event_time + FEATURE_VECTOR_FEATURES + b"\x81\x80\x00" + b"x" * (128 * 128)
    value = frame(time_header(0), b"", body)
    stored: list[bytes | None] = [short] * _FEW_ROWS + [value, short]
    assert not payload_whole(payload(value))
    want = reply_or_loss(stored, None, per_row_reply)
    assert isinstance(want, tuple) and want[1]["key_index"] == str(_FEW_ROWS)
    assert reply_or_loss(stored, None, struct_reply) == want
    assert _many_results(stored, None) is None


@pytest.mark.parametrize("value", [None, b"", b"\x00" * 11, MISSING_RESULT])
def test_a_read_of_many_missing_or_tiny_rows_matches_the_per_row_reply(value: bytes | None) -> None:
    for n in (1, _FEW_ROWS, 2 * _FEW_ROWS):
        stored = [value] * n
        assert reply_or_loss(stored, None, struct_reply) == reply_or_loss(stored, None, per_row_reply)
        assert reply_or_loss(stored, 0, struct_reply) == reply_or_loss(stored, 0, per_row_reply)
