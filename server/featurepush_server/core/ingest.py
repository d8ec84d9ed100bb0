"""The push path: validate every record of every source, then write them all atomically or none."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from functools import partial

import pyarrow as pa
from google.protobuf import struct_pb2

from .columns import conform
from .errors import InvalidInput, LimitExceeded, NotFound, Violation, name_list
from .ipc import IpcLimits, MalformedStream, StreamTooLarge, read_stream
from .materialize import Materializer, Origin, SourceRecords, validated_data
from .registry import Registry, Source
from .rows import ConvertedRows, convert_rows
from .stores.base import BatchCounts

_LOGGER = logging.getLogger(__name__)

MAX_REQUEST_ID = 128


@dataclass(frozen=True)
class SourcePayload:
    """One source's records in a push: JSON-like rows, or one Arrow IPC stream."""

    rows: Sequence[struct_pb2.Struct] = ()
    arrow_ipc: bytes = b""


@dataclass(frozen=True)
class PushOutcome:
    """The counts per source of a push."""

    counts: dict[str, BatchCounts]
    dry_run: bool
    replayed: bool


def source_path(name: str) -> str:
    """The path prefix of one source's records in violations."""
    return 'records["' + name.replace("\\", "\\\\").replace('"', '\\"') + '"]'


def read_arrow(
    data: bytes,
    path: str,
    limits: IpcLimits | None = None,
    before_decode: Callable[[int], object] | None = None,
) -> pa.Table:
    """Read an untrusted Arrow IPC stream, each batch fully validated; raise InvalidInput or LimitExceeded.

    `before_decode` is told the bytes the stream declares it decodes to, before it is decoded.
    """
    limits = limits or IpcLimits()
    try:
        return read_stream(data, limits, before_decode)
    except MalformedStream as e:
        raise InvalidInput(
            "arrow_ipc is not a valid Arrow IPC stream",
            [Violation(path + ".arrow_ipc", f"not a valid Arrow IPC stream: {e}")],
            reason="INVALID_ARROW",
        ) from None
    except StreamTooLarge as e:
        if e.what == "rows":
            raise LimitExceeded(
                f"{path}.arrow_ipc carries more than {e.limit} records; split it into requests of at most "
                f"{e.limit} records",
                reason="TOO_MANY_RECORDS",
                metadata={"limit": str(e.limit)},
            ) from None
        # Beyond what the server reads from one push: the caller's stream is refused like a malformed one.
        raise InvalidInput(
            f"{path}.arrow_ipc is too large: {e}; split it into smaller pushes",
            [Violation(path + ".arrow_ipc", f"too large: {e}")],
            reason="ARROW_TOO_LARGE",
            metadata={"limit": str(e.limit), "what": e.what},
        ) from None


def _empty_push() -> InvalidInput:
    return InvalidInput(
        "the push carries no records",
        [Violation("records", "add at least one record for a source")],
        reason="EMPTY_PUSH",
    )


class Ingestor:
    """Validates pushes against their sources' schemas and hands them to the materializer to write."""

    def __init__(
        self,
        registry: Registry,
        materializer: Materializer,
        *,
        max_records: int = 10_000,
        max_violations: int = 100,
        arrow_limits: IpcLimits | None = None,
        decoded_budget: Callable[[int], AbstractContextManager[object]] | None = None,
    ):
        self._registry = registry
        # Holds a count of bytes (what a push's Arrow streams decode to beyond their own size) for as long
        # as the push runs; raises Busy where the server holds too many such bytes already.
        self._decoded_budget = decoded_budget
        self._materializer = materializer
        self.max_records = max_records
        self._max_violations = max_violations
        self._arrow_limits = dataclasses.replace(arrow_limits or IpcLimits(), max_rows=max_records)

    def _hold_decoded(self, held: ExitStack, wire_bytes: int, decoded_bytes: int) -> None:
        """Count what a stream decodes to beyond its own bytes (already admitted with the request)."""
        if self._decoded_budget is not None and decoded_bytes > wire_bytes:
            held.enter_context(self._decoded_budget(decoded_bytes - wire_bytes))

    def push(
        self,
        records: Mapping[str, SourcePayload],
        *,
        dry_run: bool = False,
        request_id: str = "",
        stop: Callable[[], bool] | None = None,
    ) -> PushOutcome:
        """Validate all records, then write them all or raise without writing anything.

        `stop` is asked once validation is done: a caller that went away (cancelled, or past its deadline)
        gets Cancelled and nothing is written, since it could not learn of the write anyway.
        """
        with ExitStack() as held:
            return self._push(records, dry_run, request_id, stop, held)

    def _push(
        self,
        records: Mapping[str, SourcePayload],
        dry_run: bool,
        request_id: str,
        stop: Callable[[], bool] | None,
        held: ExitStack,
    ) -> PushOutcome:
        """push(), the decoded bytes it holds entered on `held`."""
        if not records or all(not p.rows and not p.arrow_ipc for p in records.values()):
            raise _empty_push()
        if len(request_id) > MAX_REQUEST_ID:
            raise InvalidInput(
                "request_id is too long", [Violation("request_id", f"at most {MAX_REQUEST_ID} characters")]
            )
        missing = sorted(name for name in records if self._source_or_none(name) is None)
        if missing:
            raise NotFound(
                f"unknown push source{'s' if len(missing) > 1 else ''}: {name_list(missing)}; "
                "apply them first (featurepush apply)",
                reason="SOURCE_NOT_FOUND",
                metadata={"sources": name_list(missing, 3)},
            )
        violations: list[Violation] = []
        arrow: dict[str, pa.Table] = {}
        # The limits hold for the push as a whole: each stream gets what the ones before it left.
        limits = self._arrow_limits
        for name, payload in records.items():
            path = source_path(name)
            if payload.rows and payload.arrow_ipc:
                violations.append(Violation(path, "set rows or arrow_ipc, not both"))
            elif payload.arrow_ipc:
                expands = partial(self._hold_decoded, held, len(payload.arrow_ipc))
                decoded = arrow[name] = read_arrow(payload.arrow_ipc, path, limits, expands)
                limits = dataclasses.replace(
                    limits,
                    max_rows=max(limits.max_rows - decoded.num_rows, 0),
                    max_decoded_bytes=max(limits.max_decoded_bytes - decoded.nbytes, 0),
                )
        total = sum(t.num_rows for t in arrow.values()) + sum(len(p.rows) for p in records.values())
        if not total and not violations:
            # Arrow streams of a schema and no rows: as empty as a push without them.
            raise _empty_push()
        if total > self.max_records:
            raise LimitExceeded(
                f"the push carries {total} records, more than {self.max_records}; split it into requests "
                f"of at most {self.max_records} records",
                reason="TOO_MANY_RECORDS",
                metadata={"limit": str(self.max_records)},
            )
        sources = {name: self._registry.get(name) for name in records}
        tables: dict[str, pa.Table | ConvertedRows] = {}
        # Sources given both rows and arrow_ipc, each listed; then the values, of which the first are listed.
        misplaced = len(violations)
        total_bad = 0
        for name, payload in records.items():
            spec = sources[name].spec
            path = source_path(name)
            left = max(self._max_violations - len(violations), 1)
            table: pa.Table | ConvertedRows | None
            if name in arrow:
                with validated_data("conforming", path):
                    table, bad = conform(arrow[name], spec.fields, path, max_violations=left)
                total_bad += len(bad)
            elif payload.rows:
                table, bad, count = convert_rows(payload.rows, spec.fields, spec.arrow_schema, path, left)
                total_bad += count
            else:
                continue
            if table is None:
                violations.extend(bad)
            else:
                tables[name] = table
        if violations:
            in_all = misplaced + total_bad
            raise InvalidInput(
                f"{in_all} invalid field value{'s' if in_all != 1 else ''}; nothing was written",
                violations[: self._max_violations],
                reason="INVALID_RECORDS",
                total=in_all,
            )
        parts = [SourceRecords(sources[name], part, source_path(name)) for name, part in tables.items()]
        result = self._materializer.write(
            parts, origin=Origin.PUSH, request_id=request_id, dry_run=dry_run, stop=stop
        )
        return PushOutcome(result.counts, dry_run, result.replayed)

    def knows(self, name: str) -> bool:
        """Whether `name` is an applied source: only those may label metrics, callers choose the rest."""
        return self._source_or_none(name) is not None

    def _source_or_none(self, name: str) -> Source | None:
        try:
            return self._registry.get(name)
        except NotFound:
            return None
