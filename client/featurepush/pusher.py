"""A batching pusher: records batched by size and time, sent over PushStream, retried until acknowledged."""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import grpc
from google.protobuf import struct_pb2

from featurepush.errors import FeaturepushError, from_rpc_error, from_status_proto
from featurepush.payload import BatchFailure, PushBatchError
from featurepush.v1 import ingest_service_pb2, ingest_service_pb2_grpc
from featurepush.values import fill_struct

__all__ = ["Pusher", "PusherStats", "RETRYABLE_CODES"]

_LOGGER = logging.getLogger(__name__)

# Codes after which a batch may simply be sent again: its request_id makes a repeat harmless.
# Codes after which a batch is resent; RESOURCE_EXHAUSTED is resent too when it carries a RetryInfo delay
# (an overload refusal, not a request over a size limit).
RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})

ErrorCallback = Callable[[BatchFailure], None]


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


@dataclass
class _Batch:
    """One sealed batch: the message to send (and resend) and the records it came from."""

    message: ingest_service_pb2.PushStreamRequest
    records: list[Mapping[str, Any]]
    sent_at: float | None = None


def encode_record(record: Mapping[str, Any]) -> struct_pb2.Struct:
    """The Struct of one record; raises the encoder's ValueError or TypeError naming the bad field."""
    struct = struct_pb2.Struct()
    fill_struct(struct, record, "record")
    return struct


@dataclass
class BatchBook:
    """The bookkeeping shared by the thread and asyncio pushers; not thread-safe, callers hold their lock."""

    source: str
    max_rows: int
    buffer: list[Mapping[str, Any]] = field(default_factory=list)
    structs: list[struct_pb2.Struct] = field(default_factory=list)
    buffer_started: float = 0.0
    pending: dict[int, _Batch] = field(default_factory=dict)
    failures: list[BatchFailure] = field(default_factory=list)
    stats: PusherStats = field(default_factory=PusherStats)
    stream_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    next_sequence: int = 0

    def append(self, record: Mapping[str, Any], struct: struct_pb2.Struct) -> bool:
        """Buffer one encoded record; return whether the buffer is full."""
        if not self.buffer:
            self.buffer_started = time.monotonic()
        self.buffer.append(record)
        self.structs.append(struct)
        return len(self.buffer) >= self.max_rows

    def seal(self) -> _Batch | None:
        """Turn the buffer into a pending batch with its own sequence and request ids."""
        if not self.buffer:
            return None
        sequence = self.next_sequence
        self.next_sequence += 1
        request = ingest_service_pb2.PushRequest(request_id=f"{self.stream_id}-{sequence}")
        request.records[self.source].rows.extend(self.structs)
        message = ingest_service_pb2.PushStreamRequest(sequence_id=sequence, request=request)
        batch = _Batch(message, self.buffer)
        self.buffer, self.structs = [], []
        self.pending[sequence] = batch
        return batch

    def linger_due(self, linger_s: float) -> float | None:
        """When the buffered records must be sealed, on the monotonic clock, or None if none are."""
        return self.buffer_started + linger_s if self.buffer else None

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
        return self._failed(batch, from_status_proto(err.code, err.message, list(err.details)))

    def fail_pending(self, error: FeaturepushError) -> list[BatchFailure]:
        """Give up on every pending batch with one error."""
        failures = [self._failed(b, error) for b in self.in_order()]
        self.pending.clear()
        return failures

    def _failed(self, batch: _Batch, error: FeaturepushError) -> BatchFailure:
        self.stats.failed_batches += 1
        self.stats.failed_records += len(batch.records)
        return BatchFailure(batch.records, error, batch.message.sequence_id, batch.message.request.request_id)


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


class Pusher:
    """Batches one source's records by size (`max_rows`) and time (`linger_ms`) and sends them on PushStream.

    Every batch carries a request_id, so batches resent after UNAVAILABLE, DEADLINE_EXCEEDED or an
    acknowledgement that took longer than `ack_timeout_s` are never counted twice; retries back off
    exponentially and give up after `retry_timeout_s` without progress. A batch the server rejects is passed
    with its records to `on_error`, or, without a callback, raised as PushBatchError by the next flush() or
    close(). At most `max_pending` batches are unacknowledged at once; add() blocks beyond that. Thread-safe.
    """

    def __init__(
        self,
        stub: ingest_service_pb2_grpc.IngestServiceStub,
        source: str,
        *,
        max_rows: int = 1000,
        linger_ms: float = 50.0,
        max_pending: int = 8,
        on_error: ErrorCallback | None = None,
        retry_timeout_s: float = 60.0,
        ack_timeout_s: float = 30.0,
        backoff_initial_s: float = 0.05,
        backoff_max_s: float = 2.0,
    ) -> None:
        if max_rows < 1 or max_pending < 1 or linger_ms < 0:
            raise ValueError("max_rows and max_pending must be at least 1 and linger_ms not negative")
        self._stub = stub
        self._book = BatchBook(source, max_rows)
        self._linger_s = linger_ms / 1000
        self._max_pending = max_pending
        self._on_error = on_error
        self._retry_timeout_s = retry_timeout_s
        self._ack_timeout_s = ack_timeout_s
        self._backoff = Backoff(backoff_initial_s, backoff_max_s)
        self._cond = threading.Condition()
        self._outbox: queue.SimpleQueue[object] | None = None
        self._call: Any = None
        self._timed_out = False
        self._closed = False
        self._sender = threading.Thread(target=self._send_loop, name=f"pusher-{source}", daemon=True)
        self._ticker = threading.Thread(target=self._tick_loop, name=f"pusher-{source}-linger", daemon=True)
        self._sender.start()
        self._ticker.start()

    @property
    def stats(self) -> PusherStats:
        """A copy of the totals so far."""
        with self._cond:
            return PusherStats(**vars(self._book.stats))

    def add(self, record: Mapping[str, Any]) -> None:
        """Queue one record; raises ValueError or TypeError at once if it cannot be encoded."""
        struct = encode_record(record)
        with self._cond:
            if self._closed:
                raise RuntimeError("the pusher is closed")
            while len(self._book.pending) >= self._max_pending and self._sender.is_alive():
                self._cond.wait()
            if self._book.append(record, struct):
                self._seal()
            else:
                self._cond.notify_all()

    def add_many(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Queue records in order."""
        for record in records:
            self.add(record)

    def flush(self) -> None:
        """Send what is buffered and wait until every batch is settled; raise PushBatchError for failures."""
        with self._cond:
            self._seal()
            while self._book.pending and self._sender.is_alive():
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
        self._ticker.join()
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
                self._outbox.put(batch.message)
            self._cond.notify_all()

    def _half_close(self) -> None:
        """End the request side once closed and settled, so the server ends the call; lock held."""
        if self._closed and not self._book.pending and self._outbox is not None:
            self._outbox.put(_STOP)
            self._outbox = None

    def _report(self, failures: list[BatchFailure]) -> None:
        """Hand failures to the callback, or keep them for flush() and close(); called without the lock."""
        if not failures:
            return
        if self._on_error is None:
            with self._cond:
                self._book.failures.extend(failures)
            return
        for failure in failures:
            try:
                self._on_error(failure)
            except Exception:
                _LOGGER.exception("the pusher's on_error callback failed")

    def _send_loop(self) -> None:
        failing_since: float | None = None
        while True:
            with self._cond:
                while not self._book.pending and not self._closed:
                    self._cond.wait()
                if not self._book.pending:
                    return
                outbox: queue.SimpleQueue[object] = queue.SimpleQueue()
                now = time.monotonic()
                for batch in self._book.in_order():
                    batch.sent_at = now
                    outbox.put(batch.message)
                self._outbox = outbox
                self._timed_out = False
                call = self._stub.PushStream(iter(outbox.get, _STOP))
                self._call = call
            try:
                for ack in call:
                    with self._cond:
                        failure = self._book.acknowledge(ack)
                        self._backoff.reset()
                        failing_since = None
                        self._half_close()
                        self._cond.notify_all()
                    self._report([failure] if failure is not None else [])
                error: FeaturepushError | None = None
                code = None
            except grpc.RpcError as err:
                error = from_rpc_error(err)
                code = error.code
            with self._cond:
                if self._outbox is outbox:
                    self._outbox = None
                outbox.put(_STOP)  # releases the request thread of a broken call
                timed_out, self._timed_out, self._call = self._timed_out, False, None
                if not self._book.pending:
                    continue
            overloaded = error is not None and error.retry_delay_s is not None
            if (
                error is None
                or code in RETRYABLE_CODES
                or overloaded
                or (timed_out and code == grpc.StatusCode.CANCELLED)
            ):
                now = time.monotonic()
                failing_since = failing_since or now
                if now - failing_since <= self._retry_timeout_s:
                    # An overloaded server says when to come back; sooner would only be refused again.
                    retry_after = error.retry_delay_s if error is not None else None
                    delay = max(self._backoff.next_delay(), retry_after or 0.0)
                    _LOGGER.info(
                        "push stream to %s broke (%s); resending in %.2fs", self._book.source, code, delay
                    )
                    with self._cond:
                        self._book.stats.reconnects += 1
                    time.sleep(delay)
                    continue
            final = error or FeaturepushError(grpc.StatusCode.UNAVAILABLE, "the push stream kept ending")
            with self._cond:
                failures = self._book.fail_pending(final)
                self._cond.notify_all()
            failing_since = None
            self._report(failures)

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
                    self._timed_out = True
                    self._call.cancel()
                wake = [t for t in (due, oldest and oldest + self._ack_timeout_s) if t]
                timeout = max(min(wake) - now, 0.001) if wake else 0.5
                self._cond.wait(min(timeout, 0.5))
