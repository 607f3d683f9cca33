"""The event-loop lag watcher (services/common/loop_lag.py) sees a loop held up by blocking work, and little lag on
an idle loop."""
from __future__ import annotations

import asyncio
import statistics
import time

from services.common.loop_lag import watch_loop_lag


async def test_a_blocked_loop_shows_as_lag_and_an_idle_one_does_not():
    lags: list[float] = []
    watcher = asyncio.create_task(watch_loop_lag(lags.append, interval_s=0.01))
    while len(lags) < 5:                 # idle: the watcher wakes about on time
        await asyncio.sleep(0.01)
    idle = list(lags)
    time.sleep(0.5)                      # the loop held up by blocking work, as a CPU-bound callback would
    while len(lags) <= len(idle):
        await asyncio.sleep(0.01)
    watcher.cancel()
    assert max(lags[len(idle):]) >= 0.4  # the watcher's next wake came that late
    assert statistics.median(idle) < 0.1  # idle, it woke about on time (a busy 2-core machine allowed for)
