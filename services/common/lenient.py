"""Register a gRPC service whose requests are parsed leniently: a request the protobuf runtime refuses
(invalid UTF-8 in a string field) reaches the handler as a BadMessage naming the field, so the client
gets INVALID_ARGUMENT "<field>: invalid UTF-8" instead of an opaque INTERNAL error."""
from __future__ import annotations

import grpc

from services.common.wire import invalid_utf8_field


class BadMessage:
    def __init__(self, field: str, problem: str):
        self.field = field
        self.problem = problem


def lenient_deserializer(message_cls):
    def parse(data: bytes):
        try:
            return message_cls.FromString(data)
        except Exception:  # noqa: BLE001 - DecodeError; anything unparseable is the client's error
            try:
                field = invalid_utf8_field(message_cls.DESCRIPTOR, data)
            except Exception:  # noqa: BLE001 - truncated or garbled wire bytes: no field to name
                field = None
            if field is None:
                return BadMessage("<message>", "malformed protobuf bytes")
            return BadMessage(field, "invalid UTF-8")
    return parse


async def reject_bad(request, context) -> None:
    if isinstance(request, BadMessage):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{request.field}: {request.problem}")


def add_lenient_service(server: grpc.aio.Server, servicer, pb_module, service: str) -> None:
    """Like the generated add_<Service>Servicer_to_server, with lenient request parsing."""
    desc = pb_module.DESCRIPTOR.services_by_name[service]
    handlers = {}
    factories = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
                 (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    for method in desc.methods:
        req_cls = getattr(pb_module, method.input_type.name)
        factory = factories[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = factory(getattr(servicer, method.name),
                                        request_deserializer=lenient_deserializer(req_cls),
                                        response_serializer=lambda m: m.SerializeToString())
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(desc.full_name, handlers),))
