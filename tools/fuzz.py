"""Fuzz every featurepush RPC of a real server with arbitrary bytes and arbitrary well-formed messages.

Runs `featurepush serve` in a child process over a temporary data directory and, for a set time, sends
each method random request bodies: random bytes, mutations of valid requests, and random messages built
from the method's descriptor (deep Structs, odd strings, NaNs, out-of-range enums and times, Arrow IPC
mutations). Every answer must be a deliberate status: INTERNAL, UNKNOWN, DATA_LOSS or a dead server
fails the run. Prints the counts of each status per method; `--seed` replays a run.

    python tools/fuzz.py --seconds 60 [--seed N]
"""

from __future__ import annotations

import argparse
import io
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pyarrow as pa
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from featurepush.definitions import load_definitions, load_services, load_views
from featurepush.v1 import (
    backfill_service_pb2,
    feature_view_service_pb2,
    ingest_service_pb2,
    online_service_pb2,
    registry_service_pb2,
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "ad_impressions.py"
# The seed's view and service over the example source, so that view calls reach past NOT_FOUND.
VIEWS = ROOT / "examples" / "ad_impressions_views.py"
SOURCE = "ad_impressions"
VIEW = "user_clicks"
SERVICE = "ads_ranking"
# Answers that mean the server failed rather than refused.
FAILURES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}


def _services() -> list[tuple[str, Any]]:
    out = []
    for module, name in (
        (registry_service_pb2, "RegistryService"),
        (ingest_service_pb2, "IngestService"),
        (online_service_pb2, "OnlineService"),
        (backfill_service_pb2, "BackfillService"),
        (feature_view_service_pb2, "FeatureViewService"),
    ):
        service = module.DESCRIPTOR.services_by_name[name]
        out.extend((f"/{service.full_name}/{m.name}", m) for m in service.methods)
    return out


def _valid_arrow() -> bytes:
    table = pa.table(
        {
            "user_id": pa.array(["u1", "u2", None]),
            "timestamp": pa.array([1, 2, 3], pa.timestamp("us", tz="UTC")),
            "clicked": pa.array([1, 2, 3], pa.int64()),
        }
    )
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def _valid_requests() -> dict[str, list[bytes]]:
    """Well-formed requests per method, the seeds of mutations."""
    push = ingest_service_pb2.PushRequest(request_id="r1")
    push.records[SOURCE].rows.add().update(
        {"user_id": "u1", "timestamp": "2026-11-25T10:00:00Z", "clicked": 1}
    )
    arrow = ingest_service_pb2.PushRequest()
    arrow.records[SOURCE].arrow_ipc = _valid_arrow()
    get = online_service_pb2.GetFeaturesRequest(source=SOURCE)
    get.keys.add().update({"user_id": "u1"})
    stream = ingest_service_pb2.PushStreamRequest(sequence_id=1, request=push)
    view_features = feature_view_service_pb2.GetViewFeaturesRequest(feature_view=VIEW)
    view_features.keys.add().update({"user_id": "u1"})
    service_features = feature_view_service_pb2.GetViewFeaturesRequest(feature_service=SERVICE)
    service_features.keys.add().update({"user_id": "u1"})
    fv = feature_view_service_pb2
    return {
        "Push": [push.SerializeToString(), arrow.SerializeToString()],
        "PushStream": [stream.SerializeToString()],
        "GetFeatures": [get.SerializeToString()],
        "GetSource": [registry_service_pb2.GetSourceRequest(name=SOURCE).SerializeToString()],
        "ListSources": [registry_service_pb2.ListSourcesRequest(page_size=2).SerializeToString()],
        "ReadBatchSource": [backfill_service_pb2.ReadBatchSourceRequest(source=SOURCE).SerializeToString()],
        "Backfill": [backfill_service_pb2.BackfillRequest(source=SOURCE, dry_run=True).SerializeToString()],
        "ApplyFeatureView": [request.SerializeToString() for request in _view_applies()[:1]],
        "ApplyFeatureService": [request.SerializeToString() for request in _view_applies()[1:]],
        "GetViewFeatures": [view_features.SerializeToString(), service_features.SerializeToString()],
        "GetFeatureView": [fv.GetFeatureViewRequest(name=VIEW).SerializeToString()],
        "ListFeatureViews": [fv.ListFeatureViewsRequest(page_size=2).SerializeToString()],
        "GetFeatureService": [fv.GetFeatureServiceRequest(name=SERVICE).SerializeToString()],
        "ListFeatureServices": [fv.ListFeatureServicesRequest(page_size=2).SerializeToString()],
    }


def _view_applies() -> list[Message]:
    """The example view's and service's apply requests, in the order they apply."""
    [view] = load_views(VIEWS)
    [service] = load_services(VIEWS)
    return [
        feature_view_service_pb2.ApplyFeatureViewRequest(view=view.to_proto()),
        feature_view_service_pb2.ApplyFeatureServiceRequest(service=service.to_proto()),
    ]


class Generator:
    """Random request bodies from a seeded generator."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.arrow = _valid_arrow()

    def mutate(self, data: bytes) -> bytes:
        """`data` with a few bytes flipped, cut, duplicated or inserted."""
        out = bytearray(data)
        for _ in range(self.rng.randint(1, 4)):
            op = self.rng.randrange(4)
            pos = self.rng.randrange(len(out) + 1)
            if op == 0 and out:
                out[min(pos, len(out) - 1)] ^= 1 << self.rng.randrange(8)
            elif op == 1:
                del out[pos : pos + self.rng.randint(1, 16)]
            elif op == 2:
                out[pos:pos] = out[pos : pos + self.rng.randint(1, 32)]
            else:
                out[pos:pos] = self.rng.randbytes(self.rng.randint(1, 8))
        return bytes(out)

    def string(self) -> str:
        pick = self.rng.randrange(6)
        if pick == 0:
            return ""
        if pick == 1:
            return self.rng.choice([SOURCE, VIEW, SERVICE])
        if pick == 2:
            return "x" * self.rng.choice([1, 100, 5000, 70_000])
        if pick == 3:
            return "".join(chr(self.rng.randrange(0x20, 0x2FFF)) for _ in range(self.rng.randint(1, 20)))
        if pick == 4:
            return self.rng.choice(["../../etc/passwd", "file:///etc/passwd", "s3://b/k?x=1", "NaN", "-1"])
        return "".join(self.rng.choice("abc_.:/0123") for _ in range(self.rng.randint(1, 30)))

    def scalar(self, field: FieldDescriptor) -> Any:
        t = field.type
        r = self.rng
        if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
            return r.choice([0.0, -1.5, float("nan"), float("inf"), 1e308, r.uniform(-1e9, 1e9)])
        if t in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64):
            return r.choice([0, -1, 2**63 - 1, -(2**63), r.randint(-(10**12), 10**12)])
        if t in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
            return r.choice([0, 2**64 - 1, r.randint(0, 10**12)])
        if t in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32):
            return r.choice([0, -1, 2**31 - 1, -(2**31), r.randint(-1000, 100_000)])
        if t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
            return r.choice([0, 2**32 - 1, r.randint(0, 100_000)])
        if t == FieldDescriptor.TYPE_BOOL:
            return r.random() < 0.5
        if t == FieldDescriptor.TYPE_ENUM:
            values = [v.number for v in field.enum_type.values]
            return r.choice([*values, 99, -5])
        if t == FieldDescriptor.TYPE_BYTES:
            if field.name == "arrow_ipc":
                return r.choice(
                    [self.arrow, self.mutate(self.arrow), self.arrow[: r.randrange(len(self.arrow))]]
                )
            return r.randbytes(r.randint(0, 64))
        return self.string()

    def message(self, desc: Descriptor, depth: int = 0) -> Message:
        """A random message of type `desc`, nesting at most a few levels."""
        msg = message_factory.GetMessageClass(desc)()
        for field in desc.fields:
            if self.rng.random() < 0.4:
                continue
            value = getattr(msg, field.name)
            sub = field.message_type
            if sub is not None and sub.GetOptions().map_entry:
                key_field, value_field = sub.fields_by_name["key"], sub.fields_by_name["value"]
                for _ in range(self.rng.randint(0, 3)):
                    key = self.scalar(key_field)
                    if value_field.message_type is not None:
                        if depth < 5:
                            value[key].CopyFrom(self.message(value_field.message_type, depth + 1))
                    else:
                        value[key] = self.scalar(value_field)
            elif field.is_repeated:
                for _ in range(self.rng.randint(0, 3)):
                    if sub is not None:
                        if depth < 5:
                            value.add().CopyFrom(self.message(sub, depth + 1))
                    else:
                        value.append(self.scalar(field))
            elif sub is not None:
                if depth < 5:
                    value.CopyFrom(self.message(sub, depth + 1))
            else:
                setattr(msg, field.name, self.scalar(field))
        return msg

    def body(self, method: Any, seeds: list[bytes]) -> bytes:
        """One request body for `method`: random bytes, a mutated valid request, or a random message."""
        pick = self.rng.randrange(10)
        if pick < 2:
            return self.rng.randbytes(self.rng.randint(0, 256))
        if pick < 5 and seeds:
            return self.mutate(self.rng.choice(seeds))
        return self.message(method.input_type).SerializeToString()


class Server:
    """`featurepush serve` in a child process on a port it picks itself."""

    def __init__(self, data_dir: Path):
        cmd = [
            sys.executable,
            "-m",
            "featurepush_server.cli",
            "serve",
            "--listen",
            "localhost:0",
            "--data-dir",
            str(data_dir),
            "--definitions",
            str(EXAMPLE),
            "--definitions",
            str(VIEWS),
            "--fsync",
            "never",
        ]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        self.log: list[str] = []
        self.port = 0
        for line in self.proc.stderr:
            self.log.append(line)
            match = re.search(r"\(port (\d+)\)", line)
            if match:
                self.port = int(match.group(1))
                break
        if not self.port:
            raise SystemExit("the server did not start:\n" + "".join(self.log))
        self._drainer = threading.Thread(target=self._drain, daemon=True)
        self._drainer.start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)

    def stop(self) -> int:
        """SIGTERM, then SIGKILL if it lingers; the exit code."""
        self.proc.terminate()
        try:
            code = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(30)
        self._drainer.join(10)
        assert self.proc.stderr is not None
        self.proc.stderr.close()
        return code


def _call(channel: grpc.Channel, path: str, method: Any, body: bytes) -> grpc.StatusCode:
    """Send one body and read at most a few replies; the status code the call ended with."""
    try:
        if method.client_streaming:
            bodies: Iterator[bytes] = iter([body, body][: 1 + (len(body) % 2)])
            call = channel.stream_stream(path)(bodies, timeout=10)
        elif method.server_streaming:
            call = channel.unary_stream(path)(body, timeout=10)
        else:
            channel.unary_unary(path)(body, timeout=10)
            return grpc.StatusCode.OK
        for i, _ in enumerate(call):
            if i >= 3:
                call.cancel()
                return grpc.StatusCode.OK
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return e.code()  # type: ignore[no-any-return]


def run(seconds: float, seed: int, out: Callable[[str], None] = print) -> bool:
    """Fuzz a fresh server for `seconds`; True when it answered every call deliberately and stayed up."""
    rng = random.Random(seed)
    gen = Generator(rng)
    methods = _services()
    seeds = _valid_requests()
    counts: dict[str, Counter[str]] = {path: Counter() for path, _ in methods}
    [source] = load_definitions(EXAMPLE)
    examples = [
        (
            "/featurepush.v1.RegistryService/ApplySource",
            registry_service_pb2.ApplySourceRequest(source=source.to_proto()),
        ),
        ("/featurepush.v1.FeatureViewService/ApplyFeatureView", _view_applies()[0]),
        ("/featurepush.v1.FeatureViewService/ApplyFeatureService", _view_applies()[1]),
    ]
    failures: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(Path(tmp) / "data")
        channel = grpc.insecure_channel(f"localhost:{server.port}")
        try:
            end = time.monotonic() + seconds
            calls = 0
            while time.monotonic() < end and server.proc.poll() is None:
                if calls % 200 == 0:
                    # Random deletes and applies may remove or change the examples; put them back so that
                    # calls reach deeper code. A random apply may have made them incompatible: that refusal
                    # is deliberate, a failure status is not.
                    for path, request in examples:
                        try:
                            channel.unary_unary(path)(request.SerializeToString(), timeout=10)
                        except grpc.RpcError as e:
                            if e.code() in FAILURES:
                                failures.append(f"{path} answered {e.code().name} to the example")
                path, method = rng.choice(methods)
                body = gen.body(method, seeds.get(method.name, []))
                code = _call(channel, path, method, body)
                counts[path][code.name] += 1
                calls += 1
                if code in FAILURES or (
                    code == grpc.StatusCode.UNAVAILABLE and server.proc.poll() is not None
                ):
                    failures.append(f"{path} answered {code.name} to {body[:80]!r}")
            alive = server.proc.poll() is None
            healthy = False
            # A loaded machine may answer slowly; a few tries tell slow from stuck.
            for _ in range(3):
                if not alive:
                    break
                try:
                    check = health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=10
                    )
                except grpc.RpcError as e:
                    out(f"health check: {e.code().name}")
                    continue
                healthy = check.status == health_pb2.HealthCheckResponse.SERVING
                break
        finally:
            channel.close()
            code = server.stop()
    out(f"fuzz: seed {seed}, {calls} calls in {seconds:g}s")
    for path, counter in counts.items():
        out(f"  {path}: " + ", ".join(f"{k} {v}" for k, v in sorted(counter.items())))
    for failure in failures[:20]:
        out(f"FAIL {failure}")
    if not alive:
        out("FAIL the server died:\n" + "".join(server.log[-40:]))
    elif not healthy:
        out("FAIL the server no longer reports SERVING")
    tracebacks = [line for line in server.log if line.startswith("Traceback")]
    if tracebacks:
        out("FAIL the server logged tracebacks:\n" + "".join(server.log[-60:]))
    ok = not failures and alive and healthy and not tracebacks and code == 0
    out(f"fuzz: {'ok' if ok else 'FAILED'} (server exit code {code})")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to fuzz (default 60)")
    parser.add_argument("--seed", type=int, default=None, help="replay a run (default: random)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    return 0 if run(args.seconds, seed) else 1


if __name__ == "__main__":
    sys.exit(main())
