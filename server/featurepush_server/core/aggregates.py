"""Reading stream feature views: tiles rolled up over each feature's window, one vector per entity.

A window of length w read at time T covers the tiles starting in [E - w, E), where E is the start of
the tile holding T: it never includes an event after T, and its values change once per tile interval.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, cast

import numpy as np
import pyarrow as pa
from google.protobuf import struct_pb2

from featurepush.v1 import feature_view_pb2 as fv_pb2
from featurepush.v1 import feature_view_service_pb2 as pb
from featurepush.v1 import online_service_pb2, schema_pb2

from .encoding import key_part, python_key
from .errors import InvalidInput, LimitExceeded, Violation
from .online import check_key_count
from .rows import BadValue, scalar_converter
from .schema import Kind
from .stores.base import TileStore
from .tiles import Codec, bounded, damaged_tiles, floor_to, now_micros, sketch_estimate, union_sketches
from .times import MIN_MICROS, request_micros
from .view_reply import Feature, arrow_columns, arrow_vectors, int64_text, vectors
from .views import LIST_FUNCTIONS, MAX_INTERVAL, AggSpec, View, Views, ViewSpec
from .wire import VIEW_FEATURES_ARROW_IPC, VIEW_REQUEST_KEYS, string_keys_between, varint

F = fv_pb2
_PRESENT = online_service_pb2.FEATURE_STATUS_PRESENT
_MISSING = online_service_pb2.FEATURE_STATUS_MISSING
_INT_KINDS = (Kind.INT32, Kind.INT64)
# A tile's partial aggregates per moment column, after its record count: count, sum, squared deviations
# from the tile's mean, min and max (tiles.py).
_PER_COLUMN = 5
_SCALAR = {
    Kind.STRING: schema_pb2.SCALAR_TYPE_STRING,
    Kind.INT32: schema_pb2.SCALAR_TYPE_INT32,
    Kind.INT64: schema_pb2.SCALAR_TYPE_INT64,
    Kind.FLOAT32: schema_pb2.SCALAR_TYPE_FLOAT32,
    Kind.FLOAT64: schema_pb2.SCALAR_TYPE_FLOAT64,
    Kind.BOOL: schema_pb2.SCALAR_TYPE_BOOL,
}


def feature_type(agg: AggSpec) -> schema_pb2.DataType:
    """The type of an aggregation's values."""
    fn = agg.function
    if fn in (F.AGGREGATE_FUNCTION_COUNT, F.AGGREGATE_FUNCTION_APPROX_COUNT_DISTINCT):
        return schema_pb2.DataType(scalar=schema_pb2.SCALAR_TYPE_INT64)
    if fn in (F.AGGREGATE_FUNCTION_MEAN, F.AGGREGATE_FUNCTION_STDDEV):
        return schema_pb2.DataType(scalar=schema_pb2.SCALAR_TYPE_FLOAT64)
    if fn == F.AGGREGATE_FUNCTION_SUM:
        kind = Kind.INT64 if agg.kind in _INT_KINDS else Kind.FLOAT64
        return schema_pb2.DataType(scalar=_SCALAR[kind])
    scalar = schema_pb2.DataType(scalar=_SCALAR[agg.kind])
    if fn in (F.AGGREGATE_FUNCTION_MIN, F.AGGREGATE_FUNCTION_MAX):
        return scalar
    return schema_pb2.DataType(array=schema_pb2.ArrayType(element_type=scalar))


def _json_value(value: Any, kind: Kind) -> struct_pb2.Value:
    """A value in canonical JSON form: Int64 as a decimal string, non-finite floats as strings."""
    if value is None:
        return struct_pb2.Value(null_value=struct_pb2.NULL_VALUE)
    if isinstance(value, list):
        return struct_pb2.Value(list_value=struct_pb2.ListValue(values=[_json_value(v, kind) for v in value]))
    if isinstance(value, bool):
        return struct_pb2.Value(bool_value=value)
    if isinstance(value, str):
        return struct_pb2.Value(string_value=value)
    if kind is Kind.INT64:
        return struct_pb2.Value(string_value=int64_text(value))
    if kind is Kind.INT32:
        return struct_pb2.Value(number_value=int(value))
    if math.isfinite(value):
        return struct_pb2.Value(number_value=value)
    return struct_pb2.Value(
        string_value="NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
    )


_ARROW_SCALARS = {
    schema_pb2.SCALAR_TYPE_INT64: pa.int64(),
    schema_pb2.SCALAR_TYPE_INT32: pa.int32(),
    schema_pb2.SCALAR_TYPE_FLOAT64: pa.float64(),
    schema_pb2.SCALAR_TYPE_FLOAT32: pa.float32(),
    schema_pb2.SCALAR_TYPE_BOOL: pa.bool_(),
    schema_pb2.SCALAR_TYPE_STRING: pa.string(),
}


def _arrow_type(t: schema_pb2.DataType) -> pa.DataType:
    """The Arrow type of a feature's values: a scalar, or a list of one (list kinds are scalars)."""
    if t.HasField("array"):
        return pa.list_(_ARROW_SCALARS[t.array.element_type.scalar])
    return _ARROW_SCALARS[t.scalar]


def value_kind(agg: AggSpec) -> Kind:
    """The scalar kind of an aggregation's values (of their elements, for lists)."""
    t = feature_type(agg)
    scalar = t.array.element_type.scalar if t.HasField("array") else t.scalar
    return next(k for k, s in _SCALAR.items() if s == scalar)


def roll_up(
    view: View, store: TileStore, entities: Sequence[bytes], aggs: Sequence[AggSpec], at: int
) -> list[Feature]:
    """The features `aggs` of every entity over the windows ending at the tile holding `at` (microseconds)."""
    return _Layout(view, aggs).roll_up(store, entities, at)


class _Moments:
    """The moment features of one window length: where each feature's values come from in a _Window.

    Every such feature is gathered at once into one (features, entities) array per read.
    """

    def __init__(self, spec: ViewSpec, aggs: Sequence[AggSpec], positions: list[int]):
        self.positions = positions
        found = [_moment_source(agg, spec.moments.index(agg.column)) for agg in aggs]
        # The _Window arrays these features need, in _Window.SOURCES order, side by side in one row per
        # entity: each feature's column in that row.
        self.sources = tuple(name for name in _Window.SOURCES if any(name == f[0] for f in found))
        widths = {"totals": 1 + _PER_COLUMN * len(spec.moments)}
        starts: dict[str, int] = {}
        at = 0
        for name in self.sources:
            starts[name] = at
            at += widths.get(name, len(spec.moments))
        self.take = np.array([starts[name] + column for name, column, _ in found], dtype=np.int64)
        self.columns = np.array([spec.moments.index(agg.column) for agg in aggs], dtype=np.int64)
        self.counts_and_sums = np.array(
            [
                j
                for j, agg in enumerate(aggs)
                if agg.function in (F.AGGREGATE_FUNCTION_COUNT, F.AGGREGATE_FUNCTION_SUM)
            ],
            dtype=np.int64,
        )
        self.kinds = [kind for _, _, kind in found]

    def values(self, window: _Window) -> tuple[np.ndarray, np.ndarray]:
        """Every entity's values of these features, and where they are set, each (features, entities)."""
        arrays = window.sources(self.sources)
        side = arrays[0] if len(arrays) == 1 else np.hstack(arrays)
        numbers = side.T[self.take]
        has = window.has.T[self.columns]
        # A count or a sum is set wherever the window holds events, even without values of its column.
        has[self.counts_and_sums] = True
        has &= window.present
        return numbers, has


class _Layout:
    """What every read of some aggregations of one view shares: its codec and where each feature comes from.

    Built from the view alone, so a reader keeps one per view object (a changed view is a new object).
    """

    def __init__(self, view: View, aggs: Sequence[AggSpec]):
        spec = view.spec
        self.view = view
        self.aggs = list(aggs)
        self.codec = Codec(spec)
        self.longest = max(a.window for a in aggs)
        groups: dict[int, list[int]] = {}
        for i, agg in enumerate(aggs):
            if agg.function not in _LIST_OR_SKETCH:
                groups.setdefault(agg.window // spec.interval, []).append(i)
        self.moments = {k: _Moments(spec, [aggs[i] for i in which], which) for k, which in groups.items()}
        self.others = [(i, agg) for i, agg in enumerate(aggs) if agg.function in _LIST_OR_SKETCH]
        self.headers: dict[bool, bytes] = {}
        self.arrow_fields: dict[bool, list[pa.Field]] = {}

    def header(self, qualified: bool) -> bytes:
        """The `features` entries of these aggregations, serialized; named view.feature if qualified."""
        found = self.headers.get(qualified)
        if found is None:
            response = pb.GetViewFeaturesResponse()
            for agg in self.aggs:
                name = f"{self.view.spec.name}.{agg.name}" if qualified else agg.name
                response.features.add(name=name, type=feature_type(agg))
            found = self.headers[qualified] = response.SerializeToString()
        return found

    def fields(self, qualified: bool) -> list[pa.Field]:
        """The Arrow fields of these aggregations' values, named as in `header`."""
        found = self.arrow_fields.get(qualified)
        if found is None:
            name = self.view.spec.name
            found = self.arrow_fields[qualified] = [
                pa.field(f"{name}.{agg.name}" if qualified else agg.name, _arrow_type(feature_type(agg)))
                for agg in self.aggs
            ]
        return found

    def roll_up(self, store: TileStore, entities: Sequence[bytes], at: int) -> list[Feature]:
        """The features of every entity over the windows ending at the tile holding `at` (microseconds)."""
        view = self.view
        spec = view.spec
        interval = spec.interval
        end = floor_to(at, interval)
        first = end - self.longest
        codec = self.codec
        n = len(entities)
        owners, block_starts, stored = _blocks(view, store, codec, entities, first, end - interval)
        try:
            blocks = codec.decode(stored)
            if not codec.placed(blocks, block_starts):
                raise ValueError("a stored tile is out of place")
        except ValueError:
            raise damaged_tiles(spec.name) from None
        # Each tile's place in a grid of entities by the intervals of the blocks read. The tiles come in
        # the grid's order (entity by entity, each one's blocks and the tiles of a block by start), so a
        # window's tiles are one run of rows per entity, found by a search.
        low = floor_to(first, codec.span)
        columns = (floor_to(end - interval, codec.span) + codec.span - low) // interval
        places = np.repeat(owners * columns, blocks.counts) + (blocks.starts - low) // interval
        rows = np.arange(n, dtype=np.int64) * columns
        stop = np.searchsorted(places, rows + (end - low) // interval)
        windows: dict[int, _Window] = {}

        def window_of(k: int) -> _Window:
            window = windows.get(k)
            if window is None:
                start = np.searchsorted(places, rows + (end - k * interval - low) // interval)
                window = windows[k] = _Window(blocks.fixed, start, stop)
            return window

        out: list[Feature | None] = [None] * len(self.aggs)
        for k, moments in self.moments.items():
            window = window_of(k)
            numbers, has = moments.values(window)
            for j, (i, kind) in enumerate(zip(moments.positions, moments.kinds, strict=True)):
                out[i] = Feature(window.present, end, numbers[j], has[j], kind)
        if self.others:
            # The tiles inside the longest window, entity by entity and by start (as the blocks come): each
            # entity's are one run, found by a search. A grid of every entity's window slots would take 8
            # bytes per slot whether a tile is stored or not (10 GB for 10,000 keys of a 90-day window of
            # 1-minute tiles), so only the tiles stored are visited.
            inside = np.flatnonzero((blocks.starts >= first) & (blocks.starts < end))
            tile_owner = np.repeat(owners, blocks.counts)[inside]
            tile_start = blocks.starts[inside]
            bounds = np.searchsorted(tile_owner, np.arange(n + 1, dtype=np.int64)).tolist()
            for index, agg in self.others:
                k = agg.window // interval
                present = window_of(k).present
                kind = value_kind(agg)
                serialized, objects = [], []
                for i in range(n):
                    found = None
                    if present[i]:
                        lo, hi = bounds[i], bounds[i + 1]
                        at = lo + int(np.searchsorted(tile_start[lo:hi], end - k * interval))
                        parts = [blocks.var[j] for j in inside[at:hi].tolist()]
                        try:
                            found = _from_var(view, agg, [p for p in parts if p])
                        except (ValueError, TypeError):
                            # A stored sketch that does not read back, or list values of mixed types.
                            raise damaged_tiles(spec.name) from None
                    serialized.append(_json_value(found, kind).SerializeToString())
                    objects.append(found)
                out[index] = Feature(present, end, values=serialized, objects=objects)
        return [f for f in out if f is not None]


# Up to this many blocks per entity, a read names every block key in one multi-get; beyond, it scans.
_MULTI_GET_BLOCKS = 8


def _blocks(
    view: View, store: TileStore, codec: Codec, entities: Sequence[bytes], first: int, last: int
) -> tuple[np.ndarray, np.ndarray, list[bytes]]:
    """The stored blocks of each entity's tiles starting in [first, last], each one's entity and start."""
    span = codec.span
    low = floor_to(first, span)
    per_entity = (floor_to(last, span) - low) // span + 1
    n = len(entities)
    if per_entity > _MULTI_GET_BLOCKS:
        counts, block_starts, values = store.scan_tiles(view.id, entities, low, floor_to(last, span))
        return np.repeat(np.arange(n, dtype=np.int64), counts), block_starts, values
    if per_entity == 1:
        starts = np.full(n, low, dtype=np.int64)
        named = entities
    else:
        starts = np.tile(np.arange(per_entity, dtype=np.int64) * span + low, n)
        named = [e for e in entities for _ in range(per_entity)]
    keys = store.tile_keys(view.id, named, starts)
    stored = store.read_tiles(keys)
    if None not in stored:
        # Every entity has every block: the common case of a read of active entities.
        return np.arange(len(stored), dtype=np.int64) // per_entity, starts, cast(list[bytes], stored)
    present = np.array([j for j, v in enumerate(stored) if v is not None], dtype=np.int64)
    return present // per_entity, starts[present], [v for v in stored if v is not None]


class _Window:
    """Every entity's tiles in a window of one length, and their moments for every column at once.

    Each entity's tiles are the rows [start, stop) of `tiles`, the tiles read; an empty run has none.
    """

    # The arrays of moments a feature's values come from (`sources`).
    SOURCES = ("totals", "mins", "maxes", "means", "stddevs")

    def __init__(self, tiles: np.ndarray, start: np.ndarray, stop: np.ndarray):
        self.tiles = tiles
        self.start, self.stop = start, stop
        bounds = np.empty(2 * len(start), dtype=np.int64)
        bounds[0::2] = start
        bounds[1::2] = stop
        # Every other reduction is of the tiles between two runs, left out. reduceat takes no index past
        # the last row: a run that ends there needs no end, and a run that starts there is empty.
        self.bounds = bounds[: np.searchsorted(bounds, len(tiles))]
        self.empty = start == stop
        # Whether every entity has tiles here, as in most reads: then the reductions need no placing.
        self.every = not np.count_nonzero(self.empty)
        self.totals = self._reduce(np.add, tiles, 0.0)
        self.present: np.ndarray = self.totals[:, 0] > 0
        self.counts = self.totals[:, 1::_PER_COLUMN]
        self.has: np.ndarray = self.counts > 0

    def _reduce(self, ufunc: np.ufunc, part: np.ndarray, empty: float) -> np.ndarray:
        """Each entity's reduction of the rows of `part` in its run; `empty` where the run has none.

        reduceat reduces each run as it would the run alone (in its own order of operations), so the
        rows between runs change nothing, to the last bit.
        """
        reduced: np.ndarray = ufunc.reduceat(part, self.bounds, axis=0)[::2] if len(self.bounds) else part[:0]
        if self.every:
            return reduced
        found = np.full((len(self.empty), part.shape[1]), empty)
        found[: len(reduced)] = reduced
        found[self.empty] = empty
        return found

    def sources(self, names: Sequence[str]) -> list[np.ndarray]:
        """The arrays `names` (of SOURCES), each a row per entity and a column per moment column.

        Means and standard deviations are NaN without values; a column's minimum and maximum are
        infinite then.
        """
        found: list[np.ndarray] = []
        with np.errstate(all="ignore"):
            if "means" in names or "stddevs" in names:
                means: np.ndarray = self.totals[:, 2::_PER_COLUMN] / self.counts
            for name in names:
                if name == "totals":
                    found.append(self.totals)
                elif name == "mins":
                    found.append(self._reduce(np.minimum, self.tiles[:, 4::_PER_COLUMN], np.inf))
                elif name == "maxes":
                    found.append(self._reduce(np.maximum, self.tiles[:, 5::_PER_COLUMN], -np.inf))
                elif name == "means":
                    found.append(means)
                else:
                    # The population standard deviation.
                    found.append(np.sqrt(self._deviations(means) / self.counts))
        return found

    def _deviations(self, means: np.ndarray) -> np.ndarray:
        """Each entity's squared deviations from its window's `means`, per column (tiles.spread_between).

        Its tiles' own, plus each tile's count times its mean's squared distance from the window's.
        """
        tiles = self.tiles
        lengths = self.stop - self.start
        # Every row of a run, run after run, and each such row's entity's window means.
        rows = np.repeat(self.start - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
        window_means = np.zeros((len(tiles), means.shape[1]))
        window_means[rows] = np.repeat(means, lengths, axis=0)
        counts = tiles[:, 1::_PER_COLUMN]
        apart = np.where(counts > 0, tiles[:, 2::_PER_COLUMN] / counts - window_means, 0.0)
        between: np.ndarray = self._reduce(np.add, counts * apart * apart, 0.0)
        found: np.ndarray = self.totals[:, 3::_PER_COLUMN] + between
        return found


def _moment_source(agg: AggSpec, column: int) -> tuple[str, int, Kind]:
    """Where a moment aggregation's values are in a _Window: the array, its column, and the kind written."""
    fn = agg.function
    integral = agg.kind in _INT_KINDS
    if fn == F.AGGREGATE_FUNCTION_COUNT:
        return "totals", 1 + _PER_COLUMN * column, Kind.INT64
    if fn == F.AGGREGATE_FUNCTION_SUM:
        return "totals", 2 + _PER_COLUMN * column, Kind.INT64 if integral else Kind.FLOAT64
    if fn in (F.AGGREGATE_FUNCTION_MIN, F.AGGREGATE_FUNCTION_MAX):
        kind = Kind.FLOAT64
        if integral:
            kind = Kind.INT64 if agg.kind is Kind.INT64 else Kind.INT32
        return "mins" if fn == F.AGGREGATE_FUNCTION_MIN else "maxes", column, kind
    return "means" if fn == F.AGGREGATE_FUNCTION_MEAN else "stddevs", column, Kind.FLOAT64


_LIST_OR_SKETCH = {
    F.AGGREGATE_FUNCTION_LAST_N,
    F.AGGREGATE_FUNCTION_FIRST_N,
    F.AGGREGATE_FUNCTION_LAST_DISTINCT_N,
    F.AGGREGATE_FUNCTION_APPROX_COUNT_DISTINCT,
}


def _from_var(view: View, agg: AggSpec, parts: list[dict[str, Any]]) -> Any:
    spec = view.spec
    if agg.function == F.AGGREGATE_FUNCTION_APPROX_COUNT_DISTINCT:
        j = spec.sketches.index(agg.column)
        sketches = [p["h"][j] for p in parts]
        if not sketches:
            return 0
        return sketch_estimate(sketches[0] if len(sketches) == 1 else union_sketches(sketches))
    kind = LIST_FUNCTIONS[agg.function]
    j = next(i for i, (c, k, _) in enumerate(spec.lists) if c == agg.column and k == kind)
    items = [item for p in parts for item in p["l"][j]]
    return [v for _, v in bounded(kind, agg.n, items)]


# Reads of at most this many keys visit the parsed keys: serializing the request costs more than it saves.
_PARSED_KEYS = 2
# Layouts a reader keeps before it forgets them all.
_MAX_LAYOUTS = 1024
# The fewest bytes one feature of one entity takes in a reply of either form: in the Struct form its
# entry's tag and length, status, a null value and an empty effective_time; in the Arrow form a 4-byte
# value or offset, its status byte and its 8-byte effective_time.
_MIN_VALUE_BYTES = 10
_FORMATS = (
    online_service_pb2.RESPONSE_FORMAT_UNSPECIFIED,
    online_service_pb2.RESPONSE_FORMAT_STRUCT,
    online_service_pb2.RESPONSE_FORMAT_ARROW,
)


def check_reply_size(keys: int, features: int, max_reply_bytes: int) -> None:
    """Refuse (LimitExceeded) a read whose reply could not be sent: at least `max_reply_bytes` for sure.

    A feature service may name a hundred views of a hundred features each: read for 10,000 keys, its reply
    would be built whole (gigabytes, and minutes of CPU) only for gRPC to refuse to send it.
    """
    least = keys * features * _MIN_VALUE_BYTES
    if least > max_reply_bytes:
        raise _too_large(
            f"a read of {keys} keys and {features} features answers at least {least:,} bytes, more than the "
            f"{max_reply_bytes:,} a reply may hold (max_message_bytes); ask for fewer keys or features "
            "per request",
            "REPLY_TOO_LARGE",
            max_reply_bytes,
        )


def _too_large(message: str, reason: str, limit: int) -> LimitExceeded:
    """The refusal of a read past a bound, with the bound in its metadata."""
    return LimitExceeded(message, reason=reason, metadata={"limit": str(limit)})


# The most values (keys x features) one chunk of a read rolls up and writes at once: its byte arrays take
# about a hundred bytes per value, tens of megabytes a chunk.
_CHUNK_VALUES = 1 << 18
# The most bytes one chunk's tiles may take decoded, had every key every tile of its windows: a view of
# 90-day windows of 1-minute tiles reads up to 129,600 tiles per key.
_CHUNK_TILE_BYTES = 32 << 20


def tile_bytes_per_key(layout: _Layout) -> int:
    """The most bytes a read's decoded tiles of one key take for `layout`: every tile of its longest window.

    A window's tiles lie in blocks, and the first and last block read may hold a block's span more.
    """
    codec = layout.codec
    tiles = layout.longest // layout.view.spec.interval + 2 * codec.slots
    return int(tiles * codec.record.itemsize)


def chunk_keys(layouts: Sequence[_Layout]) -> int:
    """How many keys one chunk of a read of `layouts` holds: within both chunk bounds, and at least one."""
    features = sum(len(layout.aggs) for layout in layouts)
    tiles = sum(tile_bytes_per_key(layout) for layout in layouts)
    return max(1, min(_CHUNK_VALUES // max(features, 1), _CHUNK_TILE_BYTES // max(tiles, 1)))


# What a read holds per value (key and feature) for its whole length: its part of the reply as written
# (up to about 20 bytes in either form) and the joined reply, plus the Arrow form's joined columns.
_HELD_PER_VALUE = 48
# What a chunk holds per value while it is rolled up and written: windows, masks and padded entries.
_CHUNK_PER_VALUE = 120


def read_bytes(keys: int, layouts: Sequence[_Layout]) -> int:
    """A read's working memory, estimated: what its reply holds, and one chunk's tiles and byte arrays."""
    features = sum(len(layout.aggs) for layout in layouts)
    step = min(max(keys, 1), chunk_keys(layouts))
    tiles = sum(tile_bytes_per_key(layout) for layout in layouts)
    return keys * features * _HELD_PER_VALUE + step * (features * _CHUNK_PER_VALUE + tiles)


def check_read_bytes(estimate: int, max_read_bytes: int) -> None:
    """Refuse (LimitExceeded) a read whose working memory is estimated past what all reads may hold."""
    if estimate > max_read_bytes:
        raise _too_large(
            f"a read of these keys and features takes about {estimate:,} bytes of working memory, more than "
            f"the {max_read_bytes:,} that reads may hold (max_view_read_bytes); ask for fewer keys or "
            "features per request, or for shorter windows",
            "READ_TOO_LARGE",
            max_read_bytes,
        )


# Holds a read's estimated bytes against the server's reads for the with block; raises Busy without room.
MemoryBudget = Callable[[int], AbstractContextManager[None]]


class ViewReader:
    """Serves GetViewFeatures: a view's or a feature service's features for many entities."""

    def __init__(
        self,
        views: Views,
        store: TileStore,
        *,
        max_keys: int = 10_000,
        max_reply_bytes: int = 64 << 20,
        max_read_bytes: int = 1 << 30,
        memory_budget: MemoryBudget | None = None,
    ):
        self._views = views
        self._store = store
        self.max_keys = max_keys
        self.max_reply_bytes = max_reply_bytes
        self.max_read_bytes = max_read_bytes
        self._budget = memory_budget
        # Each view's and aggregation choice's layout, for as long as the view object is current.
        self._layouts: dict[tuple[int, tuple[int, ...]], _Layout] = {}

    def targets(self, request: pb.GetViewFeaturesRequest) -> tuple[list[tuple[View, list[int]]], bool]:
        """The views and feature indexes a request names, and whether it named a feature service."""
        which = request.WhichOneof("target")
        if which == "feature_view":
            view = self._views.get(request.feature_view)
            return [(view, list(range(len(view.spec.aggregations))))], False
        if which == "feature_service":
            return self._views.resolve(self._views.get_service(request.feature_service)), True
        raise InvalidInput(
            "name a feature_view or a feature_service",
            [Violation("target", "set feature_view or feature_service")],
            reason="NO_TARGET",
        )

    def get(self, request: pb.GetViewFeaturesRequest) -> bytes:
        """The serialized GetViewFeaturesResponse: every requested entity's features, in request order."""
        keys = request.keys
        check_key_count(len(keys), self.max_keys)
        if request.response_format not in _FORMATS:
            raise InvalidInput(
                f"unknown response_format {request.response_format}",
                [Violation("response_format", "use RESPONSE_FORMAT_STRUCT or RESPONSE_FORMAT_ARROW")],
                reason="UNKNOWN_RESPONSE_FORMAT",
            )
        targets, qualified = self.targets(request)
        check_reply_size(len(keys), sum(len(indexes) for _, indexes in targets), self.max_reply_bytes)
        # A window ends at the start of the tile holding as_of, up to a day before it, within the years kept.
        as_of = request_micros(request, "as_of", earliest=MIN_MICROS + MAX_INTERVAL)
        at = now_micros() if as_of is None else as_of
        entities = self._string_keys(targets[0][0], request) or self.entity_keys(targets[0][0], keys)
        layouts = [self._layout(view, indexes) for view, indexes in targets]
        estimate = read_bytes(len(entities), layouts)
        check_read_bytes(estimate, self.max_read_bytes)
        # Reads run several at once: together they hold at most the budget, or the newest is refused.
        with nullcontext() if self._budget is None else self._budget(estimate):
            return self._read(request, entities, layouts, qualified, at)

    def _read(
        self,
        request: pb.GetViewFeaturesRequest,
        entities: Sequence[bytes],
        layouts: Sequence[_Layout],
        qualified: bool,
        at: int,
    ) -> bytes:
        """The serialized reply of a read whose checks passed."""
        headers = [layout.header(qualified) for layout in layouts]
        fields = [field for layout in layouts for field in layout.fields(qualified)]
        arrow = request.response_format == online_service_pb2.RESPONSE_FORMAT_ARROW
        # Keys are read a chunk at a time and each chunk's part of the reply written before the next is
        # read, so that the tiles, windows and byte arrays behind the reply are held for one chunk only.
        step = chunk_keys(layouts)
        # The Struct form's results entries of each chunk, or the Arrow form's columns of each chunk.
        written: list[bytes] = []
        columns: list[list[pa.Array]] = []
        # A read of no keys is one empty chunk, which writes each form's empty reply.
        for low in range(0, max(len(entities), 1), step):
            part = entities[low : low + step]
            features = [f for layout in layouts for f in layout.roll_up(self._store, part, at)]
            if arrow:
                columns.append(arrow_columns(features, fields))
            else:
                written.append(vectors(features, len(part)))
            del features
        if arrow:
            ipc = arrow_vectors(columns, fields)
            return b"".join([*headers, VIEW_FEATURES_ARROW_IPC, varint(ipc.size), memoryview(ipc)])
        return b"".join([*headers, *written])

    def _layout(self, view: View, indexes: list[int]) -> _Layout:
        key = (view.id, tuple(indexes))
        layout = self._layouts.get(key)
        if layout is None or layout.view is not view:
            if len(self._layouts) >= _MAX_LAYOUTS:
                # Views come and go: forget every layout now and then rather than track which are stale.
                self._layouts.clear()
            layout = _Layout(view, [view.spec.aggregations[i] for i in indexes])
            # One assignment: readers on other threads see the old layout or the new one.
            self._layouts[key] = layout
        return layout

    @staticmethod
    def _string_keys(view: View, request: pb.GetViewFeaturesRequest) -> list[bytes] | None:
        """Many keys of one String field, read back from the request's bytes; None for any other request."""
        if len(request.keys) <= _PARSED_KEYS or view.key_kinds != (Kind.STRING,):
            return None
        # The request is the target's field, the keys, then as_of and the response format, in that order.
        target = pb.GetViewFeaturesRequest()
        if request.WhichOneof("target") == "feature_view":
            target.feature_view = request.feature_view
        else:
            target.feature_service = request.feature_service
        rest = pb.GetViewFeaturesRequest(response_format=request.response_format)
        if request.HasField("as_of"):
            rest.as_of.CopyFrom(request.as_of)
        return string_keys_between(
            request.SerializeToString(),
            target.SerializeToString(),
            VIEW_REQUEST_KEYS,
            rest.SerializeToString(),
            view.spec.entity_keys[0],
        )

    @staticmethod
    def entity_keys(view: View, keys: Sequence[struct_pb2.Struct]) -> list[bytes]:
        """The entity key bytes of each request key, or InvalidInput naming every bad one."""
        names = view.spec.entity_keys
        if len(names) == 1 and view.key_kinds == (Kind.STRING,):
            # The common case, one String key given as a string, without a converter call per key.
            maps = [k.fields for k in keys]
            if all(len(m) == 1 for m in maps):
                values = [m.get(names[0]) for m in maps]
                if None not in values:
                    given = cast(list[struct_pb2.Value], values)
                    if all(v.HasField("string_value") for v in given):
                        return [v.string_value.encode() for v in given]
        source = view.spec.source
        violations: list[Violation] = []
        out: list[bytes] = []
        converters = [scalar_converter(k) for k in view.key_kinds]
        for i, key in enumerate(keys):
            fields = key.fields
            parts: list[bytes] = []
            for name, convert in zip(names, converters, strict=True):
                if name not in fields:
                    violations.append(Violation(f"keys[{i}].{name}", f"entity key {name} is required"))
                    continue
                try:
                    parts.append(key_part(convert(fields[name])))
                except BadValue as e:
                    violations.append(Violation(f"keys[{i}].{name}", str(e)))
            for extra in sorted(set(fields) - set(names)):
                violations.append(
                    Violation(f"keys[{i}].{extra}", f"{extra!r} is not an entity key of {source}")
                )
            out.append(python_key(parts, b""))
        if violations:
            raise InvalidInput(
                f"{len(violations)} invalid entity key value(s)", violations[:100], reason="INVALID_KEYS"
            )
        return out
