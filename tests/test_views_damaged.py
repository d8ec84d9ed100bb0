"""Damaged stored blocks of view tiles, in RocksDB (read by the server or by a front of serve --processes)
and in Redis: reads and pushes answer as the whole block or fail as damaged."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pyarrow as pa
import pytest
import redis
import rocksdict
from conftest import AD_IMPRESSIONS, VIEW_STORES, Running, rich_error, source_from_json, start
from google.protobuf import json_format
from hypothesis import given, settings
from hypothesis import strategies as st
from views_helpers import MINUTE, Aggregate, apply, opened_store, push, stub, view, view_id

from featurepush.v1 import feature_view_service_pb2 as fvs_pb2
from featurepush.v1 import online_service_pb2, registry_service_pb2
from featurepush_server.core.tiles import Blocks, Codec, merge_spec

M = 60_000_000
USERS = ("a", "bb")


def _moments_only() -> Any:
    """A view whose blocks hold many tiles and no JSON part."""
    aggs = [Aggregate("clicked", fn, 10 * MINUTE) for fn in ("count", "sum", "mean", "min", "max", "stddev")]
    return view("moments", aggregations=aggs)


def _reply(running: Running, name: str, users: list[str], as_of: int, arrow: bool) -> list[Any]:
    """Each user's features in one form: proto3 JSON of its vector, or its Arrow row."""
    request = fvs_pb2.GetViewFeaturesRequest(feature_view=name, keys=[{"user_id": u} for u in users])
    request.as_of.FromMicroseconds(as_of)
    if arrow:
        request.response_format = online_service_pb2.RESPONSE_FORMAT_ARROW
    response = stub(running).GetViewFeatures(request)
    if arrow:
        rows: list[Any] = pa.ipc.open_stream(response.arrow_ipc).read_all().to_pylist()
        return rows
    return [json_format.MessageToDict(v) for v in response.results]


def _is_damaged(err: grpc.RpcError) -> bool:
    code, _, reason = rich_error(err)
    return code == grpc.StatusCode.DATA_LOSS and reason == "DAMAGED_TILES"


def _pushed(data: Path, store: dict[str, object]) -> tuple[int, dict[tuple[str, bool, str], list[Any]]]:
    """Start a server, push events of both users to both views, read them back; return as_of and the reads."""
    running = start(data, fsync="never", **store)
    try:
        running.registry.ApplySource(
            registry_service_pb2.ApplySourceRequest(source=source_from_json(AD_IMPRESSIONS))
        )
        apply(running, view())
        apply(running, _moments_only())
        now = time.time_ns() // 1000 // M * M
        # Events in three intervals, so that a block of the moments view holds several tiles.
        push(running, [(u, now - k * M + 7, c) for u in USERS for k, c in ((1, 3), (2, 5), (4, 5))])
        # As of the next interval, so that every read after a restart rolls up the same windows.
        as_of = now + M
        want = {
            (name, arrow, u): _reply(running, name, [u], as_of, arrow)
            for name in ("clicks", "moments")
            for arrow in (False, True)
            for u in USERS
        }
    finally:
        running.close()
    return as_of, want


def _blocks_of(
    data: Path, store: dict[str, object], name: str, entity: bytes
) -> tuple[int, list[tuple[int, bytes]]]:
    """The view's id and the stored blocks of one entity, each with its start."""
    with opened_store(data, store) as opened:
        found = view_id(opened, name)
        counts, starts, values = opened.scan_tiles(found, [entity], -(2**61), 2**61)
        assert counts[0] == len(values) > 0
        return found, list(zip(starts.tolist(), values, strict=True))


def _put_blocks(
    data: Path, store: dict[str, object], view: int, blocks: list[tuple[bytes, int, bytes]]
) -> None:
    """Store (entity, start, value) blocks of a view as they are, past the store's own checks."""
    url = store.get("store")
    if isinstance(url, str):
        # The Redis store's layout (core/stores/redis.py): a hash per view and entity, a field per start.
        client = redis.Redis.from_url(url)
        try:
            for entity, start_micros, value in blocks:
                name = f"{{{store['redis_namespace']}}}:t{view}:".encode() + len(entity).to_bytes(4, "big")
                client.hset(name + entity, (start_micros + 2**63).to_bytes(8, "big"), value)
        finally:
            client.close()
        return
    with opened_store(data, store) as opened:
        keys = [opened.tile_key(view, entity, start_micros) for entity, start_micros, _ in blocks]
    db = rocksdict.Rdict(str(data / "online"), rocksdict.Options(raw_mode=True))
    try:
        for key, (_, _, value) in zip(keys, blocks, strict=True):
            db[key] = value
    finally:
        db.close()


def _damaged(value: bytes) -> list[bytes]:
    """Every cut of a value, and every flip of a bit of its tile count and of its first tile's start.

    A flip among the partial aggregates or the lists' values reads as other numbers: nothing stored says
    what they were.
    """
    out = [value[:cut] for cut in range(len(value))]
    for at in range(12):
        for bit in range(8):
            flipped = bytearray(value)
            flipped[at] ^= 1 << bit
            out.append(bytes(flipped))
    at = value.find(b'"h":["')
    if at >= 0:
        # A sketch damaged inside JSON that still parses: its preamble, or three bytes after it left out.
        at += 6
        out += [value[:at] + b"AAAAAAAA" + value[at + 8 :], value[: at + 8] + value[at + 12 :]]
    return out


def _plant(data: Path, store: dict[str, object], name: str) -> list[str]:
    """Store damaged copies of user a's blocks, each under an entity of its own, and an intact copy of each
    block under "w" and its number; return the intact copy's entity of each damaged one."""
    view, blocks = _blocks_of(data, store, name, b"a")
    planted: list[tuple[bytes, int, bytes]] = []
    intact: list[str] = []
    for k, (start_micros, value) in enumerate(blocks):
        planted.append((b"w%d" % k, start_micros, value))
        for bad in _damaged(value):
            planted.append((b"d%d" % len(intact), start_micros, bad))
            intact.append(f"w{k}")
    _put_blocks(data, store, view, planted)
    return intact


# In RocksDB read by the server itself and by fronts of serve --processes through the store owner, and in
# Redis; blocks planted where the store does not look would never be refused.
@VIEW_STORES
@pytest.mark.parametrize("name", ["clicks", "moments"])
def test_a_damaged_stored_block_reads_as_the_whole_block_or_as_damaged(
    tmp_path: Path, name: str, store_settings: dict[str, object]
) -> None:
    """A block cut anywhere or flipped reads as an intact copy of it or fails as DATA_LOSS, in both forms, and
    never changes what its neighbours in the same read get."""
    data = tmp_path / "data"
    as_of, want = _pushed(data, store_settings)
    intact = _plant(data, store_settings, name)
    running = start(data, fsync="never", **store_settings)
    try:
        copies = {
            (w, arrow): _reply(running, name, [w], as_of, arrow)
            for w in set(intact)
            for arrow in (False, True)
        }
        refused = 0
        for j, w in enumerate(intact):
            for arrow in (False, True):
                users = ["bb", f"d{j}", "bb"]
                try:
                    got = _reply(running, name, users, as_of, arrow)
                except grpc.RpcError as e:
                    assert _is_damaged(e), (j, arrow, e)
                    refused += 1
                    continue
                bb = want[name, arrow, "bb"]
                assert got == [*bb, *copies[w, arrow], *bb], (j, arrow)
        assert refused
        # The server keeps serving the intact blocks.
        for arrow in (False, True):
            assert _reply(running, name, list(USERS), as_of, arrow) == [
                want[name, arrow, u][0] for u in USERS
            ]
    finally:
        running.close()


def _cut(value: bytes) -> bytes:
    return value[:-3]


def _moved(value: bytes) -> bytes:
    # The first tile's start (little-endian, after the tile count) one microsecond later.
    return value[:4] + bytes([value[4] ^ 1]) + value[5:]


@pytest.mark.parametrize("damage", [_cut, _moved])
@VIEW_STORES
def test_a_push_onto_a_damaged_stored_block_is_refused_whole(
    tmp_path: Path, store_settings: dict[str, object], damage: Any
) -> None:
    """A push merging into a damaged block fails as DATA_LOSS and writes nothing, not even other users'."""
    data = tmp_path / "data"
    as_of, want = _pushed(data, store_settings)
    view, blocks = _blocks_of(data, store_settings, "moments", b"a")
    # Every block of user a, so that the push meets one whichever block its events fall in.
    _put_blocks(
        data, store_settings, view, [(b"a", start_micros, damage(value)) for start_micros, value in blocks]
    )
    running = start(data, fsync="never", **store_settings)
    try:
        # The interval of the latest pushed events, whose tile is in a stored block. The current one (as
        # before) lies in a block not stored yet whenever the clock has just crossed a block's span.
        latest = as_of - 2 * M
        with pytest.raises(grpc.RpcError) as caught:
            push(running, [(u, latest + 11, 9) for u in USERS])
        assert _is_damaged(caught.value)
        assert "moments" in str(caught.value.details())
        # Nothing of the push was written: bb's tiles and the latest rows are as before.
        for name in ("clicks", "moments"):
            assert _reply(running, name, ["bb"], as_of, False) == want[name, False, "bb"]
        latest = running.online.GetFeatures(
            json_format.ParseDict(
                {"source": "ad_impressions", "keys": [{"user_id": "bb"}]},
                online_service_pb2.GetFeaturesRequest(),
            )
        )
        assert json_format.MessageToDict(latest.results[0])["features"]["clicked"] == "3"
    finally:
        running.close()


# --- the codec alone ---------------------------------------------------------------------------------

_INTERVAL = 60


def _codec(has_var: bool) -> Codec:
    lists = (("x", "last", 3),) if has_var else ()
    return Codec(merge_spec("v", _INTERVAL, 10 * _INTERVAL, ("x",), lists, ()))


@st.composite
def _encoded(draw: st.DrawFn, has_var: bool) -> tuple[Codec, list[bytes], np.ndarray]:
    """A codec, valid stored blocks of it, and each block's start."""
    codec = _codec(has_var)
    slots = draw(st.lists(st.sets(st.integers(0, codec.slots - 1), max_size=4), min_size=1, max_size=3))
    block_starts = np.array([b * codec.span for b in range(len(slots))], dtype=np.int64)
    starts = np.array(
        [b * codec.span + s * _INTERVAL for b, ss in enumerate(slots) for s in sorted(ss)], dtype=np.int64
    )
    numbers = st.floats(allow_nan=False, width=64)
    fixed = np.array(
        draw(
            st.lists(
                st.lists(numbers, min_size=codec.width, max_size=codec.width),
                min_size=len(starts),
                max_size=len(starts),
            )
        )
    ).reshape(len(starts), codec.width)
    item = st.tuples(st.integers(-(2**40), 2**40), st.one_of(st.integers(-100, 100), st.text(max_size=3)))
    var: list[Any] = [
        draw(
            st.one_of(
                st.none(),
                st.builds(
                    lambda items: {"l": [[list(i) for i in items]], "h": []}, st.lists(item, max_size=3)
                ),
            )
        )
        if has_var
        else None
        for _ in starts
    ]
    values = codec.encode([len(ss) for ss in slots], starts, fixed, var)
    return codec, values, block_starts


def _same(a: Blocks, b: Blocks) -> bool:
    return (
        a.counts.tolist() == b.counts.tolist()
        and a.starts.tobytes() == b.starts.tobytes()
        and a.fixed.tobytes() == b.fixed.tobytes()
        and a.var == b.var
    )


@settings(max_examples=300, deadline=None)
@given(st.booleans(), st.data())
def test_decode_of_a_damaged_block_is_a_valid_blocks_decode_or_value_error(
    has_var: bool, data: st.DataObject
) -> None:
    codec, values, block_starts = data.draw(_encoded(has_var))
    j = data.draw(st.integers(0, len(values) - 1))
    value = bytearray(values[j])
    how = data.draw(st.sampled_from(["cut", "flip", "count", "empty"]))
    if how == "cut":
        del value[data.draw(st.integers(0, len(value) - 1)) :]
    elif how == "flip":
        for _ in range(data.draw(st.integers(1, 3))):
            value[data.draw(st.integers(0, len(value) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    elif how == "count":
        value[:4] = data.draw(st.integers(0, 2**32 - 1)).to_bytes(4, "big")
    else:
        value.clear()
    damaged = [*values[:j], bytes(value), *values[j + 1 :]]
    try:
        blocks = codec.decode(damaged)
        if not codec.placed(blocks, block_starts):
            raise ValueError("out of place")
    except ValueError:
        return
    # Accepted: the tiles are those of valid blocks, each block's own tiles, that encode to what is stored.
    again = codec.encode(blocks.counts.tolist(), blocks.starts, blocks.fixed, blocks.var)
    size = 4 + int(blocks.counts[j]) * codec.record.itemsize
    assert again[j][:4] == bytes(value)[:4]
    stored = np.frombuffer(bytes(value)[4:size], dtype=codec.record).copy()
    rewritten = np.frombuffer(again[j][4:size], dtype=codec.record)
    # Squared deviations stored with their sign bit clear are read as store format 3's sums of squares,
    # and written back the current way.
    earlier = ~np.signbit(stored["fixed"][:, 3::5])
    stored["fixed"][:, 3::5][earlier] = rewritten["fixed"][:, 3::5][earlier]
    assert rewritten.tobytes() == stored.tobytes()
    if has_var:
        assert json.loads(again[j][size:]) == json.loads(bytes(value)[size:])
    else:
        assert len(again[j]) == len(value)
    assert _same(codec.decode(again), blocks)
