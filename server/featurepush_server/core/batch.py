"""Batch sources: a source's history read lazily, file by file, post-processed and cast.

A batch config names Parquet, CSV or Arrow IPC files (one file or a folder, optionally hive-partitioned)
under the local roots or remote schemes the operator allows (`locations.py`). The URI
`offline://<source>` names the source's own offline log. pyarrow.dataset gives the schema, partitions
and pruning; each file is then read by its format's streaming reader in batches of a bounded byte size,
so memory stays bounded whatever the source size and however slowly the caller reads.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import re
import threading
from collections.abc import Callable, Collection, Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from featurepush.v1 import source_pb2

from .columns import conform
from .errors import Cancelled, FailedPrecondition, InvalidInput, Violation
from .locations import BatchLocations, StopCheck
from .schema import FieldSpec, SourceSpec

if TYPE_CHECKING:
    import pyarrow.dataset as ds

_LOGGER = logging.getLogger(__name__)

OFFLINE_SCHEME = "offline://"
DEFAULT_ROWS = 65_536
MAX_ROWS = 1_000_000
DEFAULT_BYTES = 4 * 1024 * 1024
# Most rows one file batch holds before post-processing and casting; the output is re-sliced to the request.
SCAN_ROWS = 65_536
# Rows of the first batch of a Parquet file, before its real width per row is known.
FIRST_ROWS = 1024
DEFAULT_READ_AHEAD_BYTES = 32 * 1024 * 1024


def _datasets() -> Any:
    """pyarrow.dataset, imported on first use.

    It imports pandas too, a quarter of a second more for every process that starts: backfill workers,
    which only encode and write, never load it (the server's batch sources load it as they start).
    """
    import pyarrow.dataset

    return pyarrow.dataset


def _parquet() -> ds.ParquetFileFormat:
    """Parquet read column chunk by column chunk: pre-buffering would hold a whole file's chunks in memory."""
    datasets = _datasets()
    options = datasets.ParquetFragmentScanOptions(pre_buffer=False)
    return datasets.ParquetFileFormat(default_fragment_scan_options=options)


_FORMATS: dict[int, tuple[str, Callable[[], ds.FileFormat]]] = {
    source_pb2.FILE_FORMAT_PARQUET: ("Parquet", _parquet),
    source_pb2.FILE_FORMAT_CSV: ("CSV", lambda: _datasets().CsvFileFormat()),
    source_pb2.FILE_FORMAT_ARROW_IPC: ("Arrow IPC", lambda: _datasets().IpcFileFormat()),
}

# What the Arrow, Parquet, CSV and IPC readers raise on a file they cannot read. Their messages may quote
# the file, so replies say only what kind of failure it was; the server log keeps the original.
READ_ERRORS: tuple[type[BaseException], ...] = (
    pa.ArrowException,
    OSError,
    ValueError,
    TypeError,
    LookupError,
    MemoryError,
    NotImplementedError,
)


def _failure_kind(e: BaseException, format_name: str) -> str:
    if isinstance(e, MemoryError | pa.ArrowCapacityError):
        return "holds more data than the server can decode at once"
    if isinstance(e, NotImplementedError):
        return f"uses a {format_name} feature or type this server cannot read"
    if isinstance(e, TypeError):
        return "holds a column whose type differs between files or cannot be converted"
    if isinstance(e, OSError):
        return "could not be read from storage"
    if isinstance(e, LookupError):
        return f"is not well-formed {format_name}"
    return f"is not valid {format_name} or does not match the source's other files"


PostProcessor = Callable[[pa.Table], pa.Table]
_PUBLIC_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


def load_post_processor(
    reference: str, source: str, allowed: Collection[str], what: str = "post_processor"
) -> PostProcessor:
    """Import a "package.module:function" reference from an allowed module; raise FailedPrecondition.

    The part after the colon is one public name, and it must be a function defined in that very
    module, so no attribute path reaches anything the module merely imports or holds. `what` names the
    reference in errors (a source's post_processor, a view's transformation).
    """
    missing, refused = f"{what.upper()}_NOT_FOUND", f"{what.upper()}_NOT_ALLOWED"
    module_name, sep, attr = reference.partition(":")
    parts = module_name.split(".")
    if (
        not sep
        or not _PUBLIC_NAME.fullmatch(attr)
        or not all(p.isidentifier() and not p.startswith("__") for p in parts)
    ):
        raise FailedPrecondition(
            f'{what} {reference!r} of source {source!r} is not a "package.module:function" '
            "reference naming one public function",
            reason=missing,
            metadata={"source": source, what: reference},
        )
    if not any(module_name == m or module_name.startswith(m + ".") for m in allowed):
        raise FailedPrecondition(
            f"{what} {reference!r} of source {source!r} is in module {module_name!r}, which the "
            "server may not import; add it to the server's post_processor_modules setting "
            "(--post-processor-module) or define the function in a definitions file the server loads",
            reason=refused,
            metadata={"source": source, what: reference},
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise FailedPrecondition(
            f"{what} {reference!r} of source {source!r} cannot be imported by the server: "
            f"{type(e).__name__}: {e}",
            reason=missing,
            metadata={"source": source, what: reference},
        ) from None
    target = module.__dict__.get(attr)
    if not (inspect.isfunction(target) and target.__module__ == module_name):
        raise FailedPrecondition(
            f"{what} {reference!r} of source {source!r} is not a function defined in module {module_name!r}",
            reason=missing,
            metadata={"source": source, what: reference},
        )
    return target


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


_UNIT_PER_SECOND = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}


_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


def _in_unit(micros: int, unit: str) -> int:
    """The smallest count of `unit` whose time is at or after `micros`; so `t >= it` iff `t >= micros`.

    Nanoseconds reach only years 1677 to 2262 in int64: a bound beyond them is held at int64's limit,
    which every value of the column passes or fails as it would the bound (bar int64's largest value).
    """
    per = _UNIT_PER_SECOND[unit]
    count = micros * (per // 1_000_000) if per >= 1_000_000 else _ceil_div(micros, 1_000_000 // per)
    return min(max(count, _INT64_MIN), _INT64_MAX)


def _is_time(t: pa.DataType) -> bool:
    return bool(pa.types.is_timestamp(t) and t.tz is not None)


def time_mask(column: pa.ChunkedArray | pa.Array, start: int | None, end: int | None) -> pa.Array:
    """Which rows of a tz-aware timestamp column lie in [start, end) microseconds; nulls are kept."""
    unit = column.type.unit
    values = pc.cast(column, pa.int64())
    mask = pc.is_valid(values)
    keep = pa.array(np.ones(len(values), dtype=bool))
    if start is not None:
        keep = pc.and_(keep, pc.greater_equal(values, _in_unit(start, unit)))
    if end is not None:
        keep = pc.and_(keep, pc.less(values, _in_unit(end, unit)))
    return pc.or_(pc.fill_null(keep, False), pc.invert(mask))


@dataclass(frozen=True)
class Scanned:
    """One file batch after post-processing: its table, the row number of its first row, its bytes."""

    table: pa.Table
    first_row: int
    nbytes: int


class BatchReadError(FailedPrecondition):
    """Reading or post-processing a batch source failed; the message names the source and batch."""


def _never() -> bool:
    return False


@dataclass(frozen=True)
class _Opened:
    """A source's dataset with the name of its format, for messages."""

    dataset: ds.Dataset
    format_name: str
    format_code: int


def range_violations(start: int | None, end: int | None) -> list[Violation]:
    """What is wrong with an event-time range [start, end) of a read or a backfill: an end before start."""
    if start is not None and end is not None and end < start:
        return [Violation("end_time", "must not be before start_time")]
    return []


class BatchSources:
    """Opens, checks and reads sources' batch histories; thread-safe, holds no open reader between calls.

    `open_readers` counts readers not yet released, so cancellation can be observed. One file batch
    holds about a quarter of `read_ahead_bytes` of decoded data.
    """

    def __init__(
        self,
        offline_root: Path,
        post_processor_modules: Collection[str] = (),
        locations: BatchLocations | None = None,
        read_ahead_bytes: int = DEFAULT_READ_AHEAD_BYTES,
    ):
        self._offline_root = offline_root
        self._allowed = set(post_processor_modules)
        self._locations = locations or BatchLocations((), (), offline_root.parent)
        self._batch_bytes = max(read_ahead_bytes // 4, 64 * 1024)
        self._lock = threading.Lock()
        self.open_readers = 0
        _datasets()  # at start, not on the first read

    @property
    def allowed(self) -> set[str]:
        """The modules functions may be imported from; the set itself, so later additions show."""
        return self._allowed

    def allow_post_processors(self, module: str) -> None:
        """Let sources name functions of `module` (and its submodules) as post_processor."""
        self._allowed.add(module)

    # --- opening -------------------------------------------------------------------------------

    def _open(self, spec: SourceSpec, stop: StopCheck) -> _Opened:
        """A source's dataset, its location checked and listed; raise FailedPrecondition."""
        bc = spec.proto.batch_config
        if bc.uri.startswith(OFFLINE_SCHEME):
            name = bc.uri[len(OFFLINE_SCHEME) :]
            if name != spec.name:
                raise FailedPrecondition(
                    f"source {spec.name!r} names the offline log of {name!r}; a source can only read its own "
                    f"({OFFLINE_SCHEME}{spec.name})",
                    reason="BATCH_SOURCE_UNREADABLE",
                    metadata={"source": spec.name},
                )
            own = self._locations.list_own(self._offline_root / name, spec.name, stop)
            dataset = _datasets().FileSystemDataset.from_paths(
                own.files, schema=spec.arrow_schema, format=_parquet(), filesystem=own.filesystem
            )
            return _Opened(dataset, "Parquet", source_pb2.FILE_FORMAT_PARQUET)
        found = _FORMATS.get(bc.file_format)
        if found is None:
            raise FailedPrecondition(
                f"source {spec.name!r} has no batch file format",
                reason="BATCH_SOURCE_UNREADABLE",
                metadata={"source": spec.name},
            )
        format_name, make_format = found
        listing = self._locations.listing(bc.uri, spec.name, stop)
        if not listing.files:
            raise FailedPrecondition(
                f"the batch location of source {spec.name!r} holds no files",
                reason="BATCH_SOURCE_UNREADABLE",
                metadata={"source": spec.name},
            )
        try:
            dataset = _datasets().dataset(
                listing.files,
                filesystem=listing.filesystem,
                format=make_format(),
                partitioning="hive" if bc.hive_partitioning else None,
                partition_base_dir=listing.base,
            )
        except READ_ERRORS as e:
            _LOGGER.warning("opening the batch source of %s failed", spec.name, exc_info=True)
            raise FailedPrecondition(
                f"the batch source of {spec.name!r} cannot be opened: a file {_failure_kind(e, format_name)}",
                reason="BATCH_SOURCE_UNREADABLE",
                metadata={"source": spec.name},
            ) from None
        return _Opened(dataset, format_name, bc.file_format)

    def dataset(self, spec: SourceSpec, stop: StopCheck = _never) -> ds.Dataset:
        """The dataset of a source's batch config; raise FailedPrecondition if it may not be opened."""
        return self._open(spec, stop).dataset

    def check(self, spec: SourceSpec, stop: StopCheck = _never) -> None:
        """Refuse a batch config that lacks a schema column or has one of a type that cannot be cast."""
        bc = spec.proto.batch_config
        opened = self._open(spec, stop)
        post = load_post_processor(bc.post_processor, spec.name, self._allowed) if bc.post_processor else None
        if post is None:
            sample = opened.dataset.schema.empty_table()
        else:
            tables = self._tables(spec, opened, None, None, stop)
            try:
                head = next(tables, opened.dataset.schema.empty_table()).slice(0, 64)
            finally:
                tables.close()
            sample = self._post_process(spec, post, head, 0, 0).slice(0, 0)
        sample = self._rename_time(spec, sample)
        names = set(sample.column_names)
        missing = [f.name for f in spec.fields if f.name not in names]
        present = [f for f in spec.fields if f.name in names]
        _, bad = conform(sample, present, "", allow_extra_columns=True, max_violations=len(spec.fields))
        mistyped = [v.description for v in bad]
        if missing or mistyped:
            parts = []
            if missing:
                parts.append("missing columns " + ", ".join(missing))
            parts.extend(mistyped)
            raise FailedPrecondition(
                f"the batch source of {spec.name!r} ({bc.uri}) does not fit the push schema: "
                + "; ".join(parts),
                reason="BATCH_SOURCE_SCHEMA_MISMATCH",
                metadata={
                    "source": spec.name,
                    "missing": ",".join(missing),
                    "mistyped": ",".join(v.path.lstrip(".") for v in bad),
                },
            )

    # --- scanning ------------------------------------------------------------------------------

    def scan(
        self,
        spec: SourceSpec,
        start: int | None,
        end: int | None,
        columns: Sequence[str] | None,
        stop: StopCheck,
    ) -> Generator[Scanned, None, None]:
        """Post-processed file batches holding at least the rows in [start, end) microseconds.

        Rows outside the range are dropped here when the event time is already a timestamp; otherwise
        the caller drops them after the cast. `columns` limits the files' columns read (None: all).
        """
        bc = spec.proto.batch_config
        opened = self._open(spec, stop)
        schema = opened.dataset.schema
        post = load_post_processor(bc.post_processor, spec.name, self._allowed) if bc.post_processor else None
        file_time = bc.timestamp_field or spec.timestamp_field
        filt = None
        if post is None and file_time in schema.names and _is_time(schema.field(file_time).type):
            filt = self._pushdown(file_time, schema.field(file_time).type, start, end)
        read_columns = None
        if post is None and columns is not None:
            wanted = {file_time if c == spec.timestamp_field else c for c in columns} | {file_time}
            read_columns = [n for n in schema.names if n in wanted]
        with self._lock:
            self.open_readers += 1
        tables = self._tables(spec, opened, read_columns, filt, stop)
        try:
            row = 0
            for index, table in enumerate(tables):
                if stop():
                    raise Cancelled("the read was cancelled")
                nbytes = table.nbytes
                if post is not None:
                    table = self._post_process(spec, post, table, index, row)
                table = self._rename_time(spec, table)
                if post is not None and spec.timestamp_field in table.column_names:
                    ts = table.column(spec.timestamp_field)
                    if _is_time(ts.type) and (start is not None or end is not None):
                        table = table.filter(time_mask(ts, start, end))
                yield Scanned(table, row, nbytes)
                row += table.num_rows
        finally:
            tables.close()
            with self._lock:
                self.open_readers -= 1

    def _tables(
        self,
        spec: SourceSpec,
        opened: _Opened,
        columns: list[str] | None,
        filt: ds.Expression | None,
        stop: StopCheck,
    ) -> Generator[pa.Table, None, None]:
        """The dataset's rows as tables of the dataset schema, file by file; reader failures named safely."""
        files = self._file_tables(opened, columns, filt, stop)
        index = 0
        row = 0
        try:
            while True:
                try:
                    table = next(files)
                except StopIteration:
                    return
                except READ_ERRORS as e:
                    _LOGGER.warning("reading the batch source of %s failed", spec.name, exc_info=True)
                    raise BatchReadError(
                        f"reading batch {index} (from row {row}) of the batch source of {spec.name!r} "
                        f"failed: a file {_failure_kind(e, opened.format_name)}",
                        reason="BATCH_SOURCE_UNREADABLE",
                        metadata={"source": spec.name, "batch": str(index)},
                    ) from None
                yield table
                index += 1
                row += table.num_rows
        finally:
            files.close()

    def _file_tables(
        self, opened: _Opened, columns: list[str] | None, filt: ds.Expression | None, stop: StopCheck
    ) -> Generator[pa.Table, None, None]:
        """Each file's batches, given the dataset schema's columns and partition values, then filtered."""
        schema = opened.dataset.schema
        wanted = columns if columns is not None else schema.names
        for fragment in opened.dataset.get_fragments(filter=filt):
            if stop():
                raise Cancelled("the read was cancelled")
            keys = _datasets().get_partition_keys(fragment.partition_expression)
            in_file = [n for n in wanted if n not in keys]
            for batch in self._fragment_batches(opened.format_code, fragment, schema, in_file, filt):
                columns_out = []
                for name in wanted:
                    dtype = schema.field(name).type
                    if name in keys:
                        columns_out.append(pa.array([keys[name]] * batch.num_rows, dtype))
                    elif name in batch.schema.names:
                        column = batch.column(name)
                        columns_out.append(column if column.type == dtype else column.cast(dtype))
                    else:
                        columns_out.append(pa.nulls(batch.num_rows, dtype))
                table = pa.Table.from_arrays(columns_out, schema=pa.schema([schema.field(n) for n in wanted]))
                yield table if filt is None else table.filter(filt)

    def _fragment_batches(
        self,
        format_code: int,
        fragment: ds.Fragment,
        schema: pa.Schema,
        columns: list[str],
        filt: ds.Expression | None,
    ) -> Iterator[pa.RecordBatch]:
        """One file's batches of about `_batch_bytes`, read by its format's streaming reader."""
        fs = fragment.filesystem
        if format_code == source_pb2.FILE_FORMAT_CSV:
            with fs.open_input_stream(fragment.path) as stream:
                reader = pacsv.open_csv(
                    stream,
                    convert_options=pacsv.ConvertOptions(
                        column_types={n: schema.field(n).type for n in columns},
                        include_columns=columns,
                        include_missing_columns=True,
                    ),
                )
                yield from reader
            return
        if format_code == source_pb2.FILE_FORMAT_ARROW_IPC:
            with fs.open_input_file(fragment.path) as handle:
                ipc = pa.ipc.open_file(handle)
                for i in range(ipc.num_record_batches):
                    batch = ipc.get_batch(i)
                    present = [n for n in columns if n in batch.schema.names]
                    batch = batch.select(present)
                    step = self._rows_for(batch.nbytes, batch.num_rows)
                    for offset in range(0, batch.num_rows, step):
                        yield batch.slice(offset, step)
            return
        with fs.open_input_file(fragment.path) as handle:
            # Buffered column reads: without them a whole column chunk is read into memory at once.
            parquet = pq.ParquetFile(handle, pre_buffer=False, buffer_size=1024 * 1024)
            row_groups = list(range(parquet.metadata.num_row_groups))
            if filt is not None:
                row_groups = [rg.id for rg in fragment.subset(filter=filt, schema=schema).row_groups]
            present = [n for n in columns if n in parquet.schema_arrow.names]
            rows = 0
            for group in row_groups:
                if rows == 0:
                    # A row's decoded width shows only once decoded (dictionaries hide it): a few rows
                    # are decoded first and dropped, to size the batches of the whole file.
                    probe = parquet.iter_batches(
                        batch_size=FIRST_ROWS, row_groups=[group], columns=present, use_threads=False
                    )
                    first = next(probe, None)
                    probe.close()
                    rows = SCAN_ROWS if first is None else self._rows_for(first.nbytes, first.num_rows)
                for batch in parquet.iter_batches(
                    batch_size=rows, row_groups=[group], columns=present, use_threads=True
                ):
                    # Later row groups follow the width the rows really have.
                    rows = self._rows_for(batch.nbytes, batch.num_rows)
                    yield batch

    def _rows_for(self, nbytes: int, num_rows: int) -> int:
        """Rows per batch so that a batch of rows this wide holds about `_batch_bytes`."""
        per_row = max(nbytes / max(num_rows, 1), 1.0)
        return max(1, min(SCAN_ROWS, int(self._batch_bytes // per_row)))

    @staticmethod
    def _pushdown(
        column: str, dtype: pa.DataType, start: int | None, end: int | None
    ) -> ds.Expression | None:
        expr = None
        unit = dtype.unit
        if start is not None:
            expr = _datasets().field(column) >= pa.scalar(_in_unit(start, unit), pa.int64()).cast(dtype)
        if end is not None:
            upper = _datasets().field(column) < pa.scalar(_in_unit(end, unit), pa.int64()).cast(dtype)
            expr = upper if expr is None else expr & upper
        return expr

    @staticmethod
    def _rename_time(spec: SourceSpec, table: pa.Table) -> pa.Table:
        """Name the files' event-time column as the push schema does."""
        file_time = spec.proto.batch_config.timestamp_field
        names = table.column_names
        if (
            file_time
            and file_time != spec.timestamp_field
            and file_time in names
            and spec.timestamp_field not in names
        ):
            return table.rename_columns([spec.timestamp_field if n == file_time else n for n in names])
        return table

    @staticmethod
    def _post_process(
        spec: SourceSpec, post: PostProcessor, table: pa.Table, index: int, row: int
    ) -> pa.Table:
        reference = spec.proto.batch_config.post_processor
        where = f"batch {index} (from row {row})"
        try:
            out = post(table)
        except Exception as e:
            raise BatchReadError(
                f"post_processor {reference!r} of source {spec.name!r} failed on {where}: "
                f"{type(e).__name__}: {e}",
                reason="POST_PROCESSOR_FAILED",
                metadata={"source": spec.name, "batch": str(index), "post_processor": reference},
            ) from None
        if not isinstance(out, pa.Table):
            raise BatchReadError(
                f"post_processor {reference!r} of source {spec.name!r} returned {type(out).__name__}, not a "
                f"pyarrow.Table, on {where}",
                reason="POST_PROCESSOR_FAILED",
                metadata={"source": spec.name, "batch": str(index), "post_processor": reference},
            )
        return out

    # --- reading -------------------------------------------------------------------------------

    def open_read(
        self,
        spec: SourceSpec,
        *,
        start: int | None,
        end: int | None,
        columns: Sequence[str],
        max_rows: int,
        max_bytes: int,
        stop: StopCheck,
    ) -> BatchRead:
        """Check a read's arguments and prepare it; nothing is read until its batches are iterated."""
        if not spec.proto.HasField("batch_config"):
            raise FailedPrecondition(
                f"source {spec.name!r} has no batch_config to read",
                reason="NO_BATCH_CONFIG",
                metadata={"source": spec.name},
            )
        violations = []
        known = {f.name for f in spec.fields}
        for i, c in enumerate(columns):
            if c not in known:
                violations.append(
                    Violation(f"columns[{i}]", f"{c!r} is not a column of source {spec.name!r}")
                )
        if len(set(columns)) != len(columns):
            violations.append(Violation("columns", "columns must not repeat"))
        if not 0 <= max_rows <= MAX_ROWS:
            violations.append(Violation("max_rows_per_batch", f"must be 0 to {MAX_ROWS:,}, got {max_rows}"))
        if max_bytes < 0:
            violations.append(Violation("max_bytes_per_batch", f"must not be negative, got {max_bytes}"))
        violations += range_violations(start, end)
        if violations:
            raise InvalidInput("the read request is not valid", violations)
        by_name = {f.name: f for f in spec.fields}
        fields = [by_name[c] for c in columns] if columns else list(spec.fields)
        return BatchRead(
            self, spec, start, end, fields, max_rows or DEFAULT_ROWS, max_bytes or DEFAULT_BYTES, stop
        )


class BatchRead:
    """One prepared read: `schema` of the output, and `batches()` cast to it, sliced to the size limits."""

    def __init__(
        self,
        sources: BatchSources,
        spec: SourceSpec,
        start: int | None,
        end: int | None,
        fields: list[FieldSpec],
        max_rows: int,
        max_bytes: int,
        stop: StopCheck,
    ):
        self._sources = sources
        self._spec = spec
        self._start = start
        self._end = end
        self._fields = fields
        self._max_rows = max_rows
        self._max_bytes = max_bytes
        self._stop = stop
        self.schema = pa.schema([f.to_arrow() for f in fields])

    def batches(self) -> Generator[pa.RecordBatch, None, None]:
        """The output batches; a batch-source row that cannot be cast fails the read, naming the row."""
        spec = self._spec
        ts = spec.timestamp_field
        conform_fields = (
            self._fields if any(f.name == ts for f in self._fields) else [*self._fields, spec.field(ts)]
        )
        names = [f.name for f in self._fields]
        scans = self._sources.scan(spec, self._start, self._end, names, self._stop)
        try:
            for scanned in scans:
                table, bad = conform(
                    scanned.table, conform_fields, "rows", allow_extra_columns=True, max_violations=10
                )
                if table is None:
                    shown = "; ".join(f"{_renumber(v.path, scanned.first_row)}: {v.description}" for v in bad)
                    raise BatchReadError(
                        f"the batch source of {spec.name!r} holds rows that do not fit the push schema: "
                        + shown,
                        reason="BATCH_SOURCE_INVALID_ROWS",
                        metadata={"source": spec.name},
                    )
                if self._start is not None or self._end is not None:
                    table = table.filter(time_mask(table.column(ts), self._start, self._end))
                table = table.select(names)
                if table.num_rows == 0:
                    continue
                per_row = max(table.nbytes / table.num_rows, 1.0)
                step = max(1, min(self._max_rows, int(self._max_bytes // per_row)))
                for batch in table.to_batches(max_chunksize=step):
                    if self._stop():
                        raise Cancelled("the read was cancelled")
                    yield batch
        finally:
            scans.close()


def _renumber(path: str, offset: int) -> str:
    """A violation path with its row index moved from the batch to the whole read."""
    head, sep, rest = path.partition("[")
    index, close, tail = rest.partition("]")
    if not sep or not close or not index.isdigit():
        return path
    return f"{head}[{int(index) + offset}]{tail}"
