"""`featurepush serve --processes N`: a supervisor and N gRPC fronts on one port, over one store.

The supervisor (the process started) reserves the port and starts the fronts, which bind it with
SO_REUSEPORT so the kernel spreads connections over them. With the embedded store it first starts one
store owner and waits for its socket: the owner opens the store and runs its background work; the fronts
decode, validate and encode, and reach the store through `RemoteStore` (core/stores/remote.py). With
Redis there is no owner: every front opens its own connection to Redis, which decides every write, and
runs its own background work (the first front alone drains the offline log, under Redis's lease).
A process that dies is started again: a front's clients retry on another; while the owner is down the
fronts answer UNAVAILABLE. SIGTERM or SIGINT stops the fronts gracefully, then the owner, which flushes
and closes the store.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pickle
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .config import ServerConfig
from .runtime import CATALOG, SOCKET, WRITES, process_stat

if TYPE_CHECKING:
    from .core.stores.base import Store
    from .core.stores.remote import RemoteStore, StoreOwner

_LOGGER = logging.getLogger(__name__)

# Each process's metrics socket in the runtime folder: metrics-owner-0.sock, metrics-front-3.sock.
METRICS_PREFIX = "metrics-"
# Seconds a process may take from its start to serving before the server gives up.
START_TIMEOUT_S = 120.0


class _Child:
    """One started process of the server and the pipe on which it says it is ready."""

    def __init__(self, role: str, index: int, config: ServerConfig, runtime: Path):
        self.role = role
        self.index = index
        self.started = time.monotonic()
        read_end, write_end = os.pipe()
        command = [sys.executable, "-m", "featurepush_server.processes", role, str(index), str(runtime)]
        command.append(str(write_end))
        # A session of its own: Ctrl-C in a terminal reaches the supervisor only, which stops all in order.
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, pass_fds=(write_end,), start_new_session=True
        )
        os.close(write_end)
        self._ready_pipe = read_end
        assert self.process.stdin is not None
        self.process.stdin.write(pickle.dumps(config))
        self.process.stdin.close()

    @property
    def name(self) -> str:
        return "the store owner" if self.role == "owner" else f"front {self.index}"

    def wait_ready(self, signals: list[int]) -> bool:
        """Whether the process came up; False once it exited first, a signal came or the time ran out."""
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            while time.monotonic() < deadline and not signals:
                readable, _, _ = select.select([self._ready_pipe], [], [], 0.1)
                if readable:
                    return os.read(self._ready_pipe, 1) == b"r"
            return False
        finally:
            os.close(self._ready_pipe)

    def not_ready(self, signals: list[int]) -> str | None:
        """Why wait_ready() was False, for the log; None where the process exited having said why itself."""
        if signals:
            return f"a signal came while {self.name} was starting"
        try:
            # Its ready pipe closes as it exits, a moment before the exit can be waited for.
            code = self.process.wait(5.0)
        except subprocess.TimeoutExpired:
            return f"{self.name} did not start within {START_TIMEOUT_S:.0f}s"
        if code == 1:
            # Its last line on standard error said why (a data directory in use, a refused definition).
            return None
        if code < 0:
            return f"{self.name} was killed by signal {-code} before it was ready"
        return f"{self.name} exited with code {code} before it was ready"

    def forget_ready(self) -> None:
        """Not wait for this one: the supervisor goes on watching the others while it starts."""
        os.close(self._ready_pipe)

    def signal(self, signum: int) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signum)


def _reserve_port(listen: str) -> tuple[str, socket.socket]:
    """The listen address with a real port, and a socket holding that port for the fronts to share."""
    host, _, port_text = listen.rpartition(":")
    family, kind, proto, _, address = socket.getaddrinfo(
        host.strip("[]") or None, int(port_text), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    # Bound without SO_REUSEPORT first: that fails while anything listens there, another featurepush too.
    # SO_REUSEADDR lets it past the connections a killed server's fronts left in TIME_WAIT (a restart right
    # after a kill -9 failed for a minute without it); it still fails beside a listening or holding socket.
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError:
            raise OSError(f"cannot listen on {listen}: the address is in use or not available here") from None
        port = probe.getsockname()[1]
    # Bound but never listening, it gets no connections; it keeps other programs off the port.
    holder = socket.socket(family, kind, proto)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind((address[0], port, *address[2:]))
    return f"{host}:{port}", holder


def supervise(config: ServerConfig) -> None:
    """Run `config.processes` fronts (and the owner of an embedded store) until SIGINT or SIGTERM.

    Exits non-zero if they fail.
    """
    os.umask(0o077)
    listen, holder = _reserve_port(config.listen)
    shared = dataclasses.replace(config, listen=listen)
    runtime = Path(tempfile.mkdtemp(prefix="featurepush-"))
    signals: list[int] = []

    def _on_signal(signum: int, frame: object) -> None:
        signals.append(signum)

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    fronts: list[_Child] = []
    owner: _Child | None = None

    def start(role: str, index: int) -> _Child:
        # Each process serves its metrics on a socket in the runtime folder (metrics_socket), which the
        # supervisor's /metrics adds up.
        child = _Child(role, index, shared, runtime)
        _LOGGER.info("%s started, pid %d", child.name, child.process.pid)
        return child

    metrics_http = None
    try:
        if config.metrics_listen:
            from prometheus_client import CollectorRegistry

            from .metrics import ProcessGroupCollector, serve_http

            group = CollectorRegistry(auto_describe=False)
            group.register(ProcessGroupCollector(lambda: sorted(runtime.glob(f"{METRICS_PREFIX}*.sock"))))
            metrics_http, _ = serve_http(config.metrics_listen, group)
        # Redis decides writes itself and is shared by whoever connects: nothing needs to own it.
        if config.store == "rocksdb":
            owner = start("owner", 0)
            if not owner.wait_ready(signals):
                _fail(owner.not_ready(signals), [], owner)
        # Started together and awaited after: each takes a while to import and build its server.
        fronts = [start("front", i) for i in range(config.processes)]
        for front in fronts:
            if not front.wait_ready(signals):
                _fail(front.not_ready(signals), fronts, owner)
        port = int(listen.rpartition(":")[2])
        _LOGGER.info(
            "featurepush listening on %s (port %d), data in %s; %d front processes %s",
            config.listen,
            port,
            config.data_dir,
            config.processes,
            "and a store owner" if owner is not None else "on a shared Redis",
        )
        while not signals:
            time.sleep(0.1)
            # Started again at most once a second each, so a process that cannot start does not spin.
            if (
                owner is not None
                and owner.process.poll() is not None
                and time.monotonic() - owner.started > 1.0
            ):
                _LOGGER.error(
                    "the store owner (pid %d) exited with code %s; fronts answer UNAVAILABLE until it is up",
                    owner.process.pid,
                    owner.process.returncode,
                )
                owner = start("owner", 0)
                owner.forget_ready()
            for i, front in enumerate(fronts):
                if front.process.poll() is not None and time.monotonic() - front.started > 1.0:
                    _LOGGER.warning(
                        "front %d (pid %d) exited with code %s; starting it again",
                        i,
                        front.process.pid,
                        front.process.returncode,
                    )
                    fronts[i] = start("front", i)
                    fronts[i].forget_ready()
        _LOGGER.info("stopping within %.1fs (a second signal exits at once)", config.shutdown_grace_s)
        # Fronts first, so that every call they drain still reaches the store; then the owner flushes.
        # One that died before the signal (its restart waits out the second) is not failing to stop.
        running = [c for c in (*fronts, *([owner] if owner is not None else [])) if c.process.poll() is None]
        codes = _stop([f for f in fronts if f in running], signals)
        codes += _stop([owner] if owner in running else [], signals)
        # A process still starting when the signal came ends by it, with nothing to drain.
        failed = [c for c in codes if c not in (0, -signal.SIGTERM)]
        if failed:
            _LOGGER.error("processes exited with codes %s while stopping", failed)
            raise SystemExit(1)
        _LOGGER.info("stopped")
    finally:
        for child in (*fronts, *([owner] if owner is not None else [])):
            if child.process.poll() is None:
                child.process.kill()
                child.process.wait()
        holder.close()
        if metrics_http is not None:
            metrics_http.shutdown()
            metrics_http.server_close()
        # The sockets and the shared counters.
        shutil.rmtree(runtime, ignore_errors=True)


def _stop(children: list[_Child], signals: list[int]) -> list[int]:
    """SIGTERM to each child, then wait for all; a second signal passes on and exits at once."""
    for child in children:
        child.signal(signal.SIGTERM)
    seen = len(signals)
    while any(child.process.poll() is None for child in children):
        if len(signals) > seen:
            _LOGGER.warning("second signal: exiting now")
            for child in children:
                child.signal(signal.SIGTERM)
            for child in children:
                child.process.wait(30)
            os._exit(128 + signals[-1])
        time.sleep(0.05)
    return [child.process.returncode for child in children]


def _fail(reason: str | None, fronts: list[_Child], owner: _Child | None) -> None:
    """Stop whatever runs and exit non-zero, saying why unless the process that failed said it already."""
    if reason is not None:
        _LOGGER.error("%s; stopping the server", reason)
    _stop([f for f in fronts if f.process.poll() is None], [])
    _stop([owner] if owner is not None else [], [])
    raise SystemExit(1)


def _watch_parent() -> None:
    """Stop this process, as SIGTERM would, once the supervisor is gone (even killed with SIGKILL)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="featurepush-parent-watch", daemon=True).start()


def _argv(pid: int) -> list[bytes]:
    """A running process's command line, empty if it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def running(pid: int) -> bool:
    """Whether a process exists and has not exited (a zombie has)."""
    stat = process_stat(pid)
    return stat is not None and stat[0] != "Z"


def orphaned_owner(online_dir: Path) -> int | None:
    """The pid of an earlier server's store owner still holding `online_dir` after its supervisor went away.

    Such an owner noticed and is stopping gracefully (see _watch_parent). A live server's owner has its
    supervisor (a `featurepush ... serve` process) as parent and is not orphaned.
    """
    from .core.stores.rocksdb import PID_FILE

    try:
        pid = int((online_dir / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return None
    stat = process_stat(pid)
    if stat is None:
        return None
    parent = stat[1]
    argv = _argv(pid)
    if pid == os.getpid() or b"featurepush_server.processes" not in argv or b"owner" not in argv:
        return None
    supervisor = _argv(parent)
    if b"serve" in supervisor and any(b"featurepush" in part for part in supervisor):
        return None
    return pid


def await_orphaned_owner(online_dir: Path, timeout_s: float) -> None:
    """Wait, up to `timeout_s`, for an orphaned earlier owner of `online_dir` to finish stopping.

    A server restarted at once after its supervisor alone was killed would otherwise find the database still
    locked by the old owner, flushing its offline log, and refuse to start.
    """
    pid = orphaned_owner(online_dir)
    if pid is None:
        return
    _LOGGER.warning(
        "the data directory is still held by pid %d, the store owner of a server whose supervisor is gone; "
        "waiting up to %.0fs for it to stop",
        pid,
        timeout_s,
    )
    deadline = time.monotonic() + timeout_s
    while running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def store_owner(store: Store, runtime: Path) -> StoreOwner:
    """Serve `store` to the fronts on the runtime folder's socket (not started), counting its writes."""
    from .core.stores.remote import CatalogVersion, SharedCounter, StoreOwner
    from .core.stores.rocksdb import RocksDBStore

    owner = StoreOwner(store, runtime / SOCKET, CatalogVersion(runtime / CATALOG))
    if isinstance(store, RocksDBStore):
        writes = SharedCounter(runtime / WRITES)
        store.watch_writes(writes.bump)
        # A restarted owner recovered its log: the fronts' snapshots may miss what it held.
        writes.bump()
    return owner


def front_store(config: ServerConfig, runtime: Path) -> RemoteStore:
    """A front's store: the owner's over its socket, with reads from snapshots where configured."""
    from .core.stores.remote import CatalogVersion, RemoteStore, SharedCounter
    from .core.stores.snapshots import SnapshotReader

    local = None
    if config.front_reads:
        local = SnapshotReader(config.online_dir, SharedCounter(runtime / WRITES))
    return RemoteStore(runtime / SOCKET, CatalogVersion(runtime / CATALOG), local=local)


def _run_owner(
    config: ServerConfig, runtime: Path, ready: Callable[[], None], metrics_socket: Path | None
) -> None:
    """Open the store, serve it to the fronts and run its background work until SIGTERM."""
    from .app import open_store, track_stored_rows
    from .core.expiry import ExpirySweeper
    from .core.offline_log import OfflineLog
    from .core.periodic import Periodic
    from .core.tiles import sweep_tiles
    from .metrics import Metrics

    os.umask(0o077)
    # Its grace period, and a little for closing the database after it.
    await_orphaned_owner(config.online_dir, config.shutdown_grace_s + 5.0)
    store = open_store(config)
    try:
        offline_log = OfflineLog(
            store, config.data_dir / "offline", interval_s=config.offline_flush_interval_s
        )
        sweeper = ExpirySweeper(store, config.expired_sweep_interval_s, lambda: sweep_tiles(store))
        recovery = Periodic("featurepush-storage-recovery", config.storage_retry_interval_s, store.recover)
        owner = store_owner(store, runtime)
    except BaseException:
        store.close()
        raise
    owner.start()
    offline_log.start()
    sweeper.start()
    recovery.start()
    track_stored_rows(store)
    metrics_server = None
    if metrics_socket is not None:
        # The store's gauges, the offline log's and the sweep's come from here: the fronts have none.
        metrics = Metrics()
        metrics.watch(store=store, offline_log=offline_log, sweeper=sweeper)
        metrics_server = metrics.serve_socket(metrics_socket)
    ready()
    signals: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: signals.append(signum))
    signal.signal(signal.SIGINT, lambda signum, frame: signals.append(signum))
    while not signals:
        time.sleep(0.1)

    def stop() -> None:
        if metrics_server is not None:
            metrics_server.shutdown()
            metrics_server.server_close()
        owner.close()
        for close in (offline_log.close, sweeper.close, recovery.stop):
            try:
                close()
            except Exception:
                # What a closer leaves undone is still in the store (the offline queue), so it is only logged.
                _LOGGER.exception("stopping a background worker failed")
        store.close(max(config.shutdown_grace_s, 1.0))

    stopper = threading.Thread(target=stop, name="featurepush-stop")
    stopper.start()
    while stopper.is_alive():
        stopper.join(0.1)
        if len(signals) > 1:
            # The write-ahead log holds every acknowledged write, so leaving now loses nothing.
            store.sync_now()
            os._exit(128 + signals[-1])


# How long a starting front waits for the store owner to answer before it gives up.
OWNER_WAIT_S = 30.0


def main(argv: list[str]) -> int:
    """A child process: `owner` or `front`, its index, the runtime folder and the ready pipe's fd."""
    role, index, runtime_text, ready_fd = argv
    runtime = Path(runtime_text)
    config: ServerConfig = pickle.load(sys.stdin.buffer)
    from .core.errors import CoreError, InvalidInput
    from .logs import configure

    configure(config.log_level, config.log_format)
    _watch_parent()
    metrics_socket = runtime / f"{METRICS_PREFIX}{role}-{index}.sock" if config.metrics_listen else None
    # The supervisor serves /metrics on the address; this process answers it on its socket.
    config = dataclasses.replace(config, metrics_listen="")

    def ready() -> None:
        # A process started again writes to a pipe nobody reads any more: the supervisor does not wait.
        with contextlib.suppress(OSError):
            os.write(int(ready_fd), b"r")
        os.close(int(ready_fd))

    try:
        if role == "owner":
            _run_owner(config, runtime, ready, metrics_socket)
        elif config.store != "rocksdb":
            from .app import serve

            serve(config, peer=int(index), ready=ready, metrics_socket=metrics_socket)
        else:
            from .app import serve
            from .core.errors import Unavailable

            served: list[bool] = []

            def serving() -> None:
                served.append(True)
                ready()

            from .workers import backfill_workers

            # Started on the first backfill; stopped when this front stops.
            workers = backfill_workers(config, runtime)
            # A front started again while the owner restarts meets it gone; it waits for it, briefly.
            give_up = time.monotonic() + OWNER_WAIT_S
            try:
                while True:
                    store = front_store(config, runtime)
                    try:
                        serve(
                            config,
                            front=store,
                            ready=serving,
                            metrics_socket=metrics_socket,
                            backfill_workers=workers,
                        )
                        break
                    except Unavailable:
                        if served or time.monotonic() > give_up:
                            raise
                        time.sleep(0.2)
            finally:
                workers.shutdown(wait=True, cancel_futures=True)
    except CoreError as e:
        # A definitions file applied at start was refused, as ApplySource would refuse it.
        details = (
            [f"\n  {v.path}: {v.description}" for v in e.violations] if isinstance(e, InvalidInput) else []
        )
        print(f"featurepush: error: {''.join([e.message, *details])}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:
        print(f"featurepush: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
