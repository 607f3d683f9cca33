"""Fan-out of job events (chunks, completion) from worker sessions to client streams.

Each chunk carries the index of its first token in the job's output, so a stream that joins a running job
(a client re-attaching after a disconnect or a scheduler restart) can skip what it already read from Redis.
"""
from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass

from alise.v1 import generate_pb2 as pb


@dataclass(frozen=True)
class JobEvent:
    response: pb.GenerateResponse
    first_token: int = -1          # chunks: index of the first token in the job's output; -1 for completion
    fingerprint: str = ""          # the request's: a finished id reused by another request is another job


class JobEventHub:
    def __init__(self):
        self._subs: dict[str, list[asyncio.Queue]] = defaultdict(list)

    def subscribe(self, job_id: str) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue()
        self._subs[job_id].append(q)
        return q

    def unsubscribe(self, job_id: str, q: asyncio.Queue) -> None:
        subs = self._subs.get(job_id, [])
        if q in subs:
            subs.remove(q)
        if not subs:
            self._subs.pop(job_id, None)

    def watched(self, job_id: str) -> bool:
        return bool(self._subs.get(job_id))

    def watchers(self, job_id: str) -> int:
        return len(self._subs.get(job_id, ()))

    def publish(self, job_id: str, event: JobEvent) -> None:
        for q in self._subs.get(job_id, []):
            q.put_nowait(event)


def coalesce(event: JobEvent, events: asyncio.Queue, fingerprint: str) -> tuple[pb.GenerateResponse, JobEvent | None]:
    """`event`'s chunk joined with the chunks queued behind it, and the event that has to be handled on its own
    next (or None): a completion, or a chunk that does not follow on (tokens between were never published, see
    `AliseServicer._follow`). Chunks that queued up while the client read the last message go out as one: a slow
    reader gets fewer, larger messages instead of falling further behind. With nothing queued, `event`'s own
    message is reused."""
    ids, text, merged = None, None, False
    while not events.empty():
        more = events.get_nowait()
        if more.fingerprint and more.fingerprint != fingerprint:
            continue
        if ids is None:
            ids, text = list(event.response.chunk.token_ids), event.response.chunk.text
        if more.first_token < 0 or more.first_token > event.first_token + len(ids):
            return (_joined(event, ids, text) if merged else event.response), more
        if more.first_token == event.first_token + len(ids):      # one starting earlier repeats joined tokens
            ids += more.response.chunk.token_ids
            text += more.response.chunk.text
            merged = True
    return (_joined(event, ids, text) if merged else event.response), None


def _joined(event: JobEvent, ids: list[int], text: str) -> pb.GenerateResponse:
    return pb.GenerateResponse(chunk=pb.GenerateChunk(text=text, token_ids=ids))
