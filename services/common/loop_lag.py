"""How late an asyncio event loop runs what is due: a watcher sleeps a short interval over and over and observes how
long past its due time it woke. A loop busy with other callbacks (many streams, CPU work done in the loop, a machine
short of CPU) delays everything it serves by that much: requests getting in, tokens going out. The scheduler exports
it (alise:event_loop_lag_seconds); the benchmark client records its own, so a run can tell a slow system from a
slow client."""
from __future__ import annotations

import asyncio
from typing import Callable

INTERVAL_S = 0.05


async def watch_loop_lag(observe: Callable[[float], None], interval_s: float = INTERVAL_S) -> None:
    """Runs until cancelled, calling observe(seconds late) once per interval."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + interval_s
        await asyncio.sleep(interval_s)
        observe(max(0.0, loop.time() - due))
