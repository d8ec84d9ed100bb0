"""The `featurepush` command line, run in-process against a real server."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import re
import socket
from pathlib import Path
from typing import Any

import pytest
from conftest import Running

from featurepush_server.cli import main

DEFINITIONS = '''
"""Account clicks keyed by an Int64 account id."""
from featurepush import Field, Float64, Int64, PushConfig, StreamSource, String, Timestamp

clicks = StreamSource(
    name="account_clicks",
    schema=[
        Field("account_id", Int64),
        Field("ts", Timestamp),
        Field("country", String),
        Field("score", Float64, nullable=True),
    ],
    entity_keys=["account_id"],
    timestamp_field="ts",
    stream_config=PushConfig(log_offline=False),
)
'''

RECORDS = [
    {"account_id": 42, "ts": "2026-11-25T10:00:00Z", "country": "NZ", "score": 0.5},
    {"account_id": "9007199254740993", "ts": "2026-11-25T11:30:00+01:00", "country": "FR"},
]


_files = itertools.count()


def definitions_file(folder: Path, text: str) -> Path:
    """A definitions file with a module name of its own, as load_definitions imports it by its stem."""
    path = folder / f"cli_definitions_{next(_files)}.py"
    path.write_text(text)
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run the command; returns its exit code, stdout and stderr."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def write_jsonl(path: Path, lines: list[object]) -> Path:
    """Write one JSON document (or raw text) per line."""
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


@pytest.fixture
def definitions(tmp_path: Path) -> Path:
    """The account_clicks definitions file."""
    return definitions_file(tmp_path, DEFINITIONS)


@pytest.fixture
def applied(running: Running, definitions: Path, capsys: pytest.CaptureFixture[str]) -> Running:
    """The running server with account_clicks applied through the command line."""
    assert run(capsys, "apply", str(definitions), "--target", running.target) == (
        0,
        "account_clicks: created\n",
        "",
    )
    return running


def assert_one_error_line(err: str, *fragments: str) -> None:
    """stderr is one `featurepush: error:` line, then only violation lines (path: what), no traceback."""
    lines = err.splitlines()
    assert lines and lines[0].startswith("featurepush: error: "), err
    assert all(re.match(r"^ *\S+: ", line) for line in lines[1:]), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


def test_apply_creates_then_is_unchanged(
    applied: Running, definitions: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Applying the same definitions again changes nothing."""
    assert run(capsys, "apply", str(definitions), "--target", applied.target) == (
        0,
        "account_clicks: unchanged\n",
        "",
    )


def test_push_get_sources_delete(
    applied: Running, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A JSONL push, a get by Int64 keys typed as text, the source list and a delete."""
    target = ("--target", applied.target)
    code, out, err = run(
        capsys, "push", "account_clicks", str(write_jsonl(tmp_path / "r.jsonl", RECORDS)), *target
    )
    assert (code, err) == (0, "")
    assert json.loads(out) == {
        "source": "account_clicks",
        "dry_run": False,
        "batches": 1,
        "accepted": 2,
        "written": 2,
        "superseded": 0,
    }

    code, out, err = run(
        capsys,
        "get",
        "account_clicks",
        "account_id=42",
        "account_id=9007199254740993",
        "account_id=1",
        *target,
    )
    assert (code, err) == (0, "")
    first, second, third = (json.loads(line) for line in out.splitlines())
    assert first == {
        "key": {"account_id": "42"},
        "status": "PRESENT",
        "event_time": "2026-11-25T10:00:00+00:00",
        "features": {"account_id": 42, "ts": "2026-11-25T10:00:00+00:00", "country": "NZ", "score": 0.5},
    }
    assert second["features"] == {
        "account_id": 9007199254740993,
        "ts": "2026-11-25T10:30:00+00:00",
        "country": "FR",
        "score": None,
    }
    assert (third["status"], third["features"]) == ("MISSING", None)

    code, out, err = run(capsys, "sources", *target)
    assert (code, err) == (0, "")
    assert [line.split()[0] for line in out.splitlines()] == ["account_clicks", "ad_impressions"]
    assert "keys=account_id" in out

    assert run(capsys, "delete", "account_clicks", *target) == (
        0,
        "account_clicks: deleted with 2 online rows\n",
        "",
    )
    code, out, err = run(capsys, "get", "account_clicks", "account_id=42", *target)
    assert (code, out) == (1, "")
    assert_one_error_line(err, "NOT_FOUND", "account_clicks")


def test_dry_run_push_writes_nothing(
    applied: Running, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--dry-run validates and reports counts, and the rows stay missing."""
    path = write_jsonl(tmp_path / "r.jsonl", RECORDS)
    code, out, _ = run(capsys, "push", "account_clicks", str(path), "--dry-run", "--target", applied.target)
    assert code == 0 and json.loads(out)["dry_run"] is True
    code, out, _ = run(capsys, "get", "account_clicks", "account_id=42", "--target", applied.target)
    assert json.loads(out)["status"] == "MISSING"


def test_bad_records_name_file_and_line(
    applied: Running, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Violations point at the file's lines (blank lines counted) and nothing of the file is written."""
    path = write_jsonl(
        tmp_path / "bad.jsonl",
        [RECORDS[0], "", {**RECORDS[1], "account_id": 1.5}, {**RECORDS[1], "account_id": 3, "extra": 1}],
    )
    code, out, err = run(capsys, "push", "account_clicks", str(path), "--target", applied.target)
    assert (code, out) == (1, "")
    assert_one_error_line(err, f"  {path}:3: account_id: ", f"  {path}:4: extra: ")
    assert len(err.splitlines()) == 3
    code, out, _ = run(capsys, "get", "account_clicks", "account_id=42", "--target", applied.target)
    assert json.loads(out)["status"] == "MISSING"


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["push", "nosuch", "{records}"], ["NOT_FOUND", "nosuch"]),
        (["push", "account_clicks", "{missing}"], ["No such file or directory", "missing.jsonl"]),
        (["push", "account_clicks", "{not_json}"], ["not_json.jsonl:2: not valid JSON"]),
        (["push", "account_clicks", "{not_object}"], ["not_object.jsonl:1: each line must be a JSON object"]),
        (["get", "account_clicks", "account_id"], ["'account_id' is not KEY=VALUE"]),
        (["get", "account_clicks", "account_id=abc"], ["INVALID_ARGUMENT", "keys[0].account_id"]),
        (["get", "account_clicks", "user=1"], ["INVALID_ARGUMENT", "keys[0].user"]),
        (["apply", "{broken_defs}"], ["cli_definitions_", "SyntaxError"]),
        (["apply", "{empty_defs}"], ["defines no StreamSource"]),
        (["delete", "nosuch"], ["NOT_FOUND", "nosuch"]),
    ],
)
def test_errors_print_one_line_and_exit_1(
    applied: Running,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    fragments: list[str],
) -> None:
    """Each mistake prints `featurepush: error: ...` and returns 1, never a traceback."""
    files = {
        "records": write_jsonl(tmp_path / "records.jsonl", RECORDS),
        "missing": tmp_path / "missing.jsonl",
        "not_json": write_jsonl(tmp_path / "not_json.jsonl", [RECORDS[0], "{nope"]),
        "not_object": write_jsonl(tmp_path / "not_object.jsonl", [[1, 2]]),
        "broken_defs": definitions_file(tmp_path, "from featurepush import StreamSource\ndef broken(:\n"),
        "empty_defs": definitions_file(tmp_path, "X = 1\n"),
    }
    args = [a.format(**{k: str(v) for k, v in files.items()}) for a in argv]
    code, out, err = run(capsys, *args, "--target", applied.target)
    assert (code, out) == (1, "")
    assert_one_error_line(err, *fragments)


def test_unreachable_target_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A target with nothing listening gives one UNAVAILABLE line naming the address."""
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
        # Bound but not listening: connections are refused at once.
        code, out, err = run(capsys, "sources", "--target", f"localhost:{port}")
    assert (code, out) == (1, "")
    assert_one_error_line(err, "UNAVAILABLE", str(port))


@pytest.mark.parametrize(
    ("definitions_text", "fragments"),
    [
        ("x = (\n", ["SyntaxError"]),
        (
            "from featurepush import Field, StreamSource, String\n"
            "s = StreamSource(name='bad name', schema=[Field('a', String)], entity_keys=['a'], "
            "timestamp_field='a')\n",
            ["push source 'bad name' is not valid", "source.name:", "source.timestamp_field:"],
        ),
    ],
)
def test_serve_refuses_bad_definitions_in_one_clear_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, definitions_text: str, fragments: list[str]
) -> None:
    path = definitions_file(tmp_path, definitions_text)
    code, _, err = run(
        capsys,
        "serve",
        "--listen",
        "localhost:0",
        "--data-dir",
        str(tmp_path / "d"),
        "--definitions",
        str(path),
    )
    assert code == 1
    assert_one_error_line(err, *fragments)


def test_serve_on_a_busy_address_says_so(
    running: Running, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = run(capsys, "serve", "--listen", running.target, "--data-dir", str(tmp_path / "d"))
    assert code == 1
    assert_one_error_line(err, f"cannot listen on {running.target}")


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    import featurepush

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"featurepush {featurepush.__version__}"


NON_FINITE_VIEW = '''
"""A view of account_clicks' scores, which may be NaN or infinite."""
from datetime import timedelta
from featurepush import Aggregate, Field, Float64, StreamFeatureView
from {module} import clicks

scores = StreamFeatureView(
    name="scores",
    source=clicks,
    entities=["account_id"],
    schema=[Field("score", Float64)],
    aggregations=[
        Aggregate("score", "max", timedelta(days=1)),
        Aggregate("score", "last_n", timedelta(days=1), n=3),
    ],
    aggregation_interval=timedelta(hours=1),
)
'''


def strict_json(line: str) -> Any:
    """A JSON document, refusing the NaN and Infinity tokens that no JSON parser but Python's accepts."""

    def refuse(token: str) -> None:
        raise ValueError(f"{token} is not JSON")

    return json.loads(line, parse_constant=refuse)


def test_get_and_get_view_print_non_finite_floats_as_json_strings(
    applied: Running, definitions: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """NaN and the infinities print as proto3 JSON writes them, so the output stays JSON (jq reads it)."""
    target = ("--target", applied.target)
    views = definitions_file(tmp_path, NON_FINITE_VIEW.format(module=definitions.stem))
    assert run(capsys, "apply", str(views), *target)[0] == 0
    now = dt.datetime.now(dt.UTC)
    records = [
        {"account_id": n, "ts": now.isoformat(), "country": "NZ", "score": score}
        for n, score in ((1, "NaN"), (2, "Infinity"), (3, "-Infinity"))
    ]
    code, _, err = run(
        capsys, "push", "account_clicks", str(write_jsonl(tmp_path / "r.jsonl", records)), *target
    )
    assert (code, err) == (0, "")
    code, out, err = run(
        capsys, "get", "account_clicks", "account_id=1", "account_id=2", "account_id=3", *target
    )
    assert (code, err) == (0, "")
    assert [strict_json(line)["features"]["score"] for line in out.splitlines()] == [
        "NaN",
        "Infinity",
        "-Infinity",
    ]
    later = (now + dt.timedelta(hours=1)).isoformat()
    code, out, err = run(capsys, "get-view", "scores", "account_id=2", "--as-of", later, *target)
    assert (code, err) == (0, "")
    features = strict_json(out)["features"]
    assert (features["score_max_1d"]["value"], features["score_last_n_1d"]["value"]) == (
        "Infinity",
        ["Infinity"],
    )
