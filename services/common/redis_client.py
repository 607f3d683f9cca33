"""How ALISE services connect to Redis: a bounded pool that waits instead of failing under bursts, and
retries with backoff across a short Redis restart.

redis-py's default pool raises MaxConnectionsError when every connection is busy (300 concurrent clients
got UNKNOWN errors that way); a BlockingConnectionPool makes the caller wait up to `timeout` for one. A
command that meets a dropped connection is retried on a fresh one with exponential backoff; past that the
caller gets ConnectionError, which the APIs turn into UNAVAILABLE. The password, when Redis has AUTH, comes
in the URL (redis://:PASSWORD@host:port/0), which the chart builds from a Kubernetes Secret.
"""
from __future__ import annotations

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

MAX_CONNECTIONS = 64
# What Redis being away (after the retries) or refusing every write looks like to a caller; APIs answer UNAVAILABLE
# and the client retries. Refusals: a replica after a failover (READONLY), maxmemory reached with no eviction (OOM),
# a cluster without a master (CLUSTERDOWN, MASTERDOWN, TRYAGAIN), an ACL that does not cover us (NOPERM). Redis
# applied none of the refused writes, so nothing half-done is left behind.
REDIS_UNAVAILABLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.ReadOnlyError,
                     redis.exceptions.OutOfMemoryError, redis.exceptions.ClusterDownError,
                     redis.exceptions.TryAgainError, redis.exceptions.NoPermissionError)
WAIT_FOR_CONNECTION_S = 10.0
SOCKET_TIMEOUT_S = 10.0
RETRIES = 5
BACKOFF_CAP_S = 1.0
# The longest a command and its retries can take: every try times out, each after a full backoff. A reply kept
# for a retry to replay (job_store.run_once) is needed this long, and no longer.
RETRY_SPAN_S = (RETRIES + 1) * (SOCKET_TIMEOUT_S + BACKOFF_CAP_S)


def connect(url: str, max_connections: int = MAX_CONNECTIONS) -> aioredis.Redis:
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=WAIT_FOR_CONNECTION_S,
        socket_timeout=SOCKET_TIMEOUT_S, socket_connect_timeout=2, health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=BACKOFF_CAP_S, base=0.05), retries=RETRIES))
    return aioredis.Redis(connection_pool=pool)
