"""One scheduler at a time acts on a job store: a lease in Redis that the scheduler holds while it serves.

The scheduler owns the queue, placements and recovery. Two of them on one Redis (a second replica by mistake, or a
replacement Kubernetes starts while a partitioned pod still reaches Redis) would each take the other's workers for
lost and requeue their jobs: the same job generated twice, placements thrashing. So a scheduler takes the lease
before it recovers or serves anything and renews it every third of its term. Its dispatcher acts only while the
lease is valid (renewed within a term: after that another may hold it), and the scheduler stops once someone else
holds it. A scheduler that stops cleanly gives the lease back, so its successor starts at once; one that died leaves
it to expire. The lease is also a fence: the store's scripts that place, take back or fail jobs check, as they run,
that Redis names this scheduler as the holder (job_store.FENCED_SCRIPTS), so a command still on its way when the term ran
out (redis-py retries for up to a minute; a process paused past its term goes on with what it had begun) changes
nothing once the lease has lapsed or passed on. What it cannot fence is a worker: a command a worker has already
received is carried out, and the worker's own reports are checked against the job's holder instead.
"""
from __future__ import annotations

import asyncio
import logging
import time

import redis.asyncio as aioredis

from services.common.redis_client import REDIS_UNAVAILABLE
from services.scheduler import keys

log = logging.getLogger("alise.scheduler")

# renew: still ours (or free again, as after a flush of the store) -> term extended; someone else's -> 0
_RENEW = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if not holder then return redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) and 1 or 0 end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class LeaseLost(Exception):
    """This scheduler can no longer show that it holds the lease: it must stop acting on the job store."""


class LeaderLease:
    def __init__(self, r: aioredis.Redis, holder: str, term_s: float):
        if not term_s > 0:
            raise ValueError(f"the lease's term must be > 0 s, got {term_s}")
        self.r, self.holder, self.term_s = r, holder, term_s
        self._renew = r.register_script(_RENEW)
        self._release = r.register_script(_RELEASE)
        self._held_until = 0.0     # monotonic time until which no one else can hold it (from our last renewal)

    @property
    def _term_ms(self) -> int:
        return max(1, int(self.term_s * 1000))

    async def acquire(self) -> None:
        """Wait until the lease is ours (Redis being away is waited out too)."""
        waited_for = None
        while True:
            started = time.monotonic()
            try:
                if await self.r.set(keys.SCHEDULER_LEASE, self.holder, nx=True, px=self._term_ms):
                    self._held_until = started + self.term_s
                    log.info("scheduler %s holds the lease (term %.1f s)", self.holder, self.term_s)
                    return
                holder = await self.r.get(keys.SCHEDULER_LEASE)
                if holder is not None and holder.decode() != waited_for:
                    waited_for = holder.decode()
                    log.warning("scheduler %s waits: scheduler %s holds the lease of this job store", self.holder,
                                waited_for)
            except REDIS_UNAVAILABLE as e:
                log.warning("scheduler %s waits for Redis to take the lease: %s", self.holder, e)
            await asyncio.sleep(self.term_s / 3)

    def valid(self) -> bool:
        """Whether no one else can hold the lease now: until a term after the last renewal Redis confirmed. The
        dispatcher acts on the store only while this holds."""
        return time.monotonic() < self._held_until

    async def keep(self) -> None:
        """Renew every third of the term, for as long as this runs; raises LeaseLost once someone else holds it
        (never returns otherwise). Each renewal waits at most a third of the term (a Redis that does not answer
        must not hold the term open: redis-py's own retries last a minute). A renewal that fails leaves the lease
        lapsing (valid() turns false once the term is over) and the next one tries again: Redis away for everyone
        (a restart) takes nothing from this scheduler, which goes on once Redis answers and the lease is still or
        again its own."""
        lapsed = False
        while True:
            await asyncio.sleep(self.term_s / 3)
            started = time.monotonic()
            try:
                renewed = await asyncio.wait_for(
                    self._renew(keys=[keys.SCHEDULER_LEASE], args=[self.holder, self._term_ms]), self.term_s / 3)
            except (asyncio.TimeoutError, *REDIS_UNAVAILABLE) as e:
                if not self.valid() and not lapsed:
                    lapsed = True
                    log.error("scheduler %s: lease not renewed for a whole term (%s): not acting until it is",
                              self.holder, e or "no answer")
                continue
            if not renewed:
                raise LeaseLost(f"scheduler {await self._holder()} holds the lease now")
            self._held_until = started + self.term_s
            if lapsed:
                lapsed = False
                log.warning("scheduler %s holds the lease again", self.holder)

    async def _holder(self) -> str:
        try:
            holder = await asyncio.wait_for(self.r.get(keys.SCHEDULER_LEASE), self.term_s / 3)
        except (asyncio.TimeoutError, *REDIS_UNAVAILABLE):
            return "?"
        return holder.decode() if holder else "?"

    async def release(self) -> None:
        try:
            await self._release(keys=[keys.SCHEDULER_LEASE], args=[self.holder])
        except REDIS_UNAVAILABLE:
            pass                                 # it expires by itself
