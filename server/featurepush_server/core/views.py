"""Stream feature views and feature services: their compiled specs, and a registry kept in the store.

A view aggregates one push source's events per entity over time windows. Its definition is checked
against its source on apply; while it holds tiles, only changes that leave the tiles' meaning intact
(descriptions, windows, feature names) are accepted.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Generic, TypeVar

import pyarrow as pa

from featurepush.v1 import feature_view_pb2 as fv_pb2

from .batch import load_post_processor
from .columns import cast_problem
from .errors import Aborted, FailedPrecondition, InvalidInput, NotFound, Violation, shown
from .registry import Registry, Source, page_of, page_start, settled_version
from .schema import NAME_RE, FieldSpec, Kind, SourceSpec, _compile_fields, check_fields, check_labels
from .stores.base import Store
from .times import duration_micros, duration_problem

MICROS = 1_000_000
MIN_WINDOW = 60 * MICROS
MAX_WINDOW = 90 * 86_400 * MICROS
MIN_INTERVAL = 60 * MICROS
MAX_INTERVAL = 86_400 * MICROS
MAX_N = 1000
MAX_AGGREGATIONS = 100
MAX_SERVICE_VIEWS = 100

F = fv_pb2
MOMENT_FUNCTIONS = frozenset(
    {
        F.AGGREGATE_FUNCTION_COUNT,
        F.AGGREGATE_FUNCTION_SUM,
        F.AGGREGATE_FUNCTION_MEAN,
        F.AGGREGATE_FUNCTION_MIN,
        F.AGGREGATE_FUNCTION_MAX,
        F.AGGREGATE_FUNCTION_STDDEV,
    }
)
# The list functions and the kind of bounded list each keeps in a tile.
LIST_FUNCTIONS: dict[int, str] = {
    F.AGGREGATE_FUNCTION_LAST_N: "last",
    F.AGGREGATE_FUNCTION_FIRST_N: "first",
    F.AGGREGATE_FUNCTION_LAST_DISTINCT_N: "distinct",
}
NUMERIC_KINDS = frozenset({Kind.INT32, Kind.INT64, Kind.FLOAT32, Kind.FLOAT64})
LIST_KINDS = frozenset({Kind.STRING, Kind.INT32, Kind.INT64, Kind.FLOAT32, Kind.FLOAT64, Kind.BOOL})
# COUNT works on any scalar column; the others below need numbers (sum, mean, stddev, min, max).
_NEEDS_NUMBERS = MOMENT_FUNCTIONS - {F.AGGREGATE_FUNCTION_COUNT}


@dataclass(frozen=True)
class AggSpec:
    """One aggregation: its feature name, column, function, list size and window in microseconds."""

    name: str
    column: str
    function: int
    n: int
    window: int
    kind: Kind


@dataclass(frozen=True)
class ViewSpec:
    """A validated view: what its tiles hold and how its features are rolled up from them.

    `moments` are the columns whose tiles keep count, sum, squared deviations from the mean, min and max;
    `lists` the (column, kind, n) bounded lists; `sketches` the columns with a HyperLogLog sketch.
    """

    name: str
    source: str
    entity_keys: tuple[str, ...]
    transformation: str
    fields: tuple[FieldSpec, ...]
    aggregations: tuple[AggSpec, ...]
    interval: int
    moments: tuple[str, ...]
    lists: tuple[tuple[str, str, int], ...]
    sketches: tuple[str, ...]
    proto: fv_pb2.StreamFeatureView

    @property
    def longest_window(self) -> int:
        """The longest window in microseconds: tiles older than it are never read."""
        return max(a.window for a in self.aggregations)

    def tile_layout(self) -> tuple[object, ...]:
        """What the stored tiles mean; a change of it while tiles exist would misread them."""
        return (
            self.source,
            self.entity_keys,
            self.transformation,
            tuple((f.name, str(f.dtype)) for f in self.fields),
            self.interval,
            self.moments,
            self.lists,
            self.sketches,
        )


@dataclass(frozen=True)
class View:
    """A registered view: its store id, spec, generation, and its loaded transformation if any."""

    id: int
    spec: ViewSpec
    generation: int
    transform: Callable[[pa.Table], pa.Table] | None
    # The kinds of the entity keys, as the source declares them.
    key_kinds: tuple[Kind, ...] = ()


def compile_view(
    view: fv_pb2.StreamFeatureView, source: Source | None, path: str = "view", *, stored: bool = False
) -> ViewSpec:
    """Check a view against its source and compile it; raise InvalidInput naming every problem.

    A `stored` definition, read back, is compiled as it was accepted: one applied before durations of a
    fraction of a microsecond were refused reads with that fraction dropped, as it always did.
    """
    out: list[Violation] = []
    if not NAME_RE.match(view.name):
        out.append(
            Violation(
                path + ".name",
                f"{view.name!r} is not a valid view name: use 1 to 128 letters, "
                "digits and underscores, not starting with a digit",
            )
        )
    if source is None:
        out.append(Violation(path + ".source", f"push source {shown(view.source)!r} does not exist"))
    elif tuple(view.entity_keys) != source.spec.entity_keys:
        out.append(
            Violation(
                path + ".entity_keys", f"must be the source's entity keys {list(source.spec.entity_keys)}"
            )
        )
    check_labels(view, path, out)
    check_fields(view.schema, path + ".schema.fields", out)
    fields = _compile_fields(view.schema.fields, path + ".schema.fields", 0, out) or ()
    by_name = {f.name: f for f in fields}
    if source is not None:
        reserved = set(source.spec.entity_keys) | {source.spec.timestamp_field}
        for f in fields:
            if f.name in reserved:
                out.append(Violation(path + ".schema", f"{f.name!r} is an entity key or the event time"))
        if not stored:
            out += column_problems(view, source.spec, path)
    problem = duration_problem(view.aggregation_interval)
    interval = duration_micros(view.aggregation_interval)
    if problem is not None:
        out.append(Violation(path + ".aggregation_interval", problem))
        interval = 0
    elif (
        not MIN_INTERVAL <= interval <= MAX_INTERVAL
        or interval % MICROS
        # Microseconds drop any nanoseconds below one: 60 s and 1 ns would be kept as 60 s.
        or (view.aggregation_interval.nanos and not stored)
    ):
        out.append(
            Violation(
                path + ".aggregation_interval", "must be a whole number of seconds from one minute to one day"
            )
        )
        interval = 0
    if not 1 <= len(view.aggregations) <= MAX_AGGREGATIONS:
        out.append(Violation(path + ".aggregations", f"1 to {MAX_AGGREGATIONS} aggregations"))
    aggs: list[AggSpec] = []
    names: set[str] = set()
    for i, a in enumerate(view.aggregations):
        ap = f"{path}.aggregations[{i}]"
        if not NAME_RE.match(a.name) or a.name in names:
            out.append(Violation(ap + ".name", f"{a.name!r} is not a valid, unique feature name"))
        names.add(a.name)
        field = by_name.get(a.column)
        if field is None:
            out.append(Violation(ap + ".column", f"{a.column!r} is not a column of the view's schema"))
        problem = duration_problem(a.time_window)
        window = duration_micros(a.time_window)
        if problem is not None:
            out.append(Violation(ap + ".time_window", problem))
        elif not MIN_WINDOW <= window <= MAX_WINDOW:
            out.append(Violation(ap + ".time_window", "must be from one minute to 90 days"))
        elif (interval and window % interval) or (a.time_window.nanos and not stored):
            out.append(Violation(ap + ".time_window", "must be a whole multiple of the aggregation_interval"))
        fn = a.function
        if (
            fn not in MOMENT_FUNCTIONS
            and fn not in LIST_FUNCTIONS
            and fn != F.AGGREGATE_FUNCTION_APPROX_COUNT_DISTINCT
        ):
            out.append(Violation(ap + ".function", "must be an AggregateFunction other than UNSPECIFIED"))
        if (fn in LIST_FUNCTIONS) != (1 <= a.n <= MAX_N):
            out.append(Violation(ap + ".n", f"1 to {MAX_N} for last_n, first_n, last_distinct_n; else 0"))
        if field is not None:
            kind = field.dtype.kind
            if fn in _NEEDS_NUMBERS and kind not in NUMERIC_KINDS:
                out.append(Violation(ap + ".column", f"{a.column!r} is {field.dtype}, not a number"))
            elif kind not in LIST_KINDS:
                out.append(Violation(ap + ".column", f"{a.column!r} is {field.dtype}, not a scalar"))
            aggs.append(AggSpec(a.name, a.column, fn, a.n, window, kind))
    if out:
        raise InvalidInput(f"the view has {len(out)} problem(s)", out, reason="INVALID_VIEW")
    moments = sorted({agg.column for agg in aggs if agg.function in MOMENT_FUNCTIONS})
    lists: dict[tuple[str, str], int] = {}
    for agg in aggs:
        if agg.function in LIST_FUNCTIONS:
            k = (agg.column, LIST_FUNCTIONS[agg.function])
            lists[k] = max(lists.get(k, 0), agg.n)
    sketches = sorted(
        {agg.column for agg in aggs if agg.function == F.AGGREGATE_FUNCTION_APPROX_COUNT_DISTINCT}
    )
    # Nullable whatever was declared: a view column may be null in any record.
    nullable = tuple(FieldSpec(f.name, f.dtype, True) for f in fields)
    return ViewSpec(
        view.name,
        view.source,
        tuple(view.entity_keys),
        view.transformation,
        nullable,
        tuple(aggs),
        interval,
        tuple(moments),
        tuple((c, k, n) for (c, k), n in sorted(lists.items())),
        tuple(sketches),
        view,
    )


def column_problems(
    view: fv_pb2.StreamFeatureView, source: SourceSpec, path: str = "view"
) -> list[Violation]:
    """The view's columns that its source's records can never be cast to, where it has no transformation.

    Such a view failed every push to its source (TRANSFORMATION_FAILED) from the moment it was applied.
    """
    if view.transformation:
        return []
    types = {f.name: f.dtype.to_arrow() for f in source.fields}
    out: list[Violation] = []
    fields = _compile_fields(view.schema.fields, path + ".schema.fields", 0, []) or ()
    for i, f in enumerate(fields):
        problem = None if f.name not in types else cast_problem(types[f.name], f.dtype)
        if problem is not None:
            out.append(
                Violation(
                    f"{path}.schema.fields[{i}]",
                    f"{f.name!r} is {f.dtype}, but the field of push source {source.name!r} {problem}",
                )
            )
    return out


def _view_not_found(name: str) -> NotFound:
    """The error of a call naming a view that does not exist."""
    return NotFound(
        f"feature view {shown(name)!r} does not exist; apply it first (featurepush apply)",
        reason="VIEW_NOT_FOUND",
        metadata={"view": shown(name)},
    )


def _definition_only(message: fv_pb2.StreamFeatureView | fv_pb2.FeatureService) -> bytes:
    copy = type(message).FromString(message.SerializeToString())
    copy.ClearField("create_time")
    copy.ClearField("update_time")
    return copy.SerializeToString(deterministic=True)


def _stamp(result: fv_pb2.StreamFeatureView | fv_pb2.FeatureService, created: object | None) -> None:
    now = time.time_ns() // 1000 * 1000
    if created is not None:
        result.create_time.CopyFrom(created)  # type: ignore[arg-type]
    else:
        result.create_time.FromNanoseconds(now)
    result.update_time.FromNanoseconds(now)


def _check_unique(service: fv_pb2.FeatureService, resolved: list[tuple[View, list[int]]]) -> None:
    """Refuse a service that names one feature twice: its reply would hold two columns of one name.

    Only on apply: a service stored before this check is still read.
    """
    out: list[Violation] = []
    first: dict[str, int] = {}
    for i, (ref, (view, indexes)) in enumerate(zip(service.features, resolved, strict=True)):
        for j, index in enumerate(indexes):
            name = f"{view.spec.name}.{view.spec.aggregations[index].name}"
            if name in first:
                # A reference to a whole view repeats every feature: one violation says it.
                path = f"service.features[{i}]" + (f".features[{j}]" if ref.features else ".view")
                out.append(Violation(path, f"{name} is already served by service.features[{first[name]}]"))
                if not ref.features:
                    break
            else:
                first[name] = i
    if out:
        raise InvalidInput(
            f"the feature service has {len(out)} problem(s)", out[:100], reason="INVALID_SERVICE"
        )


Message = TypeVar("Message", fv_pb2.StreamFeatureView, fv_pb2.FeatureService)


@dataclass(frozen=True)
class Outcome(Generic[Message]):
    """The stored definition and whether the apply created or changed it."""

    message: Message
    changed: bool
    created: bool


class Views:
    """View and feature-service definitions kept in the store, cached in memory; thread-safe.

    Transformations are imported under the batch post_processor rules: only from `allowed` modules, and
    only a function defined in the module it names. Where other processes change the same store's views,
    `catalog_version` reads their change counter (see Registry), and the caches are dropped when it moves;
    where other servers do (a shared store), the caches are dropped every `refresh_s` seconds.
    """

    def __init__(
        self,
        store: Store,
        sources: Registry,
        allowed: Collection[str],
        catalog_version: Callable[[], int] | None = None,
        refresh_s: float | None = None,
    ):
        self._store = store
        self._sources = sources
        self._allowed = allowed
        self._lock = threading.Lock()
        self._by_name: dict[str, View] = {}
        # Source name -> its views; dropped whole on any view change.
        self._by_source: dict[str, list[View]] | None = None
        # Each source's view names, read with the cache above; a source's views load on its first push.
        self._view_names: dict[str, list[str]] = {}
        self._catalog_version = catalog_version
        self._cached_version = catalog_version() if catalog_version is not None else 0
        self._refresh_s = refresh_s
        self._filled_at = time.monotonic()

    def _current(self) -> bool:
        """Whether the caches still hold: no definition changed elsewhere since they were filled."""
        if self._refresh_s is not None and time.monotonic() - self._filled_at >= self._refresh_s:
            return False
        return self._catalog_version is None or self._catalog_version() == self._cached_version

    def _settled_version(self) -> int:
        """The change counter once no change is being written elsewhere; caches are dropped if it moved."""
        if self._refresh_s is not None and time.monotonic() - self._filled_at >= self._refresh_s:
            self._by_name.clear()
            self._by_source = None
            self._filled_at = time.monotonic()
        if self._catalog_version is None:
            return 0
        version = settled_version(self._catalog_version, "feature views")
        if version != self._cached_version:
            self._by_name.clear()
            self._by_source = None
            self._cached_version = version
        return version

    def _source(self, name: str) -> Source | None:
        try:
            return self._sources.get(name)
        except NotFound:
            return None

    def _load(self, spec: ViewSpec) -> Callable[[pa.Table], pa.Table] | None:
        if not spec.transformation:
            return None
        try:
            return load_post_processor(spec.transformation, spec.source, self._allowed, "transformation")
        except FailedPrecondition as e:
            raise FailedPrecondition(
                f"feature view {spec.name!r}: {e}",
                reason=e.reason,
                metadata={"view": spec.name, "transformation": spec.transformation},
            ) from None

    def get(self, name: str) -> View:
        """The view called `name`; raise NotFound."""
        cached = self._by_name.get(name)
        if cached is not None and self._current():
            return cached
        with self._lock:
            return self._get_locked(name)

    def _get_locked(self, name: str) -> View:
        while True:
            version = self._settled_version()
            cached = self._by_name.get(name)
            if cached is not None:
                return cached
            view = self._read(name)
            # A change written elsewhere while the definition and its generation were read: read again.
            if self._catalog_version is None or self._catalog_version() == version:
                self._by_name[name] = view
                return view

    def _read(self, name: str) -> View:
        found = self._store.get_view(name)
        if found is None:
            raise _view_not_found(name)
        view_id, raw = found
        proto = fv_pb2.StreamFeatureView.FromString(raw)
        source = self._source(proto.source)
        spec = compile_view(proto, source, stored=True)
        kinds = tuple(source.spec.field(k).dtype.kind for k in spec.entity_keys) if source else ()
        return View(view_id, spec, self._store.view_generation(view_id), self._load(spec), kinds)

    def of_source(self, source: str) -> list[View]:
        """The views of one source (cached: pushes ask on every call).

        Only that source's views are loaded, so a view whose transformation this server cannot import
        refuses pushes to its own source and to no other.
        """
        by_source = self._by_source
        if by_source is not None and self._current():
            found = by_source.get(source)
            if found is not None:
                return found
        with self._lock:
            version = self._settled_version()
            filling = self._by_source
            if filling is None:
                names: dict[str, list[str]] = {}
                for name, _, raw in self._store.list_views():
                    names.setdefault(fv_pb2.StreamFeatureView.FromString(raw).source, []).append(name)
                filling = {}
                self._view_names, self._by_source = names, filling
            views = [self._get_locked(name) for name in self._view_names.get(source, ())]
            # Loading a view may drop the caches (a refresh period ending, a change elsewhere): then these
            # views answer this call alone.
            if self._by_source is filling and (
                self._catalog_version is None or self._catalog_version() == version
            ):
                filling[source] = views
            return views

    def all(self) -> list[View]:
        """Every view."""
        return [self.get(name) for name, _, _ in self._store.list_views()]

    def apply(
        self, definition: fv_pb2.StreamFeatureView, *, validate_only: bool = False
    ) -> Outcome[fv_pb2.StreamFeatureView]:
        """Create or update a view; an unchanged definition is a no-op."""
        source = self._source(definition.source)
        spec = compile_view(definition, source)
        self._load(spec)
        wanted = _definition_only(definition)
        while True:
            # The stored view's source is looked up before the locks are taken: the registry takes its own
            # lock for it, which ApplySource holds while it waits for the store's, and the two calls
            # deadlocked (the store's lock held, every push hung behind it).
            before = self._store.get_view(definition.name)
            before_source = "" if before is None else fv_pb2.StreamFeatureView.FromString(before[1]).source
            old_source = self._source(before_source) if before_source else None
            with self._lock, self._store.exclusive():
                if source is not None and self._store.generation(source.id) != source.generation:
                    # Deleted or changed since the view was compiled against it: a view of a deleted source
                    # would outlive it, and one compiled against another definition may not match it.
                    raise Aborted(
                        f"push source {definition.source!r} was changed or deleted while the view was "
                        "checked; nothing was applied, apply the view again",
                        reason="SOURCE_CHANGED",
                        metadata={"source": definition.source},
                    )
                found = self._store.get_view(definition.name)
                stored = None if found is None else fv_pb2.StreamFeatureView.FromString(found[1])
                if stored is not None and _definition_only(stored) == wanted:
                    return Outcome(stored, changed=False, created=False)
                if stored is not None and stored.source != before_source:
                    # Changed by another call since it was looked up: look again.
                    continue
                return self._put(definition, spec, found, stored, old_source, validate_only)

    def _put(
        self,
        definition: fv_pb2.StreamFeatureView,
        spec: ViewSpec,
        found: tuple[int, bytes] | None,
        stored: fv_pb2.StreamFeatureView | None,
        old_source: Source | None,
        validate_only: bool,
    ) -> Outcome[fv_pb2.StreamFeatureView]:
        """Store a changed view definition, called under both locks; refused where its tiles would misread."""
        incompatible = False
        if stored is not None and found is not None:
            old = compile_view(stored, old_source, stored=True)
            incompatible = old.tile_layout() != spec.tile_layout()
            if incompatible and self._store.has_tiles(found[0]):
                raise FailedPrecondition(
                    f"feature view {definition.name!r} holds tiles that the new definition would read "
                    "wrongly: its source, entity keys, transformation, schema, aggregation_interval or "
                    "the kinds of aggregates it keeps change. Apply it under a new name, or delete the "
                    "view (and its tiles) first with `featurepush delete-view`.",
                    reason="INCOMPATIBLE_VIEW_CHANGE",
                    metadata={"view": definition.name},
                )
        result = fv_pb2.StreamFeatureView()
        result.CopyFrom(definition)
        _stamp(result, None if stored is None else stored.create_time)
        if validate_only:
            return Outcome(result, changed=True, created=found is None)
        self._forget(definition.name)
        self._store.put_view(
            definition.name,
            result.SerializeToString(),
            None if found is None else found[0],
            invalidate=incompatible,
        )
        return Outcome(result, changed=True, created=found is None)

    def _forget(self, name: str) -> None:
        self._by_name.pop(name, None)
        self._by_source = None

    def list_views(
        self, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[fv_pb2.StreamFeatureView], str]:
        """One page of views in name order and the token of the next page ("" at the end)."""
        size, after = page_start(page_size, page_token, "ListFeatureViews")
        rows = [(name, raw) for name, _, raw in self._store.list_views(after, size + 1)]
        count, token = page_of(rows, size)
        return [fv_pb2.StreamFeatureView.FromString(raw) for _, raw in rows[:count]], token

    def delete(self, name: str) -> int:
        """Delete a view and its tiles; return how many tiles it held. Refused while a service uses it.

        The view is found by its stored id, not compiled: one its source no longer matches (a store changed
        by an older server) can still be deleted.
        """
        with self._lock, self._store.exclusive():
            found = self._store.get_view(name)
            if found is None:
                raise _view_not_found(name)
            users = [
                s
                for s, raw in self._store.list_services()
                if any(r.view == name for r in fv_pb2.FeatureService.FromString(raw).features)
            ]
            if users:
                raise FailedPrecondition(
                    f"feature view {name!r} is served by feature service(s) {', '.join(users)}; "
                    "remove it from them first",
                    reason="VIEW_IN_USE",
                    metadata={"view": name},
                )
            self._forget(name)
            return self._store.delete_view(name, found[0])

    def check_source_delete(self, source: str) -> None:
        """Refuse to delete a source that views aggregate.

        Reads the stored definitions alone, as check_source_apply does: the registry asks under its lock.
        """
        names = [
            name
            for name, _, raw in self._store.list_views()
            if fv_pb2.StreamFeatureView.FromString(raw).source == source
        ]
        if names:
            raise FailedPrecondition(
                f"push source {source!r} feeds feature view(s) {', '.join(names)}; delete them first",
                reason="SOURCE_IN_USE",
                metadata={"source": source},
            )

    def check_source_apply(self, spec: SourceSpec) -> None:
        """Refuse a source definition that the views reading it would not compile against.

        Reads the stored definitions alone (never the caches, nor this registry's lock): the registry asks
        under its own lock. Without it, a change of a source's entity keys, or an event time named as a view
        column, was applied, and every push to the source, every read of the view and its deletion failed.
        """
        source = Source(0, spec, 0, ())
        broken: list[str] = []
        for name, _, raw in self._store.list_views():
            proto = fv_pb2.StreamFeatureView.FromString(raw)
            if proto.source != spec.name:
                continue
            try:
                compile_view(proto, source, stored=True)
                problems = column_problems(proto, spec)
            except InvalidInput as e:
                problems = e.violations
            if problems:
                broken.append(f"{name} ({'; '.join(f'{v.path}: {v.description}' for v in problems[:3])})")
        if broken:
            raise FailedPrecondition(
                f"push source {spec.name!r} feeds feature view(s) that the new definition would break: "
                + ", ".join(broken[:10])
                + "; delete them first, or apply the source so that they still match it",
                reason="SOURCE_IN_USE",
                metadata={"source": spec.name},
            )

    # --- feature services ----------------------------------------------------------------------

    def apply_service(
        self, definition: fv_pb2.FeatureService, *, validate_only: bool = False
    ) -> Outcome[fv_pb2.FeatureService]:
        """Create or update a feature service; an unchanged definition is a no-op."""
        _check_unique(definition, self.resolve(definition))
        wanted = _definition_only(definition)
        with self._lock:
            raw = self._store.get_service(definition.name)
            stored = None if raw is None else fv_pb2.FeatureService.FromString(raw)
            if stored is not None and _definition_only(stored) == wanted:
                return Outcome(stored, changed=False, created=False)
            result = fv_pb2.FeatureService()
            result.CopyFrom(definition)
            _stamp(result, None if stored is None else stored.create_time)
            if not validate_only:
                self._store.put_service(definition.name, result.SerializeToString())
        return Outcome(result, changed=True, created=stored is None)

    def resolve(self, service: fv_pb2.FeatureService) -> list[tuple[View, list[int]]]:
        """The views of a feature service with the indexes of their features; raise InvalidInput."""
        out: list[Violation] = []
        if not NAME_RE.match(service.name):
            out.append(Violation("service.name", f"{service.name!r} is not a valid feature service name"))
        check_labels(service, "service", out)
        if not 1 <= len(service.features) <= MAX_SERVICE_VIEWS:
            out.append(Violation("service.features", f"1 to {MAX_SERVICE_VIEWS} views"))
        resolved: list[tuple[View, list[int]]] = []
        keys: set[tuple[str, ...]] = set()
        for i, ref in enumerate(service.features):
            try:
                view = self.get(ref.view)
            except NotFound:
                out.append(
                    Violation(
                        f"service.features[{i}].view", f"feature view {shown(ref.view)!r} does not exist"
                    )
                )
                continue
            names = [a.name for a in view.spec.aggregations]
            wanted = list(ref.features) or names
            bad = [n for n in wanted if n not in names]
            if bad:
                out.append(Violation(f"service.features[{i}].features", f"not features of {ref.view}: {bad}"))
                continue
            keys.add(view.spec.entity_keys)
            resolved.append((view, [names.index(n) for n in wanted]))
        if len(keys) > 1:
            out.append(Violation("service.features", "every view must have the same entity keys"))
        if out:
            raise InvalidInput(
                f"the feature service has {len(out)} problem(s)", out, reason="INVALID_SERVICE"
            )
        return resolved

    def get_service(self, name: str) -> fv_pb2.FeatureService:
        """The feature service called `name`; raise NotFound."""
        raw = self._store.get_service(name)
        if raw is None:
            raise NotFound(
                f"feature service {shown(name)!r} does not exist; apply it first",
                reason="SERVICE_NOT_FOUND",
                metadata={"service": shown(name)},
            )
        return fv_pb2.FeatureService.FromString(raw)

    def list_services(
        self, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[fv_pb2.FeatureService], str]:
        """One page of feature services in name order and the token of the next page."""
        size, after = page_start(page_size, page_token, "ListFeatureServices")
        rows = list(self._store.list_services(after, size + 1))
        count, token = page_of(rows, size)
        return [fv_pb2.FeatureService.FromString(raw) for _, raw in rows[:count]], token

    def delete_service(self, name: str) -> None:
        """Delete a feature service; raise NotFound."""
        self.get_service(name)
        self._store.delete_service(name)
