"""CPU time of the core's GetViewFeatures read, without gRPC: the read scenario's view, store and keys.

Builds a server over a RocksDB in a temporary folder, applies bench/views.py's read view, fills every
entity's 24 one-hour tiles, then times `ViewReader.get` in this thread (time.thread_time), so that other
work on the machine counts little. `--profile` prints a cProfile of the 100-entity reads instead.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime as dt
import pstats
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc

from bench.views import GET_VIEW, PUSH, READ_VIEW, _get_payload, _push_payload
from featurepush import Client
from featurepush.v1 import feature_view_service_pb2 as fv_pb
from featurepush_server.app import create_server
from featurepush_server.config import ServerConfig
from featurepush_server.core.aggregates import ViewReader


def _per_call(reader: ViewReader, request: fv_pb.GetViewFeaturesRequest, calls: int, rounds: int) -> float:
    """The least over `rounds` of the thread CPU microseconds per call of `calls` reads."""
    found = []
    for _ in range(rounds):
        start = time.thread_time()
        for _ in range(calls):
            reader.get(request)
        found.append((time.thread_time() - start) / calls * 1e6)
    return min(found)


@contextlib.contextmanager
def loaded() -> Iterator[tuple[ViewReader, fv_pb.GetViewFeaturesRequest, fv_pb.GetViewFeaturesRequest]]:
    """A started server with the read scenario's tiles: its view reader, a read of 100 entities and of one."""
    from bench.run import AD_IMPRESSIONS

    now = dt.datetime.now(dt.UTC)
    with tempfile.TemporaryDirectory(prefix="featurepush-view-cpu-") as tmp:
        server = create_server(ServerConfig(listen="localhost:0", data_dir=Path(tmp) / "data"))
        server.start()
        try:
            target = f"localhost:{server.port}"
            with Client(target) as client:
                client.apply(AD_IMPRESSIONS)
                client.apply_views(READ_VIEW)
            with grpc.insecure_channel(target) as channel:
                push = channel.unary_unary(PUSH)
                for w in range(2):
                    for _ in range(3):
                        push(_push_payload(w, 4000, now, 100))
                # The reply over gRPC, as a check that the reads below are the bench's.
                channel.unary_unary(GET_VIEW)(_get_payload(0, 100))
            assert server.views is not None
            reader = ViewReader(server.views, server.store)
            many = fv_pb.GetViewFeaturesRequest.FromString(_get_payload(0, 100))
            one = fv_pb.GetViewFeaturesRequest.FromString(_get_payload(0, 1))
            yield reader, many, one
        finally:
            server.stop(None)


def main() -> None:
    """Print the CPU microseconds per read of 100 entities and of one."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    with loaded() as (reader, many, one):
        if args.profile:
            profile = cProfile.Profile()
            profile.enable()
            for _ in range(args.calls * args.rounds):
                reader.get(many)
            profile.disable()
            pstats.Stats(profile).sort_stats("tottime").print_stats(30)
            return
        _per_call(reader, many, args.calls // 4, 1)
        hundred = _per_call(reader, many, args.calls, args.rounds)
        single = _per_call(reader, one, args.calls, args.rounds)
        print(f"read of 100 entities: {hundred:.1f} us CPU per call; of 1 entity: {single:.1f} us")


if __name__ == "__main__":
    main()
