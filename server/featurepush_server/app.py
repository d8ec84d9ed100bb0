"""Builds the gRPC server from a configuration and runs it."""

from __future__ import annotations

import gc
import logging
import os
import resource
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from featurepush import __version__
from featurepush.v1 import (
    backfill_service_pb2,
    feature_view_service_pb2,
    ingest_service_pb2,
    ingest_service_pb2_grpc,
    online_service_pb2,
    registry_service_pb2,
    registry_service_pb2_grpc,
)

from . import admission, machine
from .admission import Admission, Gate, Limit, Overloaded, configured_limits
from .auth import auth_interceptor, log_exposure
from .config import ServerConfig
from .core.aggregates import ViewReader
from .core.backfill import Backfiller, ChunkWorkers
from .core.batch import BatchSources
from .core.errors import Busy, ShuttingDown
from .core.expiry import ExpirySweeper
from .core.ingest import Ingestor
from .core.ipc import IpcLimits
from .core.locations import BatchLocations, ListLimits
from .core.materialize import LatestRowWriter, Materializer
from .core.offline_log import OfflineLog, OfflineLogWriter
from .core.online import OnlineReader
from .core.periodic import Periodic
from .core.registry import Registry
from .core.server_status import StatusReporter
from .core.stores.base import Store, StoreInUse
from .core.stores.remote import RemoteStore
from .core.stores.rocksdb import RocksDBStore
from .core.tiles import TileWriter, sweep_tiles
from .core.views import Views
from .edge import EdgeInterceptor
from .metrics import Metrics
from .reflection import DocumentedPool, documented_files
from .servicers.backfill import BackfillServicer
from .servicers.feature_views import FeatureViewServicer
from .servicers.ingest import PARSERS as PUSH_PARSERS
from .servicers.ingest import IngestServicer
from .servicers.online import PARSERS as READ_PARSERS
from .servicers.online import OnlineServicer
from .servicers.registry import RegistryServicer
from .tls import server_credentials
from .waits import RequestWaits
from .workers import worker_count

_LOGGER = logging.getLogger(__name__)

SERVICE_NAMES = (
    registry_service_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name,
    ingest_service_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name,
    online_service_pb2.DESCRIPTOR.services_by_name["OnlineService"].full_name,
    backfill_service_pb2.DESCRIPTOR.services_by_name["BackfillService"].full_name,
    feature_view_service_pb2.DESCRIPTOR.services_by_name["FeatureViewService"].full_name,
)
# The services that write; health reports them NOT_SERVING while the disk refuses writes.
WRITING_SERVICES = (SERVICE_NAMES[1], SERVICE_NAMES[3])


class MethodAwarePool:
    """A view of a descriptor pool whose symbol lookup also finds RPC methods.

    Reflection clients such as `grpcurl describe pkg.Service.Method` ask for the file of a method, and
    the C-backed pool only knows messages, enums and services by name.
    """

    def __init__(self, pool: descriptor_pool.DescriptorPool):
        self._pool = pool

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)

    def FindFileContainingSymbol(self, symbol: str) -> Any:  # noqa: N802 - the pool's own method name
        """The file defining `symbol`, a method's included."""
        try:
            return self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            service, _, method = symbol.rpartition(".")
            try:
                found = self._pool.FindServiceByName(service)
            except KeyError:
                raise KeyError(symbol) from None
            if method not in found.methods_by_name:
                raise
            return found.file


@dataclass
class Server:
    """A built server: the gRPC server, its bound port and the core it serves; `stop()` closes it all.

    `stopping` is set as a stop begins; streams and backfills watch it to end at a batch boundary.
    """

    grpc_server: grpc.Server
    port: int
    store: Store
    registry: Registry
    ingestor: Ingestor
    reader: OnlineReader
    config: ServerConfig
    health: health.HealthServicer
    _closers: list[Any] = field(default_factory=list)
    offline_log: OfflineLog | None = None
    batch_sources: BatchSources | None = None
    admission: Admission | None = None
    stopping: threading.Event = field(default_factory=threading.Event)
    metrics: Metrics | None = None
    # The /metrics HTTP server and its port, when metrics_listen is set.
    metrics_http: Any = None
    metrics_port: int = 0
    # The stream feature views and feature services.
    views: Views | None = None

    def start(self) -> None:
        """Start serving."""
        self.grpc_server.start()
        for name in (*SERVICE_NAMES, ""):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.storage_changed(self.store.writable)

    def storage_changed(self, writable: bool) -> None:
        """Report the writing services NOT_SERVING while the disk refuses writes, SERVING once it does."""
        if self.stopping.is_set():
            return
        serving = (
            health_pb2.HealthCheckResponse.SERVING if writable else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in WRITING_SERVICES:
            self.health.set(name, serving)

    def stop(self, grace: float | None = 5.0) -> None:
        """Stop taking calls, end streams at their next batch, let unary calls finish, flush, close the store.

        Running calls get `grace` seconds (None: none at all); the store then waits for what still uses it
        for the rest of that time at least a second, so a call never touches a closed database.
        """
        deadline = time.monotonic() + (grace or 0.0)
        self.stopping.set()
        for name in (*SERVICE_NAMES, ""):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.grpc_server.stop(grace).wait()
        for close in reversed(self._closers):
            try:
                close()
            except Exception:
                # What a closer leaves undone is still in the store (the offline queue), so it is only logged.
                _LOGGER.exception("stopping a background worker failed")
        self.store.close(max(deadline - time.monotonic(), 1.0))
        if self.metrics_http is not None:
            self.metrics_http.shutdown()
            self.metrics_http.server_close()

    def wait(self) -> None:
        """Block until the server stops."""
        self.grpc_server.wait_for_termination()


def open_store(config: ServerConfig) -> Store:
    """The configured store: the embedded RocksDB in the data directory, or a shared Redis."""
    # Rows are callers' data and keys may be secrets: the data directory is the server user's alone.
    config.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(config.data_dir, 0o700)
    if config.store != "rocksdb":
        # Imported here so that the redis package is needed only by servers that use it.
        from .core.stores.redis import RedisStore

        return RedisStore.connect(
            config.store,
            timeout_s=config.redis_timeout_s,
            namespace=config.redis_namespace,
            idempotency_window_s=config.idempotency_window_s,
            expiry_grace_s=config.redis_expiry_grace_s,
            wait_replicas=config.redis_wait_replicas,
        )
    entries, size = config.latest_index_bounds(machine.memory_bytes())
    try:
        return RocksDBStore(
            config.online_dir,
            fsync=config.fsync == "always",
            idempotency_window_s=config.idempotency_window_s,
            latest_cache_entries=entries,
            latest_cache_bytes=size,
        )
    except StoreInUse as e:
        # The operator chose the data directory, not the store's folder inside it, so name that.
        raise StoreInUse(config.data_dir, e.pid) from None


def track_stored_rows(store: Store) -> None:
    """Let the latest-event index hold whole, in a background thread, the sources that held rows at open.

    RocksDB only (see RocksDBStore.track_stored_rows); until it is done, those sources' writes read the
    keys their index lacks, as before.
    """
    if not isinstance(store, RocksDBStore):
        return

    def run() -> None:
        began = time.monotonic()
        try:
            made = store.track_stored_rows()
        except ShuttingDown:
            return  # closed before the walk was done: nothing to report
        except Exception as e:  # noqa: BLE001 - a disk error midway: the index works as before
            _LOGGER.info("the latest-event index stopped taking in stored rows: %s", e)
            return
        if made:
            took = time.monotonic() - began
            _LOGGER.info("the latest-event index took in %d sources' stored rows (%.1f s)", len(made), took)

    threading.Thread(target=run, name="featurepush-index-tracking", daemon=True).start()


def create_server(
    config: ServerConfig,
    *,
    front: RemoteStore | None = None,
    peer: int | None = None,
    metrics_socket: Path | None = None,
    backfill_workers: ChunkWorkers | None = None,
) -> Server:
    """Open the store, apply the configured definitions and register every service; not started.

    With `front`, the server is one of `serve --processes`: it uses that store, which another process
    owns along with its background work (offline-log flushes, expiry sweeps, disk recovery), and shares
    its port with the other fronts. With `peer`, the server is front number `peer` of `serve --processes`
    on a shared store (Redis): it opens its own, runs its own background work and shares its port; only
    peer 0 drains the offline log. With `metrics_socket`, the metrics are served on that Unix socket for
    the supervisor of `serve --processes` to add up, not over HTTP. With `backfill_workers` (workers.py),
    backfills load their chunks in those processes.
    """
    store = open_store(config) if front is None else front
    shares_port = front is not None or peer is not None
    try:
        offline_root = config.data_dir / "offline"
        # One drainer per server: the owner keeps the log, or with a shared store the first peer alone (the
        # others would only contend for the drain lease).
        offline_log = (
            OfflineLog(store, offline_root, interval_s=config.offline_flush_interval_s)
            if front is None and not peer
            else None
        )
        locations = BatchLocations(
            config.batch_roots,
            config.batch_schemes,
            config.data_dir,
            ListLimits(config.batch_max_files, config.batch_max_depth, config.batch_list_timeout_s),
        )
        batch_sources = BatchSources(
            offline_root, config.post_processor_modules, locations, config.stream_read_ahead_bytes
        )
        for path in config.definitions:
            # A definitions file is loaded as a module named after it; its functions may post-process.
            batch_sources.allow_post_processors(Path(path).stem)
        # A shared store's definitions change through other servers too; they are read again now and then.
        refresh = None if config.store == "rocksdb" else config.redis_registry_refresh_s
        registry = Registry(
            store,
            check_batch_source=batch_sources.check,
            catalog_version=None if front is None else front.catalog.read,
            refresh_s=refresh,
        )
        # Transformations are imported under the post_processor rules, from the same allowed modules.
        views = Views(
            store,
            registry,
            batch_sources.allowed,
            catalog_version=None if front is None else front.catalog.read,
            refresh_s=refresh,
        )
        registry.delete_checks.append(views.check_source_delete)
        registry.apply_checks.append(views.check_source_apply)
        arrow_limits = IpcLimits(
            max_decoded_bytes=config.max_arrow_decoded_bytes,
            max_batches=config.max_arrow_batches,
            max_columns=config.max_arrow_columns,
            max_nesting=config.max_arrow_nesting,
        )
        # Pushes and backfills write through this one step; each writer adds its part to every write.
        materializer = Materializer(
            store, [LatestRowWriter(store), OfflineLogWriter(), TileWriter(views, store)]
        )
        reader = OnlineReader(registry, store, max_keys=config.max_keys_per_request)
        for path in config.definitions:
            from featurepush.definitions import load_definitions

            for source in load_definitions(path):
                applied = registry.apply(source.to_proto())
                _LOGGER.info(
                    "source %s from %s: %s", source.name, path, _state(applied.created, applied.changed)
                )
            from featurepush.definitions import load_views

            for view in load_views(path):
                outcome = views.apply(view.to_proto())
                _LOGGER.info(
                    "feature view %s from %s: %s", view.name, path, _state(outcome.created, outcome.changed)
                )
            from featurepush.definitions import load_services

            for service in load_services(path):
                result = views.apply_service(service.to_proto())
                _LOGGER.info(
                    "feature service %s from %s: %s",
                    service.name,
                    path,
                    _state(result.created, result.changed),
                )
        options = [
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            # Fronts share the port, and the kernel spreads connections over them.
            ("grpc.so_reuseport", int(shares_port)),
        ]
        # The processes of `serve --processes` share one machine's memory: each front admits its share of
        # push bytes, derived or set, or together they would admit the whole bound once per front. (A gate
        # still admits a request larger than its share when it holds no other.)
        fronts = max(config.processes, 1) if shares_port else 1
        memory = machine.memory_bytes() // fronts
        push_bytes = max(config.max_push_bytes // fronts, 1) if config.max_push_bytes else 0
        gates = Admission(
            configured_limits(
                machine.cpu_count(),
                memory,
                config.max_message_bytes,
                pushes=config.max_concurrent_pushes,
                waiting_pushes=config.max_waiting_pushes,
                push_bytes=push_bytes,
                reads=config.max_concurrent_reads,
                streams=config.max_push_streams,
                backfills=config.max_concurrent_backfills,
            )
        )
        push_gate = gates.gate(admission.PUSH)
        ingestor = Ingestor(
            registry,
            materializer,
            max_records=config.max_records_per_request,
            arrow_limits=arrow_limits,
            decoded_budget=None if push_gate is None else partial(_decoded_bytes, push_gate),
        )
        # Files are read before any thread starts, so a bad certificate or keys file fails in one line.
        credentials = server_credentials(config)
        metrics = Metrics()
        parsers = {**PUSH_PARSERS, **READ_PARSERS}
        # Authentication runs first, so a caller without a key never takes an admission slot.
        slow, slow_per_address = config.slow_request_bounds()
        waits = RequestWaits(slow, slow_per_address, config.request_timeout_s)
        # A stream idle a quarter of the idle timeout (at most 5 s) may be closed for a new one.
        evict_idle_s = min(5.0, config.stream_idle_timeout_s / 4)
        edge = EdgeInterceptor(gates, metrics, parsers, waits, stream_evict_idle_s=evict_idle_s)
        interceptors: list[grpc.ServerInterceptor[Any, Any]] = [
            i for i in (auth_interceptor(config), edge) if i is not None
        ]
        # Every admitted or waiting call may hold a thread; `workers` more serve health, reflection and
        # refusals, so those never queue behind a flood (calls slow to send their request take at most
        # half of them: RequestWaits).
        executor = futures.ThreadPoolExecutor(max_workers=config.workers + gates.threads_needed())
        grpc_server = grpc.server(executor, options=options, interceptors=interceptors)
        stopping = threading.Event()
        registry_service_pb2_grpc.add_RegistryServiceServicer_to_server(
            RegistryServicer(registry, StatusReporter(__version__, store, offline_log)), grpc_server
        )
        ingest_service_pb2_grpc.add_IngestServiceServicer_to_server(
            IngestServicer(
                ingestor,
                read_ahead=config.stream_read_ahead,
                idle_timeout_s=config.stream_idle_timeout_s,
                stopping=stopping,
                metrics=metrics,
            ),
            grpc_server,
        )
        grpc_server.add_generic_rpc_handlers((OnlineServicer(reader).handler(),))
        backfill = BackfillServicer(
            registry,
            batch_sources,
            Backfiller(
                registry,
                materializer,
                batch_sources,
                views,
                store,
                workers=backfill_workers,
                # One chunk per worker, and one more read ahead while they load theirs.
                in_flight=worker_count(config) + 1,
            ),
            read_ahead_bytes=config.stream_read_ahead_bytes,
            stopping=stopping,
            metrics=metrics,
        )
        grpc_server.add_generic_rpc_handlers((backfill.handler(),))
        # Reads' working memory, like push bytes, is a front's share where serve --processes runs several.
        view_bytes = (
            max(config.max_view_read_bytes // fronts, 1)
            if config.max_view_read_bytes
            else max(512 << 20, min(memory // 8, 4 << 30))
        )
        view_gate = Gate(admission.READ, Limit(calls=1, queue=0, bytes=view_bytes, wait_s=0.0))
        view_reader = ViewReader(
            views,
            store,
            max_keys=config.max_keys_per_request,
            max_reply_bytes=config.max_message_bytes,
            max_read_bytes=view_bytes,
            memory_budget=partial(_view_read_bytes, view_gate),
        )
        view_servicer = FeatureViewServicer(views, view_reader)
        grpc_server.add_generic_rpc_handlers((view_servicer.handler(),))
        health_servicer = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
        if config.reflection:
            reflection.enable_server_reflection(
                (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME),
                grpc_server,
                # Duck-typed: reflection only calls the pool's Find* methods.
                pool=DocumentedPool(  # type: ignore[arg-type]
                    MethodAwarePool(descriptor_pool.Default()), documented_files()
                ),
            )
        try:
            if credentials is None:
                port = grpc_server.add_insecure_port(config.listen)
            else:
                port = grpc_server.add_secure_port(config.listen, credentials)
        except RuntimeError:
            port = 0  # grpc raises where older releases returned 0
        if port == 0:
            raise OSError(f"cannot listen on {config.listen}: the address is in use or not available here")
    except BaseException:
        store.close()
        raise
    log_exposure(config)
    # The watch over calls' request waits stops once calls have stopped.
    closers: list[Any] = [waits.close]
    sweeper = None
    if front is None:
        # Started last so that a failed build leaves no thread; stop() flushes what is still queued.
        if offline_log is not None:
            offline_log.start()
            closers.append(offline_log.close)
        # On Redis this sweeps nothing (Redis expires rows itself), so every peer may run it.
        sweeper = ExpirySweeper(store, config.expired_sweep_interval_s, lambda: sweep_tiles(store))
        sweeper.start()
        # After a disk error, writes resume by themselves once the disk takes them again; after Redis
        # was unreachable, each process's own connections must answer again.
        recovery = Periodic("featurepush-storage-recovery", config.storage_retry_interval_s, store.recover)
        recovery.start()
        closers += [sweeper.close, recovery.stop]
        track_stored_rows(store)
    metrics.watch(gates, store, offline_log, sweeper)
    server = Server(
        grpc_server,
        port,
        store,
        registry,
        ingestor,
        reader,
        config,
        health_servicer,
        closers,
        offline_log,
        batch_sources,
        gates,
        stopping,
        metrics,
    )
    server.views = views
    store.watch_writable(server.storage_changed)
    if metrics_socket is not None:
        server.metrics_http = metrics.serve_socket(metrics_socket)
    elif config.metrics_listen:
        try:
            server.metrics_http, server.metrics_port = metrics.serve(config.metrics_listen)
        except OSError as e:
            server.stop(None)
            raise OSError(f"cannot serve metrics on {config.metrics_listen}: {e.strerror or e}") from None
    return server


@contextmanager
def _held_bytes(gate: Gate, nbytes: int, refusal: str) -> Iterator[None]:
    """Hold `nbytes` of the gate's bytes for the with block; Busy, saying `refusal`, where it has no room."""
    try:
        gate.take_bytes(nbytes)
    except Overloaded as e:
        raise Busy(f"{refusal}; retry after {e.retry_after_s:.2f}s", e.retry_after_s) from None
    try:
        yield
    finally:
        gate.give_bytes(nbytes)


def _decoded_bytes(gate: Gate, nbytes: int) -> AbstractContextManager[None]:
    """Hold `nbytes` of the push gate's bytes while a push's decoded Arrow lives; Busy if it has no room."""
    refusal = f"featurepush holds as many push bytes as it may: this push's Arrow decodes to {nbytes} bytes "
    return _held_bytes(gate, nbytes, refusal + "more than it was sent as")


def _view_read_bytes(gate: Gate, nbytes: int) -> AbstractContextManager[None]:
    """Hold a view read's estimated working memory while it runs; Busy if the reads running hold too much."""
    refusal = "featurepush's feature view reads hold as much memory as they may (max_view_read_bytes): "
    return _held_bytes(gate, nbytes, refusal + f"this read takes about {nbytes} bytes")


def _state(created: bool, changed: bool) -> str:
    """How a definition applied at start went, for the log."""
    return "created" if created else "updated" if changed else "unchanged"


def _raise_open_files_limit() -> None:
    """Let this process (and those it starts) open as many files as the system allows it.

    RocksDB keeps every table file of the database open, in the owner and in each front's snapshot (two
    while one replaces the other), so a large database runs past the usual soft limit of 1,024.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Linux caps open files at fs.nr_open (2^20 by default) even where the hard limit says unlimited.
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            _LOGGER.info("cannot raise the open files limit from %d; a large store may need more", soft)


def serve(
    config: ServerConfig,
    *,
    front: RemoteStore | None = None,
    peer: int | None = None,
    ready: Callable[[], None] | None = None,
    metrics_socket: Path | None = None,
    backfill_workers: ChunkWorkers | None = None,
) -> None:
    """Run a server until SIGINT or SIGTERM, then stop it gracefully; a second signal exits at once.

    With `processes` above 1 (and no `front` nor `peer`), a supervisor runs that many front processes
    instead, plus a store owner for the embedded store (processes.py). `ready` is called once the server
    serves.
    """
    _raise_open_files_limit()
    if front is None and peer is None and config.processes > 1:
        from .processes import supervise

        supervise(config)
        return
    # Every file the server creates (RocksDB's, the offline log's) is readable by its user alone.
    os.umask(0o077)
    server = create_server(
        config, front=front, peer=peer, metrics_socket=metrics_socket, backfill_workers=backfill_workers
    )
    server.start()
    # A push allocates a wrapper per JSON value, so full collections come every few pushes: objects alive
    # after start-up (modules, descriptors, the registry) are frozen out of them.
    gc.freeze()
    if front is None and peer is None:
        _LOGGER.info(
            "featurepush listening on %s (port %d), data in %s", config.listen, server.port, config.data_dir
        )
    if ready is not None:
        ready()
    signals: list[int] = []

    def _on_signal(signum: int, frame: object) -> None:
        # Only recorded: a handler runs between any two bytecodes of the main thread, so taking a lock
        # here (an Event's, the logging module's) could wait forever on the main thread itself.
        signals.append(signum)

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    while not signals:
        time.sleep(0.1)
    _LOGGER.info("stopping within %.1fs (a second signal exits at once)", config.shutdown_grace_s)
    # Stopped from another thread so that this one stays free to notice a second signal.
    stopper = threading.Thread(target=server.stop, args=(config.shutdown_grace_s,), name="featurepush-stop")
    stopper.start()
    while stopper.is_alive():
        stopper.join(0.1)
        if len(signals) > 1:
            # RocksDB's write-ahead log holds every acknowledged write, so leaving now loses nothing.
            _LOGGER.warning("second signal: exiting now")
            server.store.sync_now()
            os._exit(128 + signals[-1])
    _LOGGER.info("stopped")
