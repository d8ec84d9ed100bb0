"""FeatureViewService over the core views registry and view reader."""

from __future__ import annotations

import logging
from typing import Any

import grpc

from featurepush.v1 import feature_view_service_pb2 as pb
from featurepush.v1 import feature_view_service_pb2_grpc as pb_grpc

from ..core.aggregates import ViewReader
from ..core.errors import shown
from ..core.views import Views
from ..status import unary

_LOGGER = logging.getLogger(__name__)
SERVICE = pb.DESCRIPTOR.services_by_name["FeatureViewService"].full_name


class FeatureViewServicer(pb_grpc.FeatureViewServiceServicer):
    """Apply, get, list and delete views and feature services; read their features."""

    def __init__(self, views: Views, reader: ViewReader):
        self._views = views
        self._reader = reader

    @unary
    def ApplyFeatureView(
        self, request: pb.ApplyFeatureViewRequest, context: grpc.ServicerContext
    ) -> pb.ApplyFeatureViewResponse:
        outcome = self._views.apply(request.view, validate_only=request.validate_only)
        if not request.validate_only:
            state = "created" if outcome.created else "changed" if outcome.changed else "unchanged"
            _LOGGER.info("feature view %r applied: %s", shown(request.view.name), state)
        return pb.ApplyFeatureViewResponse(
            view=outcome.message, changed=outcome.changed, created=outcome.created
        )

    @unary
    def GetFeatureView(
        self, request: pb.GetFeatureViewRequest, context: grpc.ServicerContext
    ) -> pb.GetFeatureViewResponse:
        return pb.GetFeatureViewResponse(view=self._views.get(request.name).spec.proto)

    @unary
    def ListFeatureViews(
        self, request: pb.ListFeatureViewsRequest, context: grpc.ServicerContext
    ) -> pb.ListFeatureViewsResponse:
        views, token = self._views.list_views(request.page_size, request.page_token)
        return pb.ListFeatureViewsResponse(views=views, next_page_token=token)

    @unary
    def DeleteFeatureView(
        self, request: pb.DeleteFeatureViewRequest, context: grpc.ServicerContext
    ) -> pb.DeleteFeatureViewResponse:
        tiles = self._views.delete(request.name)
        _LOGGER.info("feature view %r deleted with %d tiles", shown(request.name), tiles)
        return pb.DeleteFeatureViewResponse(tiles_deleted=tiles)

    @unary
    def ApplyFeatureService(
        self, request: pb.ApplyFeatureServiceRequest, context: grpc.ServicerContext
    ) -> pb.ApplyFeatureServiceResponse:
        outcome = self._views.apply_service(request.service, validate_only=request.validate_only)
        return pb.ApplyFeatureServiceResponse(
            service=outcome.message, changed=outcome.changed, created=outcome.created
        )

    @unary
    def GetFeatureService(
        self, request: pb.GetFeatureServiceRequest, context: grpc.ServicerContext
    ) -> pb.GetFeatureServiceResponse:
        return pb.GetFeatureServiceResponse(service=self._views.get_service(request.name))

    @unary
    def ListFeatureServices(
        self, request: pb.ListFeatureServicesRequest, context: grpc.ServicerContext
    ) -> pb.ListFeatureServicesResponse:
        services, token = self._views.list_services(request.page_size, request.page_token)
        return pb.ListFeatureServicesResponse(services=services, next_page_token=token)

    @unary
    def DeleteFeatureService(
        self, request: pb.DeleteFeatureServiceRequest, context: grpc.ServicerContext
    ) -> pb.DeleteFeatureServiceResponse:
        self._views.delete_service(request.name)
        return pb.DeleteFeatureServiceResponse()

    def GetViewFeatures(
        self, request: pb.GetViewFeaturesRequest, context: grpc.ServicerContext
    ) -> pb.GetViewFeaturesResponse:
        return pb.GetViewFeaturesResponse.FromString(self.get_view_features_bytes(request, context))

    @unary
    def get_view_features_bytes(
        self, request: pb.GetViewFeaturesRequest, context: grpc.ServicerContext
    ) -> bytes:
        """GetViewFeatures' reply already serialized: the core assembles it with numpy."""
        return self._reader.get(request)

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        """The service's handlers; GetViewFeatures sends the core's bytes as they are, never re-encoded."""
        handlers = {}
        for method in pb.DESCRIPTOR.services_by_name["FeatureViewService"].methods:
            request, response = getattr(pb, method.input_type.name), getattr(pb, method.output_type.name)
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                getattr(self, method.name),
                request_deserializer=request.FromString,
                response_serializer=response.SerializeToString,
            )
        handlers["GetViewFeatures"] = grpc.unary_unary_rpc_method_handler(
            self.get_view_features_bytes, request_deserializer=pb.GetViewFeaturesRequest.FromString
        )
        return grpc.method_handlers_generic_handler(SERVICE, handlers)
