"""A short fuzzing run of every RPC is part of the suite; `make fuzz` runs a longer one."""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import random
from pathlib import Path
from types import ModuleType

import featurepush.v1

FUZZ = Path(__file__).resolve().parent.parent / "tools" / "fuzz.py"


def load_fuzz() -> ModuleType:
    """tools/fuzz.py as a module."""
    spec = importlib.util.spec_from_file_location("featurepush_fuzz", FUZZ)
    assert spec is not None and spec.loader is not None
    fuzz = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fuzz)
    return fuzz


def test_the_fuzz_calls_every_method_of_every_featurepush_service() -> None:
    wanted = set()
    for info in pkgutil.iter_modules(featurepush.v1.__path__):
        if info.name.endswith("_pb2"):
            module = importlib.import_module(f"featurepush.v1.{info.name}")
            for service in module.DESCRIPTOR.services_by_name.values():
                wanted |= {f"/{service.full_name}/{m.name}" for m in service.methods}
    assert "/featurepush.v1.FeatureViewService/GetViewFeatures" in wanted
    called = {path for path, _ in load_fuzz()._services()}
    assert wanted <= called, sorted(wanted - called)


def test_a_short_fuzzing_run_gets_only_deliberate_statuses_and_the_server_stays_up() -> None:
    fuzz = load_fuzz()
    lines: list[str] = []
    seed = random.randrange(2**32)
    ok = fuzz.run(8.0, seed, out=lines.append)
    assert ok, "\n".join(lines)
    assert "calls in" in lines[0]
