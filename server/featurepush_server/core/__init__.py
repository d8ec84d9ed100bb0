"""The server's core: plain Python that never imports grpc."""
