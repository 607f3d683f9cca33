"""Ports of a local stack never collide, and a server never silently shares a port that is in use.

Regression: a CI run sent a test's client calls to the scheduler's worker gateway ("Method not found"): two
ports of one stack came out equal and gRPC's default SO_REUSEPORT let both servers bind it."""
from __future__ import annotations

import pytest

from services.common.grpc_server import build_server
from services.common.local_stack import free_ports


def test_free_ports_are_distinct():
    ports = free_ports(64)
    assert len(set(ports)) == 64


async def test_a_port_in_use_is_refused_not_shared():
    server, _, port = build_server([], "127.0.0.1:0")
    try:
        with pytest.raises(RuntimeError):
            build_server([], f"127.0.0.1:{port}")
    finally:
        await server.stop(None)
