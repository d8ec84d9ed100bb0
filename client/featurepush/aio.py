"""The asyncio client (grpc.aio): the thread Client's surface, registry to batch sources, and a pusher."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
import pyarrow as pa
from google.rpc import status_pb2

from featurepush.auth import PemPath, async_api_key_interceptors, channel_credentials
from featurepush.batch import BackfillProgress, progress_of, read_batch, read_schema, timestamp
from featurepush.client import STALE_VIEW_CODES, ApplyResult, DefinitionResult, PushResult
from featurepush.definitions import FeatureService, StreamFeatureView, StreamSource
from featurepush.errors import FeaturepushError, InvalidArgumentError, from_rpc_error, from_status_proto
from featurepush.payload import (
    RESEND_AS_ROWS,
    BatchFailure,
    PushBatchError,
    PushData,
    PushSchema,
    as_records,
    is_columnar,
    push_request,
    push_result,
    sends_structs,
)
from featurepush.pusher import (
    DEFAULT_EAGER_ROWS,
    DEFAULT_MAX_BATCH_BYTES,
    DEFAULT_MAX_ROWS,
    IDLE_WAIT_S,
    RETRYABLE_CODES,
    Backoff,
    BatchBook,
    ErrorCallback,
    PusherStats,
    SchemaLookup,
    _Batch,
    channel_closed,
    check_mapping,
    check_sizes,
    log_recovered,
    log_retry,
)
from featurepush.reads import (
    GET_FEATURES_METHOD,
    FeatureResults,
    get_features_request,
    parse_reply,
    read_reply,
    wants_arrow,
)
from featurepush.retries import Retries
from featurepush.v1 import (
    backfill_service_pb2,
    backfill_service_pb2_grpc,
    feature_view_service_pb2,
    feature_view_service_pb2_grpc,
    ingest_service_pb2,
    ingest_service_pb2_grpc,
    online_service_pb2_grpc,
    registry_service_pb2,
    registry_service_pb2_grpc,
)

if TYPE_CHECKING:
    from featurepush.views import ViewFeatureValue

__all__ = ["AsyncClient", "AsyncPusher"]

_LOGGER = logging.getLogger(__name__)


class AsyncClient:
    """A featurepush client on a grpc.aio channel; use it from one event loop, as the channel requires."""

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        timeout: float | None = 10.0,
        channel_options: Sequence[Any] = (),
        credentials: grpc.ChannelCredentials | None = None,
        api_key: str | None = None,
        tls: bool = False,
        ca_cert: PemPath | None = None,
        client_cert: PemPath | None = None,
        client_key: PemPath | None = None,
    ) -> None:
        """Connect to target; credentials and api_key as Client takes them."""
        if tls or ca_cert or client_cert or client_key:
            if credentials is not None:
                raise ValueError("pass either credentials or the tls/ca_cert/client_cert options, not both")
            credentials = channel_credentials(ca_cert, client_cert, client_key)
        interceptors = async_api_key_interceptors(api_key) if api_key is not None else None
        options = list(channel_options)
        self._channel = (
            grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
            if credentials is None
            else grpc.aio.secure_channel(target, credentials, options=options, interceptors=interceptors)
        )
        self._timeout = timeout
        self._ingest = ingest_service_pb2_grpc.IngestServiceStub(self._channel)
        self._online = online_service_pb2_grpc.OnlineServiceStub(self._channel)
        # GetFeatures with requests the client serializes itself (featurepush.reads).
        self._get_features = self._channel.unary_unary(
            GET_FEATURES_METHOD,
            request_serializer=None,
            response_deserializer=parse_reply,
        )
        self._registry = registry_service_pb2_grpc.RegistryServiceStub(self._channel)
        self._backfill = backfill_service_pb2_grpc.BackfillServiceStub(self._channel)
        self._views = feature_view_service_pb2_grpc.FeatureViewServiceStub(self._channel)
        self._schemas: dict[str, StreamSource] = {}
        self._push_schemas: dict[str, PushSchema] = {}
        # The entity keys of each (view, service) that get_view_features named bare keys by.
        self._view_entity_keys: dict[tuple[str, str], tuple[str, ...]] = {}

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close(None)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # As Client's: the overload budget, and how long reads and pushes with a request_id resend a call that
    # met no server able to take it, in seconds.
    overload_retry_s: float = 30.0
    unavailable_retry_s: float = 10.0

    async def _call_retrying(self, method: Any, request: Any, *, resend: bool = False) -> Any:
        """Call a unary method; a refusal carrying RetryInfo is retried after its delay, within a budget;
        with `resend`, an unavailable server too (see Client._call_retrying)."""
        retries = Retries(self.overload_retry_s, self.unavailable_retry_s, resend=resend)
        while True:
            try:
                return await method(request, timeout=self._timeout)
            except grpc.RpcError as err:
                error = _error(err)
            delay = retries.delay(error)
            if delay is None:
                raise error from None
            await asyncio.sleep(delay)

    async def push(
        self, source: str, data: PushData, *, dry_run: bool = False, request_id: str | None = None
    ) -> PushResult:
        """Push dicts, a pyarrow Table or RecordBatch, or a pandas or polars DataFrame to one source."""
        return await self.push_many({source: data}, dry_run=dry_run, request_id=request_id)

    async def push_many(
        self, records: Mapping[str, PushData], *, dry_run: bool = False, request_id: str | None = None
    ) -> PushResult:
        """Push records for several sources in one atomic request; as Client.push_many, records go as Arrow
        when the cached schema takes them exactly, else as Structs."""
        data = {source: as_records(source_records) for source, source_records in records.items()}
        schemas = {source: await self._push_schema(source, d) for source, d in data.items()}
        request, columnar = push_request(data, schemas, dry_run=dry_run, request_id=request_id)
        try:
            response = await self._call_retrying(self._ingest.Push, request, resend=bool(request_id))
        except FeaturepushError as error:
            if error.code == grpc.StatusCode.NOT_FOUND:
                for source in data:
                    self._forget(source)
            if not columnar or error.code not in RESEND_AS_ROWS or error.retry_delay_s is not None:
                raise
            # The server's row path words the answer the records get; the schema may also have changed.
            for source in columnar:
                self._forget(source)
            request, _ = push_request(data, {}, dry_run=dry_run, request_id=request_id)
            response = await self._call_retrying(self._ingest.Push, request, resend=bool(request_id))
        return push_result(response)

    async def _push_schema(self, source: str, data: object) -> PushSchema | None:
        """The cached schema to send records as Arrow, or None to send Structs (also when it is unknown)."""
        if sends_structs(data) or (is_columnar(data) and type(data).__module__.split(".")[0] != "pandas"):
            return None
        cached = self._push_schemas.get(source)
        if cached is None:
            try:
                cached = PushSchema.of((await self._definition(source)).schema)
            except FeaturepushError:
                return None
            self._push_schemas[source] = cached
        return cached

    def _forget(self, name: str) -> None:
        self._schemas.pop(name, None)
        self._push_schemas.pop(name, None)

    # Registry.

    async def apply(self, *sources: StreamSource, validate_only: bool = False) -> list[ApplyResult]:
        """Create or update each source in order; stop at the first rejected one, raising its error."""
        results: list[ApplyResult] = []
        for source in sources:
            request = registry_service_pb2.ApplySourceRequest(
                source=source.to_proto(), validate_only=validate_only
            )
            try:
                response = await self._registry.ApplySource(request, timeout=self._timeout)
            except grpc.RpcError as err:
                raise _error(err) from None
            if response.changed and not validate_only:
                self._forget(source.name)
            stored = StreamSource.from_proto(response.source) if response.HasField("source") else source
            results.append(
                ApplyResult(response.source.name or source.name, response.created, response.changed, stored)
            )
        return results

    async def get_source(self, name: str) -> StreamSource:
        """The stored definition of one source; raises NotFoundError if there is none."""
        request = registry_service_pb2.GetSourceRequest(name=name)
        response = await self._call_retrying(self._registry.GetSource, request, resend=True)
        return StreamSource.from_proto(response.source)

    async def list_sources(self, page_size: int = 100) -> AsyncIterator[StreamSource]:
        """Every source in name order, fetching pages of page_size lazily."""
        token = ""
        while True:
            request = registry_service_pb2.ListSourcesRequest(page_size=page_size, page_token=token)
            try:
                response = await self._registry.ListSources(request, timeout=self._timeout)
            except grpc.RpcError as err:
                raise _error(err) from None
            for message in response.sources:
                yield StreamSource.from_proto(message)
            token = response.next_page_token
            if not token:
                return

    async def delete_source(self, name: str) -> int:
        """Delete a source and its online rows; return how many rows were deleted."""
        try:
            response = await self._registry.DeleteSource(
                registry_service_pb2.DeleteSourceRequest(name=name), timeout=self._timeout
            )
        except grpc.RpcError as err:
            raise _error(err) from None
        finally:
            self._forget(name)
        return int(response.rows_deleted)

    # Batch sources.

    async def read_batch_source(
        self,
        source: str,
        *,
        start: dt.datetime | None = None,
        end: dt.datetime | None = None,
        columns: Sequence[str] = (),
    ) -> AsyncIterator[pa.RecordBatch]:
        """The source's batch history in [start, end) as Arrow record batches, read lazily."""
        request = backfill_service_pb2.ReadBatchSourceRequest(
            source=source, start_time=timestamp(start), end_time=timestamp(end), columns=list(columns)
        )
        call = self._backfill.ReadBatchSource(request)
        schema: pa.Schema | None = None
        try:
            async for message in call:
                if schema is None:
                    schema = read_schema(message.arrow_schema)
                    continue
                yield read_batch(message.arrow_record_batch, schema)
        except grpc.RpcError as err:
            raise _error(err) from None
        finally:
            # Stopping early ends the server's read at once rather than at the deadline.
            call.cancel()

    async def backfill(
        self,
        source: str,
        *,
        start: dt.datetime | None = None,
        end: dt.datetime | None = None,
        dry_run: bool = False,
        on_progress: Callable[[BackfillProgress], None] | None = None,
    ) -> BackfillProgress:
        """Load the source's batch history in [start, end) into the online store; return the totals."""
        request = backfill_service_pb2.BackfillRequest(
            source=source, start_time=timestamp(start), end_time=timestamp(end), dry_run=dry_run
        )
        last: BackfillProgress | None = None
        try:
            async for message in self._backfill.Backfill(request):
                last = progress_of(message)
                if on_progress is not None:
                    on_progress(last)
        except grpc.RpcError as err:
            raise _error(err) from None
        if last is None or not last.done:
            raise RuntimeError(f"the backfill of {source!r} ended without a final report")
        return last

    async def get_features(
        self, source: str, keys: Sequence[Mapping[str, Any] | Any], *, columnar: bool | None = None
    ) -> FeatureResults:
        """The latest record of each key's entity, in key order; as Client.get_features takes and returns."""
        definition = await self._definition(source)
        arrow = wants_arrow(columnar, len(keys))
        request = get_features_request(source, keys, definition.entity_keys, columnar=arrow)
        try:
            response = await self._call_retrying(self._get_features, request, resend=True)
        except FeaturepushError:
            self._forget(source)
            raise
        try:
            return read_reply(response, definition, keys)
        except ValueError:
            # The source may have changed since it was cached; decode with a fresh definition.
            self._forget(source)
            return read_reply(response, await self._definition(source), keys)

    # Stream feature views.

    async def apply_views(
        self, *definitions: StreamFeatureView | FeatureService, validate_only: bool = False
    ) -> list[DefinitionResult]:
        """Create or update each view or feature service in order; stop at the first rejected one."""
        results: list[DefinitionResult] = []
        # A view applied again may name other entity keys.
        self._view_entity_keys.clear()
        for item in definitions:
            try:
                if isinstance(item, StreamFeatureView):
                    response: Any = await self._views.ApplyFeatureView(
                        feature_view_service_pb2.ApplyFeatureViewRequest(
                            view=item.to_proto(), validate_only=validate_only
                        ),
                        timeout=self._timeout,
                    )
                else:
                    response = await self._views.ApplyFeatureService(
                        feature_view_service_pb2.ApplyFeatureServiceRequest(
                            service=item.to_proto(), validate_only=validate_only
                        ),
                        timeout=self._timeout,
                    )
            except grpc.RpcError as err:
                raise _error(err) from None
            results.append(DefinitionResult(item.name, response.created, response.changed))
        return results

    async def get_view_features(
        self,
        keys: Sequence[Mapping[str, Any] | Any],
        *,
        view: str = "",
        service: str = "",
        as_of: dt.datetime | None = None,
    ) -> list[dict[str, ViewFeatureValue]]:
        """The features of a view or a feature service per entity key, windows ending at `as_of` or now.

        Keys take the forms get_features takes: a mapping, a tuple in entity key order, or a single value
        where there is one entity key; the two last ask the server for the view's entity keys first.
        """
        from featurepush.views import view_vectors

        return view_vectors(await self._view_reply(keys, (view, service), as_of, False), len(keys))

    async def get_view_features_arrow(
        self,
        keys: Sequence[Mapping[str, Any] | Any],
        *,
        view: str = "",
        service: str = "",
        as_of: dt.datetime | None = None,
    ) -> pa.Table:
        """get_view_features as one Arrow table: per feature its values, `:status` and `:effective_time`."""
        from featurepush.views import view_table

        return view_table(await self._view_reply(keys, (view, service), as_of, True), len(keys))

    async def _view_reply(
        self,
        keys: Sequence[Mapping[str, Any] | Any],
        target: tuple[str, str],
        as_of: dt.datetime | None,
        arrow: bool,
    ) -> Any:
        """Client._view_reply awaited: the reply for `keys`, bare ones named by entity keys asked once."""
        from featurepush.views import check_target, key_mappings, keyed_by_name, view_request

        view, service = target
        check_target(view, service)

        async def call(named: Sequence[Mapping[str, Any]]) -> Any:
            request = view_request(named, view=view, service=service, as_of=as_of, arrow=arrow)
            return await self._call_retrying(self._views.GetViewFeatures, request, resend=True)

        if keyed_by_name(keys):
            return await call(keys)
        known = self._view_entity_keys.get(target)
        entity_keys = known if known is not None else await self._entity_keys(view, service)
        try:
            reply = await call(key_mappings(keys, entity_keys))
        except FeaturepushError as e:
            if known is None or e.code not in STALE_VIEW_CODES:
                raise
            entity_keys = await self._entity_keys(view, service)
            reply = await call(key_mappings(keys, entity_keys))
        self._view_entity_keys[target] = entity_keys
        return reply

    async def _entity_keys(self, view: str, service: str) -> tuple[str, ...]:
        """The entity keys of a view, or of a service's views (all have the same), asked of the server."""
        try:
            if service:
                found = await self._views.GetFeatureService(
                    feature_view_service_pb2.GetFeatureServiceRequest(name=service), timeout=self._timeout
                )
                view = found.service.features[0].view
            response = await self._views.GetFeatureView(
                feature_view_service_pb2.GetFeatureViewRequest(name=view), timeout=self._timeout
            )
        except grpc.RpcError as err:
            raise _error(err) from None
        return tuple(response.view.entity_keys)

    async def delete_view(self, name: str) -> int:
        """Delete a view and its tiles; return how many tiles it held."""
        self._view_entity_keys.clear()
        try:
            response = await self._views.DeleteFeatureView(
                feature_view_service_pb2.DeleteFeatureViewRequest(name=name), timeout=self._timeout
            )
        except grpc.RpcError as err:
            raise _error(err) from None
        return int(response.tiles_deleted)

    async def delete_service(self, name: str) -> None:
        """Delete a feature service; its views stay."""
        self._view_entity_keys.clear()
        try:
            await self._views.DeleteFeatureService(
                feature_view_service_pb2.DeleteFeatureServiceRequest(name=name), timeout=self._timeout
            )
        except grpc.RpcError as err:
            raise _error(err) from None

    async def _definition(self, name: str) -> StreamSource:
        cached = self._schemas.get(name)
        if cached is None:
            cached = self._schemas[name] = await self.get_source(name)
        return cached

    def pusher(
        self, source: str, *, max_rows: int = DEFAULT_MAX_ROWS, linger_ms: float = 50.0, **options: Any
    ) -> AsyncPusher:
        """A batching pusher over PushStream for one source; use it with `async with`."""
        loop = asyncio.get_running_loop()

        def schema() -> PushSchema | None:
            # Asked on a worker thread as a batch is built; the lookup itself runs on the client's loop.
            return asyncio.run_coroutine_threadsafe(self._push_schema(source, None), loop).result()

        options.setdefault("schema", schema)
        options.setdefault("forget_schema", lambda: self._forget(source))
        return AsyncPusher(self._ingest, source, max_rows=max_rows, linger_ms=linger_ms, **options)


class AsyncPusher:
    """The asyncio twin of featurepush.pusher.Pusher: same batching, retries, idempotency and error reporting.

    Its tasks start on `async with` or `start()`; `add` waits while `max_pending` batches are unsettled.
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
        self._backoff = Backoff(backoff_initial_s, backoff_max_s)
        self._changed = asyncio.Condition()
        self._outbox: asyncio.Queue[_Batch | None] | None = None
        self._closed = False
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def stats(self) -> PusherStats:
        """A copy of the totals so far."""
        return PusherStats(**vars(self._book.stats))

    def start(self) -> None:
        """Start the sending and linger tasks on the running loop."""
        if not self._tasks:
            self._tasks = [asyncio.create_task(self._send_loop()), asyncio.create_task(self._linger_loop())]

    async def __aenter__(self) -> AsyncPusher:
        self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def add(self, record: Mapping[str, Any]) -> None:
        """Queue one record; raises TypeError at once if it is not a mapping.

        Only appends to a buffer: a full buffer is converted on a worker thread and sent while the next fills;
        a batch holding a value that cannot be encoded fails unsent, as in Pusher.add.
        """
        check_mapping(record)
        self.start()
        if self._closed:
            raise RuntimeError("the pusher is closed")
        if len(self._book.pending) >= self._max_pending:
            async with self._changed:
                await self._changed.wait_for(
                    lambda: len(self._book.pending) < self._max_pending or self._dead()
                )
        state = self._book.append(record)
        if state is None:
            return
        # A full buffer is sealed; a first record starts the linger clock, which the linger task waits on.
        async with self._changed:
            if state:
                self._seal()
            self._changed.notify_all()

    async def add_many(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Queue records in order."""
        for record in records:
            await self.add(record)

    async def flush(self) -> None:
        """Send what is buffered and wait until every batch is settled; raise PushBatchError for failures."""
        async with self._changed:
            self._seal()
            self._changed.notify_all()
            await self._changed.wait_for(lambda: not self._book.pending or self._dead())
        self._raise_failures()

    async def close(self) -> None:
        """Flush, end the stream and the tasks; raise PushBatchError for failures."""
        async with self._changed:
            if not self._closed:
                self._seal()
                self._closed = True
                self._half_close()
                self._changed.notify_all()
        if self._tasks:
            sender, linger = self._tasks
            try:
                await sender
            finally:
                async with self._changed:
                    # The linger task waits for the sender's end, which nothing else wakes it for.
                    self._changed.notify_all()
                await linger
        self._raise_failures()

    def _dead(self) -> bool:
        return bool(self._tasks) and self._tasks[0].done()

    def _raise_failures(self) -> None:
        failures, self._book.failures = self._book.failures, []
        if failures:
            raise PushBatchError(failures)

    def _seal(self) -> None:
        batch = self._book.seal()
        if batch is not None and self._outbox is not None:
            batch.sent_at = time.monotonic()
            self._outbox.put_nowait(batch)

    def _half_close(self) -> None:
        if self._closed and not self._book.pending and self._outbox is not None:
            self._outbox.put_nowait(None)
            self._outbox = None

    def _report(self, failures: list[BatchFailure]) -> None:
        if self._on_error is None:
            self._book.failures.extend(failures)
            return
        for failure in failures:
            try:
                self._on_error(failure)
            except Exception:
                _LOGGER.exception("the pusher's on_error callback failed")

    async def _refuse(self, batch: _Batch, error: InvalidArgumentError) -> None:
        """Settle a batch that could not be built."""
        async with self._changed:
            failure = self._book.refuse(batch, error)
            if failure is None:
                return
            if self._book.ready(self._linger_s):
                self._seal()
            self._report([failure])
            self._half_close()
            self._changed.notify_all()

    async def _send_loop(self) -> None:
        failing_since: float | None = None
        while True:
            async with self._changed:
                await self._changed.wait_for(lambda: bool(self._book.pending) or self._closed)
                if not self._book.pending:
                    return
                outbox: asyncio.Queue[_Batch | None] = asyncio.Queue()
                now = time.monotonic()
                self._book.resend.clear()
                for batch in self._book.in_order():
                    batch.sent_at = now
                    outbox.put_nowait(batch)
                self._outbox = outbox
            error: FeaturepushError | None = None
            try:
                call = self._stub.PushStream(_drain(outbox, self._refuse))
            except grpc.aio.UsageError as e:
                # The channel was closed under the pusher: no call can be made on it any more.
                async with self._changed:
                    self._outbox = None
                    self._report(self._book.fail_pending(channel_closed(e)))
                    self._changed.notify_all()
                failing_since = None
                continue
            try:
                async for ack in call:
                    async with self._changed:
                        failure = self._book.acknowledge(ack)
                        if self._book.broken is not None:
                            call.cancel()
                            break
                        for batch in self._book.resend:
                            batch.sent_at = time.monotonic()
                            outbox.put_nowait(batch)
                        self._book.resend.clear()
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
                        self._changed.notify_all()
            except grpc.RpcError as err:
                error = _stream_error(err)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is None or task.cancelling():
                    raise
                # Not this task being cancelled but its call, by grpc: the channel was closed under it.
                error = FeaturepushError(grpc.StatusCode.CANCELLED, "the push stream was cancelled")
            async with self._changed:
                if self._outbox is outbox:
                    self._outbox = None
                outbox.put_nowait(None)
                broken, self._book.broken = self._book.broken, None
                # A batch acknowledged as not written for now (see TRANSIENT_BATCH_CODES) is resent.
                error = broken or error
                if not self._book.pending:
                    continue
            if (
                error is None
                or broken is not None
                or error.code in RETRYABLE_CODES
                or error.retry_delay_s is not None
                # Cancelled by someone else than this pusher (it cancels a call only as it leaves it): by
                # grpc for a call that reached a server as it stopped, by a proxy. Resending is safe
                # (request ids); a channel closed under the pusher refuses the next call.
                or error.code == grpc.StatusCode.CANCELLED
            ):
                now = time.monotonic()
                failing_since = failing_since or now
                if now - failing_since <= self._retry_timeout_s:
                    self._book.stats.reconnects += 1
                    # An overloaded server says when to come back; sooner would only be refused again.
                    retry_after = error.retry_delay_s if error is not None else None
                    delay = max(self._backoff.next_delay(), retry_after or 0.0)
                    log_retry(self._book.source, error, now - failing_since, delay)
                    await asyncio.sleep(delay)
                    continue
            final = error or FeaturepushError(grpc.StatusCode.UNAVAILABLE, "the push stream kept ending")
            async with self._changed:
                self._report(self._book.fail_pending(final))
                self._changed.notify_all()
            failing_since = None

    async def _linger_loop(self) -> None:
        async with self._changed:
            while not (self._closed and self._dead()):
                due = self._book.linger_due(self._linger_s)
                now = time.monotonic()
                if due is not None and now >= due:
                    self._seal()
                    self._changed.notify_all()
                    continue
                timeout = min(due - now, IDLE_WAIT_S) if due is not None else IDLE_WAIT_S
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), timeout)


async def _drain(
    outbox: asyncio.Queue[_Batch | None], refuse: Callable[[_Batch, InvalidArgumentError], Awaitable[None]]
) -> AsyncIterator[ingest_service_pb2.PushStreamRequest]:
    """The requests of one stream attempt, until the None that ends it; each built on a worker thread."""
    while (batch := await outbox.get()) is not None:
        try:
            message = await asyncio.to_thread(batch.message)
        except InvalidArgumentError as err:
            await refuse(batch, err)
            continue
        yield message


# What grpc.aio reports, as INTERNAL, for a write that failed because the server had already ended the call,
# in place of the status the server ended it with (grpc/grpc issue 36066; seen with grpcio 1.85).
_WRITE_AFTER_END = "Internal error from Core"


def _stream_error(err: grpc.RpcError) -> FeaturepushError:
    """A pusher's stream error; a status grpc.aio lost to a write after the server's end is UNAVAILABLE.

    The server ended the stream (stopping, an idle or broken stream, a refusal) while a batch was being
    written: the stream broke, which is resent like any other break (request ids make it safe).
    """
    if (
        isinstance(err, grpc.aio.AioRpcError)
        and err.code() == grpc.StatusCode.INTERNAL
        and err.details() == _WRITE_AFTER_END
    ):
        return FeaturepushError(
            grpc.StatusCode.UNAVAILABLE,
            f"the push stream ended while a batch was being written, and grpc lost the server's status: "
            f"{err.debug_error_string()}",
        )
    return _error(err)


def _error(err: grpc.RpcError) -> FeaturepushError:
    """The typed exception of a failed aio call, with the rich status details from its trailers."""
    if not isinstance(err, grpc.aio.AioRpcError):
        return from_rpc_error(err)
    details = []
    # grpc's stubs type the trailers too loosely to unpack them.
    trailers: Any = err.trailing_metadata() or ()
    for key, value in trailers:
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            details = list(status_pb2.Status.FromString(value).details)
    return from_status_proto(err.code().value[0], err.details() or "", details)
