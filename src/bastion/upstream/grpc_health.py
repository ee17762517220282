"""The `grpc` active health check: grpc.health.v1.Health/Check over HTTP/2 (h2 or h2c).

The probe opens a fresh HTTP/2 connection (TLS and ALPN as the upstream's pool would), sends
one unary call and counts the target healthy when the call succeeds (HTTP 200, grpc-status
0) with `SERVING`. The two tiny messages are protobuf classes built at import from a
descriptor of the standard health.proto, so no generated code or gRPC runtime is needed.
"""

from __future__ import annotations

import struct
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory  # type: ignore[import-untyped]

from bastion.config.schema import ActiveHealthCheck
from bastion.errors import GatewayError
from bastion.upstream.h2_probe import Call, h2_request
from bastion.upstream.targets import TargetState

CHECK_PATH = "/grpc.health.v1.Health/Check"
SERVING = 1
_STATUS_NAMES = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


def _messages() -> tuple[Any, Any]:
    """HealthCheckRequest and HealthCheckResponse of grpc/health/v1/health.proto."""
    proto = descriptor_pb2.FileDescriptorProto(
        name="bastion/grpc_health.proto", package="grpc.health.v1", syntax="proto3"
    )
    request = proto.message_type.add(name="HealthCheckRequest")
    request.field.add(name="service", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING, label=1)
    response = proto.message_type.add(name="HealthCheckResponse")
    status = response.enum_type.add(name="ServingStatus")
    for number, name in _STATUS_NAMES.items():
        status.value.add(name=name, number=number)
    response.field.add(
        name="status",
        number=1,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_ENUM,
        type_name=".grpc.health.v1.HealthCheckResponse.ServingStatus",
        label=1,
    )
    pool = descriptor_pool.DescriptorPool()  # our own: never clashes with grpcio's generated one
    pool.Add(proto)
    return (
        message_factory.GetMessageClass(pool.FindMessageTypeByName("grpc.health.v1.HealthCheckRequest")),
        message_factory.GetMessageClass(pool.FindMessageTypeByName("grpc.health.v1.HealthCheckResponse")),
    )


HealthCheckRequest, HealthCheckResponse = _messages()


def request_frame(service: str) -> bytes:
    """One length-prefixed gRPC message: flag 0 (not compressed), 4-byte length, the message."""
    message: bytes = HealthCheckRequest(service=service).SerializeToString()
    return struct.pack(">BI", 0, len(message)) + message


def serving_status(body: bytes) -> int | None:
    """The status in a response body of one uncompressed message, or None if it is not one."""
    if len(body) < 5 or body[0] != 0:
        return None
    (length,) = struct.unpack(">I", body[1:5])
    if len(body) != 5 + length:
        return None
    try:
        return int(HealthCheckResponse.FromString(body[5:]).status)
    except Exception:  # protobuf's DecodeError: not a HealthCheckResponse
        return None


async def probe_grpc(target: TargetState, check: ActiveHealthCheck) -> tuple[bool, str]:
    """Call Health/Check on a new connection; healthy when the answer is SERVING."""
    frame = request_frame(check.service)
    headers = [
        (b"host", (check.host or str(target.address)).encode()),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
        (b"user-agent", b"bastion-health-check"),
    ]
    try:
        call = await h2_request(target, "POST", CHECK_PATH, headers, frame, check.timeout)
    except GatewayError as exc:
        return False, exc.message
    return _verdict(call)


def _verdict(call: Call) -> tuple[bool, str]:
    if call.error is not None:
        return False, call.error.message
    response = call.response
    if response is None:
        return False, "no response"
    if response.status != 200:
        return False, f"status {response.status}"
    # A call that fails at once answers "trailers-only": grpc-status in the head.
    fields = call.trailers if call.trailers is not None else response.headers
    grpc_status = fields.get("grpc-status") or response.headers.get("grpc-status")
    if grpc_status != "0":
        message = fields.get("grpc-message") or ""
        return False, f"grpc-status {grpc_status} {message}".strip()
    status = serving_status(bytes(call.body))
    if status is None:
        return False, "not a HealthCheckResponse"
    name = _STATUS_NAMES.get(status, str(status))
    return status == SERVING, name
