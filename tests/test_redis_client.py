"""The services' Redis client parses replies in C (hiredis): the pure-Python parser cost the scheduler's one event
loop 4-8x the CPU for a reply of many entries, such as the queue's head it reads at every dispatch pass (session 44:
the loop runs near a full core at 64 req/s on an H100)."""
from __future__ import annotations

from redis._parsers import _AsyncHiredisParser

from services.common.redis_client import connect


async def test_the_services_redis_connections_parse_replies_with_hiredis(redis_server):
    client = connect(redis_server.url)
    try:
        await client.zadd("alise-test:parser", {f"job-{i}": i for i in range(300)})
        assert len(await client.zrange("alise-test:parser", 0, 255)) == 256
        connection = await client.connection_pool.get_connection()
        try:
            assert isinstance(connection._parser, _AsyncHiredisParser)
        finally:
            await client.connection_pool.release(connection)
        await client.delete("alise-test:parser")
    finally:
        await client.aclose()
