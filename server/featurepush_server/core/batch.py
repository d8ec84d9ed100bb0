"""Batch sources: a source's history read lazily through pyarrow.dataset, post-processed and cast.

A batch config names Parquet, CSV or Arrow IPC files (one file or a folder, optionally hive-partitioned) on
any filesystem pyarrow reaches, or through fsspec (s3fs, gcsfs) when pyarrow cannot. The URI
`offline://<source>` names the source's own offline log. Reading streams record batches through a
dataset scanner with little read-ahead, so memory stays bounded whatever the source size.
"""

from __future__ import annotations

import contextlib
import importlib
import threading
from collections.abc import Callable, Collection, Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from featurepush.v1 import source_pb2

from .columns import conform
from .errors import Cancelled, FailedPrecondition, InvalidInput, Violation
from .schema import FieldSpec, SourceSpec

OFFLINE_SCHEME = "offline://"
DEFAULT_ROWS = 65_536
MAX_ROWS = 1_000_000
DEFAULT_BYTES = 4 * 1024 * 1024
# Rows a scanner batch holds before post-processing and casting; the output is re-sliced to the request.
SCAN_ROWS = 65_536


def _parquet() -> ds.ParquetFileFormat:
    """Parquet read column chunk by column chunk: pre-buffering would hold a whole file's chunks in memory."""
    return ds.ParquetFileFormat(default_fragment_scan_options=ds.ParquetFragmentScanOptions(pre_buffer=False))


_FORMATS: dict[int, str | Callable[[], ds.FileFormat]] = {
    source_pb2.FILE_FORMAT_PARQUET: _parquet,
    source_pb2.FILE_FORMAT_CSV: "csv",
    source_pb2.FILE_FORMAT_ARROW_IPC: "ipc",
}

PostProcessor = Callable[[pa.Table], pa.Table]
StopCheck = Callable[[], bool]


def load_post_processor(reference: str, source: str, allowed: Collection[str]) -> PostProcessor:
    """Import a "package.module:function" reference from an allowed module; raise FailedPrecondition."""
    module_name, _, attr = reference.partition(":")
    if not any(module_name == m or module_name.startswith(m + ".") for m in allowed):
        raise FailedPrecondition(
            f"post_processor {reference!r} of source {source!r} is in module {module_name!r}, which the "
            "server may not import; add it to the server's post_processor_modules setting "
            "(--post-processor-module) or define the function in a definitions file the server loads",
            reason="POST_PROCESSOR_NOT_ALLOWED",
            metadata={"source": source, "post_processor": reference},
        )
    try:
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except Exception as e:
        raise FailedPrecondition(
            f"post_processor {reference!r} of source {source!r} cannot be imported by the server: "
            f"{type(e).__name__}: {e}",
            reason="POST_PROCESSOR_NOT_FOUND",
            metadata={"source": source, "post_processor": reference},
        ) from None
    if not callable(target):
        raise FailedPrecondition(
            f"post_processor {reference!r} of source {source!r} is not callable",
            reason="POST_PROCESSOR_NOT_FOUND",
            metadata={"source": source},
        )
    return target  # type: ignore[no-any-return]


def _filesystem(uri: str) -> tuple[pafs.FileSystem | None, str]:
    """The filesystem and path of a URI: pyarrow's own when it has one, else fsspec's."""
    if "://" not in uri or uri.startswith("file://"):
        return None, uri.removeprefix("file://")
    with contextlib.suppress(pa.ArrowInvalid, pa.ArrowNotImplementedError, ImportError):
        fs, path = pafs.FileSystem.from_uri(uri)
        return fs, path
    # pyarrow has no filesystem for this scheme: fsspec may.
    protocol, _, path = uri.partition("://")
    try:
        fsspec = importlib.import_module("fsspec")
        handler = pafs.FSSpecHandler(fsspec.filesystem(protocol))
    except (ImportError, ValueError) as e:
        raise FailedPrecondition(
            f"cannot read {uri!r}: no filesystem for {protocol}:// ({e}); install featurepush[s3] or "
            "featurepush[gcs]",
            reason="BATCH_SOURCE_UNREADABLE",
            metadata={"uri": uri},
        ) from None
    return pafs.PyFileSystem(handler), path


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


_UNIT_PER_SECOND = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}


def _in_unit(micros: int, unit: str) -> int:
    """The smallest count of `unit` whose time is at or after `micros`; so `t >= it` iff `t >= micros`."""
    per = _UNIT_PER_SECOND[unit]
    return micros * (per // 1_000_000) if per >= 1_000_000 else _ceil_div(micros, 1_000_000 // per)


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
    """One scanner batch after post-processing: its table, the row number of its first row, its bytes."""

    table: pa.Table
    first_row: int
    nbytes: int


class BatchReadError(FailedPrecondition):
    """Reading or post-processing a batch source failed; the message names the source and batch."""


class BatchSources:
    """Opens, checks and reads sources' batch histories; thread-safe, holds no open reader between calls.

    `open_readers` counts scanners not yet released, so cancellation can be observed.
    """

    def __init__(self, offline_root: Path, post_processor_modules: Collection[str] = ()):
        self._offline_root = offline_root
        self._allowed = set(post_processor_modules)
        self._lock = threading.Lock()
        self.open_readers = 0

    def allow_post_processors(self, module: str) -> None:
        """Let sources name functions of `module` (and its submodules) as post_processor."""
        self._allowed.add(module)

    # --- opening -------------------------------------------------------------------------------

    def dataset(self, spec: SourceSpec) -> ds.Dataset:
        """The dataset of a source's batch config; raise FailedPrecondition if it cannot be opened."""
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
            folder = self._offline_root / name
            folder.mkdir(parents=True, exist_ok=True)
            return ds.dataset(str(folder), format=_parquet(), schema=spec.arrow_schema)
        found = _FORMATS.get(bc.file_format)
        fmt = found() if callable(found) else found
        if fmt is None:
            raise FailedPrecondition(
                f"source {spec.name!r} has no batch file format",
                reason="BATCH_SOURCE_UNREADABLE",
                metadata={"source": spec.name},
            )
        fs, path = _filesystem(bc.uri)
        try:
            return ds.dataset(
                path, filesystem=fs, format=fmt, partitioning="hive" if bc.hive_partitioning else None
            )
        except (OSError, pa.ArrowInvalid, ValueError) as e:
            raise FailedPrecondition(
                f"cannot open the batch source of {spec.name!r} at {bc.uri!r}: {e}",
                reason="BATCH_SOURCE_UNREADABLE",
                metadata={"source": spec.name, "uri": bc.uri},
            ) from None

    def check(self, spec: SourceSpec) -> None:
        """Refuse a batch config that lacks a schema column or has one of a type that cannot be cast."""
        bc = spec.proto.batch_config
        dataset = self.dataset(spec)
        post = load_post_processor(bc.post_processor, spec.name, self._allowed) if bc.post_processor else None
        if post is None:
            sample = dataset.schema.empty_table()
        else:
            try:
                head = dataset.head(64)
            except (OSError, pa.ArrowInvalid) as e:
                raise FailedPrecondition(
                    f"cannot read the batch source of {spec.name!r}: {e}",
                    reason="BATCH_SOURCE_UNREADABLE",
                    metadata={"source": spec.name},
                ) from None
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
        """Post-processed scanner batches holding at least the rows in [start, end) microseconds.

        Rows outside the range are dropped here when the event time is already a timestamp; otherwise
        the caller drops them after the cast. `columns` limits the files' columns read (None: all).
        """
        bc = spec.proto.batch_config
        dataset = self.dataset(spec)
        post = load_post_processor(bc.post_processor, spec.name, self._allowed) if bc.post_processor else None
        file_time = bc.timestamp_field or spec.timestamp_field
        names = set(dataset.schema.names)
        filt = None
        if post is None and file_time in names and _is_time(dataset.schema.field(file_time).type):
            filt = self._pushdown(file_time, dataset.schema.field(file_time).type, start, end)
        read_columns = None
        if post is None and columns is not None:
            wanted = {file_time if c == spec.timestamp_field else c for c in columns} | {file_time}
            read_columns = [n for n in dataset.schema.names if n in wanted]
        scanner = dataset.scanner(
            columns=read_columns,
            filter=filt,
            batch_size=SCAN_ROWS,
            batch_readahead=1,
            fragment_readahead=1,
            use_threads=True,
        )
        reader = scanner.to_reader()
        with self._lock:
            self.open_readers += 1
        try:
            row = 0
            for index, batch in enumerate(_batches(reader, spec.name)):
                if stop():
                    raise Cancelled("the read was cancelled")
                table = pa.Table.from_batches([batch])
                nbytes = batch.nbytes
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
            reader.close()
            with self._lock:
                self.open_readers -= 1

    @staticmethod
    def _pushdown(
        column: str, dtype: pa.DataType, start: int | None, end: int | None
    ) -> ds.Expression | None:
        expr = None
        unit = dtype.unit
        if start is not None:
            expr = ds.field(column) >= pa.scalar(_in_unit(start, unit), pa.int64()).cast(dtype)
        if end is not None:
            upper = ds.field(column) < pa.scalar(_in_unit(end, unit), pa.int64()).cast(dtype)
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
        if start is not None and end is not None and end < start:
            violations.append(Violation("end_time", "must not be before start_time"))
        if violations:
            raise InvalidInput("the read request is not valid", violations)
        by_name = {f.name: f for f in spec.fields}
        fields = [by_name[c] for c in columns] if columns else list(spec.fields)
        return BatchRead(
            self, spec, start, end, fields, max_rows or DEFAULT_ROWS, max_bytes or DEFAULT_BYTES, stop
        )


def _batches(reader: pa.RecordBatchReader, source: str) -> Iterator[pa.RecordBatch]:
    """The reader's batches, with read failures raised as BatchReadError naming the source."""
    index = 0
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            return
        except (OSError, pa.ArrowInvalid) as e:
            raise BatchReadError(
                f"reading batch {index} of the batch source of {source!r} failed: {e}",
                reason="BATCH_SOURCE_UNREADABLE",
                metadata={"source": source, "batch": str(index)},
            ) from None
        index += 1
        yield batch


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
