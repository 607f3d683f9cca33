"""CPU the scheduler's own Redis client spends per call, by reply parser: the calls whose replies hold many
entries (the queue's head each dispatch pass reads, a token append's counts, a job's record) against a private
Redis on loopback. redis-py parses replies in pure Python unless hiredis is installed (it is pinned since session
44); this prints each call with the parser redis-py picks and with its two pure-Python ones.

    python -m bench.redis_reply_cost [--calls 2000]
"""
from __future__ import annotations

import argparse
import asyncio
import time

from redis._parsers import _AsyncRESP2Parser, _AsyncRESP3Parser

from services.common.local_stack import RedisServer
from services.common.redis_client import connect

APPEND_LIKE = "local out = {} for i = 1, #KEYS do out[i] = i end return out"


async def per_call_cpu_us(call, calls: int) -> float:
    await call()
    started = time.process_time()
    for _ in range(calls):
        await call()
    return 1e6 * (time.process_time() - started) / calls


async def measure(url: str, parser, calls: int) -> dict[str, float]:
    r = connect(url)
    if parser is not None:
        r.connection_pool.connection_kwargs["parser_class"] = parser
    try:
        await r.zadd("bench:queue", {f"t/job-{i:05d}": float(i) for i in range(2000)})
        await r.hset("bench:job", mapping={f"f{i}": "x" * 20 for i in range(25)})
        script = r.register_script(APPEND_LIKE)
        keys, args = [f"bench:k{i}" for i in range(384)], ["x" * 8] * 256      # 128 jobs' keys and arguments
        return {"ZRANGE 256 (the queue's head)": await per_call_cpu_us(lambda: r.zrange("bench:queue", 0, 255), calls),
                "ZRANGE 256 WITHSCORES": await per_call_cpu_us(
                    lambda: r.zrange("bench:queue", 0, 255, withscores=True), calls),
                "HGETALL 25 fields": await per_call_cpu_us(lambda: r.hgetall("bench:job"), calls),
                "script, 384 keys -> 384 ints": await per_call_cpu_us(lambda: script(keys=keys, args=args), calls // 2),
                "GET": await per_call_cpu_us(lambda: r.get("bench:none"), calls)}
    finally:
        await r.delete("bench:queue", "bench:job")
        await r.aclose()


async def main(calls: int) -> None:
    server = RedisServer(persist=False)
    try:
        rows = {name: await measure(server.url, parser, calls) for name, parser in
                (("default (hiredis if installed)", None), ("RESP2, Python", _AsyncRESP2Parser),
                 ("RESP3, Python", _AsyncRESP3Parser))}
    finally:
        server.stop()
    names = list(rows)
    print("| call | " + " | ".join(f"{n}, us CPU" for n in names) + " |")
    print("|---|" + "---|" * len(names))
    for call in rows[names[0]]:
        print(f"| {call} | " + " | ".join(f"{rows[n][call]:,.0f}" for n in names) + " |")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=2000)
    asyncio.run(main(p.parse_args().calls))
