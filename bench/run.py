"""Every scenario against a real `featurepush serve` process and its ceilings; writes bench/results.json."""

from __future__ import annotations

import datetime as dt
import json
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import grpc
import pyarrow as pa
import rocksdict

from bench import batch, redis_store, views
from bench.common import start_empty, start_serve
from featurepush import Bool, Client, Field, Float64, Int32, Int64, StreamSource, String, Timestamp
from featurepush.payload import arrow_ipc
from featurepush.v1 import ingest_service_pb2 as ingest_pb
from featurepush.v1 import online_service_pb2 as online_pb
from featurepush.values import fill_struct
from featurepush_server.core.encoding import encode_rows
from featurepush_server.core.schema import compile_source
from featurepush_server.core.stores.rocksdb import row_prefix

SOURCE = "ad_impressions"
# The seed's ad_impressions schema, widened to 8 fields.
AD_IMPRESSIONS = StreamSource(
    name=SOURCE,
    schema=[
        Field("user_id", String),
        Field("timestamp", Timestamp),
        Field("clicked", Int64),
        Field("ad_id", String),
        Field("campaign_id", Int64),
        Field("position", Int32),
        Field("bid", Float64),
        Field("viewed", Bool),
    ],
    entity_keys=["user_id"],
    timestamp_field="timestamp",
)
SECONDS = float(os.environ.get("BENCH_SECONDS", "3"))
# The process scenarios run this long unmeasured before each measured run.
WARM_UP_SECONDS = 1.0
LATENCY_CALLS = int(os.environ.get("BENCH_LATENCY_CALLS", "1000"))
CLIENTS = int(os.environ.get("BENCH_CLIENTS", "2"))
# BENCH_ONLY=processes runs only the process-scaling scenarios: serve --processes 1 against one process
# per core (BENCH_PROCESSES), each with BENCH_CLIENTS client processes (default: one per core).
# BENCH_ONLY=client runs only the client scenarios and the raw ones they are measured against.
ONLY = os.environ.get("BENCH_ONLY", "")
CORES = os.cpu_count() or 1
RESULTS = Path(__file__).with_name("results.json")
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
PUSH = "/featurepush.v1.IngestService/Push"
PUSH_STREAM = "/featurepush.v1.IngestService/PushStream"
GET = "/featurepush.v1.OnlineService/GetFeatures"
CHANNEL_OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]


def rows(worker: int, n: int) -> list[dict[str, Any]]:
    """n distinct ad impressions for one worker."""
    return [
        {
            "user_id": f"w{worker}-u{i}",
            "timestamp": T0 + dt.timedelta(microseconds=i),
            "clicked": i % 7,
            "ad_id": f"ad-{i % 1000}",
            "campaign_id": 10_000_000_000 + i % 50,
            "position": i % 10,
            "bid": 0.25 + i % 100 / 1000,
            "viewed": i % 2 == 0,
        }
        for i in range(n)
    ]


def push_bytes(worker: int, n: int, columnar: bool = False) -> bytes:
    """A serialized PushRequest of n rows, as Structs or as Arrow IPC."""
    request = ingest_pb.PushRequest()
    if columnar:
        request.records[SOURCE].arrow_ipc = arrow_ipc(pa.Table.from_pylist(rows(worker, n)))
    else:
        target = request.records[SOURCE].rows
        for row in rows(worker, n):
            fill_struct(target.add(), row)
    return request.SerializeToString()


# The width of the entity keys of new_entity_pushes: 16 hex digits, a random 64-bit number.
_NEW_KEY_WIDTH = 16


def new_entity_pushes(worker: int, n: int) -> Iterator[bytes]:
    """Serialized PushRequests of n rows of entities new to the store each time, in random order.

    One request is serialized with placeholder keys of a fixed width; each request after writes fresh
    random keys over them, so the client spends about a millisecond a request, not a serialization.
    """
    placeholders = [f"q{worker:03x}{i:0{_NEW_KEY_WIDTH - 4}x}" for i in range(n)]
    request = ingest_pb.PushRequest()
    target = request.records[SOURCE].rows
    for row, key in zip(rows(worker, n), placeholders, strict=True):
        fill_struct(target.add(), {**row, "user_id": key})
    template = bytearray(request.SerializeToString())
    offsets = [template.find(key.encode()) for key in placeholders]
    assert -1 not in offsets and len(set(offsets)) == n
    while True:
        keys = os.urandom(_NEW_KEY_WIDTH // 2 * n).hex().encode()
        for i, at in enumerate(offsets):
            template[at : at + _NEW_KEY_WIDTH] = keys[i * _NEW_KEY_WIDTH : (i + 1) * _NEW_KEY_WIDTH]
        yield bytes(template)


def get_bytes(worker: int, n: int) -> bytes:
    """A serialized GetFeaturesRequest for n of one worker's entities."""
    request = online_pb.GetFeaturesRequest(source=SOURCE)
    for i in range(n):
        request.keys.add().update({"user_id": f"w{worker}-u{i}"})
    return request.SerializeToString()


def _client_throughput(target: str, scenario: str, worker: int, seconds: float) -> tuple[int, float]:
    """Rows pushed and seconds taken by one process using the featurepush Client as a user would."""
    with Client(target, channel_options=CHANNEL_OPTIONS) as client:
        if scenario == "client_get":
            # The raw scenario's very keys; the call returns FeatureResults, its rows built on first use.
            keys = [f"w{worker}-u{i}" for i in range(100)]
            client.get_features(SOURCE, keys)  # warm the connection and the schema cache
            got, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                got += len(client.get_features(SOURCE, keys))
            return got, time.perf_counter() - start
        if scenario.startswith("client_pusher"):
            records = rows(worker, 10_000)
            # The default pusher, or batches of at most 1,000 rows for the 1k comparison.
            options = {"max_rows": 1000} if scenario.endswith("_1k") else {}
            with client.pusher(SOURCE, **options) as pusher:
                pusher.add(records[0])
                pusher.flush()
                added, start = 0, time.perf_counter()
                while time.perf_counter() - start < seconds:
                    for record in records:
                        pusher.add(record)
                    added += len(records)
            # Closing flushes: the time counts until every record is acknowledged.
            return added, time.perf_counter() - start
        data: Any = rows(worker, 1000 if scenario.endswith("_1k") else 10_000)
        if scenario == "client_arrow":
            data = pa.Table.from_pylist(data)
        client.push(SOURCE, data)  # warm the connection and the schema cache
        pushed, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            pushed += client.push(SOURCE, data).counts[SOURCE].accepted
        return pushed, time.perf_counter() - start


def _throughput(target: str, scenario: str, worker: int, seconds: float) -> tuple[int, float]:
    """Items moved and seconds taken by one client process looping over one scenario."""
    try:
        return _loop(target, scenario, worker, seconds)
    except grpc.RpcError as e:
        # grpc's errors hold locks and cannot travel back from a pool process; their status can.
        raise RuntimeError(f"{scenario} client {worker}: {e.code()} {e.details()}") from None


def _loop(target: str, scenario: str, worker: int, seconds: float) -> tuple[int, float]:
    """What _throughput measures, its grpc errors raised as they come."""
    if scenario.startswith("client_"):
        return _client_throughput(target, scenario, worker, seconds)
    channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
    unary = channel.unary_unary(PUSH)
    per_call, method = 1000, unary
    if scenario == "rows":
        payload = push_bytes(worker, per_call)
    elif scenario in ("arrow", "arrow_1k"):
        per_call = 1000 if scenario == "arrow_1k" else 10_000
        payload = push_bytes(worker, per_call, columnar=True)
    elif scenario in ("get", "get_arrow"):
        per_call, method, payload = 100, channel.unary_unary(GET), get_bytes(worker, 100)
        if scenario == "get_arrow":
            # The very request Client.get_features sends for 100 keys: the reply as one Arrow batch.
            arrow = online_pb.RESPONSE_FORMAT_ARROW
            payload += online_pb.GetFeaturesRequest(response_format=arrow).SerializeToString()
    elif scenario == "rows_new":
        pushes = new_entity_pushes(worker, per_call)
        unary(next(pushes))  # warm the connection
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            unary(next(pushes))
            calls += 1
        elapsed = time.perf_counter() - start
        channel.close()
        return calls * per_call, elapsed
    elif scenario == "stream":
        # Serialized once, as the unary scenarios' requests are: the client's work is not what is measured.
        message = ingest_pb.PushStreamRequest(
            request=ingest_pb.PushRequest.FromString(push_bytes(worker, 1000))
        ).SerializeToString()
        stream = channel.stream_stream(PUSH_STREAM)
        deadline = time.perf_counter() + seconds

        def batches() -> Iterator[bytes]:
            while time.perf_counter() < deadline:
                yield message

        start = time.perf_counter()
        acks = sum(1 for _ in stream(batches()))
        return acks * per_call, time.perf_counter() - start
    method(payload)  # warm the connection
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        method(payload)
        calls += 1
    elapsed = time.perf_counter() - start
    channel.close()
    return calls * per_call, elapsed


def throughput(pool: ProcessPoolExecutor, target: str, scenario: str, clients: int = CLIENTS) -> float:
    """Items per second of `clients` processes running one scenario at once, a connection each."""
    return counted_throughput(pool, target, scenario, clients)[0]


def counted_throughput(
    pool: ProcessPoolExecutor, target: str, scenario: str, clients: int = CLIENTS, seconds: float = SECONDS
) -> tuple[float, int]:
    """Items per second of `clients` processes running one scenario at once, and how many items in all."""
    jobs = [pool.submit(_throughput, target, scenario, w, seconds) for w in range(clients)]
    done = [j.result() for j in jobs]
    moved = sum(n for n, _ in done)
    return moved / max(t for _, t in done), moved


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds a process has used so far, from /proc."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def python_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process's threads other than RocksDB's own: the time its Python code ran.

    RocksDB names its background threads (rocksdb:low, rocksdb:high) and keeps them for the process's life;
    the rest of the owner's threads run Python and hold its one GIL while they work, so this over the wall
    time says how busy that lock was. Taken as the process's total less RocksDB's threads, so that threads
    which already ended (a closed connection's) still count.
    """
    rocksdb = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended
        if name.startswith("rocksdb"):
            rocksdb += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return cpu_seconds(pid) - rocksdb


def owner_pid(supervisor: int) -> int | None:
    """The store owner among a `serve --processes` supervisor's children, or None (one process)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat[1]) == supervisor and b"featurepush_server.processes" in argv and b"owner" in argv:
            return int(entry.name)
    return None


def latencies(target: str, method_name: str, payload: bytes) -> tuple[float, float]:
    """p50 and p99 in milliseconds of serial single calls."""
    with grpc.insecure_channel(target) as channel:
        method = channel.unary_unary(method_name)
        method(payload)
        times = []
        for _ in range(LATENCY_CALLS):
            start = time.perf_counter()
            method(payload)
            times.append((time.perf_counter() - start) * 1000)
    cuts = statistics.quantiles(times, n=100)
    return cuts[49], cuts[98]


def get_one_p99s(target: str, empty_target: str | None = None) -> dict[str, float]:
    """p99 in milliseconds of serial one-key reads: raw bytes, Client.get_features and the empty handler.

    The three take turns in blocks of 50 calls, so a burst of other work on the machine falls on all of
    them alike and the ratios between them stay meaningful where the absolute figures do not.
    """
    payload = get_bytes(0, 1)
    with grpc.insecure_channel(target) as channel, Client(target) as client:
        callers = {
            "raw": partial(channel.unary_unary(GET), payload),
            "client": partial(client.get_features, SOURCE, ["w0-u0"]),
        }
        empty = grpc.insecure_channel(empty_target) if empty_target else None
        if empty is not None:
            callers["empty"] = partial(empty.unary_unary(GET), payload)
        times: dict[str, list[float]] = {name: [] for name in callers}
        for call in callers.values():
            call()
        for _ in range(0, LATENCY_CALLS, 50):
            for name, call in callers.items():
                for _ in range(50):
                    start = time.perf_counter()
                    call()
                    times[name].append((time.perf_counter() - start) * 1000)
        if empty is not None:
            empty.close()
    return {name: statistics.quantiles(t, n=100)[98] for name, t in times.items()}


def start_featurepush(data_dir: Path, fsync: str, processes: int = 1) -> tuple[subprocess.Popen[bytes], str]:
    """A `featurepush serve` process on a free port with the bench source applied."""
    process, target = start_serve(data_dir, fsync, processes=processes)
    with Client(target) as client:
        client.apply(AD_IMPRESSIONS)
    return process, target


def rocksdb_rows_per_s(folder: Path, per_batch: int, sync: bool) -> float:
    """Rows per second of raw rocksdict WriteBatches of the same rows, with the server's sync policy."""
    options = rocksdict.Options(raw_mode=True)
    options.create_if_missing(True)
    db = rocksdict.Rdict(str(folder), options)
    # The very keys and values featurepush stores for these rows.
    spec = compile_source(AD_IMPRESSIONS.to_proto())
    table = pa.Table.from_pylist(rows(0, per_batch), schema=spec.arrow_schema)
    keys, values = encode_rows(table, spec.fields, spec.entity_keys, spec.timestamp_field, row_prefix(1))
    pairs = list(zip(keys, values, strict=True))
    written, start = 0, time.perf_counter()
    while time.perf_counter() - start < SECONDS:
        wb = rocksdict.WriteBatch(raw_mode=True)
        for key, value in pairs:
            wb.put(key, value)
        db.write(wb)
        if sync:
            db.flush_wal(True)
        written += per_batch
    elapsed = time.perf_counter() - start
    db.close()
    return written / elapsed


def rocksdb_get_keys_per_s(folder: Path) -> float:
    options = rocksdict.Options(raw_mode=True)
    db = rocksdict.Rdict(str(folder), options)
    keys = [b"r\x00\x00\x00\x01" + r["user_id"].encode() for r in rows(0, 100)]
    got, start = 0, time.perf_counter()
    while time.perf_counter() - start < SECONDS:
        db.get(keys)
        got += len(keys)
    elapsed = time.perf_counter() - start
    db.close()
    return got / elapsed


@dataclass
class Result:
    name: str
    value: float
    unit: str
    ceiling: float
    ratio: float


def result(name: str, value: float, unit: str, ceiling: float) -> Result:
    """A row; ratio is the share of the ceiling reached (ceiling over value for latencies)."""
    ratio = ceiling / value if unit == "ms" else value / ceiling
    return Result(name, round(value, 3), unit, round(ceiling, 3), round(ratio, 3))


def measure(pool: ProcessPoolExecutor, target: str, suffix: str, ceilings: dict[str, float]) -> list[Result]:
    """Every featurepush scenario against one server."""
    out = [
        result("push_rows" + suffix, throughput(pool, target, "rows"), "rows/s", ceilings["push_rows"]),
        result("push_stream" + suffix, throughput(pool, target, "stream"), "rows/s", ceilings["push_stream"]),
        result("push_arrow" + suffix, throughput(pool, target, "arrow"), "rows/s", ceilings["push_arrow"]),
    ]
    if not suffix:
        out += client_pushes(pool, target, out[2].value)
    p50, p99 = latencies(target, PUSH, push_bytes(9, 1))
    out += [
        result("push_one_p50_ms" + suffix, p50, "ms", ceilings["push_one_p50_ms"]),
        result("push_one_p99_ms" + suffix, p99, "ms", ceilings["push_one_p99_ms"]),
    ]
    return out


class Sandwich:
    """A raw scenario measured again after each client scenario, so that each is held to the raw figures
    taken just before and just after it: on a shared machine the raw rate drifts by a tenth or more over
    the half minute the client scenarios take, and one early figure would bias every ratio alike."""

    def __init__(self, pool: ProcessPoolExecutor, target: str, raw_scenario: str, first: float):
        self._pool = pool
        self._target = target
        self._raw = raw_scenario
        self.last = first

    def measure(self, scenario: str) -> tuple[float, float]:
        """The scenario's rate and its ceiling, the mean of the raw rates on either side of it."""
        value = throughput(self._pool, self._target, scenario)
        before, self.last = self.last, throughput(self._pool, self._target, self._raw)
        return value, (before + self.last) / 2


def client_pushes(pool: ProcessPoolExecutor, target: str, raw_arrow: float) -> list[Result]:
    """Pushes through the client against raw Arrow pushes of as many rows per call, in the same run.

    push_arrow and the unsuffixed client rows send 10,000 rows per call (the pusher coalesces up to that);
    the _1k rows send 1,000 per call against push_arrow_1k, the raw Arrow bytes of 1,000-row pushes. Each
    client row's ceiling is the raw rate measured just before and just after it (Sandwich).
    """
    raw_1k = throughput(pool, target, "arrow_1k")
    out = [result("push_arrow_1k", raw_1k, "rows/s", raw_arrow)]
    tens = Sandwich(pool, target, "arrow", raw_arrow)
    thousands = Sandwich(pool, target, "arrow_1k", raw_1k)
    for name, scenario, raw in (
        ("client_push_dicts", "client_dicts", tens),
        ("client_push_arrow", "client_arrow", tens),
        ("pusher_add", "client_pusher", tens),
        ("client_push_dicts_1k", "client_dicts_1k", thousands),
        ("pusher_add_1k", "client_pusher_1k", thousands),
    ):
        value, ceiling = raw.measure(scenario)
        out.append(result(name, value, "rows/s", ceiling))
    return out


def client_reads(
    pool: ProcessPoolExecutor, target: str, raw_get: float, p99s: dict[str, float]
) -> list[Result]:
    """Reads through the client, against the raw requests of the same run as ceiling.

    get_features asks for Structs; get_features_arrow asks for the Arrow form that Client.get_features
    asks for when reading more than a few keys, and bounds it. Both are held to get_features measured just
    before and just after them (Sandwich). p99s holds the one-key p99s measured in turns (get_one_p99s):
    the client's is held to the raw request's.
    """
    raw = Sandwich(pool, target, "get", raw_get)
    arrow, arrow_ceiling = raw.measure("get_arrow")
    client, client_ceiling = raw.measure("client_get")
    return [
        result("get_features_arrow", arrow, "keys/s", arrow_ceiling),
        result("client_get_features", client, "keys/s", client_ceiling),
        result("client_get_one_p99_ms", p99s["client"], "ms", p99s["raw"]),
    ]


def client_only() -> list[Result]:
    """BENCH_ONLY=client: the client scenarios and, on the same server, the raw ones they are held to.

    BENCH_ROUNDS (default 1) repeats the whole set, ceilings included, and reports each row's median value,
    ceiling and ratio, which steadies the ratios on a machine shared with other work.
    """
    rounds: dict[str, list[Result]] = {}
    with (
        tempfile.TemporaryDirectory(prefix="featurepush-bench-") as tmp,
        ProcessPoolExecutor(CLIENTS, mp_context=get_context("spawn")) as pool,
    ):
        server, target = start_featurepush(Path(tmp) / "always", "always")
        processes = [server]
        try:
            for w in range(CLIENTS):
                grpc.insecure_channel(target).unary_unary(PUSH)(push_bytes(w, 1000))
            # The empty handler answers a one-key read with the server's own reply to it.
            with grpc.insecure_channel(target) as channel:
                (Path(tmp) / "get-one.bin").write_bytes(channel.unary_unary(GET)(get_bytes(0, 1)))
            empty, empty_target = start_empty("--get-response", str(Path(tmp) / "get-one.bin"))
            processes.append(empty)
            for round_number in range(1, int(os.environ.get("BENCH_ROUNDS", "1")) + 1):
                raw_arrow = throughput(pool, target, "arrow")
                raw_get = throughput(pool, target, "get")
                p99s = get_one_p99s(target, empty_target)
                out = [
                    result("push_arrow", raw_arrow, "rows/s", raw_arrow),
                    result("get_features", raw_get, "keys/s", raw_get),
                    result("get_one_p99_ms", p99s["raw"], "ms", p99s["empty"]),
                ]
                out += client_pushes(pool, target, raw_arrow)
                out += client_reads(pool, target, raw_get, p99s)
                for r in out:
                    rounds.setdefault(r.name, []).append(r)
                # Each round's figures too, so a median never hides how far the rounds spread.
                figures = "; ".join(f"{r.name} {r.value:,.3f} ({r.ratio:.3f})" for r in out)
                print(f"round {round_number}: {figures}")
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                process.wait(60)
    median = statistics.median
    out = [
        Result(
            name,
            median(r.value for r in rs),
            rs[0].unit,
            median(r.ceiling for r in rs),
            median(r.ratio for r in rs),
        )
        for name, rs in rounds.items()
    ]
    print(f"{'name':<28} {'value':>14} {'unit':<7} {'ceiling':>14} {'ratio':>6}")
    for r in out:
        print(f"{r.name:<28} {r.value:>14,.3f} {r.unit:<7} {r.ceiling:>14,.3f} {r.ratio:>6.3f}")
    print(
        f"\nfsync=always; {CLIENTS} client processes for throughput, 1 for latency; {SECONDS:g} s each; "
        f"median of {len(rounds['push_arrow'])} round(s)"
    )
    return out


def process_scaling() -> list[Result]:
    """push_rows, push_arrow and get_features with serve --processes 1 and N; the ceiling is the 1 figure."""
    processes = int(os.environ.get("BENCH_PROCESSES", str(CORES)))
    clients = int(os.environ.get("BENCH_CLIENTS", str(CORES)))
    # BENCH_PROCESS_SCENARIOS=backfill runs only the backfills, =push only the pushes and reads.
    scenarios = os.environ.get("BENCH_PROCESS_SCENARIOS", "push,backfill").split(",")
    out: list[Result] = []
    with (
        tempfile.TemporaryDirectory(prefix="featurepush-bench-") as tmp,
        ProcessPoolExecutor(clients, mp_context=get_context("spawn")) as pool,
    ):
        figures: dict[int, dict[str, float]] = {}
        owner_us: dict[str, float] = {}
        owner_python: dict[str, float] = {}
        for n in (1, processes) if "push" in scenarios else ():
            server, target = start_featurepush(Path(tmp) / f"p{n}", "always", processes=n)
            try:
                for w in range(clients):
                    grpc.insecure_channel(target).unary_unary(PUSH)(push_bytes(w, 1000))
                owner = owner_pid(server.pid)
                figures[n] = {}
                for name, scenario in (
                    ("push_rows", "rows"),
                    # Entities new to the store in every push, in random order, as a growing population's
                    # events arrive; push_rows writes the same 1,000 entities, in nearly sorted order.
                    ("push_new", "rows_new"),
                    ("push_arrow", "arrow"),
                    ("get_features", "get"),
                ):
                    # Unmeasured first: connections to every front, the fronts' source caches and the
                    # owner's index of these entities, which a server running for a while already has.
                    counted_throughput(pool, target, scenario, clients, WARM_UP_SECONDS)
                    before = cpu_seconds(owner) if owner else 0.0
                    python_before = python_cpu_seconds(owner) if owner else 0.0
                    figures[n][name], moved = counted_throughput(pool, target, scenario, clients)
                    if owner:
                        # What the one owner process spends per item bounds every front count alike.
                        owner_us[name] = (cpu_seconds(owner) - before) * 1e6 / moved
                        wall = moved / figures[n][name]
                        owner_python[name] = (python_cpu_seconds(owner) - python_before) / wall
            finally:
                server.terminate()
                server.wait(60)
        for name, unit in (
            ("push_rows", "rows/s"),
            ("push_new", "rows/s"),
            ("push_arrow", "rows/s"),
            ("get_features", "keys/s"),
        ):
            if not figures:
                break
            one = figures[1][name]
            out.append(result(f"{name}[processes=1]", one, unit, one))
            out.append(result(f"{name}[processes={processes}]", figures[processes][name], unit, one))
        for name, per in owner_us.items():
            if per <= 0:
                continue  # the owner took no measurable CPU (reads the fronts serve themselves)
            # The ceiling: the items per second one owner core could take at this cost; the ratio, the
            # share of it the N processes used.
            bound = 1e6 / per
            ratio = figures[processes][name] / bound
            out.append(
                Result(f"owner_cpu_us_per_row[{name}]", round(per, 3), "us", round(bound), round(ratio, 3))
            )
        for name, busy in owner_python.items():
            # Cores' worth of the owner's Python threads over the run, against the one its GIL allows.
            out.append(Result(f"owner_python_cores[{name}]", round(busy, 3), "cores", 1, round(busy, 3)))
        if "backfill" in scenarios:
            out += batch.backfill_pair(processes)
    print(f"{'name':<38} {'value':>14} {'unit':<7} {'ceiling':>12} {'ratio':>7}")
    for r in out:
        print(f"{r.name:<38} {r.value:>14,.2f} {r.unit:<7} {r.ceiling:>12,.0f} {r.ratio:>7.2f}")
    print(
        f"\nfsync=always; {CORES} cores; {clients} client processes, a connection each; {SECONDS:g} s per "
        f"scenario after {WARM_UP_SECONDS:g} s unmeasured; the ceiling of a [processes=N] row is the "
        "serve --processes 1 figure; of an "
        "owner_cpu_us_per_row row, the items per second one owner core could take (1e6 / us); an "
        "owner_python_cores row is the CPU of the owner's threads other than RocksDB's over the wall time "
        "(near 1: its GIL is the bound)"
    )
    return out


def main() -> None:
    """Start the servers, run everything, print the table and write bench/results.json."""
    if ONLY == "processes":
        process_scaling()
        return
    if ONLY == "client":
        client_only()
        return
    started = time.perf_counter()
    processes: list[subprocess.Popen[bytes]] = []
    with (
        tempfile.TemporaryDirectory(prefix="featurepush-bench-") as tmp,
        ProcessPoolExecutor(CLIENTS, mp_context=get_context("spawn")) as pool,
    ):
        folder = Path(tmp)
        try:
            server, target = start_featurepush(folder / "always", "always")
            processes.append(server)
            # Fill the store once so the reads find rows, and keep a real reply for the empty server to send.
            for w in range(CLIENTS):
                grpc.insecure_channel(target).unary_unary(PUSH)(push_bytes(w, 1000))
            with grpc.insecure_channel(target) as channel:
                (folder / "get.bin").write_bytes(channel.unary_unary(GET)(get_bytes(0, 100)))
            empty, empty_target = start_empty("--get-response", str(folder / "get.bin"))
            processes.append(empty)

            grpc_ceiling = {s: throughput(pool, empty_target, s) for s in ("rows", "stream", "arrow", "get")}
            empty_p50, empty_p99 = latencies(empty_target, PUSH, push_bytes(9, 1))
            db_sync = rocksdb_rows_per_s(folder / "raw-sync", 1000, sync=True)
            db_sync_10k = rocksdb_rows_per_s(folder / "raw-sync-10k", 10_000, sync=True)
            db_nosync = rocksdb_rows_per_s(folder / "raw-nosync", 1000, sync=False)
            db_nosync_10k = rocksdb_rows_per_s(folder / "raw-nosync-10k", 10_000, sync=False)
            db_get = rocksdb_get_keys_per_s(folder / "raw-nosync")

            def ceilings(sync: bool) -> dict[str, float]:
                # A push can go no faster than the slower of moving its bytes and writing its rows.
                per_1k, per_10k = (db_sync, db_sync_10k) if sync else (db_nosync, db_nosync_10k)
                return {
                    "push_rows": min(grpc_ceiling["rows"], per_1k),
                    "push_stream": min(grpc_ceiling["stream"], per_1k),
                    "push_arrow": min(grpc_ceiling["arrow"], per_10k),
                    "push_one_p50_ms": empty_p50,
                    "push_one_p99_ms": empty_p99,
                }

            results = measure(pool, target, "", ceilings(True))
            results.append(
                result(
                    "get_features",
                    throughput(pool, target, "get"),
                    "keys/s",
                    min(grpc_ceiling["get"], db_get),
                )
            )
            p99s = get_one_p99s(target, empty_target)
            results.append(result("get_one_p99_ms", p99s["raw"], "ms", p99s["empty"]))
            results += client_reads(pool, target, results[-2].value, p99s)

            fast, fast_target = start_featurepush(folder / "never", "never")
            processes.append(fast)
            results += measure(pool, fast_target, "[fsync=never]", ceilings(False))
            ceiling_rows = [
                Result("ceiling_empty_grpc_push_1k", round(grpc_ceiling["rows"]), "rows/s", 0, 0),
                Result("ceiling_empty_grpc_stream_1k", round(grpc_ceiling["stream"]), "rows/s", 0, 0),
                Result("ceiling_empty_grpc_arrow_10k", round(grpc_ceiling["arrow"]), "rows/s", 0, 0),
                Result("ceiling_empty_grpc_get_100", round(grpc_ceiling["get"]), "keys/s", 0, 0),
                Result("ceiling_rocksdb_write_1k_sync", round(db_sync), "rows/s", 0, 0),
                Result("ceiling_rocksdb_write_1k_nosync", round(db_nosync), "rows/s", 0, 0),
                Result("ceiling_rocksdb_write_10k_sync", round(db_sync_10k), "rows/s", 0, 0),
                Result("ceiling_rocksdb_get_100", round(db_get), "keys/s", 0, 0),
            ]
            skipped = redis_store.missing_reason()
            if skipped:
                print(f"skipping push_rows_redis, push_arrow_redis and get_features_redis: {skipped}")
            else:
                for name, value, unit, ceiling in redis_store.measure_redis(
                    folder, AD_IMPRESSIONS, rows, lambda t, s: throughput(pool, t, s), grpc_ceiling, SECONDS
                ):
                    if ceiling:
                        results.append(result(name, value, unit, ceiling))
                    else:
                        ceiling_rows.append(Result(name, round(value), unit, 0, 0))
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                process.wait(30)
    # Batch-source scenarios start their own server over their own generated Parquet history.
    for scenario in (batch.read_batch_source_mb_s, batch.backfill_rows, batch.read_batch_source_rss_mb):
        results.append(Result(**scenario()))
    results += process_scaling()
    # Feature view scenarios start their own server too; pushes carry current event times.
    results += [Result(**row) for row in views.scenarios(SECONDS, LATENCY_CALLS)]
    RESULTS.write_text(json.dumps([vars(r) for r in results], indent=2) + "\n")
    print(f"{'name':<28} {'value':>14} {'unit':<7} {'ceiling':>14} {'ratio':>6}")
    for r in results:
        print(f"{r.name:<28} {r.value:>14,.3f} {r.unit:<7} {r.ceiling:>14,.3f} {r.ratio:>6.3f}")
    print()
    for r in ceiling_rows:
        print(f"{r.name:<34} {r.value:>14,.0f} {r.unit}")
    print(
        f"\nfsync=always unless marked; {CLIENTS} client processes for throughput, 1 for latency; "
        f"{SECONDS:g} s per scenario; took {time.perf_counter() - started:.0f} s; wrote {RESULTS}"
    )
