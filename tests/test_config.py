"""load_config: defaults < the TOML file's [server] table < FEATUREPUSH_* environment < flags."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from featurepush_server.config import ConfigError, ServerConfig, load_config


def toml_file(folder: Path, text: str) -> Path:
    """A config file holding `text`."""
    path = folder / "featurepush.toml"
    path.write_text(text)
    return path


def test_defaults() -> None:
    """With no file, environment or flags, the defaults are safe ones."""
    config = load_config(env={})
    assert config == ServerConfig()
    assert (config.listen, config.fsync, config.max_records_per_request) == (
        "localhost:50051",
        "always",
        10_000,
    )


FILE = """
[server]
listen = "0.0.0.0:6000"
allow_unauthenticated = true
fsync = "never"
max_records_per_request = 500
workers = 4
data_dir = "/srv/featurepush"
definitions = ["/etc/a.py", "/etc/b.py"]
"""


@pytest.mark.parametrize(
    ("env", "flags", "expected"),
    [
        ({}, {}, {"listen": "0.0.0.0:6000", "fsync": "never", "max_records_per_request": 500, "workers": 4}),
        (
            {"FEATUREPUSH_LISTEN": "localhost:7000", "FEATUREPUSH_MAX_RECORDS_PER_REQUEST": "250"},
            {},
            {"listen": "localhost:7000", "fsync": "never", "max_records_per_request": 250, "workers": 4},
        ),
        (
            {"FEATUREPUSH_LISTEN": "localhost:7000", "FEATUREPUSH_FSYNC": "always"},
            {"listen": "localhost:8000", "max_records_per_request": 7, "fsync": None},
            {"listen": "localhost:8000", "fsync": "always", "max_records_per_request": 7, "workers": 4},
        ),
        (
            {"FEATUREPUSH_DATA_DIR": "/var/fp", "FEATUREPUSH_DEFINITIONS": "/x.py,/y.py"},
            {"workers": 2},
            {"data_dir": Path("/var/fp"), "definitions": (Path("/x.py"), Path("/y.py")), "workers": 2},
        ),
        (
            {
                "FEATUREPUSH_IDEMPOTENCY_WINDOW_S": "1.5",
                "OTHER_LISTEN": "ignored:1",
                "FEATUREPUSH_UNKNOWN": "x",
            },
            {"data_dir": Path("/flag/dir")},
            {"idempotency_window_s": 1.5, "data_dir": Path("/flag/dir"), "listen": "0.0.0.0:6000"},
        ),
    ],
    ids=["file", "env-over-file", "flags-over-env", "paths-and-lists", "floats-and-foreign-vars"],
)
def test_precedence(
    tmp_path: Path, env: dict[str, str], flags: dict[str, Any], expected: dict[str, Any]
) -> None:
    """Each layer overrides the one below it, setting by setting; a None flag means not given."""
    config = load_config(toml_file(tmp_path, FILE), env=env, overrides=flags)
    assert {name: getattr(config, name) for name in expected} == expected


def test_file_values_under_env_and_flags_stay() -> None:
    """Settings no layer mentions keep their defaults."""
    config = load_config(env={"FEATUREPUSH_WORKERS": "3"}, overrides={"fsync": "never"})
    assert (config.workers, config.fsync, config.max_keys_per_request) == (3, "never", 10_000)


def test_relative_data_dir_is_relative_to_the_file(tmp_path: Path) -> None:
    """A relative data_dir in the file is taken from the file's folder, not the working directory."""
    config = load_config(toml_file(tmp_path, '[server]\ndata_dir = "data"\n'), env={})
    assert config.data_dir == tmp_path / "data"


def test_a_file_without_a_server_table_is_read_whole(tmp_path: Path) -> None:
    """Settings at the top level of the file work too."""
    assert load_config(toml_file(tmp_path, "workers = 9\n"), env={}).workers == 9


@pytest.mark.parametrize(
    ("text", "env", "flags", "match"),
    [
        (
            '[server]\nlisten = "localhost:1"\nport = 5\n',
            {},
            {},
            r"unknown setting 'port' in .*featurepush\.toml",
        ),
        ('[server]\nfsync = "sometimes"\n', {}, {}, r"fsync must be one of always, never, not 'sometimes'"),
        ("", {"FEATUREPUSH_FSYNC": "sometimes"}, {}, r"fsync must be one of always, never, not 'sometimes'"),
        ("", {}, {"fsync": "sometimes"}, r"fsync must be one of always, never, not 'sometimes'"),
        ('[server]\nlisten = "nohost"\n', {}, {}, r"listen must be host:port.*not 'nohost'"),
        ("", {"FEATUREPUSH_LISTEN": ":50051"}, {}, r"listen must be host:port.*not ':50051'"),
        ("", {}, {"listen": "localhost:http"}, r"listen must be host:port.*not 'localhost:http'"),
        ("", {}, {"listen": "localhost:99999"}, r"listen must be host:port with a port up to 65535"),
        ("", {}, {"metrics_listen": "localhost:65536"}, r"metrics_listen must be .* up to 65535"),
        (
            "[server]\nmax_records_per_request = 0\n",
            {},
            {},
            r"max_records_per_request must be at least 1, not 0",
        ),
        ("", {"FEATUREPUSH_WORKERS": "0"}, {}, r"workers must be at least 1, not 0"),
        ("", {}, {"max_message_bytes": -1}, r"max_message_bytes must be at least 1, not -1"),
        (
            "[server]\nmax_records_per_request = 2.5\n",
            {},
            {},
            r"max_records_per_request must be an? int, not 2\.5",
        ),
        ("[server]\nworkers = true\n", {}, {}, r"workers must be an? int, not True"),
        (
            "",
            {"FEATUREPUSH_MAX_RECORDS_PER_REQUEST": "many"},
            {},
            r"max_records_per_request must be an? int.*'many'",
        ),
        ("", {"FEATUREPUSH_IDEMPOTENCY_WINDOW_S": "soon"}, {}, r"idempotency_window_s must be a float"),
        ("[server]\nidempotency_window_s = 0\n", {}, {}, r"idempotency_window_s must be positive"),
        ("[server\nlisten = 1\n", {}, {}, r"cannot read config file .*featurepush\.toml"),
        ("", {}, {"latest_index_bytes": -1}, r"latest_index_bytes must not be negative \(0 derives"),
    ],
)
def test_invalid_settings_are_refused(
    tmp_path: Path, text: str, env: dict[str, str], flags: dict[str, Any], match: str
) -> None:
    """Unknown keys and bad values raise ConfigError naming the setting, the bad value and what is allowed."""
    with pytest.raises(ConfigError, match=match):
        load_config(toml_file(tmp_path, text), env=env, overrides=flags)


def test_the_latest_event_index_is_sized_from_memory_unless_configured() -> None:
    """A sixteenth of memory, from 256 MiB to 4 GiB, bytes binding first; a set bound is kept as set."""
    config = ServerConfig()
    gib = 1 << 30
    assert config.latest_index_bounds(2 * gib) == (2 * 1024 * 1024, 256 << 20)
    assert config.latest_index_bounds(24 * gib) == (12 * 1024 * 1024, 24 * gib // 16)
    assert config.latest_index_bounds(512 * gib) == (32 * 1024 * 1024, 4 * gib)
    set_ = ServerConfig(latest_index_entries=1000, latest_index_bytes=1 << 20)
    assert set_.latest_index_bounds(24 * gib) == (1000, 1 << 20)
    assert ServerConfig(latest_index_entries=1000).latest_index_bounds(2 * gib) == (1000, 256 << 20)


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    """A config path that does not exist is reported as such."""
    with pytest.raises(ConfigError, match=r"cannot read config file .*nope\.toml"):
        load_config(tmp_path / "nope.toml", env={})


def test_the_config_is_frozen() -> None:
    """A loaded configuration cannot be changed afterwards."""
    config = load_config(env={})
    with pytest.raises(AttributeError):
        config.fsync = "never"  # type: ignore[misc]


def test_the_example_config_file_loads_with_paths_relative_to_it() -> None:
    example = Path(__file__).resolve().parent.parent / "examples" / "featurepush.toml"
    config = load_config(example, env={})
    # Not `make run`'s ./data: a server from each may run at once.
    assert config.data_dir.resolve() == (example.parent.parent / "data-example").resolve()
    assert [p.resolve() for p in config.definitions] == [(example.parent / "ad_impressions.py").resolve()]
    assert config.definitions[0].exists()
