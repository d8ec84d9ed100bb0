"""`featurepush keys` and `featurepush serve` with keys: what is printed, stored and logged."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from featurepush import Client, InvalidArgumentError, PermissionDeniedError, UnauthenticatedError
from featurepush_server.cli import main
from featurepush_server.core.keys import read_keys, split_key

KEY = re.compile(r"^fpk_[0-9a-f]{12}_[A-Za-z0-9_-]{43}$")
T0 = "2026-01-01T00:00:00Z"
RECORD_VALUE = "record-value-never-logged-91c2"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def create(capsys: pytest.CaptureFixture[str], keys_file: Path, *args: str) -> str:
    code, out, err = run(capsys, "keys", "create", "--keys-file", str(keys_file), *args)
    assert code == 0 and "shown only this once" in err
    assert KEY.match(out.strip()), "stdout holds the key alone"
    return out.strip()


def test_create_list_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys_file = tmp_path / "secrets" / "keys.json"
    reader = create(capsys, keys_file, "--scope", "read", "--name", "dashboards")
    pusher = create(capsys, keys_file, "--scope", "ingest,read")
    assert os.stat(keys_file).st_mode & 0o777 == 0o600
    stored = keys_file.read_text()
    code, out, _ = run(capsys, "keys", "list", "--keys-file", str(keys_file))
    assert code == 0
    for key in (reader, pusher):
        key_id, secret = split_key(key) or ("", "")
        assert secret not in stored and secret not in out and key_id in out
    lines = out.splitlines()
    assert len(lines) == 2 and "dashboards  read  created" in lines[0] and "read,ingest" in lines[1]
    assert all(line.endswith("active") for line in lines)
    hashes = [k["sha256"] for k in json.loads(stored)["keys"]]
    assert not any(h in out for h in hashes)

    reader_id = (split_key(reader) or ("", ""))[0]
    code, out, _ = run(capsys, "keys", "revoke", "--keys-file", str(keys_file), reader_id)
    assert code == 0 and f"key {reader_id} revoked" in out
    out = run(capsys, "keys", "list", "--keys-file", str(keys_file))[1]
    assert "revoked 20" in out.splitlines()[0]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["create", "--scope", "write"], "unknown scope 'write'; scopes are read, ingest, backfill, admin"),
        (["create", "--scope", ","], "a key needs at least one scope"),
        (["revoke", "0123456789ab"], "no key '0123456789ab'"),
        (["list"], "cannot read keys file"),
    ],
)
def test_mistakes_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    keys_file = tmp_path / ("keys.json" if argv[0] != "revoke" else "k.json")
    if argv[0] == "revoke":
        create(capsys, keys_file, "--scope", "read")
    code, _, err = run(capsys, "keys", argv[0], "--keys-file", str(keys_file), *argv[1:])
    assert code == 1 and err.count("\n") == 1 and message in err


def test_keys_file_from_the_config_or_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "featurepush.toml"
    config.write_text('[server]\nkeys_file = "keys.json"\n')
    create(capsys, tmp_path / "keys.json", "--scope", "admin")
    assert len(run(capsys, "keys", "list", "--config", str(config))[1].splitlines()) == 1
    monkeypatch.setenv("FEATUREPUSH_KEYS_FILE", str(tmp_path / "keys.json"))
    assert len(run(capsys, "keys", "list")[1].splitlines()) == 1
    monkeypatch.delenv("FEATUREPUSH_KEYS_FILE")
    code, _, err = run(capsys, "keys", "list")
    assert code == 1 and "no keys file" in err


def test_serve_refuses_a_reachable_address_without_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "serve", "--listen", "0.0.0.0:0", "--data-dir", str(tmp_path / "d"))
    assert code == 1 and err.count("\n") == 1 and "no keys_file is set" in err


class Serve:
    """`featurepush serve` in a child process; its whole stderr is kept for inspection."""

    def __init__(self, *argv: str) -> None:
        cmd = [sys.executable, "-m", "featurepush_server.cli", "serve", "--listen", "localhost:0", *argv]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        self.lines: list[str] = []
        self.port = 0
        for line in self.proc.stderr:
            self.lines.append(line)
            match = re.search(r"\(port (\d+)\)", line)
            if match:
                self.port = int(match.group(1))
                break
        self._drain = threading.Thread(target=lambda: self.lines.extend(self.proc.stderr or ()), daemon=True)
        self._drain.start()
        assert self.port, "".join(self.lines)

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        self._drain.join()
        assert self.proc.stderr is not None
        self.proc.stderr.close()
        return "".join(self.lines)


def test_serve_never_logs_keys_or_record_values(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys_file = tmp_path / "keys.json"
    admin = create(capsys, keys_file, "--scope", "admin")
    reader = create(capsys, keys_file, "--scope", "read")
    definitions = Path(__file__).parent.parent / "examples" / "ad_impressions.py"
    server = Serve(
        "--data-dir", str(tmp_path / "data"), "--keys-file", str(keys_file), "--definitions", str(definitions)
    )
    source = "ad_impressions"
    try:
        target = f"localhost:{server.port}"
        record = {"user_id": RECORD_VALUE, "timestamp": T0, "clicked": 1}
        with Client(target, api_key=admin) as client:
            client.push(source, [record])
            with pytest.raises(InvalidArgumentError):
                client.push(source, [{**record, "clicked": RECORD_VALUE}])
        attempts = [
            (reader, PermissionDeniedError),
            (admin[:-2] + "xx", UnauthenticatedError),
            ("fpk_nonsense", UnauthenticatedError),
        ]
        for key, error in attempts:
            with Client(target, api_key=key) as client, pytest.raises(error):
                client.push(source, [record])
    finally:
        log = server.stop()
    assert "API keys required" in log and "refused" in log
    for key in (admin, reader):
        assert key not in log and (split_key(key) or ("", ""))[1] not in log
    assert RECORD_VALUE not in log and "fpk_nonsense" not in log


def test_keys_created_by_several_processes_at_once_all_land(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.json"
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from featurepush_server.core.keys import add_key\n"
        "for i in range(15):\n"
        "    add_key(Path(sys.argv[1]), ['read'], name=f'{sys.argv[2]}-{i}')\n"
    )
    writers = [subprocess.Popen([sys.executable, "-c", script, str(keys_file), f"w{n}"]) for n in range(4)]
    assert [w.wait(timeout=120) for w in writers] == [0, 0, 0, 0]
    names = {k.name for k in read_keys(keys_file).values()}
    assert names == {f"w{n}-{i}" for n in range(4) for i in range(15)}
