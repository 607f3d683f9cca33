"""What every ALISE gRPC server shares: grpc.health.v1, server reflection, signal-driven shutdown."""
from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.keepalive import SERVER_OPTIONS
from services.common.tls import TlsFiles, add_port

log = logging.getLogger("alise.grpc")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


MAX_MESSAGE_BYTES = 8 * 1024 * 1024    # far above any prompt that fits a context; bounds what one call can send


# gRPC sets SO_REUSEPORT by default, so a second server bound to a port already in use silently shares it and
# the kernel splits connections between the two (a test stack whose ports collided sent client calls to the
# worker gateway: "Method not found"). Without it, binding a used port fails loudly.
NO_SHARED_PORT = ("grpc.so_reuseport", 0)


def build_server(service_names: list[str], listen: str, max_concurrent_rpcs: int | None = None,
                 tls: TlsFiles | None = None, require_client_cert: bool = False,
                 ) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
    """An asyncio server with health (starting NOT_SERVING) and reflection; returns the bound port.
    Calls beyond max_concurrent_rpcs get RESOURCE_EXHAUSTED from gRPC itself. With `tls` holding a
    certificate it serves TLS only (and with require_client_cert, mTLS)."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), NO_SHARED_PORT,
                                      *SERVER_OPTIONS],
                             maximum_concurrent_rpcs=max_concurrent_rpcs)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server)
    port = add_port(server, listen, tls, require_client_cert)
    if port == 0:
        raise RuntimeError(f"could not bind {listen}")
    return server, health_servicer, port


async def set_health(h: health.aio.HealthServicer, service_names: list[str], status) -> None:
    for name in ["", *service_names]:
        await h.set(name, status)


def install_stop_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
