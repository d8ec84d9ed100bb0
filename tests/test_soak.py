"""A short run of the soak: kill -9 at random moments loses and duplicates nothing acknowledged."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parent.parent / "tools" / "soak.py"


@pytest.mark.parametrize("processes", ["1", "2"])
def test_a_short_soak_finds_no_problem(tmp_path: Path, processes: str) -> None:
    # With 2, each kill takes the supervisor, the store owner and both fronts, and the restart comes at
    # once on the port their connections left in TIME_WAIT; and the latest-event index holds 50 entities,
    # so it starts over within most writes and the evicted-key filter decides what is read.
    env = dict(os.environ, FEATUREPUSH_PROCESSES=processes)
    if processes == "2":
        env["FEATUREPUSH_LATEST_INDEX_ENTRIES"] = "50"
    done = subprocess.run(
        [sys.executable, str(SOAK), "--seconds", "15", "--work-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    counts = re.search(r"(\d+) kills, (\d+) pushes acknowledged, (\d+) records checked", done.stdout)
    assert counts is not None, done.stdout
    kills, pushes, checked = (int(g) for g in counts.groups())
    assert kills >= 1 and pushes >= 1 and checked >= pushes, done.stdout
