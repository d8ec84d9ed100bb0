"""RegistryService over the core registry."""

from __future__ import annotations

import logging

import grpc

from featurepush.v1 import registry_service_pb2 as pb
from featurepush.v1 import registry_service_pb2_grpc as pb_grpc

from ..core.errors import shown
from ..core.registry import Registry
from ..status import unary
from .calls import stop_check

_LOGGER = logging.getLogger(__name__)


class RegistryServicer(pb_grpc.RegistryServiceServicer):
    """Apply, get, list and delete push sources."""

    def __init__(self, registry: Registry):
        self._registry = registry

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
