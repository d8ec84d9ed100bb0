"""The featurepush Client: apply definitions, push records and read features over one gRPC channel."""

from __future__ import annotations

import datetime as dt
import enum
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc

from featurepush.auth import ApiKeyInterceptor, PemPath, channel_credentials
from featurepush.definitions import FeatureService, StreamFeatureView, StreamSource
from featurepush.errors import FeaturepushError, from_rpc_error
from featurepush.retries import Retries
from featurepush.v1 import (
    feature_view_service_pb2,
    feature_view_service_pb2_grpc,
    ingest_service_pb2_grpc,
    online_service_pb2_grpc,
    registry_service_pb2,
    registry_service_pb2_grpc,
)

if TYPE_CHECKING:
    import pyarrow as pa

    from featurepush.batch import BackfillProgress
    from featurepush.payload import PushSchema
    from featurepush.pusher import Pusher
    from featurepush.reads import FeatureResults
    from featurepush.views import ViewFeatureValue

__all__ = [
    "ApplyResult",
    "Client",
    "FeatureResult",
    "FeatureStatus",
    "PushResult",
    "ServerStatus",
    "SourceCounts",
    "SourceStatus",
]

_LOGGER = logging.getLogger(__name__)
# How a server refuses bare view keys named by entity keys kept from an earlier call, where the view was
# applied again or deleted since: the keys are then asked again.
STALE_VIEW_CODES = frozenset({grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT})


def _parse_get_features_reply(data: bytes) -> Any:
    """A GetFeatures reply, its Arrow stream left in its bytes (featurepush.reads.parse_reply)."""
    # featurepush.reads brings pyarrow, which a client only loads once it reads.
    from featurepush.reads import parse_reply

    return parse_reply(data)


@dataclass(frozen=True)
class ApplyResult:
    """The outcome of applying one source: whether it was created or changed, and the stored definition."""

    name: str
    created: bool
    changed: bool
    source: StreamSource


@dataclass(frozen=True)
class DefinitionResult:
    """The outcome of applying one feature view or feature service: whether it was created or changed."""

    name: str
    created: bool
    changed: bool


@dataclass(frozen=True)
class SourceCounts:
    """One source's records in a push: accepted by validation, written online, superseded by newer events."""

    accepted: int
    written: int
    superseded: int
    # The most records one stream feature view of the source left out of its aggregates (older than its
    # longest window, or before its backfill watermark); last, with a default, so positional uses hold.
    late_skipped: int = 0


@dataclass(frozen=True)
class PushResult:
    """The outcome of a push: counts per source, and whether it was a dry run or a replay of a request_id."""

    counts: dict[str, SourceCounts]
    dry_run: bool
    replayed: bool


@dataclass(frozen=True)
class SourceStatus:
    """One source's online rows: row_count is a lower bound unless row_count_exact."""

    name: str
    row_count: int
    row_count_exact: bool


@dataclass(frozen=True)
class ServerStatus:
    """A server's state: version, uptime, whether it takes writes, store size, offline backlog, sources."""

    version: str
    uptime_seconds: float
    writes_accepted: bool
    store_bytes: int
    offline_log_lag_seconds: float
    offline_log_queued_entries: int
    sources: list[SourceStatus]
    # What to fix in the store's setup (a Redis that may evict keys); empty when nothing.
    store_warnings: list[str] = field(default_factory=list)


class FeatureStatus(enum.StrEnum):
    """Whether an entity has a fresh value."""

    PRESENT = "PRESENT"
    MISSING = "MISSING"
    EXPIRED = "EXPIRED"


@dataclass(frozen=True)
class FeatureResult:
    """One entity's latest record: features is set only when PRESENT, event_time when PRESENT or EXPIRED."""

    status: FeatureStatus
    event_time: dt.datetime | None
    features: dict[str, Any] | None


class Client:
    """A featurepush client over one gRPC channel; thread-safe, as the channel is.

    Every call takes the client's timeout (seconds, None for no deadline) and raises the typed exceptions of
    featurepush.errors instead of grpc.RpcError. Schemas used to decode get_features are fetched once per
    source and cached; apply() and delete_source() through this client drop the affected entry.
    """

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        timeout: float | None = 10.0,
        channel_options: Sequence[tuple[str, Any]] = (),
        credentials: grpc.ChannelCredentials | None = None,
        api_key: str | None = None,
        tls: bool = False,
        ca_cert: PemPath | None = None,
        client_cert: PemPath | None = None,
        client_key: PemPath | None = None,
    ) -> None:
        """Connect to target; TLS when tls, ca_cert or a client certificate is given (see
        featurepush.auth.channel_credentials), and api_key is sent with every call."""
        options = list(channel_options)
        if tls or ca_cert or client_cert or client_key:
            if credentials is not None:
                raise ValueError("pass either credentials or the tls/ca_cert/client_cert options, not both")
            credentials = channel_credentials(ca_cert, client_cert, client_key)
        interceptor = ApiKeyInterceptor(api_key) if api_key is not None else None
        if credentials is None:
            channel = grpc.insecure_channel(target, options=options)
        else:
            channel = grpc.secure_channel(target, credentials, options=options)
        if interceptor is not None:
            channel = grpc.intercept_channel(channel, interceptor)
        self._init(channel, timeout=timeout, owns_channel=True)

    @classmethod
    def from_channel(cls, channel: grpc.Channel, *, timeout: float | None = 10.0) -> Client:
        """Returns a client over an existing channel; the caller keeps ownership and closes the channel."""
        client = cls.__new__(cls)
        client._init(channel, timeout=timeout, owns_channel=False)
        return client

    def _init(self, channel: grpc.Channel, *, timeout: float | None, owns_channel: bool) -> None:
        self._channel = channel
        self._owns_channel = owns_channel
        self._timeout = timeout
        self._registry = registry_service_pb2_grpc.RegistryServiceStub(channel)
        self._ingest = ingest_service_pb2_grpc.IngestServiceStub(channel)
        self._online = online_service_pb2_grpc.OnlineServiceStub(channel)
        self._views = feature_view_service_pb2_grpc.FeatureViewServiceStub(channel)
        # GetFeatures with requests the client serializes itself (featurepush.reads).
        self._get_features = channel.unary_unary(
            "/featurepush.v1.OnlineService/GetFeatures",
            request_serializer=None,
            response_deserializer=_parse_get_features_reply,
        )
        self._schemas: dict[str, StreamSource] = {}
        self._push_schemas: dict[str, PushSchema] = {}
        self._schemas_lock = threading.Lock()
        # The entity keys of each (view, service) that get_view_features named bare keys by.
        self._view_entity_keys: dict[tuple[str, str], tuple[str, ...]] = {}

    # How long push and the reads keep retrying calls the server refused for overload, in seconds.
    overload_retry_s: float = 30.0
    # How long the reads, and pushes with a request_id, keep sending again a call that met no server able
    # to take it (UNAVAILABLE or CANCELLED: one restarting, a killed front or store process), in seconds.
    unavailable_retry_s: float = 10.0

    def _call_retrying(self, method: Callable[..., Any], request: Any, *, resend: bool = False) -> Any:
        """Call a unary method; a refusal carrying RetryInfo is retried after its delay, within a budget.

        An overloaded server refuses a call before doing any of its work, so resending it is always safe.
        With `resend` (the call may be carried out twice to the same effect), an unavailable server too.
        """
        retries = Retries(self.overload_retry_s, self.unavailable_retry_s, resend=resend)
        while True:
            try:
                return method(request, timeout=self._timeout)
            except grpc.RpcError as err:
                error = from_rpc_error(err)
            delay = retries.delay(error)
            if delay is None:
                raise error from None
            time.sleep(delay)

    @property
    def channel(self) -> grpc.Channel:
        """The underlying channel, for calling services the client does not wrap."""
        return self._channel

    def close(self) -> None:
        """Closes the channel if this client opened it."""
        if self._owns_channel:
            self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # Registry.

    def apply(self, *sources: StreamSource, validate_only: bool = False) -> list[ApplyResult]:
        """Creates or updates each source in order; stops at the first rejected one, raising its error."""
        results: list[ApplyResult] = []
        for source in sources:
            request = registry_service_pb2.ApplySourceRequest(
                source=source.to_proto(), validate_only=validate_only
            )
            try:
                response = self._registry.ApplySource(request, timeout=self._timeout)
            except grpc.RpcError as err:
                raise from_rpc_error(err) from None
            if response.changed and not validate_only:
                self._forget(source.name)
            results.append(
                ApplyResult(
                    name=response.source.name or source.name,
                    created=response.created,
                    changed=response.changed,
                    source=(
                        StreamSource.from_proto(response.source) if response.HasField("source") else source
                    ),
                )
            )
        return results

    def get_source(self, name: str) -> StreamSource:
        """Returns the stored definition of one source; raises NotFoundError if there is none."""
        request = registry_service_pb2.GetSourceRequest(name=name)
        response = self._call_retrying(self._registry.GetSource, request, resend=True)
        return StreamSource.from_proto(response.source)

    def list_sources(self, page_size: int = 100) -> Iterator[StreamSource]:
        """Yields every source in name order, fetching pages of page_size lazily."""
        token = ""
        while True:
            request = registry_service_pb2.ListSourcesRequest(page_size=page_size, page_token=token)
            try:
                response = self._registry.ListSources(request, timeout=self._timeout)
            except grpc.RpcError as err:
                raise from_rpc_error(err) from None
            for message in response.sources:
                yield StreamSource.from_proto(message)
            token = response.next_page_token
            if not token:
                return

    def delete_source(self, name: str) -> int:
        """Deletes a source and its online rows; returns how many rows were deleted."""
        try:
            response = self._registry.DeleteSource(
                registry_service_pb2.DeleteSourceRequest(name=name), timeout=self._timeout
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        finally:
            self._forget(name)
        return int(response.rows_deleted)

    def server_status(self, *, exact: bool = False, timeout: float | None = None) -> ServerStatus:
        """Returns the server's state; rows are counted up to 100,000 per source unless exact.

        An exact count reads every row key, so it may need a longer timeout (seconds) than the client's.
        """
        request = registry_service_pb2.GetServerStatusRequest(exact=exact)
        try:
            response = self._registry.GetServerStatus(request, timeout=timeout or self._timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        return ServerStatus(
            version=response.version,
            uptime_seconds=response.uptime_seconds,
            writes_accepted=response.writes_accepted,
            store_bytes=response.store_bytes,
            offline_log_lag_seconds=response.offline_log_lag_seconds,
            offline_log_queued_entries=response.offline_log_queued_entries,
            sources=[SourceStatus(s.name, s.row_count, s.row_count_exact) for s in response.sources],
            store_warnings=list(response.store_warnings),
        )

    # Ingest.

    def push(
        self,
        source: str,
        records: Iterable[Mapping[str, Any]] | Any,
        *,
        dry_run: bool = False,
        request_id: str | None = None,
    ) -> PushResult:
        """Pushes dicts, a pyarrow Table or RecordBatch, or a pandas DataFrame to one source, atomically."""
        return self.push_many({source: records}, dry_run=dry_run, request_id=request_id)

    def push_many(
        self,
        records: Mapping[str, Iterable[Mapping[str, Any]] | Any],
        *,
        dry_run: bool = False,
        request_id: str | None = None,
    ) -> PushResult:
        """Pushes records for several sources in one atomic request.

        Records (dicts) go as one Arrow batch per source when the client knows the source's schema (fetched
        once and cached) and every value fits it exactly, else as Structs by featurepush.values rules, as
        do lists of at most featurepush.payload.SMALL_PUSH_ROWS records; the server answers both alike. A
        request_id makes retries safe: the server replays its first response for a repeated id, so a push
        with one is sent again while the server is unavailable, for up to `unavailable_retry_s`. Raises
        InvalidArgumentError listing every bad record by path if any is rejected, in which case nothing is
        written.
        """
        # Imported here because payload builds on this module's result types.
        from featurepush.payload import RESEND_AS_ROWS, as_records, push_request, push_result

        data = {source: as_records(source_records) for source, source_records in records.items()}
        schemas = {source: self._push_schema(source, d) for source, d in data.items()}
        request, columnar = push_request(data, schemas, dry_run=dry_run, request_id=request_id)
        try:
            response = self._call_retrying(self._ingest.Push, request, resend=bool(request_id))
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
            response = self._call_retrying(self._ingest.Push, request, resend=bool(request_id))
        return push_result(response)

    def _push_schema(self, source: str, data: object) -> PushSchema | None:
        """The cached schema to send records as Arrow, or None to send Structs (also when it is unknown)."""
        from featurepush.payload import PushSchema, is_columnar, sends_structs

        if sends_structs(data) or (is_columnar(data) and type(data).__module__.split(".")[0] != "pandas"):
            return None
        with self._schemas_lock:
            cached = self._push_schemas.get(source)
        if cached is not None:
            return cached
        try:
            schema = PushSchema.of(self._definition(source).schema)
        except FeaturepushError:
            # An unknown source, or a key that may push but not read definitions: the server answers the
            # Structs as it always does.
            return None
        with self._schemas_lock:
            self._push_schemas[source] = schema
        return schema

    def pusher(
        self,
        source: str,
        *,
        max_rows: int = 10_000,
        linger_ms: float = 50.0,
        **options: Any,
    ) -> Pusher:
        """Returns a batching pusher over PushStream for one source; see featurepush.pusher.Pusher."""
        from featurepush.pusher import Pusher

        options.setdefault("schema", lambda: self._push_schema(source, None))
        options.setdefault("forget_schema", lambda: self._forget(source))
        return Pusher(self._ingest, source, max_rows=max_rows, linger_ms=linger_ms, **options)

    # Online reads.

    def get_features(
        self, source: str, keys: Sequence[Mapping[str, Any] | Any], *, columnar: bool | None = None
    ) -> FeatureResults:
        """Returns the latest record of each key's entity, in key order.

        A key is a mapping of entity key fields, a tuple matched to the source's entity_keys in order, or a
        single value when the source has one entity key. The result is a sequence of FeatureResult, features
        decoded by the source's schema, and also columns: to_arrow(), to_pandas(), to_polars() (see
        featurepush.reads.FeatureResults). The server answers with one Arrow record batch when `columnar` is
        true, with Structs when it is false (or when it is a server that predates the Arrow form), and by
        default with Structs for at most featurepush.reads.SMALL_READ_KEYS keys, Arrow for more; the result
        is the same either way.
        """
        from featurepush.reads import get_features_request, read_reply, wants_arrow

        definition = self._definition(source)
        arrow = wants_arrow(columnar, len(keys))
        request = get_features_request(source, keys, definition.entity_keys, columnar=arrow)
        try:
            response = self._call_retrying(self._get_features, request, resend=True)
        except FeaturepushError as error:
            if error.code == grpc.StatusCode.NOT_FOUND:
                self._forget(source)
            raise
        try:
            return read_reply(response, definition, keys)
        except ValueError:
            # The source may have changed under another client since it was cached; decode with a fresh one.
            _LOGGER.info("re-fetching the schema of %s after a decode failure", source)
            self._forget(source)
            return read_reply(response, self._definition(source), keys)

    # Stream feature views.

    def apply_views(
        self, *definitions: StreamFeatureView | FeatureService, validate_only: bool = False
    ) -> list[DefinitionResult]:
        """Creates or updates each view or feature service in order; stops at the first rejected one."""
        results: list[DefinitionResult] = []
        # A view applied again may name other entity keys.
        self._view_entity_keys.clear()
        for item in definitions:
            try:
                if isinstance(item, StreamFeatureView):
                    response: Any = self._views.ApplyFeatureView(
                        feature_view_service_pb2.ApplyFeatureViewRequest(
                            view=item.to_proto(), validate_only=validate_only
                        ),
                        timeout=self._timeout,
                    )
                else:
                    response = self._views.ApplyFeatureService(
                        feature_view_service_pb2.ApplyFeatureServiceRequest(
                            service=item.to_proto(), validate_only=validate_only
                        ),
                        timeout=self._timeout,
                    )
            except grpc.RpcError as err:
                raise from_rpc_error(err) from None
            results.append(DefinitionResult(item.name, response.created, response.changed))
        return results

    def get_view_features(
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

        return view_vectors(self._view_reply(keys, (view, service), as_of, False), len(keys))

    def get_view_features_arrow(
        self,
        keys: Sequence[Mapping[str, Any] | Any],
        *,
        view: str = "",
        service: str = "",
        as_of: dt.datetime | None = None,
    ) -> pa.Table:
        """get_view_features as one Arrow table: per feature its values, `:status` and `:effective_time`."""
        from featurepush.views import view_table

        return view_table(self._view_reply(keys, (view, service), as_of, True), len(keys))

    def _view_reply(
        self,
        keys: Sequence[Mapping[str, Any] | Any],
        target: tuple[str, str],
        as_of: dt.datetime | None,
        arrow: bool,
    ) -> Any:
        """GetViewFeatures' reply for `keys`; bare keys are named by the view's (or service's) entity keys.

        Those are asked of the server once and kept: where the view changed since (another client applied
        it again, or deleted it), the server refuses the keys and they are asked again, once.
        """
        from featurepush.views import check_target, key_mappings, keyed_by_name, view_request

        view, service = target
        check_target(view, service)

        def call(named: Sequence[Mapping[str, Any]]) -> Any:
            request = view_request(named, view=view, service=service, as_of=as_of, arrow=arrow)
            return self._call_retrying(self._views.GetViewFeatures, request, resend=True)

        if keyed_by_name(keys):
            return call(keys)
        known = self._view_entity_keys.get(target)
        entity_keys = known if known is not None else self._entity_keys(view, service)
        try:
            reply = call(key_mappings(keys, entity_keys))
        except FeaturepushError as e:
            if known is None or e.code not in STALE_VIEW_CODES:
                raise
            entity_keys = self._entity_keys(view, service)
            reply = call(key_mappings(keys, entity_keys))
        self._view_entity_keys[target] = entity_keys
        return reply

    def _entity_keys(self, view: str, service: str) -> tuple[str, ...]:
        """The entity keys of a view, or of a service's views (all have the same), asked of the server."""
        try:
            if service:
                found = self._views.GetFeatureService(
                    feature_view_service_pb2.GetFeatureServiceRequest(name=service), timeout=self._timeout
                )
                view = found.service.features[0].view
            response = self._views.GetFeatureView(
                feature_view_service_pb2.GetFeatureViewRequest(name=view), timeout=self._timeout
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        return tuple(response.view.entity_keys)

    def delete_view(self, name: str) -> int:
        """Deletes a view and its tiles; returns how many tiles it held."""
        self._view_entity_keys.clear()
        try:
            response = self._views.DeleteFeatureView(
                feature_view_service_pb2.DeleteFeatureViewRequest(name=name), timeout=self._timeout
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        return int(response.tiles_deleted)

    def delete_service(self, name: str) -> None:
        """Deletes a feature service; its views stay."""
        self._view_entity_keys.clear()
        try:
            self._views.DeleteFeatureService(
                feature_view_service_pb2.DeleteFeatureServiceRequest(name=name), timeout=self._timeout
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def read_batch_source(
        self,
        source: str,
        *,
        start: dt.datetime | None = None,
        end: dt.datetime | None = None,
        columns: Sequence[str] = (),
    ) -> pa.RecordBatchReader:
        """The source's batch history in [start, end) as Arrow batches, read lazily; see featurepush.batch."""
        from featurepush.batch import read_batch_source

        return read_batch_source(self._channel, source, start=start, end=end, columns=columns)

    def backfill(
        self,
        source: str,
        *,
        start: dt.datetime | None = None,
        end: dt.datetime | None = None,
        dry_run: bool = False,
        on_progress: Callable[[BackfillProgress], None] | None = None,
    ) -> BackfillProgress:
        """Load the source's batch history in [start, end) into the online store; return the totals."""
        from featurepush.batch import backfill

        return backfill(self._channel, source, start=start, end=end, dry_run=dry_run, on_progress=on_progress)

    def _definition(self, name: str) -> StreamSource:
        with self._schemas_lock:
            cached = self._schemas.get(name)
        if cached is not None:
            return cached
        definition = self.get_source(name)
        with self._schemas_lock:
            self._schemas[name] = definition
        return definition

    def _forget(self, name: str) -> None:
        with self._schemas_lock:
            self._schemas.pop(name, None)
            self._push_schemas.pop(name, None)
