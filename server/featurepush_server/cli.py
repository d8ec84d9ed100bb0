"""The `featurepush` command line: serve, keys, and the client commands (apply, push, get, status, ...)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import re
import signal
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from featurepush import Client, FeaturepushError, InvalidArgumentError, __version__
from featurepush.batch import BackfillProgress
from featurepush.definitions import DefinitionError, load_definitions

DEFAULT_TARGET = "localhost:50051"
# Records per Push a server takes unless its max_records_per_request says otherwise.
MAX_BATCH_SIZE = 10_000
# Codes after which a push may or may not have been applied: the call may have reached the server.
_OUTCOME_UNKNOWN = {
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DATA_LOSS,
}


class CommandError(Exception):
    """A user mistake the command reports in one line."""


class _BatchFailed(CommandError):
    """A push's batch failed; the message says what it and the batches before it did."""


def _records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """The JSON objects of a JSON Lines file ('-' for standard input), with their line numbers."""
    fh = sys.stdin if str(path) == "-" else open(path, encoding="utf-8")  # noqa: SIM115
    try:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise CommandError(f"{path}:{number}: not valid JSON: {e.msg}") from None
            if not isinstance(record, dict):
                raise CommandError(f"{path}:{number}: each line must be a JSON object")
            yield number, record
    finally:
        if fh is not sys.stdin:
            fh.close()


def _missing_extra(command: str, error: ImportError) -> CommandError:
    """The error of a command whose module could not be imported, naming the module that is missing."""
    if error.name is None:
        return CommandError(f"{command} cannot start: {error}")
    return CommandError(
        f"{command} needs the Python module {error.name!r}, which is not installed; "
        "pip install 'featurepush[server]' installs what the server needs"
    )


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        from .app import serve
        from .config import ConfigError, load_config
    except ImportError as e:
        raise _missing_extra("serve", e) from None
    overrides = {
        "listen": args.listen,
        "data_dir": args.data_dir,
        "fsync": args.fsync,
        "max_records_per_request": args.max_records_per_request,
        "max_message_bytes": args.max_message_bytes,
        "workers": args.workers,
        "processes": args.processes,
        "definitions": tuple(args.definitions) if args.definitions else None,
        "post_processor_modules": tuple(args.post_processor_modules) if args.post_processor_modules else None,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "tls_client_ca": args.tls_client_ca,
        "keys_file": args.keys_file,
        "allow_unauthenticated": args.allow_unauthenticated,
        "reflection": False if args.no_reflection else None,
        "metrics_listen": args.metrics_listen,
        "log_level": args.log_level,
        "log_format": args.log_format,
    }
    # Where batch sources may read, and how far ahead streams decode.
    overrides["batch_roots"] = tuple(args.batch_roots) if args.batch_roots else None
    overrides["batch_schemes"] = tuple(args.batch_schemes) if args.batch_schemes else None
    overrides["stream_read_ahead_bytes"] = args.stream_read_ahead_bytes
    try:
        config = load_config(args.config, overrides=overrides)
    except ConfigError as e:
        raise CommandError(str(e)) from None
    from .core.errors import CoreError, InvalidInput
    from .logs import configure

    configure(config.log_level, config.log_format)
    try:
        serve(config)
    except (DefinitionError, ConfigError) as e:
        raise CommandError(str(e)) from None
    except CoreError as e:
        # A definitions file applied at start was refused, as ApplySource would refuse it.
        details = (
            [f"\n  {v.path}: {v.description}" for v in e.violations] if isinstance(e, InvalidInput) else []
        )
        raise CommandError("".join([e.message, *details])) from None
    return 0


def _client(args: argparse.Namespace) -> Client:
    """A client for a client command's --target, TLS files and API key."""
    try:
        client = Client(
            args.target,
            api_key=args.api_key or None,
            tls=args.tls,
            ca_cert=args.ca_cert,
            client_cert=args.client_cert,
            client_key=args.client_key,
        )
    except ValueError as e:
        raise CommandError(str(e)) from None
    # A command run by hand says at once that the server is not there, rather than waiting for it.
    client.unavailable_retry_s = 0.0
    return client


def _keys_file(args: argparse.Namespace) -> Path:
    """The keys file of a `keys` command: --keys-file, else keys_file of --config or FEATUREPUSH_KEYS_FILE."""
    if args.keys_file is not None:
        return Path(args.keys_file)
    try:
        from .config import ConfigError, load_config
    except ImportError as e:
        raise _missing_extra("the keys commands", e) from None
    try:
        path = load_config(args.config).keys_file
    except ConfigError as e:
        raise CommandError(str(e)) from None
    if path is None:
        raise CommandError(
            "no keys file: pass --keys-file, or --config with keys_file, or set FEATUREPUSH_KEYS_FILE"
        )
    return path


def _cmd_keys_create(args: argparse.Namespace) -> int:
    from .core.keys import KeysFileError, add_key, parse_scopes

    try:
        scopes = parse_scopes(args.scopes)
        record, key = add_key(_keys_file(args), scopes, args.name or "")
    except (ValueError, KeysFileError) as e:
        raise CommandError(str(e)) from None
    print(key)
    print(
        f"created key {record.id} with scopes {', '.join(sorted(record.scopes))}; "
        "it is shown only this once, so store it now",
        file=sys.stderr,
    )
    return 0


def _cmd_keys_list(args: argparse.Namespace) -> int:
    from .core.keys import SCOPES, KeysFileError, read_keys

    path = _keys_file(args)
    try:
        keys = read_keys(path)
    except KeysFileError as e:
        raise CommandError(str(e)) from None
    for key in sorted(keys.values(), key=lambda k: k.created):
        scopes = [s for s in SCOPES if s in key.scopes]
        if args.json:
            _print_json(
                {
                    "id": key.id,
                    "name": key.name,
                    "scopes": scopes,
                    "created": key.created,
                    "revoked": key.revoked,
                    "active": key.revoked is None,
                }
            )
            continue
        state = f"revoked {key.revoked.isoformat()}" if key.revoked else "active"
        print(f"{key.id}  {key.name or '-'}  {','.join(scopes)}  created {key.created.isoformat()}  {state}")
    if not keys:
        print(f"no keys in {path}", file=sys.stderr)
    return 0


def _cmd_keys_revoke(args: argparse.Namespace) -> int:
    from .core.keys import KeysFileError, revoke_key

    try:
        key = revoke_key(_keys_file(args), args.id)
    except KeysFileError as e:
        raise CommandError(str(e)) from None
    except KeyError:
        raise CommandError(f"no key {args.id!r}; `featurepush keys list` shows the ids") from None
    print(f"key {key.id} revoked; a running server refuses it within a few seconds")
    return 0


def _cmd_apply(args: argparse.Namespace) -> int:
    from featurepush.definitions import FeatureService, StreamFeatureView, load_services, load_views

    try:
        sources = load_definitions(args.definitions)
        views: list[StreamFeatureView | FeatureService] = [
            *load_views(args.definitions),
            *load_services(args.definitions),
        ]
    except DefinitionError as e:
        raise CommandError(str(e)) from None
    if not sources and not views:
        raise CommandError(f"{args.definitions} defines no StreamSource, StreamFeatureView or FeatureService")
    with _client(args) as client:
        # Sources first: views name them, and services name views.
        results = [
            (r.name, r.created, r.changed) for r in client.apply(*sources, validate_only=args.validate_only)
        ]
        results += [
            (r.name, r.created, r.changed)
            for r in client.apply_views(*views, validate_only=args.validate_only)
        ]
        for name, created, changed in results:
            state = "created" if created else "changed" if changed else "unchanged"
            if args.json:
                _print_json(
                    {
                        "name": name,
                        "state": state,
                        "created": created,
                        "changed": changed,
                        "validate_only": args.validate_only,
                    }
                )
            else:
                print(f"{name}: {state}{' (validated only)' if args.validate_only else ''}")
    return 0


def _cmd_get_view(args: argparse.Namespace) -> int:
    target = {"service": args.name} if args.service else {"view": args.name}
    with _client(args) as client:
        vectors = client.get_view_features(_parse_keys(args.keys), as_of=args.as_of, **target)
    for key, vector in zip(_parse_keys(args.keys), vectors, strict=True):
        features = {
            name: {"value": f.value, "status": f.status, "effective_time": f.effective_time.isoformat()}
            for name, f in vector.items()
        }
        _print_json({"key": key, "features": features})
    return 0


def _cmd_delete_view(args: argparse.Namespace) -> int:
    with _client(args) as client:
        tiles = client.delete_view(args.view)
    print(f"feature view {args.view} deleted with {tiles} tiles")
    return 0


def _cmd_delete_service(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.delete_service(args.service)
    print(f"feature service {args.service} deleted; its views stay")
    return 0


_RECORD_PATH = re.compile(r'^records\["(?:[^"\\]|\\.)*"\]\[(\d+)\](.*)$')


@dataclass
class _Pushed:
    """What a push of a file has done so far: whole batches sent and acknowledged, and their counts."""

    batches: int = 0
    # The file's last line in an acknowledged batch; nothing after it is written.
    last_line: int = 0
    accepted: int = 0
    written: int = 0
    superseded: int = 0

    def summary(self, source: str, dry_run: bool) -> dict[str, Any]:
        """The JSON document push prints: stable field names, the same on success and after a failure."""
        return {
            "source": source,
            "dry_run": dry_run,
            "batches": self.batches,
            "accepted": self.accepted,
            "written": self.written,
            "superseded": self.superseded,
        }

    def done(self, dry_run: bool) -> str:
        """What the acknowledged batches did, to open the error line of a failure after them."""
        which = "batch 1" if self.batches == 1 else f"batches 1-{self.batches}"
        stay = "stays" if self.batches == 1 else "stay"
        done = "validated (dry run, nothing written)" if dry_run else f"written, and {stay} written"
        return (
            f"{which} (lines 1-{self.last_line}: {self.accepted} records accepted, {self.written} written, "
            f"{self.superseded} superseded) {'was' if self.batches == 1 else 'were'} {done}"
        )


def _violation_lines(error: InvalidArgumentError, path: Path, lines: list[int]) -> list[str]:
    """A refused batch's violations, pointing at lines of the file, not positions in a batch."""
    out = []
    for v in error.violations:
        m = _RECORD_PATH.match(v.field)
        place = f"{path}:{lines[int(m.group(1))]}: {m.group(2).lstrip('.')}" if m else v.field
        out.append(f"  {place}: {v.description}")
    return out


def _batch_failure(error: FeaturepushError, number: int, path: Path, lines: list[int]) -> str:
    """How batch `number` (of the file's `lines`) failed, and whether any of it may have been written."""
    where = f"batch {number} (lines {lines[0]}-{lines[-1]} of {path})"
    if error.code in _OUTCOME_UNKNOWN:
        # A batch is atomic, so it is all there or not at all; which one cannot be told from here.
        return (
            f"{where} failed and may or may not have been written as a whole, and no later line was: {error}"
        )
    detail = f"{error.code.name}: {error.message}" if isinstance(error, InvalidArgumentError) else str(error)
    if number == 1:
        return f"{where} was refused, so nothing of the file was written: {detail}"
    return f"{where} was refused, so neither it nor any later line was written: {detail}"


def _cmd_push(args: argparse.Namespace) -> int:
    if not 1 <= args.batch_size <= MAX_BATCH_SIZE:
        raise CommandError(
            f"--batch-size must be 1 to {MAX_BATCH_SIZE:,} (a server's default max_records_per_request), "
            f"not {args.batch_size}"
        )
    pushed = _Pushed()
    with _client(args) as client:
        batch: list[dict[str, Any]] = []
        lines: list[int] = []

        def send() -> None:
            try:
                result = client.push(args.source, batch, dry_run=args.dry_run)
            except FeaturepushError as e:
                details = _violation_lines(e, args.file, lines) if isinstance(e, InvalidArgumentError) else []
                failure = _batch_failure(e, pushed.batches + 1, args.file, lines)
                first = f"{pushed.done(args.dry_run)}; {failure}" if pushed.batches else failure
                raise _BatchFailed("\n".join([first, *details])) from None
            counts = result.counts[args.source]
            pushed.batches += 1
            pushed.last_line = lines[-1]
            pushed.accepted += counts.accepted
            pushed.written += counts.written
            pushed.superseded += counts.superseded

        try:
            for number, record in _records(args.file):
                batch.append(record)
                lines.append(number)
                if len(batch) >= args.batch_size:
                    send()
                    batch, lines = [], []
            if batch:
                send()
        except (CommandError, OSError) as e:
            if pushed.batches == 0:
                raise
            # Earlier batches are on the server: say exactly what, on stdout as on success.
            _print_json(pushed.summary(args.source, args.dry_run))
            if isinstance(e, _BatchFailed):
                raise
            text = str(e) if isinstance(e, CommandError) else f"{e.strerror or e}: {e.filename or ''}"
            later = f"nothing from line {pushed.last_line + 1} on was written"
            raise CommandError(f"{pushed.done(args.dry_run)}; {later}: {text}") from None
    _print_json(pushed.summary(args.source, args.dry_run))
    return 0


def _parse_keys(pairs: Sequence[str]) -> list[dict[str, str]]:
    """KEY=VALUE pairs into entity keys; a key name seen again starts the next entity."""
    keys: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise CommandError(f"{pair!r} is not KEY=VALUE")
        if name in current:
            keys.append(current)
            current = {}
        current[name] = value
    if current:
        keys.append(current)
    return keys


def _json_default(value: Any) -> Any:
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, bytes):
        import base64

        return base64.b64encode(value).decode()
    raise TypeError(type(value).__name__)


def _finite(value: Any) -> Any:
    """`value` with NaN and the infinities as the strings proto3 JSON writes, which JSON parsers read."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _print_json(doc: object) -> None:
    """One JSON document on one line of stdout; times as ISO 8601, bytes as base64, NaN as "NaN"."""
    print(json.dumps(_finite(doc), default=_json_default, allow_nan=False))


def _cmd_get(args: argparse.Namespace) -> int:
    keys = _parse_keys(args.keys)
    with _client(args) as client:
        # Key values arrive as text; typed per the schema so Int64 keys work from the shell.
        results = client.get_features(args.source, keys)
    for key, result in zip(keys, results, strict=True):
        _print_json(
            {
                "key": key,
                "status": str(result.status),
                "event_time": result.event_time,
                "features": result.features,
            }
        )
    return 0


def _cmd_sources(args: argparse.Namespace) -> int:
    with _client(args) as client:
        for source in client.list_sources():
            if args.json:
                from google.protobuf import json_format

                # The contract's own JSON form, so the field names are the proto's and stay stable.
                _print_json(json_format.MessageToDict(source.to_proto(), preserving_proto_field_name=True))
                continue
            fields = ", ".join(f"{f.name}: {f.dtype!r}" for f in source.schema)
            print(f"{source.name}  keys={','.join(source.entity_keys)}  [{fields}]")
    return 0


def _cmd_delete(args: argparse.Namespace) -> int:
    with _client(args) as client:
        rows = client.delete_source(args.source)
    if args.json:
        _print_json({"source": args.source, "deleted": True, "rows_deleted": rows})
    else:
        print(f"{args.source}: deleted with {rows} online rows")
    return 0


def _when(text: str) -> dt.datetime:
    """An ISO 8601 time; one without an offset is taken as UTC."""
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO 8601 time such as 2024-05-01T00:00:00Z"
        ) from None
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def _progress_bar(args: argparse.Namespace, verb: str) -> Any:
    """The progress bar of an export or a backfill; never drawn with --json, whose output is for a program."""
    from tqdm import tqdm

    # Made at the first progress, so that a refused call leaves no empty bar above its error.
    return tqdm(unit=" rows", unit_scale=True, desc=f"{verb} {args.source}", disable=args.json)


def _cmd_export(args: argparse.Namespace) -> int:
    import pyarrow.parquet as pq

    # Checked before any call: the file is written under a hidden temporary name, which errors would name.
    if args.out.suffix.lower() != ".parquet":
        raise CommandError(
            f"--out {args.out}: export writes Parquet, so the file's name must end in .parquet"
        )
    folder = args.out.parent
    if not folder.is_dir():
        raise CommandError(f"--out {args.out}: the folder {folder} does not exist")
    columns = [c for c in (args.columns or "").split(",") if c]
    rows = 0
    bar = None
    with _client(args) as client:
        reader = client.read_batch_source(args.source, start=args.start, end=args.end, columns=columns)
        temp = args.out.with_name(f".{args.out.name}.part")
        try:
            with pq.ParquetWriter(temp, reader.schema) as writer:
                for batch in reader:
                    writer.write_batch(batch)
                    rows += batch.num_rows
                    if bar is None:
                        bar = _progress_bar(args, "export")
                    bar.update(batch.num_rows)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        finally:
            if bar is not None:
                bar.close()
        # Renamed only when complete, so an interrupted export never leaves a truncated file behind.
        temp.replace(args.out)
    if args.json:
        _print_json({"source": args.source, "rows": rows, "out": str(args.out)})
    else:
        print(f"{args.source}: exported {rows} rows to {args.out}")
    return 0


def _cmd_backfill(args: argparse.Namespace) -> int:
    bars: list[Any] = []

    def show(progress: BackfillProgress) -> None:
        if not bars:
            bars.append(_progress_bar(args, "backfill"))
        bar = bars[0]
        bar.update(progress.rows_read - bar.n)
        # As text: tqdm writes numbers it is given in its shortest form, 500000 as 5e+5.
        bar.set_postfix_str(f"written={progress.rows_written:,}, rejected={progress.rows_rejected:,}")

    try:
        with _client(args) as client:
            result = client.backfill(
                args.source, start=args.start, end=args.end, dry_run=args.dry_run, on_progress=show
            )
    finally:
        for bar in bars:
            bar.close()
    if args.json:
        _print_json(
            {
                "source": args.source,
                "dry_run": args.dry_run,
                "rows_read": result.rows_read,
                "rows_written": result.rows_written,
                "rows_superseded": result.rows_superseded,
                "rows_rejected": result.rows_rejected,
                "rejections": [
                    {"row": r.row, "field": r.field, "description": r.description} for r in result.rejections
                ],
            }
        )
        return 1 if result.rows_rejected else 0
    print(
        f"{args.source}: read {result.rows_read} rows, wrote {result.rows_written}, "
        f"{result.rows_superseded} superseded, {result.rows_rejected} rejected"
        + (" (dry run, nothing written)" if args.dry_run else "")
    )
    for r in result.rejections:
        print(f"  row {r.row}: {r.field}: {r.description}", file=sys.stderr)
    if result.rows_rejected > len(result.rejections):
        more = result.rows_rejected - len(result.rejections)
        print(f"  ... and {more} more rejected rows", file=sys.stderr)
    return 1 if result.rows_rejected else 0


def _health(client: Client) -> dict[str, str]:
    """The gRPC health service's answer for the server ("") and each featurepush service, by name."""
    try:
        from grpc_health.v1 import health_pb2, health_pb2_grpc
    except ImportError:
        # The health stubs come with the server extra; the status RPC still answers without them.
        return {"": "UNKNOWN (pip install grpcio-health-checking to ask the health service)"}
    from featurepush.v1 import (
        backfill_service_pb2,
        feature_view_service_pb2,
        ingest_service_pb2,
        online_service_pb2,
        registry_service_pb2,
    )

    stub = health_pb2_grpc.HealthStub(client.channel)
    modules = (
        registry_service_pb2,
        ingest_service_pb2,
        online_service_pb2,
        backfill_service_pb2,
        feature_view_service_pb2,
    )
    names = [""] + [
        service.full_name for module in modules for service in module.DESCRIPTOR.services_by_name.values()
    ]
    out = {}
    for name in names:
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10.0)
            out[name] = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        except grpc.RpcError as err:
            out[name] = f"UNKNOWN ({err.code().name})"
    return out


def _size(n: float) -> str:
    """A byte count for people: 1.5 MiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _duration(seconds: float) -> str:
    """A duration for people: 3d 4h, 2h 5m, 7m 3s, 12.5s."""
    s = int(seconds)
    if s >= 86400:
        return f"{s // 86400}d {s % 86400 // 3600}h"
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60}m"
    if s >= 60:
        return f"{s // 60}m {s % 60}s"
    return f"{seconds:.1f}s"


def _health_line(health: dict[str, str]) -> str:
    """The health line of `status`: the server's, and each featurepush service not serving."""
    not_serving = [f"{name} {status}" for name, status in health.items() if name and status != "SERVING"]
    overall = health.get("", "UNKNOWN")
    return f"health:       {overall}" + (f" ({'; '.join(not_serving)})" if not_serving else "")


def _status_without_store(args: argparse.Namespace, health: dict[str, str], error: FeaturepushError) -> int:
    """What `status` shows of a server that answers but cannot tell its state (its Redis out of reach)."""
    if args.json:
        _print_json(
            {
                "target": args.target,
                "healthy": False,
                "health": {name or "server": status for name, status in health.items()},
                "error": str(error),
            }
        )
        return 1
    print(f"featurepush at {args.target}: version, uptime and rows unknown (its store is out of reach)")
    print(_health_line(health))
    refused = health.get("featurepush.v1.IngestService") == "NOT_SERVING"
    print("writes:       " + ("REFUSED: the store cannot be reached" if refused else "unknown"))
    print(f"store:        UNREACHABLE: {error.message}")
    return 1


def _cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        try:
            # An exact count reads every row key of every source, which may take longer than a plain call.
            state = client.server_status(exact=args.exact, timeout=300.0 if args.exact else None)
        except FeaturepushError as e:
            if e.code != grpc.StatusCode.UNAVAILABLE:
                raise
            health = _health(client)
            # Nothing answers there at all: the one-line error says so.
            if all(status.startswith("UNKNOWN") for status in health.values()):
                raise
            return _status_without_store(args, health, e)
        health = _health(client)
    healthy = health.get("") == "SERVING" and state.writes_accepted
    if args.json:
        _print_json(
            {
                "target": args.target,
                "healthy": healthy,
                "health": {name or "server": status for name, status in health.items()},
                "version": state.version,
                "uptime_seconds": state.uptime_seconds,
                "writes_accepted": state.writes_accepted,
                "store_bytes": state.store_bytes,
                "offline_log_lag_seconds": state.offline_log_lag_seconds,
                "offline_log_queued_entries": state.offline_log_queued_entries,
                "sources": [
                    {"name": s.name, "row_count": s.row_count, "row_count_exact": s.row_count_exact}
                    for s in state.sources
                ],
                "store_warnings": state.store_warnings,
            }
        )
        return 0 if healthy else 1
    print(f"featurepush {state.version} at {args.target}, up {_duration(state.uptime_seconds)}")
    print(_health_line(health))
    print(
        "writes:       "
        + ("accepted" if state.writes_accepted else "REFUSED: the disk is full or failing; reads still work")
    )
    # Zero is what a backend that cannot tell its size reports (Redis); RocksDB's is never zero.
    size = _size(state.store_bytes) if state.store_bytes else "size not reported by the store backend (Redis)"
    print(f"store:        {size}")
    for warning in state.store_warnings:
        print(f"store:        WARNING: {warning}")
    print(
        f"offline log:  {state.offline_log_queued_entries} entries queued, "
        f"lag {state.offline_log_lag_seconds:.1f}s"
    )
    print(f"sources:      {len(state.sources)}")
    width = max((len(s.name) for s in state.sources), default=0)
    for s in state.sources:
        rows = f"{s.row_count:,}" if s.row_count_exact else f"at least {s.row_count:,} (--exact counts all)"
        print(f"  {s.name:<{width}}  {rows} rows")
    return 0 if healthy else 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="featurepush", description="featurepush feature-ingest service")
    parser.add_argument("--version", action="version", version=f"featurepush {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the server")
    serve.add_argument("--config", type=Path, help="TOML file with a [server] table")
    serve.add_argument("--listen", help="host:port (default localhost:50051)")
    serve.add_argument("--data-dir", type=Path, help="data folder (default ./data)")
    serve.add_argument("--definitions", type=Path, action="append", help="definitions file to apply at start")
    serve.add_argument("--fsync", choices=["always", "never"], help="durability of acknowledged pushes")
    serve.add_argument("--max-records-per-request", type=int)
    serve.add_argument("--max-message-bytes", type=int)
    serve.add_argument("--workers", type=int)
    serve.add_argument(
        "--processes",
        type=int,
        help="gRPC processes sharing the port, plus a store owner with RocksDB (default: usable cores)",
    )
    serve.add_argument(
        "--post-processor-module",
        action="append",
        dest="post_processor_modules",
        help="a module whose functions sources may use as post_processor (repeatable)",
    )
    serve.add_argument("--tls-cert", type=Path, help="PEM certificate chain; with --tls-key turns TLS on")
    serve.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    serve.add_argument(
        "--tls-client-ca", type=Path, help="PEM CA that client certificates must chain to (mTLS)"
    )
    serve.add_argument(
        "--keys-file", type=Path, help="API keys file; every featurepush call then needs a key"
    )
    serve.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        default=None,
        help="serve without keys on an address other than loopback",
    )
    serve.add_argument("--no-reflection", action="store_true", help="do not serve gRPC reflection")
    serve.add_argument("--metrics-listen", help="host:port of a Prometheus /metrics endpoint (default: none)")
    serve.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="default INFO")
    serve.add_argument("--log-format", choices=["text", "json"], help="text lines (default) or JSON lines")
    serve.add_argument(
        "--batch-root",
        type=Path,
        action="append",
        dest="batch_roots",
        help="a folder whose files batch sources may read (repeatable; default: none)",
    )
    serve.add_argument(
        "--batch-scheme",
        action="append",
        dest="batch_schemes",
        help="a remote URI scheme batch sources may read, such as s3 (repeatable; default: none)",
    )
    serve.add_argument(
        "--stream-read-ahead-bytes", type=int, help="decoded bytes one batch read holds ahead of gRPC"
    )
    serve.set_defaults(func=_cmd_serve)

    keys = sub.add_parser("keys", help="create, list and revoke API keys in the keys file")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)

    def keys_command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = keys_sub.add_parser(name, help=help_text)
        p.add_argument("--keys-file", type=Path, help="keys file (default: keys_file of --config)")
        p.add_argument("--config", type=Path, help="TOML file with a [server] table naming keys_file")
        return p

    create = keys_command("create", "create a key and print it, once")
    create.add_argument(
        "--scope",
        action="append",
        dest="scopes",
        required=True,
        help="read, ingest, backfill or admin (repeatable or comma-separated; admin allows every call)",
    )
    create.add_argument("--name", help="what the key is for, shown by `keys list`")
    create.set_defaults(func=_cmd_keys_create)
    keys_list = keys_command("list", "list keys: ids, names, scopes, times; never secrets")
    keys_list.add_argument("--json", action="store_true", help="one JSON object per key, one per line")
    keys_list.set_defaults(func=_cmd_keys_list)
    revoke = keys_command("revoke", "revoke a key by its id")
    revoke.add_argument("id")
    revoke.set_defaults(func=_cmd_keys_revoke)

    def client_command(name: str, help_text: str, json_help: str | None = None) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        env = os.environ.get
        p.add_argument(
            "--target",
            default=env("FEATUREPUSH_TARGET") or DEFAULT_TARGET,
            help=f"server address (default $FEATUREPUSH_TARGET, else {DEFAULT_TARGET})",
        )
        # Read from the environment too, so that keys need not appear in shell history or `ps`.
        p.add_argument("--api-key", default=env("FEATUREPUSH_API_KEY"), help="API key ($FEATUREPUSH_API_KEY)")
        p.add_argument("--tls", action="store_true", help="use TLS, trusting the system's CAs")
        p.add_argument("--ca-cert", default=env("FEATUREPUSH_CA_CERT"), help="PEM CA to verify the server")
        p.add_argument(
            "--client-cert", default=env("FEATUREPUSH_CLIENT_CERT"), help="PEM certificate for mTLS"
        )
        p.add_argument("--client-key", default=env("FEATUREPUSH_CLIENT_KEY"), help="PEM key of --client-cert")
        if json_help is not None:
            p.add_argument("--json", action="store_true", help=json_help)
        return p

    apply = client_command(
        "apply",
        "apply the sources, feature views and feature services of a definitions file",
        "one JSON object per source, view or service, one per line",
    )
    apply.add_argument("definitions", type=Path)
    apply.add_argument("--validate-only", action="store_true")
    apply.set_defaults(func=_cmd_apply)

    push = client_command(
        "push",
        "push the records of a JSON Lines file ('-' reads standard input) in atomic batches; prints the "
        "counts as JSON, also when a later batch fails after earlier ones were written (exit 1 then)",
    )
    push.add_argument("source")
    push.add_argument("file", type=Path)
    push.add_argument(
        "--batch-size",
        type=int,
        default=1000,
        help=f"records per request, 1 to {MAX_BATCH_SIZE:,} (default 1000); a server whose "
        "max_records_per_request is lower refuses larger batches",
    )
    push.add_argument("--dry-run", action="store_true")
    push.set_defaults(func=_cmd_push)

    get = client_command("get", "read the latest features of entities")
    get.add_argument("source")
    get.add_argument("keys", nargs="+", metavar="KEY=VALUE")
    get.set_defaults(func=_cmd_get)

    sources = client_command(
        "sources", "list the push sources", "one PushSource per line in its proto3 JSON form"
    )
    sources.set_defaults(func=_cmd_sources)

    get_view = client_command("get-view", "read the features of a feature view (or --service) for entities")
    get_view.add_argument("name", help="the feature view, or the feature service with --service")
    get_view.add_argument("keys", nargs="+", metavar="KEY=VALUE")
    get_view.add_argument("--service", action="store_true", help="NAME is a feature service")
    get_view.add_argument(
        "--as-of", type=_when, help="the time the windows end at (ISO 8601, UTC if no offset); now if absent"
    )
    get_view.set_defaults(func=_cmd_get_view)

    delete_view = client_command("delete-view", "delete a feature view and its tiles")
    delete_view.add_argument("view")
    delete_view.set_defaults(func=_cmd_delete_view)
    delete_service = client_command("delete-service", "delete a feature service (its views stay)")
    delete_service.add_argument("service")
    delete_service.set_defaults(func=_cmd_delete_service)

    delete = client_command("delete", "delete a push source and its online rows", "one JSON object")
    delete.add_argument("source")
    delete.set_defaults(func=_cmd_delete)

    export = client_command(
        "export", "write a source's batch history to a Parquet file", "one JSON object, and no progress bar"
    )
    export.add_argument("source")
    export.add_argument("--start", type=_when, help="earliest event time (ISO 8601; UTC without an offset)")
    export.add_argument("--end", type=_when, help="event time to stop before (ISO 8601)")
    export.add_argument("--columns", help="comma-separated schema columns (default: all)")
    export.add_argument("--out", type=Path, required=True, help="Parquet file to write")
    export.set_defaults(func=_cmd_export)

    backfill = client_command(
        "backfill",
        "load a source's batch history into the online store",
        "one JSON object with the rejections, and no progress bar",
    )
    backfill.add_argument("source")
    backfill.add_argument("--start", type=_when, help="earliest event time (ISO 8601; UTC without an offset)")
    backfill.add_argument("--end", type=_when, help="event time to stop before (ISO 8601)")
    backfill.add_argument("--dry-run", action="store_true", help="validate only; write nothing")
    backfill.set_defaults(func=_cmd_backfill)

    status = client_command(
        "status",
        "show a server's health, version, uptime, store size, offline-log lag and rows per source; "
        "exits 1 when it is not serving, refuses writes or cannot reach its store",
        "one JSON object",
    )
    status.add_argument(
        "--exact",
        action="store_true",
        help="count every row (reads every row key; slow for millions) instead of stopping at 100,000",
    )
    status.set_defaults(func=_cmd_status)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; errors print as one line (plus violations), never a traceback."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
        # Flushed here, so that a reader gone before the last lines is seen below, not at exit.
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # The reader of stdout closed it (`| head`): end quietly, as a Unix tool killed by SIGPIPE does,
        # and keep Python's flush at exit from failing on it again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except (CommandError, FeaturepushError, OSError) as e:
        if isinstance(e, OSError):
            text = f"{e.strerror or e}: {e.filename or ''}".rstrip(": ")
        elif isinstance(e, InvalidArgumentError):
            text = "".join(
                [f"{e.code.name}: {e.message}", *(f"\n  {v.field}: {v.description}" for v in e.violations)]
            )
        else:
            text = str(e)
        print(f"featurepush: error: {text}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
