"""The descriptors reflection serves: featurepush's own files with their comments, the rest as loaded."""

from __future__ import annotations

from importlib import resources
from typing import Any, Protocol

from google.protobuf import descriptor_pb2

# Written by `make generate` with --include_source_info: the generated stubs carry no comments.
DESCRIPTOR_SET = "featurepush.binpb"


class _Pool(Protocol):
    def FindFileByName(self, name: str) -> Any: ...  # noqa: N802 - the pool's own method names

    def FindFileContainingSymbol(self, symbol: str) -> Any: ...  # noqa: N802


def documented_files() -> dict[str, descriptor_pb2.FileDescriptorProto]:
    """The files of the packaged descriptor set by name, each with its source info (comments)."""
    raw = resources.files("featurepush.v1").joinpath(DESCRIPTOR_SET).read_bytes()
    return {f.name: f for f in descriptor_pb2.FileDescriptorSet.FromString(raw).file}


class _DocumentedFile:
    """A file descriptor whose CopyToProto adds the source info of its documented copy."""

    def __init__(self, descriptor: Any, documented: dict[str, descriptor_pb2.FileDescriptorProto]):
        self._descriptor = descriptor
        self._documented = documented
        self.name: str = descriptor.name

    @property
    def dependencies(self) -> list[_DocumentedFile]:
        """The files this one imports, documented alike."""
        return [_DocumentedFile(d, self._documented) for d in self._descriptor.dependencies]

    def CopyToProto(self, proto: descriptor_pb2.FileDescriptorProto) -> None:  # noqa: N802
        """Fill `proto` as the pool does, plus the comments of the documented copy where there is one."""
        self._descriptor.CopyToProto(proto)
        documented = self._documented.get(self.name)
        # Only the source info is taken: protoc's full descriptors also set json_name, which would
        # turn grpcurl's JSON from the proto's field names to lowerCamelCase. Both copies come from the
        # same .proto (the stub check sees to it), so the source info's element paths match.
        if documented is not None:
            proto.source_code_info.CopyFrom(documented.source_code_info)


class DocumentedPool:
    """A view of a descriptor pool for reflection whose files come with the comments of the .proto files.

    Lookups go to the wrapped pool, which knows every service the server registers (health and
    reflection included); only the files it answers with are swapped for their documented copies.
    """

    def __init__(self, pool: _Pool, documented: dict[str, descriptor_pb2.FileDescriptorProto]):
        self._pool = pool
        self._documented = documented

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)

    def FindFileByName(self, name: str) -> _DocumentedFile:  # noqa: N802 - the pool's own method name
        """The file called `name`."""
        return _DocumentedFile(self._pool.FindFileByName(name), self._documented)

    def FindFileContainingSymbol(self, symbol: str) -> _DocumentedFile:  # noqa: N802
        """The file defining `symbol`."""
        return _DocumentedFile(self._pool.FindFileContainingSymbol(symbol), self._documented)
