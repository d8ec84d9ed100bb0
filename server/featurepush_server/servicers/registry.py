"""RegistryService over the core registry."""

from __future__ import annotations

import logging

import grpc

from featurepush.v1 import registry_service_pb2 as pb
from featurepush.v1 import registry_service_pb2_grpc as pb_grpc

from ..core.errors import shown
from ..core.registry import Registry
from ..core.server_status import StatusReporter
from ..status import unary
from .calls import stop_check

_LOGGER = logging.getLogger(__name__)


class RegistryServicer(pb_grpc.RegistryServiceServicer):
    """Apply, get, list and delete push sources, and report the server's state."""

    def __init__(self, registry: Registry, status: StatusReporter):
        self._registry = registry
        self._status = status

    @unary
    def ApplySource(
        self, request: pb.ApplySourceRequest, context: grpc.ServicerContext
    ) -> pb.ApplySourceResponse:
        outcome = self._registry.apply(
            request.source, validate_only=request.validate_only, stop=stop_check(context)
        )
        if not request.validate_only:
            state = "created" if outcome.created else "changed" if outcome.changed else "unchanged"
            _LOGGER.info("source %r applied: %s", shown(request.source.name), state)
        return pb.ApplySourceResponse(source=outcome.source, changed=outcome.changed, created=outcome.created)

    @unary
    def GetSource(self, request: pb.GetSourceRequest, context: grpc.ServicerContext) -> pb.GetSourceResponse:
        return pb.GetSourceResponse(source=self._registry.get(request.name).spec.proto)

    @unary
    def ListSources(
        self, request: pb.ListSourcesRequest, context: grpc.ServicerContext
    ) -> pb.ListSourcesResponse:
        sources, token = self._registry.list(request.page_size, request.page_token)
        return pb.ListSourcesResponse(sources=sources, next_page_token=token)

    @unary
    def DeleteSource(
        self, request: pb.DeleteSourceRequest, context: grpc.ServicerContext
    ) -> pb.DeleteSourceResponse:
        rows = self._registry.delete(request.name)
        _LOGGER.info("source %r deleted with %d online rows", shown(request.name), rows)
        return pb.DeleteSourceResponse(rows_deleted=rows)

    @unary
    def GetServerStatus(
        self, request: pb.GetServerStatusRequest, context: grpc.ServicerContext
    ) -> pb.GetServerStatusResponse:
        state = self._status.report(exact=request.exact, stop=stop_check(context))
        return pb.GetServerStatusResponse(
            version=state.version,
            uptime_seconds=state.uptime_s,
            writes_accepted=state.writes_accepted,
            store_bytes=state.store_bytes,
            offline_log_lag_seconds=state.offline_lag_s,
            offline_log_queued_entries=state.offline_queued,
            sources=[
                pb.SourceStatus(name=s.name, row_count=s.rows, row_count_exact=s.exact) for s in state.sources
            ],
            store_warnings=state.store_warnings,
        )
