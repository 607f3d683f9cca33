"""HTTP/2 keepalive for ALISE's long-lived gRPC streams (a worker's session, a client's token stream).

Without it a peer that vanished without closing its connection (power loss, a network partition, a process
stopped by the kernel) is noticed only when TCP gives up, 15 minutes or more later; meanwhile the jobs of a
lost worker stay "running". With it each side pings an idle connection every KEEPALIVE_MS and closes it when
no answer comes within TIMEOUT_MS. Servers accept pings that often, even on connections with no call open.
"""
from __future__ import annotations

KEEPALIVE_MS = 20_000
TIMEOUT_MS = 10_000

CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", KEEPALIVE_MS),
    ("grpc.keepalive_timeout_ms", TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),        # a session can be quiet for long: keep pinging it
]

SERVER_OPTIONS = [
    ("grpc.keepalive_time_ms", KEEPALIVE_MS),
    ("grpc.keepalive_timeout_ms", TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_MS // 2),   # clients' pings are welcome
    ("grpc.http2.max_ping_strikes", 0),
]
