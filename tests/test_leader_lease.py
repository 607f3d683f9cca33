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


async def test_the_store_places_takes_back_and_forgets_only_for_the_lease_holder(r):
    """The lease is a fence (review, session 22: it was not): a command of a scheduler whose term ran out, still on its
    way or sent by a process paused past its term, must change nothing once Redis names another holder. Also a call
    retried after the lease passed on replays what its first run did (run_once) rather than acting again."""
    from services.scheduler.job_store import FENCE_ERROR, CreateOutcome, JobStore, StoreFenced
    from tests.test_job_store import create, record

    old, new = JobStore(r, leader="a"), JobStore(r, leader="b")
    await r.set(keys.SCHEDULER_LEASE, "a")
    await create(old, record("j1", "f1"), 1.0)
    await create(old, record("j2", "f2"), 2.0)
    assert await old.claim("j1", "w1")
    await r.set(keys.SCHEDULER_LEASE, "b")                      # "a"'s term ran out and "b" took the lease
    with pytest.raises(StoreFenced, match="held by b"):
        await old.requeue("j1", "w1", 1.0)                      # it would take back a job its successor keeps
    with pytest.raises(StoreFenced):
        await old.claim("j2", "w9")
    with pytest.raises(StoreFenced):
        await old.fail_step("j1", "w1", 1.0, max_failures=1)
    with pytest.raises(StoreFenced):
        await old.forget_worker("w1")
    st1, st2 = await new.state("j1"), await new.state("j2")
    assert (st1.status, st1.worker, st2.status) == ("running", "w1", "queued")
    assert await new.worker_job_ids("w1") == ["j1"] and await new.known_workers() == ["w1"]
    await r.delete(keys.SCHEDULER_LEASE)                        # lapsed, no one holds it: nobody acts
    with pytest.raises(StoreFenced):
        await new.claim("j2", "w2")
    await r.set(keys.SCHEDULER_LEASE, "b")
    assert await new.claim("j2", "w2") and await new.requeue("j1", "w1", 1.0)
    await new.forget_worker("w1")
    assert await new.known_workers() == ["w2"]
    assert await create(old, record("j3", "f3"), 3.0) is CreateOutcome.CREATED   # clients' calls are not fenced
    assert await old.append_many("w2", [("j2", [7], "x")]) == [1]  # nor a worker's report on the job it holds
    # a claim whose reply was lost, retried by redis-py after the term: the retry reports what its first run did
    claim = new._scripts["claim"].script
    call = dict(keys=[keys.job("j3"), keys.QUEUE, keys.worker_jobs("w2"), keys.WORKERS, keys.SCHEDULER_LEASE],
                args=["j3", "w2", 1.0, "b", "call-1"])
    assert await claim(**call) == 1
    await r.set(keys.SCHEDULER_LEASE, "c")
    assert await claim(**call) == 1                               # replayed, not refused: it did happen
    with pytest.raises(Exception, match=FENCE_ERROR):
        await claim(**{**call, "args": [*call["args"][:-1], "call-2"]})


async def test_a_scheduler_whose_term_ran_out_cannot_requeue_its_successors_jobs(dispatcher_factory, r):
    """The hazard the fence closes: the old scheduler's sweep takes the new one's worker for lost (it is not connected
    here) and requeues its running job; before the fence this landed, and the job ran on two workers."""
    from services.scheduler.job_store import JobStore, StoreFenced
    from services.scheduler.tenants import Tenant
    from tests.helpers import valid_request

    d = await dispatcher_factory(policy="fcfs")
    d.store = JobStore(d.store.r, leader="old")
    await r.set(keys.SCHEDULER_LEASE, "old")
    assert await d.submit(valid_request("a"), Tenant("t", "0" * 64))
    await r.set(keys.SCHEDULER_LEASE, "new")
    successor = JobStore(d.store.r, leader="new")
    assert await successor.claim("t/a", "w-new")                # the successor placed it on its own worker
    with pytest.raises(StoreFenced):
        await d.recover_orphans()
    state = await successor.state("t/a")
    assert (state.status, state.worker) == ("running", "w-new")
    assert await successor.worker_job_ids("w-new") == ["t/a"]
