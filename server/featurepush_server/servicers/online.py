"""OnlineService over the core reader."""

from __future__ import annotations

import grpc

from featurepush.v1 import online_service_pb2 as pb
from featurepush.v1 import online_service_pb2_grpc as pb_grpc

from ..core.online import OnlineReader
from ..status import unary


class OnlineServicer(pb_grpc.OnlineServiceServicer):
    """Serves the latest record per entity."""

    def __init__(self, reader: OnlineReader):
        self._reader = reader

    @unary
    def GetFeatures(
        self, request: pb.GetFeaturesRequest, context: grpc.ServicerContext
    ) -> pb.GetFeaturesResponse:
        # The core assembles the reply from stored bytes; one C-level parse turns it into the message.
        return pb.GetFeaturesResponse.FromString(self._reader.get_features(request.source, request.keys))
