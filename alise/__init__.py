"""ALISE: the Python client SDK (`alise.client`) and the gRPC modules generated from protos/ (`alise.v1`).

    from alise import Client
    with Client("127.0.0.1:50051", api_key=KEY, tls_ca="ca.crt") as client:
        print(client.generate("The capital of France is", max_tokens=8).text)
        for chunk in (stream := client.stream(messages=[{"role": "user", "content": "Hi"}])):
            print(chunk.text, end="")
        print(stream.completion.usage)

`AsyncClient` is the same for asyncio. The SDK is imported on first use, so the services that only need
`alise.v1` do not load it.
"""
from __future__ import annotations

_SDK = {"Client", "AsyncClient", "Stream", "AsyncStream", "Chunk", "Completion", "Usage", "Timings", "FinishReason",
        "AliseError"}
__all__ = sorted(_SDK)


def __getattr__(name: str):
    if name in _SDK:
        from alise import client

        return getattr(client, name)
    raise AttributeError(f"module 'alise' has no attribute {name!r}")
