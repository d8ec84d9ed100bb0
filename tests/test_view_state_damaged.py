"""A damaged stored state of a stream feature view (its watermark and backfilled ranges), in RocksDB, through
fronts of serve --processes and in Redis: pushes and backfills fail as DATA_LOSS and write nothing, reads
of its tiles go on, and deleting the view, applying it again and backfilling rebuild it."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import AD_IMPRESSIONS, VIEW_STORES, Running, features, start
from hypothesis import given, settings
from hypothesis import strategies as st
from views_helpers import HOUR, apply, opened_store, push, read, stub, view, view_id

from featurepush.batch import backfill
from featurepush.definitions import Aggregate
from featurepush.errors import DataLossError, FeaturepushError, from_rpc_error
from featurepush.v1 import feature_view_service_pb2 as fvs_pb2
from featurepush_server.core.errors import DataLoss
from featurepush_server.core.tiles import ViewState

M = 60_000_000
TOTALS = [Aggregate("clicked", "count", HOUR), Aggregate("clicked", "sum", HOUR)]
# A backfill begins its runs in view name order: the intact view's run is begun before the damaged one's.
INTACT, DAMAGED = "a_intact", "b_damaged"


def _watermark_digit(raw: bytes) -> bytes:
    # The watermark's last digit one more: JSON of the right shape and types, caught by the state's check.
    at = raw.index(b",", raw.index(b'"w":')) - 1
    return raw[:at] + bytes([raw[at] ^ 1]) + raw[at + 1 :]


DAMAGES: dict[str, Callable[[bytes], bytes]] = {
    "cut": lambda raw: raw[: len(raw) // 2],
    "empty": lambda raw: b"",
    "not JSON": lambda raw: b"\xff" + raw[1:],
    "a list": lambda raw: b"[1, 2]",
    "a key missing": lambda raw: b'{"w": 0, "done": []}',
    "a text watermark": lambda raw: b'{"w": "0", "done": [], "run": {}}',
    "a true watermark": lambda raw: b'{"w": true, "done": [], "run": {}}',
    "a range of one end": lambda raw: b'{"w": 0, "done": [[0]], "run": {}}',
    "a watermark digit": _watermark_digit,
}


def _now_minute() -> int:
    return time.time_ns() // 1000 // M * M


def _parquet(root: Path, events: list[tuple[str, int, int]]) -> str:
    table = pa.table(
        {
            "user_id": [u for u, _, _ in events],
            "timestamp": pa.array([t for _, t, _ in events], pa.timestamp("us", "UTC")),
            "clicked": pa.array([c for _, _, c in events], pa.int64()),
        }
    )
    path = root / "history.parquet"
    pq.write_table(table, path)
    return str(path)


def _damaged_error(caught: BaseException) -> FeaturepushError:
    """The client's error of a call refused for the damaged view's state, checked."""
    error = from_rpc_error(caught) if isinstance(caught, grpc.RpcError) else caught
    assert isinstance(error, DataLossError), error
    assert error.reason == "DAMAGED_VIEW_STATE" and error.metadata == {"view": DAMAGED}, error
    return error


def _views(running: Running, as_of: int) -> list[Any]:
    """Both views' features of both users."""
    return [read(running, ["a", "z"], as_of, view_name=name) for name in (INTACT, DAMAGED)]


def _setup(root: Path, store: dict[str, object], minute: int) -> tuple[list[Any], bytes]:
    """A source with a batch file of ten events and two views, five of the events pushed; return what the
    views read and the stored state of the one to damage, the server stopped."""
    history = [("a", minute - 40 * M + i * M, i) for i in range(5)]
    live = [("a", minute - 20 * M + i * M, 100 + i) for i in range(5)]
    # The batch source holds every event, the pushed ones too, as a stream's archive does.
    uri = _parquet(root, history + live)
    running = start(root / "data", **store)
    try:
        running.apply({**AD_IMPRESSIONS, "batchConfig": {"uri": uri, "fileFormat": "FILE_FORMAT_PARQUET"}})
        for name in (INTACT, DAMAGED):
            apply(running, view(name, aggregations=TOTALS))
        push(running, live)
        reads = _views(running, minute + 1)
    finally:
        running.close()
    with opened_store(root / "data", store) as opened:
        state = opened.view_state(view_id(opened, DAMAGED))
    assert state is not None
    return reads, state


def _started_damaged(root: Path, store: dict[str, object], damage: str) -> tuple[Running, int, list[Any]]:
    """A server over the two views with one's stored state damaged, past the store's own checks; the minute
    the events are before, and what the views read before the damage."""
    minute = _now_minute()
    before, state = _setup(root, store, minute)
    with opened_store(root / "data", store) as opened:
        opened.update_view_state(view_id(opened, DAMAGED), lambda _: DAMAGES[damage](state))
    return start(root / "data", **store), minute, before


@VIEW_STORES
@pytest.mark.parametrize("damage", ["cut", "a watermark digit"])
def test_a_damaged_view_state_refuses_pushes_and_backfills_whole_until_the_view_is_applied_again(
    tmp_path: Path, store_settings: dict[str, object], damage: str
) -> None:
    running, minute, before = _started_damaged(
        tmp_path, {**store_settings, "batch_roots": (tmp_path,)}, damage
    )
    try:
        # A push meeting the damaged state is refused whole: no latest row, no tile of either view.
        with pytest.raises(grpc.RpcError) as caught:
            push(running, [("a", minute - 5 * M, 1000), ("z", minute - 5 * M, 1)])
        error = _damaged_error(caught.value)
        assert DAMAGED in error.message and "delete-view" in error.message
        assert _views(running, minute + 1) == before
        assert features(running, "ad_impressions", {"user_id": "z"})[0]["status"] == "FEATURE_STATUS_MISSING"
        with pytest.raises(DataLossError) as refused:
            backfill(running.channel, "ad_impressions")
        _damaged_error(refused.value)
        # What the message says to do: delete the view, apply it again, backfill its source.
        stub(running).DeleteFeatureView(fvs_pb2.DeleteFeatureViewRequest(name=DAMAGED))
        apply(running, view(DAMAGED, aggregations=TOTALS))
        # The intact view's run, begun before the damaged view refused the first backfill, was forgotten:
        # left running, it would refuse this one.
        backfill(running.channel, "ad_impressions")
        intact, rebuilt = _views(running, minute + 1)
        assert rebuilt == intact
        assert intact[1][0] == [("PRESENT", "10"), ("PRESENT", str(sum(range(5)) + sum(range(100, 105))))]
        push(running, [("z", minute + 7, 1)])
    finally:
        running.close()


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_every_kind_of_damage_to_a_view_state_fails_a_push_as_data_loss(tmp_path: Path, damage: str) -> None:
    running, minute, before = _started_damaged(tmp_path, {"batch_roots": (tmp_path,)}, damage)
    try:
        with pytest.raises(grpc.RpcError) as caught:
            push(running, [("a", minute - 5 * M, 1000)])
        _damaged_error(caught.value)
        # The damaged view's tiles read as before.
        assert _views(running, minute + 1) == before
    finally:
        running.close()


# --- the decoder alone -------------------------------------------------------------------------------

_times = st.integers(-(2**63), 2**63 - 1)
_spans = st.lists(_times, min_size=2, max_size=2)
_states = st.builds(
    ViewState,
    st.one_of(st.none(), _times),
    st.lists(_spans, max_size=3),
    st.dictionaries(st.text("0123456789abcdef", min_size=32, max_size=32), _spans, max_size=2),
)


def _legacy(state: ViewState) -> bytes:
    """A state as stored before it carried a check."""
    return json.dumps({"w": state.watermark, "done": state.done, "run": state.running}).encode()


def _valid(state: ViewState) -> bool:
    def time_(value: Any) -> bool:
        return type(value) is int and -(2**63) <= value < 2**63

    def span(value: Any) -> bool:
        return isinstance(value, list) and len(value) == 2 and all(map(time_, value))

    return (
        (state.watermark is None or time_(state.watermark))
        and isinstance(state.done, list)
        and all(map(span, state.done))
        and isinstance(state.running, dict)
        and all(isinstance(k, str) and span(v) for k, v in state.running.items())
    )


@settings(max_examples=500, deadline=None)
@given(_states, st.booleans(), st.data())
def test_a_mutated_view_state_decodes_as_a_valid_state_or_as_damaged(
    state: ViewState, legacy: bool, data: st.DataObject
) -> None:
    value = bytearray(_legacy(state) if legacy else state.dump())
    how = data.draw(st.sampled_from(["cut", "flip", "byte"]))
    if how == "cut":
        del value[data.draw(st.integers(0, len(value) - 1)) :]
    elif how == "flip":
        for _ in range(data.draw(st.integers(1, 3))):
            value[data.draw(st.integers(0, len(value) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    else:
        value[data.draw(st.integers(0, len(value) - 1))] = data.draw(st.integers(0, 255))
    try:
        got = ViewState.parse(bytes(value), "v")
    except DataLoss as e:
        assert e.reason == "DAMAGED_VIEW_STATE" and e.metadata == {"view": "v"}
        return
    assert _valid(got), got
    assert ViewState.parse(got.dump(), "v") == got
    if not legacy:
        # The check catches every changed value; what passes is the state stored, spaced another way.
        assert got == state


@settings(max_examples=100, deadline=None)
@given(_states)
def test_a_view_state_reads_back_as_itself_with_its_check_or_as_stored_before_it(state: ViewState) -> None:
    assert ViewState.parse(state.dump(), "v") == state
    assert ViewState.parse(_legacy(state), "v") == state
