"""Tests for decoding gRPC statuses and their google.rpc details into typed client exceptions."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

import featurepush
from featurepush.errors import (
    AlreadyExistsError,
    DataLossError,
    DeadlineExceededError,
    FailedPreconditionError,
    FeaturepushError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnavailableError,
    Violation,
    from_status_proto,
)
from featurepush.v1 import registry_service_pb2, registry_service_pb2_grpc


def _packed(message: error_details_pb2.BadRequest | error_details_pb2.ErrorInfo) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _invalid_records_status() -> status_pb2.Status:
    bad_request = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(
                field='records["ad_impressions"][3].clicked', description="expected Int64, got a string"
            ),
            error_details_pb2.BadRequest.FieldViolation(
                field='records["ad_impressions"][7].timestamp', description="missing required field"
            ),
        ]
    )
    info = error_details_pb2.ErrorInfo(
        reason="RECORDS_INVALID", domain="featurepush.dev", metadata={"source": "ad_impressions"}
    )
    return status_pb2.Status(
        code=code_pb2.INVALID_ARGUMENT,
        message="2 records are invalid",
        details=[_packed(bad_request), _packed(info)],
    )


def test_from_status_proto_decodes_bad_request_and_error_info() -> None:
    status = status_pb2.Status.FromString(_invalid_records_status().SerializeToString())
    error = from_status_proto(status.code, status.message, status.details)
    assert isinstance(error, InvalidArgumentError)
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert error.message == "2 records are invalid"
    assert error.reason == "RECORDS_INVALID"
    assert error.metadata == {"source": "ad_impressions"}
    assert error.violations == [
        Violation('records["ad_impressions"][3].clicked', "expected Int64, got a string"),
        Violation('records["ad_impressions"][7].timestamp', "missing required field"),
    ]
    assert str(error).splitlines() == [
        "INVALID_ARGUMENT: 2 records are invalid [RECORDS_INVALID]",
        'records["ad_impressions"][3].clicked: expected Int64, got a string',
        'records["ad_impressions"][7].timestamp: missing required field',
    ]


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (code_pb2.INVALID_ARGUMENT, InvalidArgumentError),
        (code_pb2.NOT_FOUND, NotFoundError),
        (code_pb2.ALREADY_EXISTS, AlreadyExistsError),
        (code_pb2.FAILED_PRECONDITION, FailedPreconditionError),
        (code_pb2.RESOURCE_EXHAUSTED, ResourceExhaustedError),
        (code_pb2.UNAVAILABLE, UnavailableError),
        (code_pb2.DEADLINE_EXCEEDED, DeadlineExceededError),
        (code_pb2.PERMISSION_DENIED, PermissionDeniedError),
        (code_pb2.INTERNAL, InternalError),
        (code_pb2.DATA_LOSS, DataLossError),
        (code_pb2.ABORTED, FeaturepushError),
        (999, FeaturepushError),
    ],
)
def test_each_code_maps_to_its_exception(code: int, cls: type[FeaturepushError]) -> None:
    error = from_status_proto(code, "boom", [])
    assert type(error) is cls
    assert error.reason is None and error.metadata == {}
    if isinstance(error, InvalidArgumentError):
        assert error.violations == []


def test_unknown_code_number_becomes_unknown() -> None:
    error = from_status_proto(999, "boom", [])
    assert error.code is grpc.StatusCode.UNKNOWN
    assert str(error) == "UNKNOWN: boom"


def test_unrelated_details_are_ignored() -> None:
    retry = any_pb2.Any()
    retry.Pack(error_details_pb2.RetryInfo())
    error = from_status_proto(code_pb2.UNAVAILABLE, "draining", [retry])
    assert isinstance(error, UnavailableError) and error.reason is None


def test_errors_are_exported_from_the_package() -> None:
    assert featurepush.InvalidArgumentError is InvalidArgumentError
    assert issubclass(featurepush.NotFoundError, featurepush.FeaturepushError)


class _FailingRegistry(registry_service_pb2_grpc.RegistryServiceServicer):
    """Fails every call in a fixed way, so the client's error translation is tested over a real channel."""

    def ApplySource(
        self, request: registry_service_pb2.ApplySourceRequest, context: grpc.ServicerContext
    ) -> registry_service_pb2.ApplySourceResponse:
        context.abort_with_status(rpc_status.to_status(_invalid_records_status()))
        raise AssertionError("abort_with_status returned")

    def GetSource(
        self, request: registry_service_pb2.GetSourceRequest, context: grpc.ServicerContext
    ) -> registry_service_pb2.GetSourceResponse:
        context.abort(grpc.StatusCode.NOT_FOUND, f"no source named {request.name!r}")
        raise AssertionError("abort returned")


@pytest.fixture
def client() -> Iterator[featurepush.Client]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    registry_service_pb2_grpc.add_RegistryServiceServicer_to_server(_FailingRegistry(), server)
    port = server.add_insecure_port("localhost:0")
    server.start()
    try:
        with featurepush.Client(f"localhost:{port}", timeout=5.0) as client:
            yield client
    finally:
        server.stop(None).wait()


def test_rich_status_over_the_wire_becomes_invalid_argument(client: featurepush.Client) -> None:
    source = featurepush.StreamSource(
        "s", [featurepush.Field("k", featurepush.String)], ["k"], timestamp_field="k"
    )
    with pytest.raises(
        InvalidArgumentError, match=r"(?m)^records\[\"ad_impressions\"\]\[3\]\.clicked: "
    ) as info:
        client.apply(source)
    assert info.value.reason == "RECORDS_INVALID"
    assert len(info.value.violations) == 2
    assert info.value.__cause__ is None


def test_plain_status_over_the_wire_becomes_not_found(client: featurepush.Client) -> None:
    with pytest.raises(NotFoundError, match="NOT_FOUND: no source named 'nope'"):
        client.get_source("nope")


def test_unreachable_server_becomes_unavailable() -> None:
    with featurepush.Client("localhost:1", timeout=2.0) as client:
        client.unavailable_retry_s = 0.5  # a read is sent again for this long first
        with pytest.raises((UnavailableError, DeadlineExceededError)):
            client.get_source("anything")
