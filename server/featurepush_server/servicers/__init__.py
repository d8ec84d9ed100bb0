"""gRPC servicers: thin translations between protobuf messages and the core."""
