"""The command line an operator meets: status, FEATUREPUSH_TARGET, --json, push reports, a busy data dir."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import AD_IMPRESSIONS, Running, start
from redis_servers import RedisServer, have_redis
from servers import ServedProcess
from test_batch_source import history, source_doc
from test_cli import DEFINITIONS, RECORDS, assert_one_error_line, definitions_file, run, write_jsonl

import featurepush
from featurepush import Client
from featurepush.batch import BackfillProgress
from featurepush_server.core import server_status


@pytest.fixture
def definitions(tmp_path: Path) -> Path:
    """The account_clicks definitions file."""
    return definitions_file(tmp_path, DEFINITIONS)


@pytest.fixture
def applied(running: Running, definitions: Path, capsys: pytest.CaptureFixture[str]) -> Running:
    """The running server with account_clicks applied through the command line."""
    assert run(capsys, "apply", str(definitions), "--target", running.target)[0] == 0
    return running


def account(i: int, **changes: object) -> dict[str, object]:
    """A valid account_clicks record for account `i`."""
    return {"account_id": i, "ts": "2026-11-25T10:00:00Z", "country": "NZ", **changes}


def dead_target() -> str:
    """An address where nothing listens: connections to it are refused at once."""
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return f"localhost:{sock.getsockname()[1]}"


# --- status ----------------------------------------------------------------------------------------


def test_status_shows_health_rows_store_and_offline_log(
    applied: Running, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_jsonl(tmp_path / "r.jsonl", [account(i) for i in range(5)])
    assert run(capsys, "push", "account_clicks", str(path), "--target", applied.target)[0] == 0

    code, out, err = run(capsys, "status", "--target", applied.target)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].startswith(f"featurepush {featurepush.__version__} at {applied.target}, up ")
    assert lines[1] == "health:       SERVING"
    assert lines[2] == "writes:       accepted"
    assert lines[3].startswith("store:        ") and lines[3].endswith("B")
    assert lines[4].startswith("offline log:  ") and " entries queued, lag " in lines[4]
    assert lines[5:] == [
        "sources:      2",
        "  account_clicks  5 rows",
        "  ad_impressions  0 rows",
    ]

    code, out, err = run(capsys, "status", "--json", "--target", applied.target)
    assert (code, err) == (0, "")
    doc = json.loads(out)
    assert doc["store_bytes"] > 0 and doc["uptime_seconds"] > 0
    assert doc["offline_log_queued_entries"] >= 0 and doc["offline_log_lag_seconds"] >= 0
    assert {
        k: v for k, v in doc.items() if k not in {"store_bytes", "uptime_seconds"} and "offline" not in k
    } == {
        "target": applied.target,
        "healthy": True,
        "health": {
            "server": "SERVING",
            "featurepush.v1.RegistryService": "SERVING",
            "featurepush.v1.IngestService": "SERVING",
            "featurepush.v1.OnlineService": "SERVING",
            "featurepush.v1.BackfillService": "SERVING",
            "featurepush.v1.FeatureViewService": "SERVING",
        },
        "version": featurepush.__version__,
        "writes_accepted": True,
        "store_warnings": [],
        "sources": [
            {"name": "account_clicks", "row_count": 5, "row_count_exact": True},
            {"name": "ad_impressions", "row_count": 0, "row_count_exact": True},
        ],
    }


def test_row_counts_stop_at_the_limit_unless_exact(
    applied: Running, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_status, "ROW_COUNT_LIMIT", 3)
    path = write_jsonl(tmp_path / "r.jsonl", [account(i) for i in range(5)])
    assert run(capsys, "push", "account_clicks", str(path), "--target", applied.target)[0] == 0
    with Client(applied.target) as client:
        estimate = client.server_status().sources[0]
        exact = client.server_status(exact=True).sources[0]
    assert (estimate.row_count, estimate.row_count_exact) == (3, False)
    assert (exact.row_count, exact.row_count_exact) == (5, True)
    out = run(capsys, "status", "--target", applied.target)[1]
    assert "  account_clicks  at least 3 (--exact counts all) rows" in out
    assert "  account_clicks  5 rows" in run(capsys, "status", "--exact", "--target", applied.target)[1]


def test_status_counts_queued_offline_entries(tmp_path: Path) -> None:
    """Entries wait in the queue until the flusher's next round; a long interval keeps them there."""
    running = start(tmp_path / "data", offline_flush_interval_s=3600.0)
    try:
        running.apply({**AD_IMPRESSIONS, "pushConfig": {"logOffline": True}})
        with Client(running.target) as client:
            for i in range(3):
                record = {"user_id": f"u{i}", "timestamp": "2026-01-01T00:00:00Z", "clicked": i}
                client.push("ad_impressions", [record])
            state = client.server_status()
        assert state.offline_log_queued_entries == 3 and state.offline_log_lag_seconds > 0
        assert running.server.offline_log is not None
        running.server.offline_log.flush()
        with Client(running.target) as client:
            state = client.server_status()
        assert (state.offline_log_queued_entries, state.offline_log_lag_seconds) == (0, 0.0)
    finally:
        running.close()


def test_status_of_a_server_refusing_writes_exits_1(
    running: Running, capsys: pytest.CaptureFixture[str]
) -> None:
    running.server.store._failed(OSError(28, "No space left on device"))  # type: ignore[attr-defined]
    code, out, _ = run(capsys, "status", "--target", running.target)
    assert code == 1
    assert "writes:       REFUSED: the disk is full or failing; reads still work" in out
    assert "featurepush.v1.IngestService NOT_SERVING" in out
    code, out, _ = run(capsys, "status", "--json", "--target", running.target)
    doc = json.loads(out)
    assert (code, doc["healthy"], doc["writes_accepted"]) == (1, False, False)


@pytest.mark.skipif(not have_redis(), reason="redis-server is not installed (make test installs it)")
def test_status_of_a_server_whose_redis_is_down_shows_its_health_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    node = RedisServer(tmp_path / "redis")
    running: Running | None = None
    try:
        running = start(tmp_path / "data", store=node.url, redis_namespace="status", redis_timeout_s=0.5)
        running.apply(AD_IMPRESSIONS)
        code, out, err = run(capsys, "status", "--target", running.target)
        assert (code, err) == (0, "")
        # Redis does not report its size: the line says so instead of "0 B".
        assert "store:        size not reported by the store backend (Redis)\n" in out
        node.kill()
        code, out, err = run(capsys, "status", "--target", running.target)
        assert (code, err) == (1, "")
        assert out.splitlines() == [
            f"featurepush at {running.target}: version, uptime and rows unknown (its store is out of reach)",
            "health:       SERVING (featurepush.v1.IngestService NOT_SERVING; "
            "featurepush.v1.BackfillService NOT_SERVING)",
            "writes:       REFUSED: the store cannot be reached",
            "store:        UNREACHABLE: the server cannot reach its Redis store; it reconnects by itself, "
            "send the request again later",
        ]
        code, out, err = run(capsys, "status", "--json", "--target", running.target)
        doc = json.loads(out)
        assert (code, err, doc["healthy"]) == (1, "", False)
        assert doc["health"]["featurepush.v1.IngestService"] == "NOT_SERVING"
        assert doc["error"].startswith("UNAVAILABLE: the server cannot reach its Redis store")
    finally:
        if running is not None:
            running.close()
        node.stop()


def test_status_of_no_server_is_still_one_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "status", "--target", dead_target())
    assert (code, out) == (1, "")
    assert_one_error_line(err, "UNAVAILABLE")


# --- FEATUREPUSH_TARGET ----------------------------------------------------------------------------


def test_featurepush_target_is_every_client_command_s_default(
    applied: Running, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEATUREPUSH_TARGET", applied.target)
    code, out, err = run(capsys, "sources")
    assert (code, err) == (0, "") and out.startswith("account_clicks ")
    assert run(capsys, "status")[0] == 0
    # A flag still wins over the environment.
    code, _, err = run(capsys, "sources", "--target", dead_target())
    assert code == 1 and "UNAVAILABLE" in err


@pytest.mark.parametrize(
    "command", ["apply", "push", "get", "sources", "delete", "export", "backfill", "status"]
)
def test_help_names_featurepush_target(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        run(capsys, command, "--help")
    assert "$FEATUREPUSH_TARGET, else localhost:50051" in " ".join(capsys.readouterr().out.split())


def test_without_featurepush_target_the_default_is_localhost(monkeypatch: pytest.MonkeyPatch) -> None:
    from featurepush_server.cli import build_parser

    monkeypatch.delenv("FEATUREPUSH_TARGET", raising=False)
    assert build_parser().parse_args(["sources"]).target == "localhost:50051"
    monkeypatch.setenv("FEATUREPUSH_TARGET", "feature-store:6000")
    assert build_parser().parse_args(["sources"]).target == "feature-store:6000"


# --- --json ----------------------------------------------------------------------------------------


def test_json_output_of_apply_sources_and_delete(
    running: Running, definitions: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = ("--target", running.target)
    code, out, err = run(capsys, "apply", str(definitions), "--json", *target)
    assert (code, err) == (0, "")
    assert json.loads(out) == {
        "name": "account_clicks",
        "state": "created",
        "created": True,
        "changed": True,
        "validate_only": False,
    }
    assert json.loads(run(capsys, "apply", str(definitions), "--json", "--validate-only", *target)[1]) == {
        "name": "account_clicks",
        "state": "unchanged",
        "created": False,
        "changed": False,
        "validate_only": True,
    }

    code, out, err = run(capsys, "sources", "--json", *target)
    assert (code, err) == (0, "")
    first, second = (json.loads(line) for line in out.splitlines())
    assert (first["name"], first["entity_keys"], first["timestamp_field"]) == (
        "account_clicks",
        ["account_id"],
        "ts",
    )
    assert [f["name"] for f in first["schema"]["fields"]] == ["account_id", "ts", "country", "score"]
    assert second["name"] == "ad_impressions"

    assert (
        run(capsys, "push", "account_clicks", str(write_jsonl(tmp_path / "r.jsonl", RECORDS)), *target)[0]
        == 0
    )
    code, out, err = run(capsys, "delete", "account_clicks", "--json", *target)
    assert (code, err) == (0, "")
    assert json.loads(out) == {"source": "account_clicks", "deleted": True, "rows_deleted": 2}


def test_json_output_of_export_and_backfill(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pq.write_table(history(10), tmp_path / "h.parquet")
    running = start(tmp_path / "data", batch_roots=(tmp_path,))
    try:
        running.apply(source_doc(str(tmp_path / "h.parquet"), "FILE_FORMAT_PARQUET"))
        target = ("--target", running.target)
        out_file = tmp_path / "out.parquet"
        code, out, err = run(capsys, "export", "ad_impressions", "--out", str(out_file), "--json", *target)
        assert (code, err) == (0, ""), "no progress bar either"
        assert json.loads(out) == {"source": "ad_impressions", "rows": 10, "out": str(out_file)}

        # Row 4 cannot be read as an Int64, so the backfill rejects it and exits 1.
        bad = history(10).set_column(2, "clicked", pa.array([str(i) if i != 4 else "x" for i in range(10)]))
        pq.write_table(bad, tmp_path / "h.parquet")
        code, out, err = run(capsys, "backfill", "ad_impressions", "--json", *target)
        assert (code, err) == (1, "")
        doc = json.loads(out)
        assert doc == {
            "source": "ad_impressions",
            "dry_run": False,
            "rows_read": 10,
            "rows_written": doc["rows_written"],
            "rows_superseded": doc["rows_superseded"],
            "rows_rejected": 1,
            "rejections": [
                {"row": 4, "field": "clicked", "description": doc["rejections"][0]["description"]}
            ],
        }
        assert doc["rows_written"] + doc["rows_superseded"] == 9
    finally:
        running.close()


def test_export_and_backfill_refusals_are_one_line_with_no_bar(
    running: Running, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = ("--target", running.target)
    out_file = str(tmp_path / "out.parquet")
    # ad_impressions has no batch_config.
    for argv in (("export", "ad_impressions", "--out", out_file), ("backfill", "ad_impressions")):
        code, out, err = run(capsys, *argv, *target)
        assert (code, out) == (1, "")
        assert_one_error_line(err, "no batch_config")
    code, out, err = run(capsys, "export", "ad_impressions", "--out", str(tmp_path / "nowhere" / "x.parquet"))
    assert (code, out) == (1, "")
    assert_one_error_line(err, f"the folder {tmp_path / 'nowhere'} does not exist")
    code, out, err = run(capsys, "export", "ad_impressions", "--out", str(tmp_path / "x.csv"))
    assert (code, out) == (1, "")
    assert_one_error_line(err, "export writes Parquet, so the file's name must end in .parquet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_an_end_before_the_start_is_refused_by_backfill_as_by_export(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pq.write_table(history(10), tmp_path / "h.parquet")
    running = start(tmp_path / "data", batch_roots=(tmp_path,))
    try:
        running.apply(source_doc(str(tmp_path / "h.parquet"), "FILE_FORMAT_PARQUET"))
        span = (
            "--start",
            "2026-11-12T00:00:00Z",
            "--end",
            "2026-11-01T00:00:00Z",
            "--target",
            running.target,
        )
        out_file = str(tmp_path / "out.parquet")
        for argv in (("export", "ad_impressions", "--out", out_file), ("backfill", "ad_impressions")):
            code, out, err = run(capsys, *argv, *span)
            assert (code, out) == (1, "")
            assert err.splitlines()[1:] == ["  end_time: must not be before start_time"]
    finally:
        running.close()


def test_the_backfill_bar_shows_whole_counts(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def backfill(self: Client, source: str, **options: object) -> BackfillProgress:
        done = BackfillProgress(500_000, 500_000, 0, 0, 0, 1.0, (), True)
        options["on_progress"](done)  # type: ignore[operator]
        return done

    monkeypatch.setattr(Client, "backfill", backfill)
    code, out, err = run(capsys, "backfill", "ad_impressions", "--target", dead_target())
    assert code == 0 and out.startswith("ad_impressions: read 500000 rows")
    assert "written=500,000, rejected=0" in err and "e+" not in err


def test_a_reader_that_closes_stdout_ends_the_command_quietly(running: Running) -> None:
    keys = [f"user_id=u{i}" for i in range(2000)]
    done = subprocess.run(
        f"{sys.executable} -m featurepush_server.cli get ad_impressions {' '.join(keys)} "
        f"--target {running.target} | head -1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout.startswith('{"key": {"user_id": "u0"}')
    assert done.stderr == ""


def test_get_view_as_of_that_is_not_a_time_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    for text in ("garbage", "2026-13-45"):
        with pytest.raises(SystemExit) as info:
            run(capsys, "get-view", "user_clicks", "user_id=u1", "--as-of", text)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert f"argument --as-of: {text!r} is not an ISO 8601 time" in err and "Traceback" not in err


def test_json_output_of_keys_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys_file = tmp_path / "keys.json"
    for scope, name in (("read", "dashboards"), ("ingest,read", "")):
        assert (
            run(capsys, "keys", "create", "--keys-file", str(keys_file), "--scope", scope, "--name", name)[0]
            == 0
        )
    code, out, err = run(capsys, "keys", "list", "--json", "--keys-file", str(keys_file))
    assert (code, err) == (0, "")
    first, second = (json.loads(line) for line in out.splitlines())
    assert set(first) == {"id", "name", "scopes", "created", "revoked", "active"}
    assert (first["name"], first["scopes"], first["revoked"], first["active"]) == (
        "dashboards",
        ["read"],
        None,
        True,
    )
    assert second["scopes"] == ["read", "ingest"]
    assert run(capsys, "keys", "revoke", "--keys-file", str(keys_file), first["id"])[0] == 0
    first = json.loads(
        run(capsys, "keys", "list", "--json", "--keys-file", str(keys_file))[1].splitlines()[0]
    )
    assert first["active"] is False and first["revoked"].startswith("20")


# --- push: what a later failing batch leaves written -----------------------------------------------


def test_a_later_bad_batch_reports_what_earlier_batches_wrote(
    applied: Running, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Batches of 2: lines 1-2 (two records of account 1: one supersedes the other), 3-4 (line 4 is bad), 5.
    path = write_jsonl(
        tmp_path / "r.jsonl",
        [
            account(1),
            account(1, ts="2026-11-25T09:00:00Z"),
            account(3),
            account(4, account_id="four"),
            account(5),
        ],
    )
    code, out, err = run(
        capsys, "push", "account_clicks", str(path), "--batch-size", "2", "--target", applied.target
    )
    assert code == 1
    assert json.loads(out) == {
        "source": "account_clicks",
        "dry_run": False,
        "batches": 1,
        "accepted": 2,
        "written": 1,
        "superseded": 1,
    }
    assert_one_error_line(
        err,
        "featurepush: error: batch 1 (lines 1-2: 2 records accepted, 1 written, 1 superseded) was written, "
        f"and stays written; batch 2 (lines 3-4 of {path}) was refused, so neither it nor any later line "
        "was written: INVALID_ARGUMENT: 1 invalid field value",
        f"\n  {path}:4: account_id: ",
    )
    assert len(err.splitlines()) == 2
    got = run(
        capsys, "get", "account_clicks", *(f"account_id={i}" for i in (1, 3, 5)), "--target", applied.target
    )
    assert [json.loads(line)["status"] for line in got[1].splitlines()] == ["PRESENT", "MISSING", "MISSING"]


def test_a_bad_line_after_written_batches_reports_them(
    applied: Running, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_jsonl(
        tmp_path / "r.jsonl", [account(1), account(2), account(3), account(4), account(5), "{nope"]
    )
    code, out, err = run(
        capsys, "push", "account_clicks", str(path), "--batch-size", "2", "--target", applied.target
    )
    assert code == 1
    assert json.loads(out)["batches"] == 2 and json.loads(out)["written"] == 4
    assert err == (
        "featurepush: error: batches 1-2 (lines 1-4: 4 records accepted, 4 written, 0 superseded) were "
        f"written, and stay written; nothing from line 5 on was written: {path}:6: not valid JSON: "
        "Expecting property name enclosed in double quotes\n"
    )


def test_a_bad_first_batch_writes_nothing_and_prints_no_counts(
    applied: Running, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_jsonl(tmp_path / "r.jsonl", [account(1, account_id="one"), account(2), account(3)])
    code, out, err = run(
        capsys, "push", "account_clicks", str(path), "--batch-size", "2", "--target", applied.target
    )
    assert (code, out) == (1, "")
    assert_one_error_line(
        err,
        f"featurepush: error: batch 1 (lines 1-2 of {path}) was refused, "
        "so nothing of the file was written: ",
        f"{path}:1: account_id: ",
    )


@pytest.mark.parametrize("size", ["0", "-1", "10001"])
def test_batch_size_out_of_range_is_one_line(
    applied: Running, tmp_path: Path, capsys: pytest.CaptureFixture[str], size: str
) -> None:
    path = write_jsonl(tmp_path / "r.jsonl", RECORDS)
    code, out, err = run(
        capsys, "push", "account_clicks", str(path), "--batch-size", size, "--target", applied.target
    )
    assert (code, out) == (1, "")
    assert err == (
        f"featurepush: error: --batch-size must be 1 to 10,000 (a server's default max_records_per_request), "
        f"not {size}\n"
    )


def test_the_largest_batch_size_is_accepted(
    applied: Running, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_jsonl(tmp_path / "r.jsonl", RECORDS)
    code, out, _ = run(
        capsys, "push", "account_clicks", str(path), "--batch-size", "10000", "--target", applied.target
    )
    assert code == 0 and json.loads(out)["written"] == 2


# --- a data directory in use -----------------------------------------------------------------------


@pytest.mark.parametrize("processes", ["1", "2"])
def test_a_second_serve_on_a_data_dir_in_use_says_so_in_one_line(tmp_path: Path, processes: str) -> None:
    data = tmp_path / "data"
    first = ServedProcess(data)
    try:
        second = subprocess.run(
            [
                sys.executable,
                "-m",
                "featurepush_server.cli",
                "serve",
                "--listen",
                "localhost:0",
                "--data-dir",
                str(data),
                "--processes",
                processes,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 1, second.stderr
        assert second.stderr.splitlines()[-1] == (
            f"featurepush: error: data directory {data} is in use by another featurepush process "
            f"(pid {first.proc.pid}); stop that one or serve another data directory"
        )
        # With --processes the store owner said why; the supervisor adds no line of its own.
        assert "Traceback" not in second.stderr and " ERROR " not in second.stderr
        first.signal(signal.SIGTERM)
        assert first.wait() == 0, first.log
    finally:
        first.finish()
    # A clean stop takes its pid file away; the next start opens the directory.
    assert not (data / "online" / "featurepush.pid").exists()
    running = start(data)
    running.close()


def test_the_example_config_does_not_share_make_run_s_data_dir() -> None:
    from featurepush_server.config import load_config

    root = Path(__file__).resolve().parent.parent
    config = load_config(root / "examples" / "featurepush.toml", env={})
    assert config.data_dir.resolve() == (root / "data-example").resolve()
    assert "/data-example/" in (root / ".gitignore").read_text().splitlines()


def test_the_example_config_names_every_setting_with_its_default_where_it_sets_one() -> None:
    import dataclasses
    import re
    import tomllib

    from featurepush_server.config import ServerConfig

    text = (Path(__file__).resolve().parent.parent / "examples" / "featurepush.toml").read_text()
    named = set(re.findall(r"^#? ?([a-z_]+) = ", text, re.MULTILINE))
    fields = {f.name: f for f in dataclasses.fields(ServerConfig)}
    assert sorted(set(fields) - named) == []
    # Numbers it sets are the defaults, so the file never reads as a recommendation it is not.
    for name, value in tomllib.loads(text)["server"].items():
        default = fields[name].default
        numeric = isinstance(value, int | float) and not isinstance(value, bool)
        if numeric and default is not dataclasses.MISSING:
            assert value == default, name
