"""The dispatch loop's passes start at least dispatch_gap_s apart: admissions and finishes that come faster than
that are decided together by the next pass (at 64 req/s one pass per event was ~70 passes a second on a scheduler
loop near a full core, session 44), and none of them is left undecided."""
from __future__ import annotations

import asyncio
import time


async def test_wakes_that_come_during_a_pass_are_decided_together_after_the_gap_and_none_is_lost(dispatcher_factory):
    d = await dispatcher_factory(policy="fcfs", tick_s=5.0, dispatch_gap_s=0.5)
    starts: list[float] = []
    release = asyncio.Event()             # the first pass lasts until the test has sent its other events
    tick = d.tick

    async def timed_tick():
        starts.append(time.monotonic())
        if len(starts) == 1:
            await release.wait()
        await tick()

    async def passes(n: int) -> None:
        deadline = time.monotonic() + 60
        while len(starts) < n and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    d.tick = timed_tick
    loop = asyncio.create_task(d.run())
    try:
        d.wake()
        await passes(1)
        for _ in range(5):                   # five more events while the first pass runs
            d.wake()
            await asyncio.sleep(0.01)
        release.set()
        await passes(2)
        await asyncio.sleep(0.6)             # room for a third pass, which nothing asked for
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
    assert len(starts) == 2, starts          # the first event's pass, then one for the five that came during it
    assert starts[1] - starts[0] >= 0.5 - 0.01
