"""The one step from validated records to a store write, shared by pushes and backfills.

Each source's validated Arrow table is handed to every writer in turn; each adds its part of the write
(the latest rows, the offline-log entry, and whatever else comes to hang here) to the source's `Staged`.
The parts of every source then go to the store in one atomic write, with the request id whose counts the
same write records.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import logging
from array import array
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Protocol

import pyarrow as pa

from .encoding import encode_python, encode_rows
from .errors import Cancelled, FailedPrecondition, InvalidInput, Violation, shown
from .ipc import READ_ERRORS
from .registry import Source
from .rows import ConvertedRows
from .stores.base import LatestRows, RowBatch, TileUpdate, WriteResult

_LOGGER = logging.getLogger(__name__)
# A backfill's write of at least this many rows goes to the store as a file it may take whole: sorting the
# rows and building the file run where they were encoded (a backfill worker), and the store's part of the
# write no longer grows with the rows (65,536 rows cost RocksDB's write 2.1 us a row, their file's ingestion
# 0.02). Fewer rows would make many small files for RocksDB to compact.
ROWS_FILE_MIN_ROWS = 8192


class Origin(enum.Enum):
    """Where records come from: a push, or a backfill of a source's own history."""

    PUSH = "push"
    BACKFILL = "backfill"


@dataclass(frozen=True)
class SourceRecords:
    """One source's validated records; `path` names them in the caller's errors ("" names nothing).

    A push of a few rows may hand them over as Python values (rows.ConvertedRows): their table is made
    only for a writer that asks for it.
    """

    source: Source
    records: pa.Table | ConvertedRows
    path: str = ""
    # A backfill's run id per feature view id (tiles.begin_backfill); pushes have none.
    runs: Mapping[int, str] = field(default_factory=dict)


@dataclass
class Staged:
    """One source's part of a write, filled in by the writers; `keys` and `values` are its latest rows."""

    source: Source
    records: pa.Table | ConvertedRows
    origin: Origin
    dry_run: bool
    keys: Sequence[bytes] = ()
    values: Sequence[bytes] = ()
    offline: bytes = b""
    runs: Mapping[int, str] = field(default_factory=dict)
    # The feature views' tile updates (tiles.TileWriter), merged by the store in the same write.
    tiles: list[TileUpdate] = field(default_factory=list)

    @property
    def table(self) -> pa.Table:
        """The records as an Arrow table of the source's schema."""
        records = self.records
        return records if isinstance(records, pa.Table) else records.table()

    @property
    def num_rows(self) -> int:
        """How many records there are, without making their table."""
        return self.records.num_rows


class Writer(Protocol):
    """Adds one kind of output to a source's part of a write; called once per source and write."""

    def stage(self, staged: Staged) -> None:
        """Fill in this writer's part of `staged`."""


class LatestRowWriter:
    """Encodes the records into the store's keys and framed values of the latest row per entity."""

    def __init__(self, rows: LatestRows):
        self._rows = rows

    def stage(self, staged: Staged) -> None:
        """Set the staged keys and values."""
        spec = staged.source.spec
        prefix = self._rows.row_prefix(staged.source.id)
        records = staged.records
        if isinstance(records, ConvertedRows):
            staged.keys, staged.values = encode_python(
                records.columns, spec.fields, spec.entity_keys, spec.timestamp_field, prefix
            )
            return
        # A push's rows go to the store's write batch; a backfill's large ones become a rows file, which
        # is sorted where it is written.
        staged.keys, staged.values = encode_rows(
            records,
            spec.fields,
            spec.entity_keys,
            spec.timestamp_field,
            prefix,
            by_key=staged.origin is Origin.PUSH,
        )


class Materializer:
    """Writes validated records through every writer and the store; thread-safe as the store's write is."""

    def __init__(self, store: LatestRows, writers: Sequence[Writer]):
        self._store = store
        # In order; the server's are the latest rows, the offline log (offline_log.OfflineLogWriter), then
        # the feature views' tiles (tiles.TileWriter).
        self.writers = list(writers)

    def write(
        self,
        records: Sequence[SourceRecords],
        *,
        origin: Origin,
        request_id: str = "",
        dry_run: bool = False,
        stop: Callable[[], bool] | None = None,
    ) -> WriteResult:
        """Stage every source's records, then write them all atomically or none.

        `stop` is asked once everything is staged: True raises Cancelled and nothing is written.
        """
        batches: list[RowBatch] = []
        for part in records:
            staged = Staged(part.source, part.records, origin, dry_run, runs=part.runs)
            guard: AbstractContextManager[None] = (
                validated_data("encoding", part.path) if part.path else nullcontext()
            )
            with guard:
                for writer in self.writers:
                    writer.stage(staged)
            source = part.source
            batches.append(
                RowBatch(
                    source.spec.name,
                    staged.keys,
                    staged.values,
                    staged.offline,
                    source.id,
                    source.generation,
                    staged.tiles,
                )
            )
        if stop is not None and stop():
            raise Cancelled("the push's caller went away before it was written; nothing was written")
        if origin is Origin.BACKFILL and not dry_run and not request_id and len(batches) == 1:
            batches[0] = self._with_rows_file(batches[0])
        fingerprint = records_fingerprint(records, batches) if request_id else ""
        result = self._store.write_latest(
            batches, request_id=request_id, fingerprint=fingerprint, dry_run=dry_run
        )
        first = result.fingerprint
        if result.replayed and first and _recreated(first, fingerprint):
            # A source of the first request was deleted since, its rows with it, and applied again: that
            # record answers for rows no longer stored, so these records replace it (unless another
            # request replaced it first, which is then answered from as any record is).
            result = self._store.write_latest(
                batches, request_id=request_id, fingerprint=fingerprint, dry_run=dry_run, replace=first
            )
            first = result.fingerprint
        if result.replayed and first and _other_records(first, fingerprint):
            # Answering with the first request's counts would tell the caller these records were written.
            raise FailedPrecondition(
                f"request_id {shown(request_id)!r} was used within the idempotency window for other records; "
                "nothing was written: give each distinct push a request id of its own",
                reason="REQUEST_ID_REUSED",
                metadata={"request_id": shown(request_id)},
            )
        return result

    def _with_rows_file(self, batch: RowBatch) -> RowBatch:
        """The batch naming a file of its rows if it is large, writes nothing else and the store takes one."""
        if len(batch.keys) < ROWS_FILE_MIN_ROWS or batch.offline or batch.tiles:
            return batch
        try:
            name = self._store.rows_file(batch.keys, batch.values)
        except Exception as e:  # noqa: BLE001 - the write batch does the same write, and tells a failing disk
            _LOGGER.warning("a rows file of %s failed, writing its rows one by one: %s", batch.source, e)
            return batch
        return dataclasses.replace(batch, rows_file=name) if name else batch


def records_fingerprint(records: Sequence[SourceRecords], batches: Sequence[RowBatch]) -> str:
    """What a request id is checked against: each source's name and a digest of its fields, then one of
    the records, as `name=fields,...|records`.

    The records' digest covers the encoded values (each holds its record's columns, entity key included),
    so one set of records pushed as rows or as Arrow, in one batch or several, has one fingerprint.
    """
    sources = []
    for part in sorted(records, key=lambda r: r.source.spec.name):
        sources.append(f"{part.source.spec.name}#{part.source.id}={part.source.fields_digest}")
    digest = hashlib.sha256()
    for batch in sorted(batches, key=lambda b: b.source):
        name = batch.source.encode()
        values = batch.values
        digest.update(len(name).to_bytes(2, "big") + name + len(values).to_bytes(8, "big"))
        # The lengths make the values' boundaries part of the digest, not only their concatenation.
        digest.update(array("Q", map(len, values)).tobytes())
        digest.update(b"".join(values))
    return f"{','.join(sources)}|{digest.hexdigest()[:32]}"


def _sources(fingerprint: str) -> dict[str, tuple[str, str]]:
    """A fingerprint's sources: each name's store id ("" in fingerprints written before ids) and fields."""
    sources = {}
    for item in fingerprint.partition("|")[0].split(","):
        named, _, fields = item.partition("=")
        name, _, source_id = named.partition("#")
        sources[name] = (source_id, fields)
    return sources


def _other_records(first: str, now: str) -> bool:
    """Whether two fingerprints tell that their records differ.

    Only the records' digests are compared (a fingerprint written before sources were named with their ids
    names them otherwise), and not where the same sources' fields changed between them (a nullable field
    added): the values then hold another set of fields, so the same records digest otherwise; such a
    request id is answered as a replay.
    """
    if first.partition("|")[2] == now.partition("|")[2]:
        return False
    first_fields = {name: fields for name, (_, fields) in _sources(first).items()}
    now_fields = {name: fields for name, (_, fields) in _sources(now).items()}
    return first_fields.keys() != now_fields.keys() or first_fields == now_fields


def _recreated(first: str, now: str) -> bool:
    """Whether a source both fingerprints name was deleted and applied again between them (a new id)."""
    first_sources, now_sources = _sources(first), _sources(now)
    return any(
        first_id and name in now_sources and now_sources[name][0] != first_id
        for name, (first_id, _) in first_sources.items()
    )


@contextmanager
def validated_data(step: str, path: str) -> Iterator[None]:
    """Turn an Arrow error in a step on validated data into the caller's InvalidInput, never INTERNAL."""
    try:
        yield
    except READ_ERRORS as e:
        # Validated data should not get here: keep the trace for the operator, answer the caller cleanly.
        _LOGGER.warning("%s %s failed on validated data: %s", step, path, type(e).__name__, exc_info=True)
        raise InvalidInput(
            f"{path} cannot be stored: {step} its records failed",
            [Violation(path, f"{step} the records failed ({type(e).__name__}); check the column types")],
            reason="INVALID_RECORDS",
        ) from None
