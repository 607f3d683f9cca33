"""One scheduler at a time on a job store (review, session 22: a second scheduler on the same Redis took the first's
workers for lost and requeued their jobs: the same job generated twice). Over a real Redis."""
from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from services.common.local_stack import free_port
from services.scheduler import keys
from services.scheduler.config import SchedulerConfig
from services.scheduler.leader_lease import LeaderLease, LeaseLost
from services.scheduler.server import serve
from services.scheduler.tenants import add_tenant
from tests.test_openai_http_failures import wait_for


@pytest.fixture
async def r(redis_server):
    client = aioredis.from_url(redis_server.url)
    await client.flushdb()
    yield client
    await client.aclose()


async def test_a_second_holder_waits_until_the_first_gives_the_lease_back(r):
    first, second = LeaderLease(r, "a", 1.0), LeaderLease(r, "b", 1.0)
    await asyncio.wait_for(first.acquire(), 10)
    keeping = asyncio.create_task(first.keep())
    waiting = asyncio.create_task(second.acquire())
    done, _ = await asyncio.wait({waiting}, timeout=2.5)      # over two terms: held all along by renewals
    assert not done and await r.get(keys.SCHEDULER_LEASE) == b"a"
    keeping.cancel()
    await first.release()
    await asyncio.wait_for(waiting, 10)                        # given back: taken at once
    assert await r.get(keys.SCHEDULER_LEASE) == b"b"


async def test_a_holder_whose_lease_another_took_stops_and_one_whose_store_was_emptied_takes_it_again(r):
    lease = LeaderLease(r, "a", 0.6)
    await lease.acquire()
    await r.flushdb()                                         # an emptied store: free again, re-taken
    keeping = asyncio.create_task(lease.keep())
    await asyncio.sleep(0.5)
    assert not keeping.done() and await r.get(keys.SCHEDULER_LEASE) == b"a"
    await r.set(keys.SCHEDULER_LEASE, "b")                    # as if it had expired and "b" had taken it
    with pytest.raises(LeaseLost, match="b"):
        await asyncio.wait_for(keeping, 10)


async def test_a_renewal_with_no_answer_lapses_the_lease_within_its_term_and_a_later_one_restores_it(r):
    """Review, session 22: a renewal that got no answer (a Redis cut off) waited through redis-py's retries, about
    a minute, while the lease stayed valid in this scheduler's eyes though another could take it after one term.
    And a Redis that was away for everyone (a restart) made the scheduler exit, though no one else could have it."""
    lease = LeaderLease(r, "a", 1.0)
    await lease.acquire()
    renew, answering = lease._renew, asyncio.Event()

    async def silent(*args, **kwargs):
        if not answering.is_set():
            await asyncio.sleep(3600)
        return await renew(*args, **kwargs)

    lease._renew = silent
    keeping = asyncio.create_task(lease.keep())
    await wait_for(lambda: not lease.valid(), 3.0)                 # within about a term, not a minute
    assert not keeping.done()
    answering.set()                                            # Redis answers again; the lease is free: re-taken
    await wait_for(lease.valid, 5.0)
    assert not keeping.done() and await r.get(keys.SCHEDULER_LEASE) == b"a"
    keeping.cancel()


async def test_the_dispatcher_acts_only_while_the_lease_is_valid(dispatcher_factory):
    from services.scheduler.tenants import Tenant
    from services.scheduler.worker_sessions import WorkerSession
    from tests.helpers import valid_request

    d = await dispatcher_factory(policy="fcfs")
    valid = [False]
    d.may_act = lambda: valid[0]
    w = WorkerSession("w1", d.cfg.model_name, block_size=16, num_blocks=100, max_batch=4, max_model_len=2048)
    assert await d.worker_joined(w)
    assert await d.submit(valid_request("a"), Tenant("t", "0" * 64))
    running = asyncio.create_task(d.run())
    try:
        await asyncio.sleep(1.0)                               # twenty ticks' time: none may place the job
        assert w.outbox.empty()
        valid[0] = True
        d.wake()
        await wait_for(lambda: not w.outbox.empty())
        assert w.outbox.get_nowait().assign.job_id == "t/a"
    finally:
        running.cancel()


async def test_a_second_scheduler_on_the_same_store_serves_only_once_the_first_has_stopped(redis_server, model_dir,
                                                                                          tmp_path, monkeypatch):
    monkeypatch.setenv("ALISE_SERVICE_TOKEN", "t" * 32)
    keys_file = tmp_path / "keys.json"
    add_tenant(keys_file, "t")

    def config() -> SchedulerConfig:
        return SchedulerConfig(listen=f"127.0.0.1:{free_port()}", worker_listen=f"127.0.0.1:{free_port()}",
                               api_keys_file=str(keys_file), redis_url=redis_server.url, model_dir=str(model_dir),
                               predictor_address=f"127.0.0.1:{free_port()}", leader_lease_s=3.0)

    client = aioredis.from_url(redis_server.url)
    await client.flushdb()
    stops = [asyncio.Event(), asyncio.Event()]
    readies = [asyncio.get_running_loop().create_future() for _ in stops]
    first = asyncio.create_task(serve(config(), stops[0], readies[0]))
    await asyncio.wait_for(asyncio.shield(readies[0]), 120)
    second = asyncio.create_task(serve(config(), stops[1], readies[1]))
    done, _ = await asyncio.wait({readies[1]}, timeout=7)      # over two terms: it waits, serving nothing
    assert not done and not second.done()
    holder = await client.get(keys.SCHEDULER_LEASE)
    stops[0].set()
    await asyncio.wait_for(first, 60)
    await asyncio.wait_for(asyncio.shield(readies[1]), 60)     # the lease was given back: it serves now
    assert await client.get(keys.SCHEDULER_LEASE) != holder
    stops[1].set()
    await asyncio.wait_for(second, 60)
    assert await client.get(keys.SCHEDULER_LEASE) is None      # given back on a clean stop
    await client.aclose()
