"""Server CPU per streamed message of a gRPC aio server in Python: the floor under the scheduler's per-token
cost (docs/BENCHMARKS.md, live serving). One process serves `--streams` streams of `--messages` small chunks
each to a client in a child process; prints the server's CPU seconds per message.

    python -m bench.grpc_stream_cost --streams 200 --messages 200
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

import grpc
from alise.v1 import generate_pb2 as pb
from alise.v1 import generate_pb2_grpc as pb_grpc


class Streamer(pb_grpc.AliseServicer):
    def __init__(self, messages: int):
        self.messages = messages

    async def Generate(self, request, context):
        for i in range(self.messages):
            yield pb.GenerateResponse(chunk=pb.GenerateChunk(text="ab", token_ids=[i]))


async def client(port: int, streams: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pb_grpc.AliseStub(ch)

        async def one() -> int:
            return sum([1 async for _ in stub.Generate(pb.GenerateRequest(prompt="x"))])

        print("client received", sum(await asyncio.gather(*(one() for _ in range(streams)))), "messages")


async def serve(streams: int, messages: int) -> None:
    server = grpc.aio.server()
    pb_grpc.add_AliseServicer_to_server(Streamer(messages), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    before, wall = os.times(), time.perf_counter()
    child = await asyncio.create_subprocess_exec(sys.executable, "-m", "bench.grpc_stream_cost", "--client",
                                                 str(port), "--streams", str(streams))
    await child.wait()
    after = os.times()
    cpu = (after.user + after.system) - (before.user + before.system)
    n = streams * messages
    print(f"server CPU {cpu:.2f} s for {n} messages: {cpu / n * 1e6:.1f} us/message "
          f"(wall {time.perf_counter() - wall:.2f} s)")
    await server.stop(None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=200)
    p.add_argument("--messages", type=int, default=200)
    p.add_argument("--client", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    asyncio.run(client(a.client, a.streams) if a.client else serve(a.streams, a.messages))


if __name__ == "__main__":
    main()
