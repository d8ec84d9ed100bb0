"""Time tiles of stream feature views: partial aggregates per entity and tile, built, merged and encoded.

A tile holds what one entity's events with event times in [start, start + interval) add up to: a fixed
part of float64s (the record count, then count, sum, sum of squared deviations from the tile's mean, min
and max of each moment column) and, for views with list or distinct-count aggregations, a JSON part
(bounded lists of [time, value] and HyperLogLog sketches as base64). Merging two tiles gives the tile of
both sets of events, whatever their order, so pushes may arrive out of order and a window is the merge of
its tiles. The store keeps an entity's tiles of several consecutive intervals in one value, a block (see
Codec), so that a read of a window fetches one or two values per entity.

Pushes and backfills never count an event twice: each view keeps a watermark, the start of the tile of
the earliest pushed event. Pushes write tiles from the watermark on; a backfill writes only tiles wholly
inside its time range, before the watermark, and not filled by an earlier backfill. The first backfill
freezes the watermark (to the current tile when nothing was pushed yet); pushes of events before it are
then skipped and counted, since the batch source holds them. The view's state (watermark, backfilled
and running ranges) is JSON with a CRC-32 in the store, written in the same atomic write as the tiles.
"""

from __future__ import annotations

import base64
import contextlib
import json
import time
import uuid
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from featurepush.v1 import feature_view_pb2 as fv_pb2

from .encoding import encode_keys
from .errors import CoreError, DataLoss, FailedPrecondition
from .materialize import Origin, Staged
from .schema import Kind
from .stores.base import TileMerge, TileStore
from .views import LIST_FUNCTIONS, MOMENT_FUNCTIONS, NUMERIC_KINDS, AggSpec, View, Views, ViewSpec

# HyperLogLog precision: 2^12 registers, about 1.6% standard error.
HLL_LG_K = 12
_FIXED = 5
_FAR_PAST = -(1 << 62)
# A block's tile count, its first bytes.
_HEAD = 4
# Blocks of moment-only views hold up to 64 tiles and about 16 KB; blocks with lists 8 tiles.
_MAX_SLOTS = 64
_BLOCK_BYTES = 16384
_LIST_SLOTS = 8


def _datasketches() -> Any:
    # Imported when a view first needs a sketch, so servers without such views never load it.
    import datasketches

    return datasketches


def damaged_tiles(view: str) -> DataLoss:
    """The error of a read or push that met a damaged stored block of a view's tiles (cut short, say)."""
    return DataLoss(
        f"a stored block of tiles of feature view {view!r} is damaged (cut short or overwritten); delete "
        "the view and apply it again to rebuild its tiles",
        reason="DAMAGED_TILES",
        metadata={"view": view},
    )


def floor_to(micros: int, interval: int) -> int:
    """The start of the tile holding `micros`."""
    return micros // interval * interval


def now_micros() -> int:
    """The current time in microseconds."""
    return time.time_ns() // 1000


# A tile's JSON part (its lists and sketches), or None.
Var = dict[str, Any] | None


class Blocks(NamedTuple):
    """Stored blocks decoded: each block's tile count, then every tile's start, fixed part and JSON part."""

    counts: np.ndarray
    starts: np.ndarray
    fixed: np.ndarray
    var: list[Var]


def block_slots(definition: fv_pb2.StreamFeatureView) -> int:
    """How many consecutive tile intervals one stored block of a view covers.

    It depends on the kinds of partial aggregates the tiles keep, which never change while the view holds
    tiles, and it is read from the definition alone, as a process that does not load views can.
    """
    functions = {a.function for a in definition.aggregations}
    if fv_pb2.AGGREGATE_FUNCTION_APPROX_COUNT_DISTINCT in functions:
        # A sketch is kilobytes: a push rewrites the whole block of each entity it touches.
        return 1
    if functions & LIST_FUNCTIONS.keys():
        return _LIST_SLOTS
    moments = {a.column for a in definition.aggregations if a.function in MOMENT_FUNCTIONS}
    tile_bytes = 8 * (2 + _FIXED * len(moments))
    return max(1, min(_MAX_SLOTS, _BLOCK_BYTES // tile_bytes))


class Codec:
    """Encodes, decodes and merges the tiles of one view, and packs them into blocks.

    A block is one stored value: an entity's tiles of `slots` consecutive intervals, so that a window
    reads one or two values per entity instead of one per tile. It is its tile count (4 bytes
    big-endian), the tiles by start (each an int64 start and its float64 fixed part), then, for views
    with lists or sketches, a JSON array of the tiles' JSON parts.
    """

    def __init__(self, spec: ViewSpec):
        self.spec = spec
        self.width = 1 + _FIXED * len(spec.moments)
        self.has_var = bool(spec.lists or spec.sketches)
        identity = np.zeros(self.width)
        identity[4::_FIXED] = np.inf
        identity[5::_FIXED] = -np.inf
        self.identity = identity
        self.slots = block_slots(spec.proto)
        self.span = self.slots * spec.interval
        self.record = np.dtype([("start", "<i8"), ("fixed", "<f8", (self.width,))])

    def decode(self, values: Sequence[bytes]) -> Blocks:
        """The tiles of stored blocks, block after block; ValueError where a block is damaged.

        A block whose tile count does not match its length (cut short, a flipped count), or whose JSON part
        is not one well-formed part per tile, is refused: its tiles would be read from a neighbour's bytes.
        """
        size = self.record.itemsize
        lengths = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
        if len(values) and lengths.min() < _HEAD:
            raise ValueError("a stored block is shorter than its tile count")
        found = np.frombuffer(b"".join([v[:_HEAD] for v in values]), dtype=">u4").astype(np.int64)
        if self.has_var:
            if (found * size > lengths - _HEAD).any():
                raise ValueError("a stored block's tiles run past its end")
            counts = found.tolist()
            joined = b"".join(v[_HEAD : _HEAD + c * size] for v, c in zip(values, counts, strict=True))
            var: list[Var] = []
            for v, c in zip(values, counts, strict=True):
                # json.loads raises ValueError (JSONDecodeError, UnicodeDecodeError) on damaged text.
                parts = json.loads(v[_HEAD + c * size :])
                if not isinstance(parts, list) or len(parts) != c or not all(map(self._var_whole, parts)):
                    raise ValueError("a stored block's JSON part is not one part per tile")
                var.extend(parts)
        else:
            if ((lengths - _HEAD) != found * size).any():
                raise ValueError("a stored block's tile count does not match its length")
            joined = b"".join(v[_HEAD:] for v in values)
            var = []
        records = np.frombuffer(joined, dtype=self.record)
        return Blocks(found, records["start"], self._deviations(records["fixed"]), var)

    @staticmethod
    def _deviations(stored: np.ndarray) -> np.ndarray:
        """Stored fixed parts with each column's squared deviations as merges and reads take them.

        A block stores them negated (their sign bit set, -0.0 for none); a block written before holds the
        column's plain sum of squares (sign bit clear), turned here into squared deviations, as precise as
        that sum was.
        """
        if not stored.shape[1] > 1:
            return stored
        fixed = stored.copy()
        squares = fixed[:, 3::_FIXED]
        counts, sums = fixed[:, 1::_FIXED], fixed[:, 2::_FIXED]
        with np.errstate(all="ignore"):
            earlier = np.where(counts > 0, squares - sums * sums / counts, 0.0)
        # Never below zero, which a merge would store with its sign bit clear, as a sum of squares.
        earlier = np.where(earlier < 0.0, 0.0, earlier)
        fixed[:, 3::_FIXED] = np.where(np.signbit(squares), -squares, earlier)
        return fixed

    def _var_whole(self, part: Any) -> bool:
        """Whether a decoded JSON part has this view's shape: its lists of [time, value] and its sketches."""
        if part is None:
            return True
        if not isinstance(part, dict) or part.keys() != {"l", "h"}:
            return False
        lists, sketches = part["l"], part["h"]
        if not isinstance(lists, list) or len(lists) != len(self.spec.lists):
            return False
        if not isinstance(sketches, list) or len(sketches) != len(self.spec.sketches):
            return False
        return all(isinstance(h, str) for h in sketches) and all(
            isinstance(items, list)
            and all(isinstance(item, list) and len(item) == 2 and type(item[0]) is int for item in items)
            for items in lists
        )

    def placed(self, blocks: Blocks, block_starts: np.ndarray | None) -> bool:
        """Whether decoded tiles start on interval starts, in order in each block, inside it where known.

        `block_starts` are the blocks' own starts (from their keys), or None where this codec's span is not
        the view's (a store merging tile updates sent as bytes). A damaged start would place a tile in
        another interval of its entity, or past its entity's run of tiles, among another entity's.
        """
        interval = self.spec.interval
        block = np.repeat(np.arange(len(blocks.counts), dtype=np.int64), blocks.counts)
        if (blocks.starts % interval).any():
            return False
        if block_starts is None:
            same = block[1:] == block[:-1]
            return not (same & (blocks.starts[1:] <= blocks.starts[:-1])).any()
        offsets = blocks.starts - np.repeat(block_starts, blocks.counts)
        if ((offsets < 0) | (offsets >= self.span)).any():
            return False
        # Tiles numbered across blocks: each after the one before it, in its block or the next.
        numbers = block * self.slots + offsets // interval
        return not (numbers[1:] <= numbers[:-1]).any()

    def encode(
        self, counts: Sequence[int], starts: np.ndarray, fixed: np.ndarray, var: Sequence[Var]
    ) -> list[bytes]:
        """The stored values of blocks holding `counts` tiles each, the tiles given in block order."""
        records = np.empty(len(starts), dtype=self.record)
        records["start"] = starts
        records["fixed"] = fixed
        # Stored negated, so that a block written before, which holds sums of squares, is told apart.
        records["fixed"][:, 3::_FIXED] = -fixed[:, 3::_FIXED]
        raw = records.tobytes()
        size = self.record.itemsize
        out: list[bytes] = []
        at = 0
        for c in counts:
            end = at + c * size
            out.append(c.to_bytes(_HEAD, "big") + raw[at:end])
            at = end
        if self.has_var:
            at = 0
            for j, c in enumerate(counts):
                out[j] += json.dumps(var[at : at + c], separators=(",", ":")).encode()
                at += c
        return out

    def merge_var(self, a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
        """The JSON part of both tiles' events."""
        if a is None or b is None:
            return a if b is None else b
        lists = [
            bounded(kind, n, x + y)
            for (_, kind, n), x, y in zip(self.spec.lists, a["l"], b["l"], strict=True)
        ]
        sketches = [union_sketches([x, y]) for x, y in zip(a["h"], b["h"], strict=True)]
        return {"l": lists, "h": sketches}

    def merge(
        self, block: np.ndarray, starts: np.ndarray, fixed: np.ndarray, var: Sequence[Var]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[Var]]:
        """Tiles sorted by block and start, those of one block and start merged (earlier first).

        Returns each merged tile's block, start, fixed part and JSON part.
        """
        # Stable: a stored tile stays before the new one of its start, as the merge adds them.
        order = np.lexsort((starts, block))
        block, starts, fixed = block[order], starts[order], fixed[order]
        new = np.ones(len(order), dtype=bool)
        new[1:] = (block[1:] != block[:-1]) | (starts[1:] != starts[:-1])
        heads = np.flatnonzero(new)
        if len(heads) == len(order):
            merged = fixed
        else:
            with np.errstate(all="ignore"):
                merged = np.add.reduceat(fixed, heads, axis=0)
                merged[:, 3::_FIXED] += spread_between(fixed, heads, merged)
                merged[:, 4::_FIXED] = np.minimum.reduceat(fixed[:, 4::_FIXED], heads, axis=0)
                merged[:, 5::_FIXED] = np.maximum.reduceat(fixed[:, 5::_FIXED], heads, axis=0)
        merged_var: list[Var] = []
        if self.has_var:
            ordered = [var[i] for i in order.tolist()]
            ends = [*heads.tolist()[1:], len(order)]
            for h, e in zip(heads.tolist(), ends, strict=True):
                one = ordered[h]
                for other in ordered[h + 1 : e]:
                    one = self.merge_var(one, other)
                merged_var.append(one)
        return block[heads], starts[heads], merged, merged_var


def spread_between(fixed: np.ndarray, heads: np.ndarray, merged: np.ndarray) -> np.ndarray:
    """What merging tiles adds to their squared deviations: each one's count times its mean's apart.

    `fixed` holds the tiles, each group of them starting at a row of `heads` and ending at the next;
    `merged` their counts and sums added up, a row per group. Squared deviations about each tile's own
    mean (Chan et al.'s merge) stay precise where a sum of squares of values far from zero loses them all.
    """
    counts, sums = fixed[:, 1::_FIXED], fixed[:, 2::_FIXED]
    sizes = np.diff(np.append(heads, len(fixed)))
    with np.errstate(all="ignore"):
        means = np.repeat(merged[:, 2::_FIXED] / merged[:, 1::_FIXED], sizes, axis=0)
        apart = np.where(counts > 0, sums / counts - means, 0.0)
        added: np.ndarray = np.add.reduceat(counts * apart * apart, heads, axis=0)
    return added


def _order(item: list[Any]) -> tuple[Any, ...]:
    # By time, then value, so that ties resolve alike whatever order the events came in.
    return (item[0], item[1])


def bounded(kind: str, n: int, items: list[list[Any]]) -> list[list[Any]]:
    """The [time, value] pairs a list of `kind` keeps: the n latest, the n earliest, or latest distinct."""
    if kind == "first":
        return sorted(items, key=_order)[:n]
    if kind == "distinct":
        latest: dict[Any, int] = {}
        for t, v in items:
            if latest.get(v, _FAR_PAST) < t:
                latest[v] = t
        items = [[t, v] for v, t in latest.items()]
    return sorted(items, key=_order, reverse=True)[:n]


def new_sketch(values: Sequence[Any]) -> str:
    """A HyperLogLog sketch of the values, serialized as base64."""
    ds = _datasketches()
    sketch = ds.hll_sketch(HLL_LG_K)
    for v in values:
        sketch.update(int(v) if isinstance(v, bool) else v)
    return base64.b64encode(sketch.serialize_compact()).decode()


def union_sketches(encoded: Sequence[str]) -> str:
    """The sketch of the union of serialized sketches."""
    ds = _datasketches()
    union = ds.hll_union(HLL_LG_K)
    for item in encoded:
        union.update(_sketch(item))
    return base64.b64encode(union.get_result().serialize_compact()).decode()


def sketch_estimate(encoded: str) -> int:
    """The distinct-count estimate of a serialized sketch."""
    return int(round(_sketch(encoded).get_estimate()))


def _sketch(encoded: str) -> Any:
    """A serialized sketch read back; ValueError where it is damaged."""
    ds = _datasketches()
    try:
        return ds.hll_sketch.deserialize(base64.b64decode(encoded, validate=True))
    except (ValueError, IndexError, RuntimeError) as e:
        # datasketches refuses bytes cut short or flipped with these; the caller says which view is damaged.
        raise ValueError(f"a stored sketch is damaged: {e}") from None


def merge_spec(
    name: str,
    interval: int,
    longest_window: int,
    moments: tuple[str, ...],
    lists: tuple[tuple[str, str, int], ...],
    sketches: tuple[str, ...],
) -> ViewSpec:
    """The parts of a view's spec that merging its tiles reads, for a store that gets tile updates as bytes.

    Only the interval, the longest window and the tile layout (moment, list and sketch columns) are real;
    the source, fields and features stay empty, since a merge never reads them.
    """
    window = AggSpec("", "", 0, 0, longest_window, Kind.INT64)
    empty = fv_pb2.StreamFeatureView()
    return ViewSpec(name, "", (), "", (), (window,), interval, moments, lists, sketches, empty)


# --- the view's state ----------------------------------------------------------------------------


# The bounds of a stored time or range end: int64 microseconds, as the tiles' starts they are compared with.
_INT64 = (-(1 << 63), 1 << 63)


def damaged_view_state(view: str) -> DataLoss:
    """The error of a push or backfill that met a view's stored state (watermark and ranges) damaged."""
    return DataLoss(
        f"the stored state of feature view {view!r} (its watermark and backfilled ranges) is damaged; pushes "
        "and backfills of its source are refused until it is rebuilt, while reads of its tiles go on. Delete "
        "the view with `featurepush delete-view` (after removing it from any feature service that serves "
        "it) and apply it again, then backfill its source, where it has a batch_config, to fill its earlier "
        "tiles again",
        reason="DAMAGED_VIEW_STATE",
        metadata={"view": view},
    )


def _int64(value: Any) -> bool:
    # bool is an int to Python, and JSON's true is no time.
    return type(value) is int and _INT64[0] <= value < _INT64[1]


def _span(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and _int64(value[0]) and _int64(value[1])


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # A key written twice is damage: "c" changed to "w" would otherwise read as a state without a check.
    doc = dict(pairs)
    if len(doc) != len(pairs):
        raise ValueError("a key appears twice")
    return doc


def _state_sum(watermark: int | None, done: list[list[int]], running: dict[str, list[int]]) -> int:
    """The CRC-32 stored with a state: JSON keeps no check of its own, and a changed digit still parses."""
    return zlib.crc32(json.dumps([watermark, done, running], separators=(",", ":")).encode())


@dataclass
class ViewState:
    """A view's watermark (tile start) and its backfilled and running ranges of tile starts.

    Stored as JSON with a CRC-32 of its values under "c"; a state written before the check was added has
    none, and is taken on its shape alone.
    """

    watermark: int | None = None
    done: list[list[int]] = field(default_factory=list)
    running: dict[str, list[int]] = field(default_factory=dict)

    @classmethod
    def parse(cls, raw: bytes | None, view: str) -> ViewState:
        """The stored state of `view`, or a new one where none is; DataLoss where the bytes are damaged."""
        if raw is None:
            return cls()
        try:
            doc = json.loads(raw, object_pairs_hook=_unique_keys)
        except (ValueError, RecursionError):
            # ValueError covers JSONDecodeError and UnicodeDecodeError: bytes cut short or overwritten.
            raise damaged_view_state(view) from None
        if not isinstance(doc, dict) or not {"w", "done", "run"} <= doc.keys() <= {"w", "done", "run", "c"}:
            raise damaged_view_state(view)
        watermark, done, running = doc["w"], doc["done"], doc["run"]
        whole = (
            (watermark is None or _int64(watermark))
            and isinstance(done, list)
            and all(map(_span, done))
            and isinstance(running, dict)
            and all(map(_span, running.values()))
        )
        if "c" in doc:
            whole = whole and type(doc["c"]) is int and doc["c"] == _state_sum(watermark, done, running)
        if not whole:
            raise damaged_view_state(view)
        return cls(watermark, done, running)

    def dump(self) -> bytes:
        """The state as stored, with its check."""
        doc = {
            "w": self.watermark,
            "done": self.done,
            "run": self.running,
            "c": _state_sum(self.watermark, self.done, self.running),
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    @property
    def frozen(self) -> bool:
        """Whether a backfill has used the watermark, so it may no longer move."""
        return bool(self.done or self.running)

    def backfilled(self, start: int) -> bool:
        """Whether an earlier backfill filled the tile starting at `start`."""
        return any(lo <= start < hi for lo, hi in self.done)


def begin_backfill(store: TileStore, view: View, start: int | None, end: int | None) -> str:
    """Record a backfill of the tiles wholly inside [start, end) before the watermark; return its id.

    Refused while an overlapping backfill runs or was interrupted: its partial tiles would count twice.
    """
    interval = view.spec.interval
    run = uuid.uuid4().hex
    problem: list[str] = []

    def change(raw: bytes | None) -> bytes | None:
        # A store may call this again on a newer state (a remote store compares and sets).
        problem.clear()
        state = ViewState.parse(raw, view.spec.name)
        if state.watermark is None:
            state.watermark = floor_to(now_micros(), interval)
        lo = _FAR_PAST if start is None else -(-start // interval) * interval
        hi = state.watermark if end is None else min(floor_to(end, interval), state.watermark)
        for other_lo, other_hi in state.running.values():
            if lo < other_hi and other_lo < hi:
                problem.append(f"[{other_lo}, {other_hi})")
                return None
        state.running[run] = [lo, hi]
        return state.dump()

    store.update_view_state(view.id, change)
    if problem:
        raise FailedPrecondition(
            f"feature view {view.spec.name!r} has a backfill of tile starts {problem[0]} (microseconds) that "
            "is running or was interrupted, and its tiles may be partly written; wait for it, or delete the "
            "view and apply it again to rebuild its tiles",
            reason="VIEW_BACKFILL_INCOMPLETE",
            metadata={"view": view.spec.name},
        )
    return run


def begin_backfills(
    store: TileStore, views: Sequence[View], start: int | None, end: int | None
) -> dict[int, str]:
    """Begin a backfill run on every view (begin_backfill), by view id; none stays where one is refused."""
    runs: dict[int, str] = {}
    try:
        for view in views:
            runs[view.id] = begin_backfill(store, view, start, end)
    except Exception:
        # The runs begun wrote nothing; left recorded as running, they would refuse every later backfill.
        for view in views:
            if view.id in runs:
                # Where the store fails now too, the run stays recorded as an interrupted one is.
                with contextlib.suppress(CoreError):
                    end_backfill(store, view, runs[view.id], filled=False)
        raise
    return runs


def end_backfill(store: TileStore, view: View, run: str, *, filled: bool = True) -> None:
    """Record a finished backfill's range as filled, or forget a run that wrote nothing (`filled` False)."""

    def change(raw: bytes | None) -> bytes | None:
        state = ViewState.parse(raw, view.spec.name)
        span = state.running.pop(run, None)
        if span is None:
            return None
        if filled and span[0] < span[1]:
            spans = sorted([*state.done, span])
            merged: list[list[int]] = []
            for lo, hi in spans:
                if merged and lo <= merged[-1][1]:
                    merged[-1][1] = max(merged[-1][1], hi)
                else:
                    merged.append([lo, hi])
            state.done = merged
        return state.dump()

    store.update_view_state(view.id, change)


# --- building a batch's tiles --------------------------------------------------------------------


def transformed(view: View, table: pa.Table, timestamp_field: str, where: str) -> tuple[pa.Table, pa.Table]:
    """The view's transformation of a validated batch, and its view columns cast; raise on failure."""
    from .columns import conform

    spec = view.spec
    meta = {"view": spec.name, "batch": where, "transformation": spec.transformation}
    out = table
    if view.transform is not None:
        try:
            out = view.transform(table)
        except Exception as e:
            raise FailedPrecondition(
                f"the transformation {spec.transformation!r} of feature view {spec.name!r} failed on "
                f"{where}: {type(e).__name__}: {e}; nothing was written",
                reason="TRANSFORMATION_FAILED",
                metadata=meta,
            ) from None
        if not isinstance(out, pa.Table):
            raise FailedPrecondition(
                f"the transformation {spec.transformation!r} of feature view {spec.name!r} returned "
                f"{type(out).__name__}, not a pyarrow.Table, on {where}; nothing was written",
                reason="TRANSFORMATION_FAILED",
                metadata=meta,
            )
    changed = [
        c
        for c in (*spec.entity_keys, timestamp_field)
        if c not in out.column_names or out.schema.field(c).type != table.schema.field(c).type
    ]
    if changed:
        raise FailedPrecondition(
            f"the transformation of feature view {spec.name!r} dropped or changed the type of the entity key "
            f"or event time column(s) {changed} on {where}; nothing was written",
            reason="TRANSFORMATION_FAILED",
            metadata=meta,
        )
    conformed, bad = conform(out, spec.fields, f"view {spec.name}", allow_extra_columns=True)
    if conformed is None:
        raise FailedPrecondition(
            f"the output of feature view {spec.name!r} on {where} does not match its schema: "
            + "; ".join(f"{v.path}: {v.description}" for v in bad[:5])
            + "; nothing was written",
            reason="TRANSFORMATION_FAILED",
            metadata=meta,
        )
    return out, conformed


@dataclass
class ViewTiles:
    """One view's partial aggregates of one batch: the TileUpdate the store merges under its lock.

    Row i is the tile of one entity starting at `starts[i]`; `keys[i]` is the key of the block holding
    it, and `blocks[i]` a number that rows of the same block share (numbered from the keys when absent).
    """

    view: str
    view_id: int
    generation: int
    spec: ViewSpec
    codec: Codec
    keys: list[bytes]
    starts: np.ndarray
    rows: np.ndarray
    fixed: np.ndarray
    var: list[dict[str, Any] | None]
    # The backfill run these tiles belong to, or "" for a push.
    run: str = ""
    blocks: np.ndarray | None = None

    def merge(self, state: bytes | None, read: Callable[[list[bytes]], list[bytes | None]]) -> TileMerge:
        """Merge into the stored blocks the tiles this write may add; skipped records are counted."""
        spec = self.spec
        # A damaged state refuses the write, even one that would only move the watermark: nothing else
        # records the backfilled ranges or whether the watermark froze, and a guess would count events twice
        # or skip them.
        parsed = ViewState.parse(state, self.view)
        oldest = floor_to(now_micros(), spec.interval) - spec.longest_window
        keep = self.starts >= oldest
        if self.run:
            span = parsed.running.get(self.run)
            if span is None:
                keep[:] = False
            else:
                keep &= (self.starts >= span[0]) & (self.starts < span[1])
                keep &= ~np.array([parsed.backfilled(int(s)) for s in self.starts], dtype=bool)
        elif parsed.frozen and parsed.watermark is not None:
            keep &= self.starts >= parsed.watermark
        skipped = int(self.rows[~keep].sum())
        index = np.flatnonzero(keep)
        new_state = state
        if not self.run and not parsed.frozen and len(index):
            first = int(self.starts[index].min())
            if parsed.watermark is None or first < parsed.watermark:
                parsed.watermark = first
                new_state = parsed.dump()
        if not len(index):
            return TileMerge([], [], new_state, skipped)
        if self.blocks is None:
            numbers: dict[bytes, int] = {}
            self.blocks = np.fromiter(
                (numbers.setdefault(k, len(numbers)) for k in self.keys), dtype=np.int64, count=len(self.keys)
            )
        _, firsts, inverse = np.unique(self.blocks[index], return_index=True, return_inverse=True)
        keys = [self.keys[i] for i in index[firsts].tolist()]
        stored = read(keys)
        found = [j for j, v in enumerate(stored) if v is not None]
        codec = self.codec
        try:
            old = codec.decode([v for v in stored if v is not None])
            if not codec.placed(old, None):
                raise ValueError("a stored tile is out of place")
        except ValueError:
            # Merged, a damaged block would be written back as garbage: the write is refused whole.
            raise damaged_tiles(self.view) from None
        # The stored tiles first, so that a tile's merge adds the new partial aggregates to the stored ones.
        block = np.concatenate([np.repeat(np.array(found, dtype=np.int64), old.counts), inverse.reshape(-1)])
        starts = np.concatenate([old.starts, self.starts[index]])
        fixed = np.concatenate([old.fixed, self.fixed[index]])
        var = [*old.var, *(self.var[i] for i in index.tolist())] if codec.has_var else []
        try:
            block, starts, fixed, merged_var = codec.merge(block, starts, fixed, var)
        except (ValueError, TypeError):
            # A stored sketch that does not read back, or list values of mixed types that do not sort.
            raise damaged_tiles(self.view) from None
        counts = np.bincount(block, minlength=len(keys)).tolist()
        return TileMerge(keys, codec.encode(counts, starts, fixed, merged_var), new_state, skipped)


def build_tiles(
    view: View, store: TileStore, source_table: pa.Table, timestamp_field: str, where: str, run: str = ""
) -> ViewTiles:
    """The tiles one batch adds to a view, after the view's transformation."""
    spec = view.spec
    out, table = transformed(view, source_table, timestamp_field, where)
    codec = Codec(spec)
    micros = pc.cast(out.column(timestamp_field), pa.int64()).to_numpy(zero_copy_only=False)
    entities = pc.dictionary_encode(
        encode_keys([out.column(k).combine_chunks() for k in spec.entity_keys], b"")
    )
    codes = entities.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    slots = micros // spec.interval
    # A transformation may drop every record.
    first_slot = int(slots.min()) if len(slots) else 0
    span = int(slots.max()) - first_slot + 1 if len(slots) else 1
    # One number per (entity, tile), so that numpy finds the groups without a Python loop.
    unique, idx = np.unique(codes * span + (slots - first_slot), return_inverse=True)
    idx = idx.reshape(-1)
    m = len(unique)
    names = entities.dictionary.to_pylist()
    group_entities = [names[e] for e in (unique // span).tolist()]
    starts = (unique % span + first_slot) * spec.interval
    fixed = np.tile(codec.identity, (m, 1))
    fixed[:, 0] = np.bincount(idx, minlength=m)
    kinds = {f.name: f.dtype.kind for f in spec.fields}
    for c, name in enumerate(spec.moments):
        column = table.column(name)
        valid = column.is_valid().to_numpy(zero_copy_only=False)
        base = 1 + _FIXED * c
        fixed[:, base] = np.bincount(idx, weights=valid.astype(np.float64), minlength=m)
        if kinds[name] not in NUMERIC_KINDS:
            # Only counted (count is the one moment function of other columns), and a String has no number.
            continue
        # Integers past 2^53 take their nearest float64, as every sum and extreme of a window is one: a
        # checked cast refused the whole push to the source.
        values = pc.cast(column, pa.float64(), safe=False).to_numpy(zero_copy_only=False)
        v = np.where(valid, values, 0.0)
        fixed[:, base + 1] = np.bincount(idx, weights=v, minlength=m)
        with np.errstate(all="ignore"):
            # About each tile's mean (see spread_between), NaN and infinities giving NaN as they would.
            apart = np.where(valid, v - (fixed[:, base + 1] / fixed[:, base])[idx], 0.0)
            fixed[:, base + 2] = np.bincount(idx, weights=apart * apart, minlength=m)
            np.minimum.at(fixed[:, base + 3], idx[valid], values[valid])
            np.maximum.at(fixed[:, base + 4], idx[valid], values[valid])
    var: list[dict[str, Any] | None] = [None] * m
    if codec.has_var:
        times = micros.tolist()
        order = idx.tolist()
        lists: list[list[list[list[Any]]]] = [[[] for _ in spec.lists] for _ in range(m)]
        for j, (name, _, _) in enumerate(spec.lists):
            for g, t, v in zip(order, times, table.column(name).to_pylist(), strict=True):
                if v is not None:
                    lists[g][j].append([t, v])
        distinct: list[list[list[Any]]] = [[[] for _ in spec.sketches] for _ in range(m)]
        for j, name in enumerate(spec.sketches):
            for g, v in zip(order, table.column(name).to_pylist(), strict=True):
                if v is not None:
                    distinct[g][j].append(v)
        var = [
            {
                "l": [
                    bounded(kind, n, items) for (_, kind, n), items in zip(spec.lists, lists[g], strict=True)
                ],
                "h": [new_sketch(items) for items in distinct[g]],
            }
            for g in range(m)
        ]
    # The block of each tile, numbered like the groups: entity first, then block start.
    block_starts = starts // codec.span * codec.span
    low = int(block_starts.min()) if m else 0
    per_entity = (int(block_starts.max()) - low) // codec.span + 1 if m else 1
    blocks = unique // span * per_entity + (block_starts - low) // codec.span
    keys = store.tile_keys(view.id, group_entities, block_starts)
    rows = fixed[:, 0].copy()
    name, generation = spec.name, view.generation
    return ViewTiles(name, view.id, generation, spec, codec, keys, starts, rows, fixed, var, run, blocks)


class TileWriter:
    """Adds every feature view's tiles of a source's records to the write (a Materializer writer)."""

    def __init__(self, views: Views, store: TileStore):
        self._views = views
        self._store = store

    def stage(self, staged: Staged) -> None:
        """Append one tile update per view of the source; a backfill only for views it began a run on."""
        if staged.num_rows == 0:
            return
        spec = staged.source.spec
        for view in self._views.of_source(spec.name):
            run = staged.runs.get(view.id, "")
            if staged.origin is Origin.BACKFILL and not run:
                continue
            where = f"a {staged.origin.value} batch of {staged.num_rows} records"
            staged.tiles.append(
                build_tiles(view, self._store, staged.table, spec.timestamp_field, where, run)
            )


def _micros(duration: Any) -> int:
    return int(duration.seconds) * 1_000_000 + int(duration.nanos) // 1000


def sweep_tiles(store: TileStore, now: int | None = None) -> int:
    """Delete every view's blocks whose tiles are all outside every window read now (or at `now`).

    Returns how many tiles the deleted blocks held. Windows come from the stored definitions alone, so a
    process that never loads the views' transformations (the store owner of serve --processes) sweeps too.
    """
    deleted = 0
    now = now_micros() if now is None else now
    for _, view_id, raw in store.list_views():
        proto = fv_pb2.StreamFeatureView.FromString(raw)
        interval = _micros(proto.aggregation_interval)
        longest = max((_micros(a.time_window) for a in proto.aggregations), default=0)
        if interval > 0:
            oldest = floor_to(now, interval) - longest
            # A block starting at s ends at s + span: it is wholly before `oldest` when s <= oldest - span.
            deleted += store.delete_tiles_before(view_id, oldest - block_slots(proto) * interval + 1)
    return deleted
