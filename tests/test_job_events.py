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


async def test_a_chunk_past_a_gap_is_not_joined_but_handed_back_to_be_handled_on_its_own():
    """Tokens a lost worker recorded without publishing their chunk leave a gap in the events: joining across it
    sent the text after the gap as if it followed on, and the client never got the tokens in between (found by
    review). The chunk past the gap comes back, so the stream reads the gap from Redis first."""
    q: asyncio.Queue = asyncio.Queue()
    for ev in (chunk(1, [6], "b"), chunk(3, [8], "d"), chunk(4, [9], "e")):
        q.put_nowait(ev)
    response, held = coalesce(chunk(0, [5], "a"), q, "f")
    assert (list(response.chunk.token_ids), response.chunk.text) == ([5, 6], "ab")
    assert held is not None and held.first_token == 3 and q.qsize() == 1
