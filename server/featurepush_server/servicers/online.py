"""OnlineService over the core reader."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from featurepush.v1 import online_service_pb2 as pb
from featurepush.v1 import online_service_pb2_grpc as pb_grpc

from ..core.errors import InvalidInput, Violation
from ..core.online import OnlineReader
from ..core.wire import StringKeysRequest, string_keys_request
from ..status import unary

SERVICE = pb.DESCRIPTOR.services_by_name["OnlineService"].full_name
GET_FEATURES = f"/{SERVICE}/GetFeatures"
_STRUCT_FORMATS = (pb.RESPONSE_FORMAT_UNSPECIFIED, pb.RESPONSE_FORMAT_STRUCT)


def parse_get_features(data: bytes) -> pb.GetFeaturesRequest | StringKeysRequest:
    """Decode a GetFeatures request; its keys' strings are read from its bytes where they are all one field.

    Parsing a hundred keys' Structs, then writing them back to read their strings, costs several times
    reading the strings from the bytes that came in. protobuf's DecodeError for malformed bytes.
    """
    found = string_keys_request(data)
    return pb.GetFeaturesRequest.FromString(data) if found is None else found


# How the edge decodes requests where the generated deserializer would do more work than needed.
PARSERS: dict[str, Callable[[bytes], Any]] = {GET_FEATURES: parse_get_features}


class OnlineServicer(pb_grpc.OnlineServiceServicer):
    """Serves the latest record per entity."""

    def __init__(self, reader: OnlineReader):
        self._reader = reader

    def GetFeatures(
        self, request: pb.GetFeaturesRequest, context: grpc.ServicerContext
    ) -> pb.GetFeaturesResponse:
        return pb.GetFeaturesResponse.FromString(self.get_features_bytes(request, context))

    @unary
    def get_features_bytes(
        self, request: pb.GetFeaturesRequest | StringKeysRequest, context: grpc.ServicerContext
    ) -> bytes:
        """GetFeatures' reply already serialized: the core assembles it from stored bytes."""
        if request.response_format == pb.RESPONSE_FORMAT_ARROW:
            return self._reader.get_features_arrow(request)
        if request.response_format not in _STRUCT_FORMATS:
            raise InvalidInput(
                f"unknown response_format {request.response_format}",
                [Violation("response_format", "use RESPONSE_FORMAT_STRUCT or RESPONSE_FORMAT_ARROW")],
                reason="UNKNOWN_RESPONSE_FORMAT",
            )
        return self._reader.get_features(request)

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        """The service's handlers; GetFeatures sends the core's bytes as they are, never re-encoded."""
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "GetFeatures": grpc.unary_unary_rpc_method_handler(
                    self.get_features_bytes, request_deserializer=pb.GetFeaturesRequest.FromString
                )
            },
        )
