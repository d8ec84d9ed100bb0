"""Backfill: load a time range of a source's batch history into the online store, row by validated row.

Rows take the push path's rules: the same strict cast (`conform`) and the same materializer, hence the
same encoding and latest-by-event-time write, so a backfill never overwrites a newer pushed value and
running it twice leaves the same store. A chunk with bad rows is split until the bad rows are isolated;
the good ones are written and the bad ones counted and reported.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Generator, Mapping
from concurrent.futures import BrokenExecutor, Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from .batch import BatchSources, range_violations, time_mask
from .columns import conform
from .errors import Cancelled, FailedPrecondition, InvalidInput, Unavailable, Violation
from .locations import StopCheck
from .materialize import Materializer, Origin, SourceRecords
from .registry import Registry
from .schema import SourceSpec
from .stores.base import TileStore
from .tiles import begin_backfills, end_backfill
from .views import Views

MAX_REJECTIONS = 10
# The one whole-column violation of `conform` that depends on the values, so halving can isolate it.
_DATA_DEPENDENT = "timestamps must lie"


@dataclass(frozen=True)
class Rejection:
    """Why one row of the selected range was not loaded."""

    row: int
    field: str
    description: str


@dataclass
class BackfillProgress:
    """Counts so far; `done` on the last report."""

    rows_read: int = 0
    rows_written: int = 0
    rows_superseded: int = 0
    rows_rejected: int = 0
    bytes_read: int = 0
    elapsed_seconds: float = 0.0
    rejections: list[Rejection] = field(default_factory=list)
    done: bool = False


def _row_of(path: str) -> tuple[int, str] | None:
    """The row index and field of a violation path like `rows[12].clicked`, or None if it names no row."""
    if not path.startswith("rows["):
        return None
    index, _, rest = path[5:].partition("]")
    return (int(index), rest.lstrip(".")) if index.isdigit() else None


@dataclass(frozen=True)
class LoadedChunk:
    """What loading one scanned chunk did: rows written and superseded, bad rows, whether it wrote."""

    written: int
    superseded: int
    rejected: list[Rejection]
    wrote: bool


class ChunkLoader:
    """Validates one scanned chunk, keeps its rows in the time range and writes them; thread-safe.

    A backfill runs it in its own thread, or with `serve --processes` in worker processes that each hold
    one (`install_worker_loader`), so that decoding, validation and encoding use every core while the
    store's owner only writes.
    """

    def __init__(self, registry: Registry, materializer: Materializer):
        self._registry = registry
        self._materializer = materializer

    def load(
        self,
        name: str,
        table: pa.Table,
        first_row: int,
        start: int | None,
        end: int | None,
        runs: Mapping[int, str],
        dry_run: bool,
    ) -> LoadedChunk:
        """Load one chunk whose first row is row `first_row` of the selected range."""
        source = self._registry.get(name)
        spec = source.spec
        positions = np.arange(first_row, first_row + table.num_rows)
        good, rejected = _validate(spec, table, positions)
        written = superseded = 0
        wrote = False
        for part in good:
            if start is not None or end is not None:
                part = part.filter(time_mask(part.column(spec.timestamp_field), start, end))
            if part.num_rows == 0:
                continue
            result = self._materializer.write(
                [SourceRecords(source, part, runs=runs)], origin=Origin.BACKFILL, dry_run=dry_run
            )
            wrote = True
            counts = result.counts[spec.name]
            written += counts.written
            superseded += counts.superseded
        return LoadedChunk(written, superseded, rejected, wrote)


# The loader of a backfill worker process, set once by its initializer.
_worker_loader: ChunkLoader | None = None


def install_worker_loader(loader: ChunkLoader) -> None:
    """Make this process a backfill worker: `load_in_worker` runs chunks through `loader`."""
    global _worker_loader
    _worker_loader = loader


def load_in_worker(
    name: str,
    table: pa.Table,
    first_row: int,
    start: int | None,
    end: int | None,
    runs: Mapping[int, str],
    dry_run: bool,
) -> LoadedChunk:
    """ChunkLoader.load in a worker process (submitted to an executor of such processes)."""
    if _worker_loader is None:
        raise RuntimeError("this process is not a backfill worker")
    return _worker_loader.load(name, table, first_row, start, end, runs, dry_run)


class ChunkWorkers(Protocol):
    """Processes that load chunks (`workers.BackfillWorkers`): an executor that can start ahead of work."""

    def submit(self, fn: Callable[..., LoadedChunk], /, *args: Any) -> Future[LoadedChunk]:
        """Run fn(*args) in a worker process."""

    def start(self) -> None:
        """Start the processes unless they run; return at once."""

    @property
    def ready(self) -> bool:
        """Whether a process is up to take a chunk."""


class Backfiller:
    """Runs backfills; thread-safe, since each write is one atomic latest-by-event-time store write.

    With `views`, a backfill also fills the source's feature views' tiles (tiles.begin_backfill says which).
    With `workers` (an executor of processes that ran `install_worker_loader`), chunks are loaded there,
    up to `in_flight` at once, while this thread reads the next; progress is still reported chunk by
    chunk in order, and a stop or a failure waits for the chunks already sent, so every write that
    succeeded is counted. Until a worker process is up (`ChunkWorkers.ready`), this thread loads the
    chunks itself rather than wait for them to start.
    """

    def __init__(
        self,
        registry: Registry,
        materializer: Materializer,
        sources: BatchSources,
        views: Views | None = None,
        tiles: TileStore | None = None,
        *,
        workers: ChunkWorkers | None = None,
        in_flight: int = 1,
    ):
        self._registry = registry
        self._loader = ChunkLoader(registry, materializer)
        self._sources = sources
        self._views = views
        self._tiles = tiles
        self._workers = workers
        self._in_flight = max(in_flight, 1)

    def run(
        self,
        name: str,
        *,
        start: int | None,
        end: int | None,
        dry_run: bool = False,
        stop: StopCheck = lambda: False,
    ) -> Generator[BackfillProgress, None, None]:
        """Load rows with event times in [start, end) microseconds, reporting progress after each chunk."""
        source = self._registry.get(name)
        spec = source.spec
        if not spec.proto.HasField("batch_config"):
            raise FailedPrecondition(
                f"source {name!r} has no batch_config to backfill from",
                reason="NO_BATCH_CONFIG",
                metadata={"source": name},
            )
        # Refused before anything begins, a view's backfilled range included, as a read of it is refused.
        violations = range_violations(start, end)
        if violations:
            raise InvalidInput("the backfill request is not valid", violations)
        began = time.monotonic()
        progress = BackfillProgress()
        runs: dict[int, str] = {}
        views = self._views.of_source(name) if self._views is not None and not dry_run else []
        tiles = self._tiles
        if tiles is not None:
            runs = begin_backfills(tiles, views, start, end)
        finished = False
        wrote: list[bool] = []
        pending: deque[Future[LoadedChunk]] = deque()

        def absorb(chunk: LoadedChunk) -> None:
            progress.rows_written += chunk.written
            progress.rows_superseded += chunk.superseded
            progress.rows_rejected += len(chunk.rejected)
            room = MAX_REJECTIONS - len(progress.rejections)
            progress.rejections.extend(sorted(chunk.rejected, key=lambda r: r.row)[: max(room, 0)])
            wrote.append(chunk.wrote)
            progress.elapsed_seconds = time.monotonic() - began

        workers = self._workers
        if workers is not None:
            workers.start()  # while the source is opened and the first chunks read
        scans = self._sources.scan(spec, start, end, None, stop)
        try:
            for scanned in scans:
                progress.rows_read += scanned.table.num_rows
                progress.bytes_read += scanned.nbytes
                if stop():
                    raise Cancelled("the backfill was cancelled")
                args = (name, scanned.table, scanned.first_row, start, end, runs, dry_run)
                # With nothing sent yet, order is kept whoever loads the chunk.
                if workers is None or (not pending and not workers.ready):
                    absorb(self._loader.load(*args))
                    yield progress
                    continue
                pending.append(workers.submit(load_in_worker, *args))
                while len(pending) >= self._in_flight or (pending and pending[0].done()):
                    absorb(_outcome(pending.popleft()))
                    yield progress
            while pending:
                absorb(_outcome(pending.popleft()))
                yield progress
            finished = True
        finally:
            scans.close()
            # Chunks already sent finish whatever happens here; what they wrote is counted.
            for future in pending:
                try:
                    absorb(future.result())
                except Exception:  # noqa: BLE001 - the error that ended the run is the one reported
                    wrote.append(True)
            if tiles is not None:
                # A run that wrote part of its tiles stays recorded as running: a rerun would count twice.
                for view in views:
                    if finished or not any(wrote):
                        end_backfill(tiles, view, runs[view.id], filled=finished)
        progress.elapsed_seconds = time.monotonic() - began
        progress.done = True
        yield progress


def _outcome(future: Future[LoadedChunk]) -> LoadedChunk:
    """A worker's chunk; a worker process that died is Unavailable, as a store that went away is."""
    try:
        return future.result()
    except BrokenExecutor:
        raise Unavailable(
            "a backfill worker process of the server stopped; run the backfill again: the rows already "
            "stored are written again with the same values, so it ends as one run would",
            reason="BACKFILL_WORKER_STOPPED",
        ) from None


def _validate(
    spec: SourceSpec, table: pa.Table, positions: np.ndarray
) -> tuple[list[pa.Table], list[Rejection]]:
    """The conformed tables of the good rows, and one rejection per bad row (its first violation)."""
    conformed, bad = conform(
        table,
        spec.fields,
        "rows",
        allow_extra_columns=True,
        max_violations=table.num_rows * len(spec.fields) + 1,
    )
    if conformed is not None:
        return [conformed], []
    by_row: dict[int, Violation] = {}
    whole: list[Violation] = []
    for v in bad:
        found = _row_of(v.path)
        if found is None:
            whole.append(v)
        elif found[0] not in by_row:
            by_row[found[0]] = v
    if by_row:
        rejected = [
            Rejection(int(positions[i]), _row_of(v.path)[1], v.description)  # type: ignore[index]
            for i, v in by_row.items()
        ]
        keep = np.ones(table.num_rows, dtype=bool)
        keep[list(by_row)] = False
        rest = table.filter(pa.array(keep))
        if rest.num_rows == 0:
            return [], rejected
        good, more = _validate(spec, rest, positions[keep])
        return good, rejected + more
    if table.num_rows == 1 or any(not v.description.startswith(_DATA_DEPENDENT) for v in whole):
        # A wrong column type or a missing column condemns every row of the chunk alike.
        v = next((w for w in whole if not w.description.startswith(_DATA_DEPENDENT)), whole[0])
        column = v.path.removeprefix("rows").lstrip(".")
        return [], [Rejection(int(p), column, v.description) for p in positions]
    # A violation of the whole column, such as a timestamp out of range, is found by halving.
    half = table.num_rows // 2
    left_good, left_bad = _validate(spec, table.slice(0, half), positions[:half])
    right_good, right_bad = _validate(spec, table.slice(half), positions[half:])
    return left_good + right_good, left_bad + right_bad
