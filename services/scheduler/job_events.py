"""Fan-out of job events (chunks, completion) from worker sessions to client streams."""
from __future__ import annotations

import asyncio
from collections import defaultdict

from alise.v1 import generate_pb2 as pb


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

    def publish(self, job_id: str, event: pb.GenerateResponse) -> None:
        for q in self._subs.get(job_id, []):
            q.put_nowait(event)
