"""GetFeatures keys as bytes: the client writes them by hand, the server reads the common form back."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import Running, start
from google.protobuf import timestamp_pb2
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st
from test_properties import SETTINGS

from featurepush import Client, FeatureStatus, StreamSource, reads
from featurepush import types as t
from featurepush.reads import get_features_request
from featurepush.v1 import feature_view_service_pb2 as fvs_pb2
from featurepush.v1 import online_service_pb2
from featurepush_server.core import wire
from featurepush_server.core.wire import (
    VIEW_REQUEST_KEYS,
    read_varint,
    single_string_keys,
    string_keys_between,
    string_keys_request,
)

# Keys around every bound of the fast paths: the server's short keys (under 100 UTF-8 bytes, and the
# one-byte lengths of their prefix), the client's (under 256 bytes), and strings holding the very bytes
# that separate keys in a request.
_TRICKY = [
    "",
    "k" * 99,
    "k" * 100,
    "é" * 50,
    "k" * 255,
    "k" * 256,
    "\n\x07user_id\x12",
    "a\n\x07user_id\x12\x03\x1a\x01b",
    "\x12\x0e\n\x0c",
]
_KEYS = st.one_of(st.text(max_size=120), st.sampled_from(_TRICKY))
_NAMES = st.one_of(st.sampled_from(["user_id", "k", "é" * 3, "\n\x07user_id\x12"]), st.text(min_size=1))
_FORMATS = st.sampled_from(
    [
        online_service_pb2.RESPONSE_FORMAT_UNSPECIFIED,
        online_service_pb2.RESPONSE_FORMAT_STRUCT,
        online_service_pb2.RESPONSE_FORMAT_ARROW,
        9,
    ]
)


def _request(
    source: str, response_format: int, keys: list[dict[str, Any]]
) -> online_service_pb2.GetFeaturesRequest:
    request = online_service_pb2.GetFeaturesRequest(source=source, response_format=response_format)  # type: ignore[arg-type]
    for key in keys:
        request.keys.add().update(key)
    return request


@SETTINGS
@given(
    source=st.text(max_size=30),
    response_format=_FORMATS,
    name=_NAMES,
    keys=st.lists(_KEYS, min_size=1, max_size=20),
)
def test_string_keys_read_from_the_bytes_are_the_parsed_keys(
    source: str, response_format: int, name: str, keys: list[str]
) -> None:
    """The keys read back are exactly the parsed ones, and every short key of a short name is read back."""
    request = _request(source, response_format, [{name: k} for k in keys])
    raws = single_string_keys(request.SerializeToString(), request.source, request.response_format, name)
    parsed = [k.fields[name].string_value for k in request.keys]
    if raws is not None:
        assert [r.decode() for r in raws] == parsed
    # A name that no key or source holds can only be found where keys are separated.
    apart = name.isidentifier() and name not in source and not any(name in k for k in keys)
    if apart and len(name.encode()) <= 8 and max(len(k.encode()) for k in keys) < 100:
        assert raws is not None


@SETTINGS
@given(
    source=st.text(max_size=30),
    response_format=_FORMATS,
    name=_NAMES,
    keys=st.lists(st.one_of(_KEYS, st.integers(), st.none()), min_size=1, max_size=20),
    extra=st.booleans(),
    change=st.tuples(st.sampled_from(["none", "cut", "flip", "append"]), st.integers(0, 10_000), st.binary()),
)
def test_a_request_read_from_its_bytes_is_the_parsed_request(
    source: str,
    response_format: int,
    name: str,
    keys: list[Any],
    extra: bool,
    change: tuple[str, int, bytes],
) -> None:
    """The request read unparsed is the one protobuf parses, whatever bytes it is given; or it is None."""
    request = _request(
        source, response_format, [{name: k, **({"other": "x"} if extra else {})} for k in keys]
    )
    data = request.SerializeToString()
    how, at, junk = change
    at %= len(data)
    if how == "cut":
        data = data[:at]
    elif how == "flip":
        data = data[:at] + bytes([data[at] ^ (junk[:1] or b"\x80")[0]]) + data[at + 1 :]
    elif how == "append":
        data += junk
    found = string_keys_request(data)
    if found is None:
        plain = how == "none" and not extra and all(isinstance(k, str) for k in keys)
        # Short string keys of a name that is nowhere else are always read.
        apart = name.isidentifier() and name not in source and not any(name in str(k) for k in keys)
        if plain and apart and len(name.encode()) <= 8 and max(len(str(k).encode()) for k in keys) < 100:
            raise AssertionError("plain string keys were not read")
        return
    try:
        parsed = online_service_pb2.GetFeaturesRequest.FromString(data)
    except DecodeError:
        raise AssertionError("bytes protobuf refuses were read") from None
    assert found.message == parsed
    assert parsed == _request(
        found.source, found.response_format, [{found.name: r.decode()} for r in found.raws]
    )


@pytest.mark.parametrize(
    "keys",
    [
        [{"user_id": 1.5}],
        [{"user_id": "a", "other": "b"}],
        [{"other": "a"}],
        [{"user_id": "a"}, {"user_id": None}],
        [{"user_id": "a"}, {"user_id": ["a"]}],
        [{"user_id": "a"}, {}],
    ],
)
def test_keys_of_any_other_form_are_left_to_the_parsed_request(keys: list[dict[str, Any]]) -> None:
    request = _request("s", online_service_pb2.RESPONSE_FORMAT_ARROW, keys)
    assert single_string_keys(request.SerializeToString(), "s", request.response_format, "user_id") is None


def test_unknown_fields_are_left_to_the_parsed_request() -> None:
    request = _request("s", 0, [{"user_id": "a"}])
    # Field 15 (varint 1), which no GetFeaturesRequest field has.
    data = request.SerializeToString() + b"\x78\x01"
    with_unknown = online_service_pb2.GetFeaturesRequest.FromString(data)
    serialized = with_unknown.SerializeToString()
    assert single_string_keys(serialized, "s", 0, "user_id") is None


@SETTINGS
@given(
    keys=st.lists(_KEYS, min_size=0, max_size=20),
    columnar=st.booleans(),
    source=st.text(max_size=20),
)
def test_the_clients_request_parses_as_its_string_keys(keys: list[str], columnar: bool, source: str) -> None:
    data = get_features_request(source, keys, ["user_id"], columnar=columnar)
    request = online_service_pb2.GetFeaturesRequest.FromString(data)
    form = online_service_pb2.RESPONSE_FORMAT_ARROW if columnar else online_service_pb2.RESPONSE_FORMAT_STRUCT
    assert request == _request(source, form, [{"user_id": k} for k in keys])
    # Laid out as protobuf writes it (the format after the keys), so the server reads its keys unparsed.
    assert data == request.SerializeToString()
    found = string_keys_request(data)
    if found is not None:
        # Keys that hold the bytes of a key's prefix are left to the parser; any that are read are exact.
        assert (found.source, found.response_format) == (source, form)
        assert found.raws == [k.encode() for k in keys]


@pytest.mark.parametrize("columnar", [False, True])
def test_the_server_reads_the_clients_request_unparsed(columnar: bool) -> None:
    """The client writes the format after the keys, where the server's reader of keys' bytes looks for it."""
    keys = ["u1", "é" * 40, "", "w0-u0"]
    found = string_keys_request(get_features_request("ad_impressions", keys, ["user_id"], columnar=columnar))
    assert found is not None
    form = online_service_pb2.RESPONSE_FORMAT_ARROW if columnar else online_service_pb2.RESPONSE_FORMAT_STRUCT
    assert (found.source, found.response_format, found.name) == ("ad_impressions", form, "user_id")
    assert found.raws == [k.encode() for k in keys]


@SETTINGS
@given(keys=st.lists(st.one_of(_KEYS, st.text(st.characters(max_codepoint=127), max_size=300)), max_size=20))
def test_the_clients_string_keys_are_the_bytes_of_its_general_path(keys: list[str]) -> None:
    """Keys as strings, ASCII or not, short or long, are written as the same keys given as mappings."""
    for columnar in (False, True):
        general = get_features_request("s", [{"user_id": k} for k in keys], ["user_id"], columnar=columnar)
        assert get_features_request("s", keys, ["user_id"], columnar=columnar) == general


@pytest.mark.parametrize(
    ("seconds", "nanos"),
    [(0, 0), (1, 999_999_999), (-1, 1), (-62_135_596_800, 0), (253_402_300_799, 999_999_999), (1, 1500)],
)
def test_event_times_read_as_protobuf_reads_them(seconds: int, nanos: int) -> None:
    stamp = timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)
    got, want = reads._datetime(stamp), stamp.ToDatetime(tzinfo=dt.UTC)
    assert got == want and got.tzinfo is want.tzinfo


@pytest.mark.parametrize(
    ("seconds", "nanos"), [(-62_135_596_801, 0), (253_402_300_800, 0), (0, -1), (0, 10**9)]
)
def test_an_invalid_event_time_is_refused_as_protobuf_refuses_it(seconds: int, nanos: int) -> None:
    with pytest.raises(ValueError):
        reads._datetime(timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """One server for the module."""
    r = start(Path(tmp_path_factory.mktemp("keys")) / "data", fsync="never")
    try:
        yield r
    finally:
        r.close()


def test_keys_on_either_side_of_the_fast_paths_read_alike(server: Running) -> None:
    """Every tricky key reads its own row, as Arrow and as Structs, through the client and the raw stub."""
    client = Client.from_channel(server.channel)
    schema = [t.Field("user_id", t.String), t.Field("ts", t.Timestamp), t.Field("n", t.Int64)]
    client.apply(StreamSource(name="tricky", schema=schema, entity_keys=["user_id"], timestamp_field="ts"))
    when = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    stored = [k for k in _TRICKY if k != "\x12\x0e\n\x0c"]
    client.push("tricky", [{"user_id": k, "ts": when, "n": i} for i, k in enumerate(stored)])
    keys = [*_TRICKY, *_TRICKY[::-1]]
    want = [stored.index(k) if k in stored else None for k in keys]
    for columnar in (True, False):
        results = client.get_features("tricky", keys, columnar=columnar)
        assert [r.features["n"] if r.features else None for r in results] == want
        assert [r.status for r in results] == [
            FeatureStatus.MISSING if w is None else FeatureStatus.PRESENT for w in want
        ]
        table = results.to_arrow()
        assert table.column("user_id").to_pylist() == keys
        assert table.column("n").to_pylist() == want
    for form in (online_service_pb2.RESPONSE_FORMAT_ARROW, online_service_pb2.RESPONSE_FORMAT_STRUCT):
        # Keys of the parsed request's own making, as any other client would send them.
        reply = server.online.GetFeatures(_request("tricky", form, [{"user_id": k} for k in keys]))
        count = len(keys) if form == online_service_pb2.RESPONSE_FORMAT_STRUCT else 0
        assert len(reply.results) == count and bool(reply.arrow_ipc) == (count == 0)


def test_keys_read_from_the_bytes_are_refused_or_reported_as_parsed_ones_are(server: Running) -> None:
    client = Client.from_channel(server.channel)
    schema = [t.Field("user_id", t.String), t.Field("ts", t.Timestamp)]
    client.apply(StreamSource(name="refused", schema=schema, entity_keys=["user_id"], timestamp_field="ts"))
    call = server.channel.unary_unary("/featurepush.v1.OnlineService/GetFeatures")
    arrow = online_service_pb2.RESPONSE_FORMAT_ARROW
    good = _request("refused", arrow, [{"user_id": "ab"}, {"user_id": "cd"}]).SerializeToString()
    # The second key's string made invalid UTF-8 in place: the request's shape is unchanged.
    bad = good.replace(b"cd", b"c\xff")
    assert string_keys_request(good) is not None and string_keys_request(bad) is None
    with pytest.raises(grpc.RpcError) as e:
        call(bad)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "could not be decoded" in (e.value.details() or "")
    other = _request("refused", arrow, [{"user": "ab"}]).SerializeToString()
    assert string_keys_request(other) is not None
    with pytest.raises(grpc.RpcError) as e:
        call(other)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "keys[0].user" in str(e.value.trailing_metadata())


@SETTINGS
@given(
    target=st.tuples(st.sampled_from(["feature_view", "feature_service"]), st.text(max_size=30)),
    as_of=st.one_of(st.none(), st.integers(min_value=-(2**40), max_value=2**50)),
    response_format=_FORMATS,
    keys=st.lists(st.one_of(_KEYS, st.integers(), st.none()), min_size=1, max_size=20),
    extra=st.booleans(),
)
def test_view_keys_read_from_the_bytes_are_the_parsed_keys(
    target: tuple[str, str], as_of: int | None, response_format: int, keys: list[Any], extra: bool
) -> None:
    """A GetViewFeatures request's keys read back are the parsed ones, whatever else the request holds."""
    request = fvs_pb2.GetViewFeaturesRequest(response_format=response_format)  # type: ignore[arg-type]
    setattr(request, target[0], target[1])
    if as_of is not None:
        request.as_of.FromMicroseconds(as_of)
    for key in keys:
        fields: dict[str, Any] = {"user_id": key}
        if extra:
            fields["other"] = "x"
        request.keys.add().update(fields)
    head = fvs_pb2.GetViewFeaturesRequest()
    setattr(head, target[0], target[1])
    tail = fvs_pb2.GetViewFeaturesRequest(response_format=response_format)  # type: ignore[arg-type]
    if as_of is not None:
        tail.as_of.CopyFrom(request.as_of)
    raws = string_keys_between(
        request.SerializeToString(),
        head.SerializeToString(),
        VIEW_REQUEST_KEYS,
        tail.SerializeToString(),
        "user_id",
    )
    if raws is not None:
        assert not extra and all(isinstance(k, str) for k in keys)
        assert [r.decode() for r in raws] == keys
    elif not extra and all(isinstance(k, str) and len(k.encode()) < 100 for k in keys):
        # Plain short string keys may only be missed where a key or the target holds the bytes that
        # separate keys.
        assert any("user_id" in k for k in keys) or "user_id" in target[1]


def test_a_varint_of_more_than_ten_bytes_is_refused() -> None:
    assert read_varint(b"\xff" * 9 + b"\x01", 0) == ((1 << 64) - 1, 10)
    with pytest.raises(IndexError, match="ten bytes"):
        read_varint(b"\xff" * 10 + b"\x01", 0)
    with pytest.raises(IndexError):
        read_varint(b"\xff\xff", 0)


def test_a_request_of_endless_continuation_bytes_is_left_to_protobuf() -> None:
    # A source length of 2 MB of continuation bytes: read step by step without a bound, each step
    # shifting a larger number, it would hold a front for hours; bounded, it is refused at once.
    data = online_service_pb2.GetFeaturesRequest.DESCRIPTOR.fields_by_name["source"].number
    hostile = bytes([data << 3 | 2]) + b"\xff" * 2_000_000
    assert string_keys_request(hostile) is None


# --- Requests written by hand, field by field, as an attacker would: every choice protobuf's encoder never
# makes (non-minimal varints, repeated scalars, fields out of order, groups, wrong wire types) is drawn.


def _varint_of(value: int, pad: int) -> bytes:
    """A varint of `value`, with `pad` redundant continuation bytes: protobuf reads it as the same number."""
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if not value and not pad:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)
        if not value:
            pad -= 1
            if not pad:
                out.append(0)
                return bytes(out)


def _field(number: int, wire: int, body: bytes, pad: int = 0) -> bytes:
    """One field: its tag (with `pad` extra varint bytes), then its length where it has one, then `body`."""
    tag = _varint_of(number << 3 | wire, pad)
    if wire == 2:
        return tag + _varint_of(len(body), pad) + body
    if wire == 3:
        return tag + body + _varint_of(number << 3 | 4, 0)
    return tag + body


_TEXT_BYTES = st.one_of(
    st.text(max_size=12).map(str.encode),
    st.sampled_from(
        [b"user_id", b"", b"\x00", b"a\x00b", b"\xff", b"\xc3", b"\xed\xa0\x80", b"\n\x07user_id"]
    ),
)


def _odd(draw: st.DrawFn, odds: int) -> bool:
    """True once in `odds` draws; never where `odds` is 0, for a request written as protobuf writes it."""
    return odds > 0 and draw(st.integers(1, odds)) == 1


def _pad(draw: st.DrawFn, odds: int) -> int:
    return draw(st.sampled_from([1, 3])) if _odd(draw, odds) else 0


def _value(draw: st.DrawFn, odds: int) -> bytes:
    """A google.protobuf.Value's fields: one string, or at odds another kind, two strings, or junk."""
    pad = _pad(draw, odds)
    if not _odd(draw, odds):
        return _field(3, 2, draw(_TEXT_BYTES), pad)
    kind = draw(st.sampled_from(["number", "bool", "null", "two", "junk"]))
    if kind == "number":
        return _field(2, 1, b"\x00" * 7 + b"\x40", pad)
    if kind == "bool":
        return _field(4, 0, b"\x01", pad)
    if kind == "null":
        return _field(1, 0, b"\x00", pad)
    if kind == "two":
        return _field(3, 2, draw(_TEXT_BYTES), pad) + _field(3, 2, draw(_TEXT_BYTES))
    return draw(st.binary(max_size=6))


def _struct(draw: st.DrawFn, name: bytes, odds: int) -> bytes:
    """A google.protobuf.Struct's fields: one entry {name: value}, or at odds more, another or none."""
    entries = []
    for _ in range(draw(st.sampled_from([0, 2])) if _odd(draw, odds) else 1):
        key = draw(_TEXT_BYTES) if _odd(draw, odds) else name
        parts = [_field(1, 2, key, _pad(draw, odds)), _field(2, 2, _value(draw, odds), _pad(draw, odds))]
        if _odd(draw, odds):
            parts.reverse()
        if _odd(draw, odds):
            parts.append(_field(1, 2, draw(_TEXT_BYTES)))
        entries.append(_field(1, 2, b"".join(parts), _pad(draw, odds)))
    if _odd(draw, odds):
        entries.append(_field(draw(st.integers(2, 20)), 0, b"\x01"))
    return b"".join(entries)


@st.composite
def _hostile_requests(draw: st.DrawFn) -> bytes:
    """A GetFeaturesRequest written by hand, with any of the choices protobuf's encoder never makes."""
    # How often each choice goes another way than protobuf's: never, now and then, or often.
    odds = draw(st.sampled_from([0, 40, 10, 3]))
    name = draw(st.sampled_from([b"user_id", b"k", "é".encode()]))
    fields = [
        _field(2, 2, _struct(draw, name, odds), _pad(draw, odds)) for _ in range(draw(st.integers(1, 6)))
    ]
    if draw(st.booleans()):
        at = len(fields) if _odd(draw, odds) else 0
        fields.insert(at, _field(1, 2, draw(_TEXT_BYTES), _pad(draw, odds)))
    for _ in range(draw(st.sampled_from([1, 2])) if _odd(draw, odds) else draw(st.integers(0, 1))):
        fields.append(_field(3, 0, _varint_of(draw(st.sampled_from([0, 1, 2, 3, 200])), _pad(draw, odds))))
    if _odd(draw, odds):
        extra = draw(
            st.sampled_from(
                [
                    _field(15, 0, b"\x01"),  # an unknown varint field
                    _field(16, 3, b""),  # an empty group
                    _field(2, 0, b"\x01"),  # the keys' field number with the varint wire type
                    _field(3, 2, b"\x01"),  # response_format as a length-delimited (packed) field
                    _field(1, 2, b"\x80\x80"),  # a second source, of invalid UTF-8
                    _field(5, 5, b"\x00\x00\x00\x00"),  # an unknown fixed32 field
                ]
            )
        )
        fields.insert(draw(st.integers(0, len(fields))), extra)
    data = b"".join(fields)
    if _odd(draw, odds):
        at = draw(st.integers(0, len(data) - 1))
        if draw(st.booleans()):
            data = data[:at]
        else:
            data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1 :]
    return data


def _parsed(data: bytes) -> online_service_pb2.GetFeaturesRequest | None:
    try:
        return online_service_pb2.GetFeaturesRequest.FromString(data)
    except DecodeError:
        return None


@settings(SETTINGS, max_examples=300)
@given(data=_hostile_requests())
def test_a_hostile_request_read_from_its_bytes_means_what_protobuf_parses(data: bytes) -> None:
    """Read unparsed, a request hand-written in any layout means what protobuf parses, or is left to it."""
    found = string_keys_request(data)
    if found is None:
        return
    parsed = _parsed(data)
    assert parsed is not None, "bytes protobuf refuses were read"
    assert found.message == parsed
    # The meaning: protobuf's last-one-wins for scalars and merged map entries, read from what it parsed.
    assert (found.source, found.response_format) == (parsed.source, parsed.response_format)
    assert [list(k.fields) for k in parsed.keys] == [[found.name]] * len(found.raws)
    kinds = [k.fields[found.name].WhichOneof("kind") for k in parsed.keys]
    assert kinds == ["string_value"] * len(found.raws)
    assert [k.fields[found.name].string_value.encode() for k in parsed.keys] == found.raws


# One key {"user_id": "a"}: the Struct's one entry.
_KEY_A = _field(1, 2, _field(1, 2, b"user_id") + _field(2, 2, b"\x1a\x01a"))


@pytest.mark.parametrize(
    "data",
    [
        # The source's length with a redundant continuation byte: protobuf reads it, and so is it read here.
        _field(1, 2, b"src", 1) + _field(2, 2, _KEY_A),
        # A key's tag in two bytes, its Struct's length in three.
        _field(2, 2, _KEY_A, 2),
        # response_format twice: the last one counts.
        _field(2, 2, _KEY_A) + b"\x18\x02\x18\x01",
        # A second source after the keys.
        _field(1, 2, b"a") + _field(2, 2, _KEY_A) + _field(1, 2, b"b"),
        # A key's Value with two string_values: the last one counts.
        _field(2, 2, _field(1, 2, _field(1, 2, b"user_id") + _field(2, 2, b"\x1a\x01a\x1a\x01b"))),
        # A key of two entries of one name: the map keeps the last.
        _field(2, 2, _KEY_A * 2),
        # A group after the keys.
        _field(2, 2, _KEY_A) + _field(9, 3, b""),
    ],
)
def test_layouts_protobuf_never_writes_are_read_as_it_parses_them(data: bytes) -> None:
    parsed = _parsed(data)
    assert parsed is not None
    found = string_keys_request(data)
    if found is not None:
        assert found.message == parsed
        assert (found.source, found.response_format) == (parsed.source, parsed.response_format)
        assert [k.fields[found.name].string_value.encode() for k in parsed.keys] == found.raws


def test_a_key_name_of_megabytes_is_left_to_protobuf_without_copies_of_it() -> None:
    # Each name read from a request was kept as a hundred prefixes holding it: 8 MB of name cost 800 MB.
    name = "n" * (8 << 20)
    data = _request("s", 0, [{name: "a"}] * 3).SerializeToString()
    assert string_keys_request(data) is None
    assert string_keys_between(data, b"", VIEW_REQUEST_KEYS, b"", name) is None
    assert all(len(cached) < 100 for _, cached in wire._PREFIXES)
    # The longest name still read this way, and the shortest left to protobuf.
    for size, read in ((99, True), (100, False)):
        data = _request("s", 0, [{"n" * size: ""}]).SerializeToString()
        assert (string_keys_request(data) is not None) == read


def test_a_hostile_request_is_answered_as_its_parsed_twin_and_the_server_serves_on(server: Running) -> None:
    """Through the server: a request read from its bytes gets the answer of the same request parsed."""
    client = Client.from_channel(server.channel)
    schema = [t.Field("user_id", t.String), t.Field("ts", t.Timestamp), t.Field("n", t.Int64)]
    client.apply(StreamSource(name="hostile", schema=schema, entity_keys=["user_id"], timestamp_field="ts"))
    when = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    client.push("hostile", [{"user_id": k, "ts": when, "n": i} for i, k in enumerate(["a", "b", "a\x00b"])])
    call = server.channel.unary_unary("/featurepush.v1.OnlineService/GetFeatures")
    key = _KEY_A
    nul_key = _field(1, 2, _field(1, 2, b"user_id") + _field(2, 2, b"\x1a\x03a\x00b"))
    source = _field(1, 2, b"hostile")
    hostile = [
        _field(1, 2, b"hostile", 2) + _field(2, 2, key) + _field(2, 2, nul_key) + b"\x18\x02",
        source + _field(2, 2, key, 1) + _field(2, 2, nul_key) + b"\x18\x01",
        source + _field(2, 2, key) + _field(2, 2, nul_key) + b"\x18\x02\x18\x01",
        source + _field(2, 2, key) * 3 + _field(1, 2, b"hostile") + b"\x18\x02",
        source + _field(2, 2, key) * 3 + _field(9, 3, b"") + b"\x18\x02",
        source + _field(2, 2, key + _field(1, 2, _field(1, 2, b"user_id") + _field(2, 2, b"\x1a\x01b"))),
        source + _field(2, 2, key) * 3 + b"\x18\x81\x00",
        _request("hostile", 2, [{"n" * 5000: "a"}] * 3).SerializeToString(),
        source + _field(2, 2, key) + _field(2, 2, b"\x0a\x05\x0a\x03\xff\xfe\xfd"),
        source + _field(2, 2, key) + _field(2, 2, b"\x0a\x10\x0a\x07user_id"),
    ]
    for data in hostile:
        parsed = _parsed(data)
        if parsed is None:
            with pytest.raises(grpc.RpcError) as e:
                call(data)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            continue
        # The parsed twin: the same request with an unknown field, which the bytes reader never takes.
        twin = parsed.SerializeToString() + _field(15, 0, b"\x01")
        assert string_keys_request(twin) is None
        answers = []
        for request in (data, twin):
            try:
                answers.append(("ok", call(request)))
            except grpc.RpcError as e:
                answers.append((e.code(), e.details()))
        assert answers[0] == answers[1]
    assert len(client.get_features("hostile", ["a", "b", "a\x00b", "zz"])) == 4
