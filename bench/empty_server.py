"""A gRPC server whose handlers do nothing: the ceiling of what Python gRPC moves on this machine."""

from __future__ import annotations

import argparse
import signal
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc


def write_frames(path: Path, frames: list[bytes]) -> None:
    """Store serialized replies for --stream-frames."""
    with open(path, "wb") as fh:
        for frame in frames:
            fh.write(len(frame).to_bytes(4, "big") + frame)


def read_frames(path: Path) -> list[bytes]:
    """The replies stored by write_frames."""
    data = path.read_bytes()
    frames, at = [], 0
    while at < len(data):
        size = int.from_bytes(data[at : at + 4], "big")
        frames.append(data[at + 4 : at + 4 + size])
        at += 4 + size
    return frames


def main() -> None:
    """Serve Push, PushStream, GetFeatures and ReadBatchSource with canned replies until SIGTERM."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--get-response", type=Path)
    parser.add_argument("--stream-frames", type=Path, help="ReadBatchSource replies, length-prefixed")
    args = parser.parse_args()
    canned = args.get_response.read_bytes() if args.get_response else b""
    frames = read_frames(args.stream_frames) if args.stream_frames else []

    def push(request: bytes, context: grpc.ServicerContext) -> bytes:
        return b""

    def push_stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        for _ in requests:
            yield b""

    def get_features(request: bytes, context: grpc.ServicerContext) -> bytes:
        return canned

    def read_batch_source(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield from frames

    handlers = {
        "featurepush.v1.IngestService": {
            "Push": grpc.unary_unary_rpc_method_handler(push),
            "PushStream": grpc.stream_stream_rpc_method_handler(push_stream),
        },
        "featurepush.v1.OnlineService": {"GetFeatures": grpc.unary_unary_rpc_method_handler(get_features)},
        "featurepush.v1.BackfillService": {
            "ReadBatchSource": grpc.unary_stream_rpc_method_handler(read_batch_source)
        },
    }
    options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=options)
    for service, methods in handlers.items():
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, methods),))
    server.add_insecure_port(f"localhost:{args.port}")
    server.start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    done.wait()
    server.stop(None)


if __name__ == "__main__":
    main()
