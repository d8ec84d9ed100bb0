"""A short fuzzing run of every RPC is part of the suite; `make fuzz` runs a longer one."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

FUZZ = Path(__file__).resolve().parent.parent / "tools" / "fuzz.py"


def test_a_short_fuzzing_run_gets_only_deliberate_statuses_and_the_server_stays_up() -> None:
    spec = importlib.util.spec_from_file_location("featurepush_fuzz", FUZZ)
    assert spec is not None and spec.loader is not None
    fuzz = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fuzz)
    lines: list[str] = []
    seed = random.randrange(2**32)
    ok = fuzz.run(8.0, seed, out=lines.append)
    assert ok, "\n".join(lines)
    assert "calls in" in lines[0]
