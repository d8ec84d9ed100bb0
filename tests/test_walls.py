"""Walls that must hold at run time: the core loads no grpc, and every hand-written tag matches its field."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FieldDescriptor

import featurepush.v1.backfill_service_pb2
import featurepush.v1.online_service_pb2  # noqa: F401 - registers the messages the tags belong to
from featurepush import reads
from featurepush.v1 import online_service_pb2
from featurepush_server.core import wire

_WIRE_TYPES = {
    FieldDescriptor.TYPE_DOUBLE: 1,
    FieldDescriptor.TYPE_FIXED64: 1,
    FieldDescriptor.TYPE_SFIXED64: 1,
    FieldDescriptor.TYPE_FLOAT: 5,
    FieldDescriptor.TYPE_FIXED32: 5,
    FieldDescriptor.TYPE_SFIXED32: 5,
    FieldDescriptor.TYPE_STRING: 2,
    FieldDescriptor.TYPE_BYTES: 2,
    FieldDescriptor.TYPE_MESSAGE: 2,
}


def _run(code: str) -> str:
    """Run `code` in a fresh interpreter and return what it printed."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_core_imports_no_grpc() -> None:
    loaded = _run(
        """
        import importlib, pkgutil, sys
        import featurepush_server.core as core
        for module in pkgutil.walk_packages(core.__path__, core.__name__ + "."):
            importlib.import_module(module.name)
            assert "grpc" not in sys.modules, f"{module.name} loads grpc"
        print(sorted(m for m in sys.modules if m.startswith("featurepush_server.")))
        """
    )
    # The walk did reach the core, the store backends included.
    assert "featurepush_server.core.stores.rocksdb" in loaded
    assert "featurepush_server.core.materialize" in loaded


def test_a_backfill_worker_starts_without_the_readers_only_a_front_needs(tmp_path) -> None:
    # pyarrow.dataset (and the pandas it loads) takes a quarter of a second to import and memory in each
    # front's fork server; a worker never reads a batch source. The fork server never runs gRPC, and
    # imports no rocksdict, so no RocksDB state is copied into a worker.
    loaded = _run(
        f"""
        import importlib, os, sys
        from featurepush_server import workers
        for name in workers._PRELOAD:
            importlib.import_module(name)
        print(sorted(m for m in ("pandas", "pyarrow.dataset", "grpc", "rocksdict") if m in sys.modules))
        front = (os.getpid(), workers._started(os.getpid()))
        socket, catalog = {str(tmp_path / "owner.sock")!r}, {str(tmp_path / "catalog")!r}
        workers._start_worker(socket, catalog, [], "INFO", "text", front)
        from featurepush_server.core import backfill
        assert backfill._worker_loader is not None
        print(sorted(m for m in ("pandas", "pyarrow.dataset", "grpc") if m in sys.modules))
        """
    )
    assert loaded.split() == ["[]", "[]"]


def test_a_backfill_worker_does_not_import_the_module_its_front_runs_as_main() -> None:
    # A front runs as `python -m featurepush_server.processes`; a worker forked from its fork server runs
    # that module again as its main, and Python warns of it when the preload had imported it already.
    loaded = _run(
        """
        import importlib, sys
        from featurepush_server import workers
        for name in workers._PRELOAD:
            importlib.import_module(name)
        print("featurepush_server.processes" in sys.modules)
        """
    )
    assert loaded.split() == ["False"]


def test_the_client_package_still_resolves_its_names() -> None:
    out = _run(
        """
        import sys
        import featurepush
        assert "grpc" not in sys.modules
        print(featurepush.Client.__module__, featurepush.Int64, "grpc" in sys.modules)
        from featurepush import PushConfig, InvalidArgumentError
        print(sorted(set(featurepush.__all__) - set(dir(featurepush))))
        """
    )
    assert out.splitlines()[0] == "featurepush.client Int64 True"
    assert out.splitlines()[1] == "[]"


def test_an_unknown_name_is_an_attribute_error() -> None:
    import featurepush

    with pytest.raises(AttributeError, match="no attribute 'Nothing'"):
        featurepush.Nothing  # noqa: B018


def test_every_tag_constant_is_checked() -> None:
    constants = {name for name, value in vars(wire).items() if name.isupper() and isinstance(value, bytes)}
    assert constants == set(wire.TAGS)


@pytest.mark.parametrize(("constant", "field"), sorted(wire.TAGS.items()))
def test_hand_written_tag_matches_the_descriptor(constant: str, field: tuple[str, str]) -> None:
    message, name = field
    descriptor = descriptor_pool.Default().FindMessageTypeByName(message).fields_by_name[name]
    wire_type = _WIRE_TYPES.get(descriptor.type, 0)
    assert getattr(wire, constant) == wire.varint(descriptor.number << 3 | wire_type)


@pytest.mark.parametrize(("constant", "field"), sorted(reads.TAGS.items()))
def test_the_clients_hand_written_tag_matches_the_descriptor(constant: str, field: tuple[str, str]) -> None:
    message, name = field
    descriptor = descriptor_pool.Default().FindMessageTypeByName(message).fields_by_name[name]
    wire_type = _WIRE_TYPES.get(descriptor.type, 0)
    assert getattr(reads, constant) == wire.varint(descriptor.number << 3 | wire_type)


def test_the_clients_hand_written_request_parses_as_the_keys() -> None:
    keys = ["", "u1", "é" * 200, "k" * 300, {"user_id": "u2"}]
    data = reads.get_features_request("s", keys, ["user_id"], columnar=True)
    request = online_service_pb2.GetFeaturesRequest.FromString(data)
    assert request.source == "s" and request.response_format == online_service_pb2.RESPONSE_FORMAT_ARROW
    assert [dict(k) for k in request.keys] == [{"user_id": k} for k in keys[:4]] + [{"user_id": "u2"}]
