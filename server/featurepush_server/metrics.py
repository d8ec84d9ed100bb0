"""Prometheus metrics: calls, latencies, records, admission, the offline log, backfills and RocksDB.

Each server has its own registry, so several servers in one process (tests) never share counters, and
the exporter serves only featurepush's metrics on its own port. Gauges that describe state (the store's
size, the offline log's lag, admission's refusals) are read when scraped, never kept up to date on the
write path.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from .admission import Admission
from .core.errors import CoreError
from .core.expiry import ExpirySweeper
from .core.offline_log import OfflineLog
from .core.stores.base import ROWS_FILES_DEFERRED, ROWS_FILES_INGESTED, Store
from .core.stores.remote import RemoteStore

_LOGGER = logging.getLogger(__name__)

# The store's own counts, asked of it by name as RocksDB's properties are.
_STORE_COUNTERS = {
    ROWS_FILES_INGESTED: (
        "featurepush_store_rows_files_ingested",
        "Files of a backfill's rows, built by the process that encoded them, that the store took whole "
        "(serve --processes).",
    ),
    ROWS_FILES_DEFERRED: (
        "featurepush_store_rows_files_deferred",
        "Rows files whose rows the store wrote one by one instead, while RocksDB's level 0 held too many "
        "files (its compactions behind).",
    ),
}
# RocksDB properties worth an alert: what the data takes on disk, what compaction still owes, and
# whether the store stopped writing after an I/O error.
_ROCKSDB_GAUGES = {
    "rocksdb.total-sst-files-size": ("featurepush_store_sst_bytes", "Bytes of the store's SST files."),
    "rocksdb.cur-size-all-mem-tables": (
        "featurepush_store_memtable_bytes",
        "Bytes of the store's memtables.",
    ),
    "rocksdb.estimate-pending-compaction-bytes": (
        "featurepush_store_pending_compaction_bytes",
        "Bytes RocksDB estimates compaction still has to rewrite.",
    ),
    "rocksdb.estimate-num-keys": ("featurepush_store_keys_estimate", "RocksDB's estimate of its keys."),
    "rocksdb.background-errors": (
        "featurepush_store_background_errors",
        "Background errors RocksDB met (writes stop after one until it resumes).",
    ),
}

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _or_zero(read: Callable[[], float]) -> float:
    """A state read that a stopping server may refuse; a scrape then shows 0 rather than failing."""
    try:
        return read()
    except CoreError:
        return 0.0


class _StateCollector(Collector):
    """Gauges and counters read at scrape time from the server's parts."""

    def __init__(
        self,
        admission: Admission | None,
        store: Store | None,
        offline_log: OfflineLog | None,
        sweeper: ExpirySweeper | None,
    ):
        self._admission = admission
        self._store = store
        self._offline_log = offline_log
        self._sweeper = sweeper

    def collect(self) -> Iterator[Any]:
        if self._admission is not None:
            refused = CounterMetricFamily(
                "featurepush_admission_refused",
                "Calls refused with RESOURCE_EXHAUSTED by admission control, by class of method.",
                labels=["class"],
            )
            running = GaugeMetricFamily(
                "featurepush_admission_running", "Calls running, by class of method.", labels=["class"]
            )
            waiting = GaugeMetricFamily(
                "featurepush_admission_waiting",
                "Calls waiting for a slot, by class of method.",
                labels=["class"],
            )
            for klass, gate in self._admission.gates.items():
                refused.add_metric([klass], gate.refused)
                running.add_metric([klass], gate.running)
                waiting.add_metric([klass], gate.waiting)
            yield from (refused, running, waiting)
        local = self._store.local if isinstance(self._store, RemoteStore) else None
        if local is not None:
            reads = CounterMetricFamily(
                "featurepush_front_reads",
                "Row and tile reads of a serve --processes front, by what answered them: the front's own "
                "read-only snapshot of the database (local) or the store owner (owner, when a write landed "
                "since the snapshot).",
                labels=["answered_by"],
            )
            reads.add_metric(["local"], local.local_reads)
            reads.add_metric(["owner"], local.owner_reads)
            yield reads
            yield CounterMetricFamily(
                "featurepush_front_snapshots",
                "Read-only snapshots of the database a front opened after the owner's writes paused.",
                value=local.openings,
            )
            yield CounterMetricFamily(
                "featurepush_front_snapshots_dropped",
                "Read-only openings a front dropped because the owner finished a flush or compaction while "
                "they ran (their snapshot could lack the rows of a log deleted meanwhile).",
                value=local.discarded,
            )
        if self._store is not None:
            for prop, (name, text) in _ROCKSDB_GAUGES.items():
                value = self._store.statistic(prop)
                if value is not None:
                    yield GaugeMetricFamily(name, text, value=value)
            for statistic, (name, text) in _STORE_COUNTERS.items():
                count = self._store.statistic(statistic)
                if count is not None:
                    yield CounterMetricFamily(name, text, value=count)
        log = self._offline_log
        if log is not None:
            yield GaugeMetricFamily(
                "featurepush_offline_log_lag_seconds",
                "At least the age of the oldest record not yet flushed to the offline log (0 when none).",
                value=_or_zero(log.lag_seconds),
            )
            yield CounterMetricFamily(
                "featurepush_offline_log_flush_errors",
                "Background flushes of the offline log that failed (they are retried).",
                value=log.flush_errors,
            )
            yield CounterMetricFamily(
                "featurepush_offline_log_quarantined",
                "Offline-log queue entries that could not be flushed and were moved aside.",
                value=log.quarantined,
            )
        if self._sweeper is not None:
            yield CounterMetricFamily(
                "featurepush_expired_rows_deleted",
                "Rows deleted by the expiry sweep.",
                value=self._sweeper.deleted,
            )


class Metrics:
    """The server's metrics; thread-safe, as prometheus_client's metrics are."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.calls = Counter(
            "featurepush_calls", "Finished calls by method and status code.", ["method", "code"], registry=r
        )
        self.latency = Histogram(
            "featurepush_call_seconds",
            "Time from a call's start in the server to its end, by method.",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.bytes_in = Counter(
            "featurepush_request_bytes", "Request bytes received, by method.", ["method"], registry=r
        )
        self.records = Counter(
            "featurepush_records",
            "Records pushed, by source and outcome: accepted (valid), written (newest of their entity), "
            "superseded (a newer event was stored), rejected (in a refused push).",
            ["source", "outcome"],
            registry=r,
        )
        self.backfill_rows = Counter(
            "featurepush_backfill_rows",
            "Rows of backfills, by source and outcome (read, written, superseded, rejected).",
            ["source", "outcome"],
            registry=r,
        )
        self.pushes_rejected = Counter(
            "featurepush_pushes_rejected",
            "Pushes refused, by source they carried records for (an Arrow stream's rows are not counted).",
            ["source"],
            registry=r,
        )
        self._state: _StateCollector | None = None

    def watch(
        self,
        admission: Admission | None = None,
        store: Store | None = None,
        offline_log: OfflineLog | None = None,
        sweeper: ExpirySweeper | None = None,
    ) -> None:
        """Report these parts' state at each scrape."""
        if self._state is not None:
            self.registry.unregister(self._state)
        self._state = _StateCollector(admission, store, offline_log, sweeper)
        self.registry.register(self._state)

    def serve(self, address: str) -> tuple[Any, int]:
        """Serve /metrics on host:port in a daemon thread; the HTTP server and its bound port."""
        return serve_http(address, self.registry)

    def serve_socket(self, path: Path) -> socketserver.BaseServer:
        """Write the exposition text to whoever connects to the Unix socket `path`, for a supervisor."""
        registry = self.registry

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                self.request.sendall(generate_latest(registry))

        path.unlink(missing_ok=True)
        server = socketserver.ThreadingUnixStreamServer(str(path), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="featurepush-metrics", daemon=True).start()
        return server


# How long the metrics endpoint waits on a connection that sends nothing (or reads nothing), and how many
# connections it serves at once: each holds a thread, and one that never sent its request held it for ever.
METRICS_IDLE_S = 10.0
METRICS_CONNECTIONS = 32


class _MetricsHandler(WSGIRequestHandler):
    """A /metrics request; the socket's reads and writes give up after the server's idle_s."""

    server: _MetricsServer

    def setup(self) -> None:
        """Set the socket's timeout before the request is read."""
        super().setup()
        self.connection.settimeout(self.server.idle_s)

    def log_message(self, format: str, *args: Any) -> None:
        """Nothing: a scrape every few seconds is no news."""


class _MetricsServer(socketserver.ThreadingMixIn, WSGIServer):
    """A thread per connection, at most `connections` at once; one more is closed unanswered."""

    daemon_threads = True
    # Connections the kernel holds until they are accepted (5 by default): past it a connection's first
    # packet is dropped and sent again a second later, so a burst of connections would stall a scrape.
    request_queue_size = 64

    def __init__(
        self, family: socket.AddressFamily, address: tuple[str, int], idle_s: float, connections: int
    ):
        self.address_family = family
        self.idle_s = idle_s
        self._slots = threading.BoundedSemaphore(connections)
        super().__init__(address, _MetricsHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve the connection in a thread of its own if a slot is free, else close it."""
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Serve one connection, then give back its slot."""
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that timed out or broke off: the caller's doing, worth no traceback."""
        _LOGGER.debug("metrics connection from %s ended early", client_address, exc_info=True)


def serve_http(
    address: str,
    registry: CollectorRegistry,
    *,
    idle_s: float = METRICS_IDLE_S,
    connections: int = METRICS_CONNECTIONS,
) -> tuple[Any, int]:
    """Serve a registry's /metrics on host:port in a daemon thread; the HTTP server and its bound port."""
    host, _, port = address.rpartition(":")
    bind = host.strip("[]") or "0.0.0.0"
    family = socket.getaddrinfo(bind, int(port), type=socket.SOCK_STREAM)[0][0]
    server = _MetricsServer(family, (bind, int(port)), idle_s, connections)
    server.set_app(make_wsgi_app(registry))
    threading.Thread(target=server.serve_forever, name="featurepush-metrics-http", daemon=True).start()
    bound = int(server.server_address[1])
    _LOGGER.info("metrics on http://%s:%d/metrics", host or "0.0.0.0", bound)
    return server, bound


# Gauges each process holds for itself, which add up; every other gauge reads state the processes share
# (the one store, the one offline log), so each process reports the same value and one is kept.
_PER_PROCESS_GAUGES = frozenset({"featurepush_admission_running", "featurepush_admission_waiting"})
# How long a scrape waits for one process before leaving it out.
SCRAPE_TIMEOUT_S = 2.0


class ProcessGroupCollector(Collector):
    """The metrics of every process of `serve --processes`, read from their sockets and added up.

    Counters and histograms are summed over the processes (a restarted process starts its counters
    from zero again, which Prometheus reads as a reset); `_created` keeps the earliest time.
    """

    def __init__(self, sockets: Callable[[], list[Path]]):
        self._sockets = sockets

    def _read(self, path: Path) -> str | None:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(SCRAPE_TIMEOUT_S)
                conn.connect(str(path))
                chunks = []
                while chunk := conn.recv(1 << 16):
                    chunks.append(chunk)
            return b"".join(chunks).decode()
        except OSError:
            # A process that is restarting has no socket yet or a stale one; the next scrape has it.
            return None

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
        for path in self._sockets():
            text = self._read(path)
            if text is None:
                continue
            for family in text_string_to_metric_families(text):
                if family.name not in merged:
                    merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                    values[family.name] = {}
                into = values[family.name]
                for sample in family.samples:
                    key = (sample.name, tuple(sorted(sample.labels.items())))
                    old = into.get(key)
                    if old is None:
                        into[key] = sample.value
                    elif sample.name.endswith("_created"):
                        into[key] = min(old, sample.value)
                    elif family.type == "gauge" and family.name not in _PER_PROCESS_GAUGES:
                        into[key] = max(old, sample.value)
                    else:
                        into[key] = old + sample.value
        for name, metric in merged.items():
            for (sample_name, labels), value in values[name].items():
                metric.add_sample(sample_name, dict(labels), value)
            yield metric
