"""A batching pusher: records batched by size and time, sent over PushStream, retried until acknowledged."""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import islice
from types import TracebackType
from typing import Any

import grpc
from google.protobuf import struct_pb2

from featurepush.errors import (
    FeaturepushError,
    InvalidArgumentError,
    Violation,
    from_rpc_error,
    from_status_proto,
)
from featurepush.payload import (
    RESEND_AS_ROWS,
    BatchFailure,
    PushBatchError,
    PushSchema,
    fill_source_records,
    sends_structs,
)
from featurepush.v1 import ingest_service_pb2, ingest_service_pb2_grpc
from featurepush.values import EncodingError, fill_struct

__all__ = ["DEFAULT_MAX_ROWS", "Pusher", "PusherStats", "RETRYABLE_CODES"]

_LOGGER = logging.getLogger(__name__)

# Codes after which a batch is resent (its request_id makes a repeat harmless); RESOURCE_EXHAUSTED is resent
# too when it carries a RetryInfo delay (an overload refusal, not a request over a size limit).
RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
# A batch acknowledged with one of these, or with RetryInfo, was not written for now (the server's store
# restarting, an overload, a definition changed while it was validated: "send them again"); it is resent,
# with the pending batches after it, like the batches of a stream that broke.
TRANSIENT_BATCH_CODES = RETRYABLE_CODES | {grpc.StatusCode.ABORTED}

ErrorCallback = Callable[[BatchFailure], None]


def channel_closed(error: Exception) -> FeaturepushError:
    """The error of a pusher's pending batches when its channel, closed under it, refused a new call."""
    return FeaturepushError(
        grpc.StatusCode.CANCELLED,
        f"the pusher's channel is closed ({error}), so these records were not sent; push them through a "
        "new client",
    )


@dataclass
class PusherStats:
    """Totals of a pusher's settled batches; a replayed batch counts once, as the server first saw it."""

    batches: int = 0
    records: int = 0
    accepted: int = 0
    written: int = 0
    superseded: int = 0
    failed_batches: int = 0
    failed_records: int = 0
    reconnects: int = 0


class _Batch:
    """One sealed batch: its records, ids, and the message sent (and resent), built once on first send.

    The message is built off the caller's thread (by gRPC's request thread, or a worker for asyncio): one
    Arrow batch when the source's schema takes the records exactly, else Structs.
    """

    def __init__(
        self,
        source: str,
        sequence: int,
        request_id: str,
        records: list[Mapping[str, Any]],
        schema: SchemaLookup | None,
    ) -> None:
        self.source = source
        self.sequence = sequence
        self.request_id = request_id
        self.records = records
        self.schema = schema
        self.sent_at: float | None = None
        # Whether the built message carries the records as Arrow; a refused Arrow batch is resent as rows.
        self.columnar = False
        # The size of the built request in bytes, which sizes the batches that follow; 0 until built.
        self.nbytes = 0
        self._message: ingest_service_pb2.PushStreamRequest | None = None
        self._lock = threading.Lock()

    def message(self) -> ingest_service_pb2.PushStreamRequest:
        """The request to send, built on first use; InvalidArgumentError if a record cannot be encoded."""
        with self._lock:
            if self._message is None:
                request = ingest_service_pb2.PushRequest(request_id=self.request_id)
                # A short batch (a linger sealed it with a few records) goes as Structs, as Client.push's.
                schema = (
                    self.schema() if self.schema is not None and not sends_structs(self.records) else None
                )
                try:
                    self.columnar = fill_source_records(
                        request.records[self.source], self.source, self.records, schema
                    )
                except Exception as err:
                    # Raised on the thread that feeds the stream, which must go on: the batch is settled
                    # as refused instead of breaking the call (which would be retried with the same batch).
                    raise unencodable(self.source, self.records, err) from err
                self._message = ingest_service_pb2.PushStreamRequest(
                    sequence_id=self.sequence, request=request
                )
                self.nbytes = self._message.ByteSize()
            return self._message

    def as_rows(self) -> None:
        """Send the records as Structs from now on."""
        with self._lock:
            self.schema, self._message, self.columnar = None, None, False


# The schema a batch's records are sent as Arrow by, or None for Structs; asked when the batch is built.
SchemaLookup = Callable[[], PushSchema | None]


def check_mapping(record: object) -> None:
    """Raise TypeError for a record that is not a mapping; its values are checked as its batch is built."""
    if type(record) is not dict and not isinstance(record, Mapping):
        raise TypeError(f"a record is a mapping of field names to values, not {type(record).__name__}")


def unencodable(source: str, records: list[Mapping[str, Any]], cause: Exception) -> InvalidArgumentError:
    """The client's refusal of a batch it could not build, naming every record value the encoder refuses."""
    violations = []
    for index, record in enumerate(records):
        path = f'records["{source}"][{index}]'
        try:
            fill_struct(struct_pb2.Struct(), record, path)
        except EncodingError as err:
            violations.append(Violation(err.path, err.problem))
        except Exception as err:
            # A caller's mapping or value type may raise anything from its own methods.
            violations.append(Violation(path, f"cannot encode: {type(err).__name__}: {err}"))
    if not violations:
        problem = f"cannot encode: {type(cause).__name__}: {cause}"
        violations.append(Violation(f'records["{source}"]', problem))
    return InvalidArgumentError(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"the batch was not sent: {len(violations)} value(s) cannot be encoded (see the violations); "
        "mend them and add the batch's records again",
        reason="UNENCODABLE_RECORDS",
        violations=violations,
    )


# A buffer of eager_rows records, or one whose linger time is up, is sealed at once while fewer batches than
# this are unacknowledged; otherwise it grows toward max_rows until one is acknowledged. Its records would
# wait behind those batches anyway, and one large push costs the server far less than several small ones
# (each pays a fixed cost and a WAL sync). Two keep the server writing one batch while the next is
# converted and sent.
EAGER_IN_FLIGHT = 2
DEFAULT_MAX_ROWS = 10_000
DEFAULT_EAGER_ROWS = 1000
DEFAULT_MAX_BATCH_BYTES = 8 << 20
# How many records add_many() queues per hold of the pusher's lock.
_ADD_CHUNK = 1024
# The longest the linger thread or task sleeps with nothing due, in seconds; it is woken for what changes.
IDLE_WAIT_S = 0.5


@dataclass
class BatchBook:
    """The bookkeeping shared by the thread and asyncio pushers; not thread-safe, callers hold their lock.

    A buffer is sealed when it reaches grow_to records, or, while fewer than EAGER_IN_FLIGHT batches are
    unacknowledged, when it reaches eager_rows or its linger time is up; grow_to is max_rows, less where
    the last acknowledged batch's bytes per record would take a batch past max_batch_bytes.
    """

    source: str
    max_rows: int
    schema: SchemaLookup | None = None
    forget_schema: Callable[[], None] | None = None
    eager_rows: int = DEFAULT_EAGER_ROWS
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES
    buffer: list[Mapping[str, Any]] = field(default_factory=list)
    buffer_started: float = 0.0
    pending: dict[int, _Batch] = field(default_factory=dict)
    resend: list[_Batch] = field(default_factory=list)
    failures: list[BatchFailure] = field(default_factory=list)
    # Set by an acknowledgement that a batch was not written for now; the stream is then begun anew.
    broken: FeaturepushError | None = None
    stats: PusherStats = field(default_factory=PusherStats)
    stream_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    next_sequence: int = 0
    # The most records a batch grows to while others are in flight: max_rows, less by the byte budget.
    grow_to: int = 0

    def __post_init__(self) -> None:
        self.eager_rows = min(self.eager_rows, self.max_rows)
        self.grow_to = self.max_rows

    def append(self, record: Mapping[str, Any]) -> bool | None:
        """Buffer one record; return True to seal the buffer now, False if it was empty, else None."""
        buffer = self.buffer
        buffer.append(record)
        n = len(buffer)
        if n >= self.eager_rows and (n >= self.grow_to or len(self.pending) < EAGER_IN_FLIGHT):
            return True
        if n == 1:
            self.buffer_started = time.monotonic()
            return False
        return None

    def ready(self, linger_s: float) -> bool:
        """Whether the buffer is to be sealed now; asked again as batches settle."""
        n = len(self.buffer)
        if n >= self.grow_to:
            return True
        if not n or len(self.pending) >= EAGER_IN_FLIGHT:
            return False
        return n >= self.eager_rows or time.monotonic() >= self.buffer_started + linger_s

    def seal(self) -> _Batch | None:
        """Turn the buffer into a pending batch with its own sequence and request ids."""
        if not self.buffer:
            return None
        sequence = self.next_sequence
        self.next_sequence += 1
        batch = _Batch(self.source, sequence, f"{self.stream_id}-{sequence}", self.buffer, self.schema)
        self.buffer = []
        self.pending[sequence] = batch
        return batch

    def linger_due(self, linger_s: float) -> float | None:
        """When the buffer is to be sealed by time, on the monotonic clock; None if it is empty, or if enough
        batches are in flight that the next acknowledgement is what seals it."""
        if not self.buffer or len(self.pending) >= EAGER_IN_FLIGHT:
            return None
        return self.buffer_started + linger_s

    def in_order(self) -> list[_Batch]:
        """Pending batches in sequence order, for (re)sending."""
        return [self.pending[s] for s in sorted(self.pending)]

    def oldest_sent(self) -> float | None:
        """When the oldest unacknowledged batch was sent, or None if none is in flight."""
        times = [b.sent_at for b in self.pending.values() if b.sent_at is not None]
        return min(times) if times else None

    def acknowledge(self, ack: ingest_service_pb2.PushStreamResponse) -> BatchFailure | None:
        """Settle the batch an acknowledgement names; return its failure if it failed."""
        batch = self.pending.pop(ack.sequence_id, None)
        if batch is None:
            _LOGGER.warning("acknowledgement of unknown batch %d ignored", ack.sequence_id)
            return None
        if len(batch.records) >= 100 or batch.nbytes >= 1 << 16:
            # Records of a stream are alike more often than not: the last batch's size per record says how
            # many fit the byte budget. A batch of a few small records is mostly the Arrow schema, and
            # would say far too much.
            per_record = max(batch.nbytes // len(batch.records), 1)
            self.grow_to = max(self.eager_rows, min(self.max_rows, self.max_batch_bytes // per_record))
        if ack.WhichOneof("result") == "response":
            self.stats.batches += 1
            self.stats.records += len(batch.records)
            counts = ack.response.counts.get(self.source)
            if counts is not None:
                self.stats.accepted += counts.accepted
                self.stats.written += counts.written
                self.stats.superseded += counts.superseded
            return None
        err = ack.error
        error = from_status_proto(err.code, err.message, list(err.details))
        if batch.columnar and error.code in RESEND_AS_ROWS and error.retry_delay_s is None:
            # The server's row path words the answer the records get as Structs; the schema may be stale.
            if self.forget_schema is not None:
                self.forget_schema()
            batch.as_rows()
            self.pending[batch.sequence] = batch
            self.resend.append(batch)
            return None
        if error.code in TRANSIENT_BATCH_CODES or error.retry_delay_s is not None:
            # Kept pending: the pusher ends the stream and sends it again after its backoff, within its
            # retry budget, as after a break; the batches behind it follow in order.
            self.pending[batch.sequence] = batch
            self.broken = self.broken or error
            return None
        return self._failed(batch, error)

    def refuse(self, batch: _Batch, error: FeaturepushError) -> BatchFailure | None:
        """Settle a batch the client could not build, unsent; None if it was settled already."""
        if self.pending.get(batch.sequence) is not batch:
            return None
        del self.pending[batch.sequence]
        return self._failed(batch, error)

    def fail_pending(self, error: FeaturepushError) -> list[BatchFailure]:
        """Give up on every pending batch with one error."""
        failures = [self._failed(b, error) for b in self.in_order()]
        self.pending.clear()
        return failures

    def _failed(self, batch: _Batch, error: FeaturepushError) -> BatchFailure:
        self.stats.failed_batches += 1
        self.stats.failed_records += len(batch.records)
        return BatchFailure(batch.records, error, batch.sequence, batch.request_id)


def check_sizes(
    max_rows: int, max_pending: int, linger_ms: float, eager_rows: int, max_batch_bytes: int
) -> None:
    """Raise ValueError for a pusher's sizes that cannot work."""
    if min(max_rows, max_pending, eager_rows, max_batch_bytes) < 1 or linger_ms < 0:
        raise ValueError(
            "max_rows, max_pending, eager_rows and max_batch_bytes must be at least 1, "
            "and linger_ms not negative"
        )


class Backoff:
    """Exponential backoff with full jitter between `initial_s` and `max_s`."""

    def __init__(self, initial_s: float, max_s: float) -> None:
        self._initial, self._max = initial_s, max_s
        self._attempt = 0

    def reset(self) -> None:
        """Start again from the initial delay after progress."""
        self._attempt = 0

    def next_delay(self) -> float:
        """The next delay to sleep, in seconds."""
        ceiling = min(self._max, self._initial * 2**self._attempt)
        self._attempt += 1
        return random.uniform(ceiling / 2, ceiling)


_STOP = object()


def log_retry(source: str, error: FeaturepushError | None, failing_s: float, delay_s: float) -> None:
    """Say at WARNING that a push stream broke, how long its batches have waited, and when it tries again."""
    reason = error.code.name if error is not None else "ended"
    _LOGGER.warning(
        "push stream to %s broke (%s); retrying for %.1fs, next in %.2fs", source, reason, failing_s, delay_s
    )


def log_recovered(source: str, failing_s: float) -> None:
    """Say once at WARNING, after retries, that a push stream is acknowledging batches again."""
    _LOGGER.warning("push stream to %s recovered after %.1fs of retries", source, failing_s)


def _messages(
    outbox: queue.SimpleQueue[_Batch | object], refuse: Callable[[_Batch, InvalidArgumentError], None]
) -> Iterator[ingest_service_pb2.PushStreamRequest]:
    """The requests of one stream attempt, until _STOP; each built as it is sent, or refused unsent."""
    for batch in iter(outbox.get, _STOP):
        assert isinstance(batch, _Batch)
        try:
            message = batch.message()
        except InvalidArgumentError as err:
            refuse(batch, err)
            continue
        yield message


class Pusher:
    """Batches one source's records by size and time (`linger_ms`) and sends them on PushStream.

    While fewer than two batches are unacknowledged, a batch goes once it holds `eager_rows` records or its
    first has waited `linger_ms`; otherwise it keeps filling, up to `max_rows` records and about
    `max_batch_bytes`, until the server acknowledges one: a fast producer gets few large pushes, a slow one
    short waits.

    Every batch carries a request_id, so batches resent after UNAVAILABLE, DEADLINE_EXCEEDED or an
    acknowledgement that took longer than `ack_timeout_s` are never counted twice; retries back off
    exponentially and give up after `retry_timeout_s` without progress. A batch the server rejects, or one
    holding a value the client cannot encode (never sent), is passed with its records to `on_error`, or,
    without a callback, raised as PushBatchError by the next flush() or close(). At most `max_pending`
    batches are unacknowledged at once; add() blocks beyond that. Thread-safe.
    """

    def __init__(
        self,
        stub: ingest_service_pb2_grpc.IngestServiceStub,
        source: str,
        *,
        max_rows: int = DEFAULT_MAX_ROWS,
        linger_ms: float = 50.0,
        max_pending: int = 8,
        on_error: ErrorCallback | None = None,
        retry_timeout_s: float = 60.0,
        ack_timeout_s: float = 30.0,
        backoff_initial_s: float = 0.05,
        backoff_max_s: float = 2.0,
        schema: SchemaLookup | None = None,
        forget_schema: Callable[[], None] | None = None,
        eager_rows: int = DEFAULT_EAGER_ROWS,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    ) -> None:
        check_sizes(max_rows, max_pending, linger_ms, eager_rows, max_batch_bytes)
        self._stub = stub
        self._book = BatchBook(source, max_rows, schema, forget_schema, eager_rows, max_batch_bytes)
        self._linger_s = linger_ms / 1000
        self._max_pending = max_pending
        self._on_error = on_error
        self._retry_timeout_s = retry_timeout_s
        self._ack_timeout_s = ack_timeout_s
        self._backoff = Backoff(backoff_initial_s, backoff_max_s)
        # A plain lock: add() takes it once per record, and nothing here takes it twice.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._outbox: queue.SimpleQueue[_Batch | object] | None = None
        # Failed batches for the reporting thread to hand to on_error.
        self._unreported: list[BatchFailure] = []
        self._reporting = False
        self._call: Any = None
        self._closed = False
        self._sender = threading.Thread(target=self._send_loop, name=f"pusher-{source}", daemon=True)
        self._ticker = threading.Thread(target=self._tick_loop, name=f"pusher-{source}-linger", daemon=True)
        # on_error runs on a thread of its own: a slow callback holds up neither acknowledgements nor
        # lingering buffers, and one that adds records while max_pending batches wait can wait for them.
        self._reporter: threading.Thread | None = None
        if on_error is not None:
            self._reporter = threading.Thread(
                target=self._report_loop, name=f"pusher-{source}-on-error", daemon=True
            )
            self._reporter.start()
        self._sender.start()
        self._ticker.start()

    @property
    def stats(self) -> PusherStats:
        """A copy of the totals so far."""
        with self._cond:
            return PusherStats(**vars(self._book.stats))

    def add(self, record: Mapping[str, Any]) -> None:
        """Queue one record; raises TypeError at once if it is not a mapping.

        Only appends to a buffer: a full buffer is converted (to one Arrow batch when the schema takes it)
        and sent by background threads while the next one fills. A batch holding a value that cannot be
        encoded is not sent; it fails as InvalidArgumentError naming each such value, like a batch the
        server rejects.
        """
        check_mapping(record)
        with self._lock:
            if self._closed:
                raise RuntimeError("the pusher is closed")
            self._append(record)

    def add_many(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Queue records in order, as add() does each, taking the lock once per chunk of them."""
        it = iter(records)
        # The records are drawn outside the lock: a generator's code may call the pusher.
        while chunk := list(islice(it, _ADD_CHUNK)):
            with self._lock:
                if self._closed:
                    raise RuntimeError("the pusher is closed")
                for record in chunk:
                    check_mapping(record)
                    self._append(record)

    def _append(self, record: Mapping[str, Any]) -> None:
        """Buffer one record once fewer than max_pending batches wait, sealing as due; lock held."""
        book = self._book
        while len(book.pending) >= self._max_pending and self._sender.is_alive():
            self._cond.wait()
        state = book.append(record)
        if state:
            self._seal()
        elif state is False:
            # The linger clock starts with the first record; later ones need not wake the ticker.
            self._cond.notify_all()

    def flush(self) -> None:
        """Send what is buffered; wait until every batch is settled and on_error has had each failure.

        Without a callback, raises PushBatchError for the failures.
        """
        in_callback = threading.current_thread() is self._reporter
        with self._cond:
            self._seal()
            while self._sender.is_alive() and (
                self._book.pending or (not in_callback and (self._unreported or self._reporting))
            ):
                self._cond.wait()
        self._raise_failures()

    def close(self) -> None:
        """Flush, then end the stream and the pusher's threads; raise PushBatchError for failures."""
        with self._cond:
            if not self._closed:
                self._seal()
                self._closed = True
                self._half_close()
                self._cond.notify_all()
        self._sender.join()
        with self._cond:
            # The ticker and the reporter wait for the sender's end, which nothing else wakes them for.
            self._cond.notify_all()
        self._ticker.join()
        if self._reporter is not None:
            self._reporter.join()
        self._raise_failures()

    def __enter__(self) -> Pusher:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _raise_failures(self) -> None:
        with self._cond:
            failures, self._book.failures = self._book.failures, []
        if failures:
            raise PushBatchError(failures)

    def _seal(self) -> None:
        """Seal the buffer and hand it to the open stream, if any; called with the lock held."""
        batch = self._book.seal()
        if batch is not None:
            if self._outbox is not None:
                batch.sent_at = time.monotonic()
                self._outbox.put(batch)
            self._cond.notify_all()

    def _resend(self) -> None:
        """Queue the batches to send again as rows on the open stream, if any; lock held."""
        for batch in self._book.resend:
            if self._outbox is not None:
                batch.sent_at = time.monotonic()
                self._outbox.put(batch)
        self._book.resend.clear()

    def _half_close(self) -> None:
        """End the request side once closed and settled, so the server ends the call; lock held."""
        if self._closed and not self._book.pending and self._outbox is not None:
            self._outbox.put(_STOP)
            self._outbox = None

    def _report(self, failures: list[BatchFailure]) -> None:
        """Keep failures for flush() and close(), or queue them for the reporting thread; lock held.

        on_error never runs on the sending thread or on gRPC's: a callback that adds records while
        max_pending batches wait for acknowledgements would wait on the very thread that reads them.
        """
        if self._on_error is None:
            self._book.failures.extend(failures)
        elif failures:
            self._unreported.extend(failures)
            self._cond.notify_all()

    def _report_loop(self) -> None:
        """Hand failed batches to on_error, in the order they failed, until closed and settled."""
        assert self._on_error is not None
        with self._cond:
            while True:
                if self._unreported:
                    failures, self._unreported = self._unreported, []
                    self._reporting = True
                    self._cond.release()
                    try:
                        for failure in failures:
                            try:
                                self._on_error(failure)
                            except Exception:
                                _LOGGER.exception("the pusher's on_error callback failed")
                    finally:
                        self._cond.acquire()
                        self._reporting = False
                        self._cond.notify_all()
                elif self._closed and not self._sender.is_alive():
                    return
                else:
                    self._cond.wait()

    def _refuse(self, batch: _Batch, error: InvalidArgumentError) -> None:
        """Settle a batch that could not be built, on the thread that feeds the stream."""
        with self._cond:
            failure = self._book.refuse(batch, error)
            if failure is None:
                return
            self._report([failure])
            if self._book.ready(self._linger_s):
                self._seal()
            self._half_close()
            self._cond.notify_all()

    def _send_loop(self) -> None:
        failing_since: float | None = None
        while True:
            with self._cond:
                while not self._book.pending and not self._closed:
                    self._cond.wait()
                if not self._book.pending:
                    return
                outbox: queue.SimpleQueue[_Batch | object] = queue.SimpleQueue()
                now = time.monotonic()
                self._book.resend.clear()
                for batch in self._book.in_order():
                    batch.sent_at = now
                    outbox.put(batch)
                self._outbox = outbox
                # gRPC's request thread builds each message as it sends it, off the caller's thread.
                try:
                    call = self._stub.PushStream(_messages(outbox, self._refuse))
                except ValueError as e:
                    # The channel was closed under the pusher: no call can be made on it any more.
                    self._outbox = None
                    self._report(self._book.fail_pending(channel_closed(e)))
                    self._cond.notify_all()
                    failing_since = None
                    continue
                self._call = call
            try:
                for ack in call:
                    with self._cond:
                        failure = self._book.acknowledge(ack)
                        if self._book.broken is not None:
                            call.cancel()
                            break
                        self._resend()
                        if self._book.ready(self._linger_s):
                            # The buffer grew while batches were in flight; it goes now that one settled.
                            self._seal()
                        self._backoff.reset()
                        if failing_since is not None:
                            log_recovered(self._book.source, time.monotonic() - failing_since)
                        failing_since = None
                        if failure is not None:
                            self._report([failure])
                        self._half_close()
                        self._cond.notify_all()
                error: FeaturepushError | None = None
                code = None
            except grpc.RpcError as err:
                error = from_rpc_error(err)
                code = error.code
            with self._cond:
                if self._outbox is outbox:
                    self._outbox = None
                outbox.put(_STOP)  # releases the request thread of a broken call
                self._call = None
                broken, self._book.broken = self._book.broken, None
                if broken is not None:
                    error, code = broken, broken.code
                if not self._book.pending:
                    continue
            overloaded = error is not None and error.retry_delay_s is not None
            if (
                error is None
                or broken is not None
                or code in RETRYABLE_CODES
                or overloaded
                # Cancelled by this pusher for an overdue acknowledgement, or by anyone else: by grpc for a
                # call that reached a server as it stopped, by a proxy. Resending is safe (request ids);
                # a channel closed under the pusher refuses the next call, which ends the retries.
                or code == grpc.StatusCode.CANCELLED
            ):
                now = time.monotonic()
                failing_since = failing_since or now
                if now - failing_since <= self._retry_timeout_s:
                    # An overloaded server says when to come back; sooner would only be refused again.
                    retry_after = error.retry_delay_s if error is not None else None
                    delay = max(self._backoff.next_delay(), retry_after or 0.0)
                    log_retry(self._book.source, error, now - failing_since, delay)
                    with self._cond:
                        self._book.stats.reconnects += 1
                    time.sleep(delay)
                    continue
            final = error or FeaturepushError(grpc.StatusCode.UNAVAILABLE, "the push stream kept ending")
            with self._cond:
                self._report(self._book.fail_pending(final))
                self._cond.notify_all()
            failing_since = None

    def _tick_loop(self) -> None:
        """Seal lingering buffers on time and cancel calls whose acknowledgements are overdue."""
        with self._cond:
            while not (self._closed and not self._sender.is_alive()):
                now = time.monotonic()
                due = self._book.linger_due(self._linger_s)
                if due is not None and now >= due:
                    self._seal()
                    due = None
                oldest = self._book.oldest_sent()
                if oldest is not None and now - oldest > self._ack_timeout_s and self._call is not None:
                    self._call.cancel()
                wake = [t for t in (due, oldest and oldest + self._ack_timeout_s) if t]
                timeout = max(min(wake) - now, 0.001) if wake else IDLE_WAIT_S
                self._cond.wait(min(timeout, IDLE_WAIT_S))
