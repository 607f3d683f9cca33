"""Chunks queued for a slow client stream are sent as one message, in order, and a completion behind them
is kept for after them."""
from __future__ import annotations

import asyncio

from alise.v1 import generate_pb2 as pb

from services.scheduler.job_events import JobEvent, coalesce


def chunk(first: int, ids: list[int], text: str, fingerprint: str = "f") -> JobEvent:
    return JobEvent(pb.GenerateResponse(chunk=pb.GenerateChunk(text=text, token_ids=ids)), first, fingerprint)


async def test_queued_chunks_go_out_as_one_message_and_the_completion_after_them():
    q: asyncio.Queue = asyncio.Queue()
    for ev in (chunk(1, [6], "b"), chunk(0, [9], "old", fingerprint="other"), chunk(2, [7, 8], "cd"),
               chunk(1, [6], "b"),                                   # a duplicate of a token already joined
               JobEvent(pb.GenerateResponse(complete=pb.GenerateComplete(request_id="r")), -1, "f"),
               chunk(9, [1], "after")):
        q.put_nowait(ev)
    response, held = coalesce(chunk(0, [5], "a"), q, "f")
    assert (list(response.chunk.token_ids), response.chunk.text) == ([5, 6, 7, 8], "abcd")
    assert held is not None and held.response.complete.request_id == "r"
    assert q.qsize() == 1                                            # nothing past the completion was read


async def test_an_empty_queue_sends_the_chunk_as_it_is():
    alone = chunk(3, [4], "x")
    response, held = coalesce(alone, asyncio.Queue(), "f")
    assert response is alone.response and held is None
