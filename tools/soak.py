"""Soak: pushes against a `featurepush serve` killed with kill -9 at random moments, then exactly-once checks.

Pusher processes (PushStream, batched) and unary push loops (with request ids) push records with unique
keys to a `log_offline` source while the server (fsync=always) is killed and restarted; every client
retries through the restarts with its request ids. At the end the server is stopped with SIGTERM (exit
0 expected) and the check reads every acknowledged record back: online with its latest value, exactly
once in the Parquet offline log, and no temporary file left behind. Loopback only; every loop is
bounded in count and time.

    python tools/soak.py --seconds 60
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import grpc
import pyarrow.parquet as pq

SOURCE = "soak_events"
DEFINITIONS = f'''"""The soak's source: every record also goes to the offline log."""

from featurepush import Field, Int64, PushConfig, StreamSource, String, Timestamp

soak_events = StreamSource(
    name="{SOURCE}",
    schema=[Field("key", String), Field("timestamp", Timestamp), Field("value", Int64)],
    entity_keys=["key"],
    timestamp_field="timestamp",
    stream_config=PushConfig(log_offline=True),
)
'''
# How long a client keeps retrying one push through restarts before the run counts it as failed.
RETRY_S = 60.0
# Records per unary push, and per pusher flush.
UNARY_ROWS = 5
PUSHER_ROWS = 100


def _stamp(n: int) -> str:
    # Increasing event times, so the `latest` row of each worker is the one with the highest value.
    return (dt.datetime(2026, 1, 1, tzinfo=dt.UTC) + dt.timedelta(milliseconds=n)).isoformat()


def _gave_up(acks: Path, what: str) -> None:
    """Note beside a worker's acknowledgements that it gave records up, which the run reports as a problem."""
    with open(acks.with_name(acks.name.replace("acks-", "gave-up-")), "a") as out:
        out.write(what.replace("\n", " ") + "\n")


def _unary_worker(target: str, name: str, acks: Path, stop_file: Path) -> None:
    """Push small requests one by one, each retried with its request id until acknowledged."""
    import grpc

    from featurepush import Client
    from featurepush.errors import FeaturepushError

    # A call cut by a killed front may also end CANCELLED: like the others its outcome is unknown, and the
    # request id makes sending it again safe.
    unknown = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)

    client = Client(target, timeout=5.0)
    with open(acks, "a") as out:
        for n in range(1_000_000):
            if stop_file.exists():
                break
            rows = [{"key": f"{name}-{n}-{i}", "timestamp": _stamp(n), "value": n} for i in range(UNARY_ROWS)]
            rows.append({"key": f"{name}-latest", "timestamp": _stamp(n), "value": n})
            deadline = time.monotonic() + RETRY_S
            while True:
                try:
                    client.push(SOURCE, rows, request_id=f"{name}-{n}")
                    break
                except FeaturepushError as error:
                    if error.code not in unknown:
                        raise
                    if time.monotonic() > deadline:
                        _gave_up(acks, f"{error.code.name} for {RETRY_S:.0f}s: {error.message}")
                        return
                    time.sleep(0.05)
            out.write(json.dumps(rows) + "\n")
            out.flush()


def _pusher_worker(target: str, name: str, acks: Path, stop_file: Path) -> None:
    """Push through the batching pusher; what a flush leaves unfailed is acknowledged."""
    from featurepush import Client
    from featurepush.payload import BatchFailure

    client = Client(target, timeout=5.0)
    failed: list[str] = []

    def on_error(failure: BatchFailure) -> None:
        failed.extend(str(r["key"]) for r in failure.records)
        # Each kill is over in seconds: a batch failed while the pusher retries for a minute is a defect.
        _gave_up(acks, f"{len(failure.records)} records, {failure.error.code.name}: {failure.error.message}")

    with (
        open(acks, "a") as out,
        client.pusher(
            SOURCE,
            max_rows=25,
            linger_ms=10,
            retry_timeout_s=RETRY_S,
            ack_timeout_s=5.0,
            on_error=on_error,
        ) as pusher,
    ):
        for n in range(1_000_000):
            if stop_file.exists():
                break
            rows = [
                {"key": f"{name}-{n}-{i}", "timestamp": _stamp(n), "value": n} for i in range(PUSHER_ROWS)
            ]
            pusher.add_many(rows)
            pusher.flush()
            lost = set(failed)
            failed.clear()
            out.write(json.dumps([r for r in rows if r["key"] not in lost]) + "\n")
            out.flush()


def _processes() -> dict[int, tuple[str, int]]:
    """Every process's state and parent, from Linux's /proc."""
    found: dict[int, tuple[str, int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # After the command's closing parenthesis: the state and the parent.
            state, parent = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, ValueError):
            continue
        found[int(entry.name)] = (state, int(parent))
    return found


def _family(root: int) -> list[int]:
    """A process and all its descendants."""
    children: dict[int, list[int]] = {}
    for pid, (_, parent) in _processes().items():
        children.setdefault(parent, []).append(pid)
    family, todo = [], [root]
    while todo:
        pid = todo.pop()
        family.append(pid)
        todo += children.get(pid, [])
    return family


class Server:
    """The server process, restarted on the same port after each kill."""

    def __init__(self, data_dir: Path, definitions: Path, port: int, log: Path):
        self.data_dir = data_dir
        self.definitions = definitions
        self.port = port
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = dict(os.environ, FEATUREPUSH_OFFLINE_FLUSH_INTERVAL_S="0.2")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "featurepush_server.cli",
                    "serve",
                    "--listen",
                    f"127.0.0.1:{self.port}",
                    "--data-dir",
                    str(self.data_dir),
                    "--definitions",
                    str(self.definitions),
                    "--fsync",
                    "always",
                ],
                stderr=log,
                env=env,
                # Its own process group: a kill takes the supervisor, the store owner and the fronts at once.
                start_new_session=True,
            )
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for _ in range(600):
                try:
                    reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the server exited with {self.proc.returncode}; see {self.log}")
                time.sleep(0.1)
        raise RuntimeError(f"the server did not start; see {self.log}")

    def kill9(self) -> None:
        """SIGKILL every process of the server (one, or serve --processes' supervisor, owner and fronts)."""
        assert self.proc is not None
        # The supervisor starts its owner and fronts in sessions of their own, out of its process group:
        # stopped first, it starts no other while its family is listed and killed.
        os.kill(self.proc.pid, signal.SIGSTOP)
        family = _family(self.proc.pid)
        for pid in family:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(30)
        # The killed processes hold the port and the database's lock until they have exited (a zombie that
        # no one has reaped yet holds neither).
        deadline = time.monotonic() + 30
        while any(_processes().get(pid, ("Z", 0))[0] != "Z" for pid in family):
            if time.monotonic() > deadline:
                raise RuntimeError("the killed server's processes did not go away")
            time.sleep(0.05)

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _read_acks(work: Path) -> tuple[int, dict[str, int], dict[str, int]]:
    """Acknowledged pushes, the value of each acknowledged unique key, and each worker's highest `latest`."""
    pushes = 0
    unique: dict[str, int] = {}
    latest: dict[str, int] = {}
    for path in sorted(work.glob("acks-*.jsonl")):
        for line in path.read_text().splitlines():
            pushes += 1
            for row in json.loads(line):
                key, value = str(row["key"]), int(row["value"])
                if key.endswith("-latest"):
                    latest[key] = max(latest.get(key, -1), value)
                else:
                    unique[key] = value
    return pushes, unique, latest


def _check_online(target: str, unique: dict[str, int], latest: dict[str, int]) -> list[str]:
    from featurepush import Client, FeatureStatus

    problems: list[str] = []
    with Client(target, timeout=60.0) as client:
        keys = sorted(unique) + sorted(latest)
        for i in range(0, len(keys), 5000):
            chunk = keys[i : i + 5000]
            for key, result in zip(chunk, client.get_features(SOURCE, chunk), strict=True):
                if result.status != FeatureStatus.PRESENT:
                    problems.append(f"acknowledged key {key} is not online ({result.status})")
                    continue
                got = int(result.features["value"])
                # A `latest` row may hold a push whose acknowledgement was lost to a kill: never less.
                want = unique.get(key, latest.get(key))
                if (key in unique and got != want) or (key in latest and got < latest[key]):
                    problems.append(f"key {key} holds {got} online, not the acknowledged {want}")
    return problems


def _check_offline(data_dir: Path, unique: dict[str, int], latest: dict[str, int]) -> tuple[int, list[str]]:
    seen: Counter[tuple[str, int]] = Counter()
    for path in sorted((data_dir / "offline" / SOURCE).glob("date=*/*.parquet")):
        table = pq.read_table(path, columns=["key", "value"])
        seen.update(zip(table.column("key").to_pylist(), table.column("value").to_pylist(), strict=True))
    problems = [f"record {k}={v} is in the offline log {n} times" for (k, v), n in seen.items() if n > 1]
    problems += [
        f"acknowledged record {k}={v} is not in the offline log"
        for k, v in unique.items()
        if (k, v) not in seen
    ]
    for key, top in latest.items():
        problems += [
            f"acknowledged record {key}={v} is not in the offline log"
            for v in range(top + 1)
            if (key, v) not in seen
        ]
    return sum(seen.values()), problems


def run(seconds: float, work: Path, pushers: int, loops: int, seed: int) -> int:
    """Run the soak in `work`; return 0 when every check passed."""
    rng = random.Random(seed)
    work.mkdir(parents=True, exist_ok=True)
    definitions = work / "soak_definitions.py"
    definitions.write_text(DEFINITIONS)
    data_dir = work / "data"
    stop_file = work / "stop"
    stop_file.unlink(missing_ok=True)
    server = Server(data_dir, definitions, _free_port(), work / "server.log")
    target = f"127.0.0.1:{server.port}"
    server.start()
    me = Path(__file__).resolve()
    workers = [
        subprocess.Popen([sys.executable, str(me), "--worker", kind, target, name, str(work), str(stop_file)])
        for kind, name in [("pusher", f"p{i}") for i in range(pushers)]
        + [("unary", f"u{i}") for i in range(loops)]
    ]
    kills = 0
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            time.sleep(min(rng.uniform(0.5, 2.5), max(deadline - time.monotonic(), 0.0)))
            if time.monotonic() >= deadline:
                break
            server.kill9()
            kills += 1
            server.start()
        stop_file.touch()
        for w in workers:
            w.wait(RETRY_S + 30)
    finally:
        stop_file.touch()
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait(30)
    pushes, unique, latest = _read_acks(work)
    problems = [f"worker {w.args[3]} exited with {w.returncode}" for w in workers if w.returncode != 0]
    for path in sorted(work.glob("gave-up-*.jsonl")):
        problems += [
            f"{path.stem.removeprefix('gave-up-')} gave up: {line}" for line in path.read_text().splitlines()
        ]
    problems += _check_online(target, unique, latest)
    code = server.terminate()
    if code != 0:
        problems.append(f"the server exited with {code} on SIGTERM; see {server.log}")
    offline_rows, offline_problems = _check_offline(data_dir, unique, latest)
    problems += offline_problems
    leftovers = [str(p) for p in data_dir.rglob("*.tmp")]
    problems += [f"temporary file left behind: {p}" for p in leftovers]
    checked = len(unique) + sum(top + 1 for top in latest.values())
    print(
        f"soak: {seconds:.0f}s, {kills} kills, {pushes} pushes acknowledged, {checked} records checked "
        f"(online and offline), {offline_rows} offline rows, {len(problems)} problems"
    )
    for p in problems[:20]:
        print("  " + p)
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    """Parse the options and run the soak, or one worker when started as one."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to push and kill (default 60)")
    parser.add_argument("--pushers", type=int, default=2, help="batching pusher processes (default 2)")
    parser.add_argument("--loops", type=int, default=2, help="unary push loop processes (default 2)")
    parser.add_argument("--seed", type=int, default=None, help="random seed of the kill moments")
    parser.add_argument("--work-dir", type=Path, help="folder for data and logs (default: a temporary one)")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        kind, target, name, work, stop_file = args.worker
        worker = _pusher_worker if kind == "pusher" else _unary_worker
        worker(target, name, Path(work) / f"acks-{name}.jsonl", Path(stop_file))
        return 0
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    print(f"soak: seed {seed}")
    if args.work_dir is not None:
        return run(args.seconds, args.work_dir, args.pushers, args.loops, seed)
    with tempfile.TemporaryDirectory(prefix="featurepush-soak-") as work:
        return run(args.seconds, Path(work), args.pushers, args.loops, seed)


if __name__ == "__main__":
    sys.exit(main())
