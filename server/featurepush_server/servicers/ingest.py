"""IngestService over the core ingestor."""

from __future__ import annotations

import grpc
from featurepush.v1 import ingest_service_pb2 as pb
from featurepush.v1 import ingest_service_pb2_grpc as pb_grpc

from ..core.ingest import Ingestor, PushOutcome, SourcePayload
from ..status import unary


def payloads(request: pb.PushRequest) -> dict[str, SourcePayload]:
    """The core's view of a PushRequest's records."""
    return {name: SourcePayload(recs.rows, recs.arrow_ipc) for name, recs in request.records.items()}


def push_response(outcome: PushOutcome) -> pb.PushResponse:
    """The PushResponse of a push outcome."""
    response = pb.PushResponse(dry_run=outcome.dry_run, replayed=outcome.replayed)
    for name, c in outcome.counts.items():
        response.counts[name].CopyFrom(pb.SourceCounts(accepted=c.accepted, written=c.written,
                                                       superseded=c.superseded))
    return response


class IngestServicer(pb_grpc.IngestServiceServicer):
    """Takes pushes, validates them and writes them to the online store."""

    def __init__(self, ingestor: Ingestor):
        self._ingestor = ingestor

    @unary
    def Push(self, request: pb.PushRequest, context: grpc.ServicerContext) -> pb.PushResponse:
        outcome = self._ingestor.push(payloads(request), dry_run=request.dry_run, request_id=request.request_id)
        return push_response(outcome)
