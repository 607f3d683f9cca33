"""The scheduler's job state across faults of its own making: a worker that redials at once, Redis failing between
two updates of one move, late worker messages about ended jobs, requests no worker can hold, a left job's abort
meeting a Redis outage. The dispatcher and API servicer run in-process over a real Redis; the worker's side of each
session is played by the test (found by the session-22 review of the job state)."""
from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest
import redis.exceptions
from alise.v1 import worker_pb2 as wpb

from services.scheduler import keys
from services.scheduler.api import AliseServicer
from services.scheduler.openai_http import CallAborted, HttpCallContext, to_generate_request
from services.scheduler.tenants import Tenant, TenantRegistry
from services.scheduler.tokenizer import PromptTokenizer
from services.scheduler.worker_sessions import WorkerSession
from tests.helpers import valid_request
from tests.test_openai_http_failures import wait_for

TENANT = Tenant("t", "0" * 64)


@pytest.fixture
async def dispatcher(dispatcher_factory):
    return await dispatcher_factory(policy="fcfs")


def session(d, worker_id: str = "w1", max_model_len: int = 2048, acks_aborts: bool = True) -> WorkerSession:
    return WorkerSession(worker_id, d.cfg.model_name, block_size=16, num_blocks=100, max_batch=4,
                         max_model_len=max_model_len, acks_aborts=acks_aborts)


def assigns(s: WorkerSession) -> list[str]:
    out = []
    while not s.outbox.empty():
        cmd = s.outbox.get_nowait()
        if cmd.WhichOneof("kind") == "assign":
            out.append(cmd.assign.job_id)
    return out


async def submitted(d, *names: str) -> list[str]:
    for name in names:
        assert await d.submit(valid_request(name), TENANT)
    return [keys.job_id(TENANT.name, name) for name in names]


async def test_a_worker_that_redials_at_once_keeps_the_jobs_placed_on_its_new_session(dispatcher):
    """Before, the lost session's requeue went on after the new session had joined under the same worker id and
    been given the jobs again: they were pulled from under it (queued in Redis while it ran them, sent twice) and
    its id was dropped from the worker list."""
    d = dispatcher
    old = session(d)
    assert await d.worker_joined(old)
    jobs = await submitted(d, "a", "b", "c")
    await d.tick()
    assert sorted(assigns(old)) == jobs
    gate, gated = asyncio.Event(), asyncio.Event()
    requeue = d.store.requeue

    async def slow_requeue(*args, **kwargs):
        if asyncio.current_task() is lost:          # only the lost session's requeues wait
            gated.set()
            await gate.wait()
        return await requeue(*args, **kwargs)

    d.store.requeue = slow_requeue
    lost = asyncio.create_task(d.worker_lost(old))
    await asyncio.wait_for(gated.wait(), 30)
    new = session(d)
    join = asyncio.create_task(d.worker_joined(new))
    await asyncio.wait({join}, timeout=2)           # the old code joins here, and its tick places the jobs
    if join.done():
        await d.tick()
    gate.set()
    await asyncio.wait_for(lost, 30)
    assert await asyncio.wait_for(join, 30)
    await d.tick()
    sent = assigns(new)
    assert sorted(sent) == jobs, sent               # each sent once to the new session
    for job_id in jobs:
        state = await d.store.state(job_id)
        assert (state.status, state.worker) == ("running", "w1"), job_id
    assert "w1" in await d.store.known_workers()


async def test_a_job_claimed_but_never_sent_goes_back_to_the_queue(dispatcher, monkeypatch):
    """Before, Redis failing between the claim and the assignment left the job "running" on a connected worker that
    never had it, for good: its client waited for ever."""
    d = dispatcher
    w = session(d)
    assert await d.worker_joined(w)
    [a] = await submitted(d, "a")
    output = d.store.output

    async def fails_once(job_id):
        monkeypatch.setattr(d.store, "output", output)
        raise redis.exceptions.ConnectionError("simulated outage")

    monkeypatch.setattr(d.store, "output", fails_once)
    with pytest.raises(redis.exceptions.ConnectionError):
        await d.tick()
    assert (await d.store.state(a)).status == "queued"              # put back at once
    await d.tick()
    assert assigns(w) == [a]

    # Redis failing for the requeue too: the sweep of strays finds it on its second pass, and the worker is told
    [b] = await submitted(d, "b")
    monkeypatch.setattr(d.store, "output", fails_once)
    requeue = d.store.requeue

    async def requeue_fails_once(*args, **kwargs):
        monkeypatch.setattr(d.store, "requeue", requeue)
        raise redis.exceptions.ConnectionError("simulated outage")

    monkeypatch.setattr(d.store, "requeue", requeue_fails_once)
    with pytest.raises(redis.exceptions.ConnectionError):
        await d.tick()
    assert (await d.store.state(b)).status == "running"
    assert await d.recover_orphans() == 0                           # seen once: it may be a move under way
    assert (await d.store.state(b)).status == "running"
    assert await d.recover_orphans() == 1                           # seen twice: a stray
    assert (await d.store.state(b)).status == "queued"
    assert any(cmd.WhichOneof("kind") == "abort" and cmd.abort.job_id == b for cmd in drain(w))
    assert (await d.store.state(a)).status == "running"             # the placed job is no stray


def drain(s: WorkerSession) -> list:
    out = []
    while not s.outbox.empty():
        out.append(s.outbox.get_nowait())
    return out


async def placed_then_aborted(d) -> tuple[WorkerSession, str]:
    """A worker, and a job placed on it, then aborted."""
    w = session(d)
    assert await d.worker_joined(w)
    [a] = await submitted(d, "a")
    await d.tick()
    assert assigns(w) == [a]
    assert (await d.abort(a))[0]
    return w, a


async def test_a_step_failure_reported_after_an_abort_leaves_nothing_behind(dispatcher):
    """Before, the failure's report read the ended job back into the scheduler's memory for good: counted as
    waiting, and first in line for prefill-early, whose claims always failed."""
    from alise.v1 import generate_pb2 as pb

    d = dispatcher
    w, a = await placed_then_aborted(d)
    assert await d.store.progress(a) is None                        # an ended job has no progress to take over
    await d.on_worker_message(w, wpb.WorkerMessage(step_failed=wpb.StepFailed(
        job_ids=[a], charged_job_ids=[a], charges_named=True, error="boom")))
    # and after the abort's acknowledgement too (a worker of an older build sends none)
    await d.on_worker_message(w, wpb.WorkerMessage(finished=wpb.JobFinished(job_id=a,
                                                                            finish_reason=pb.FINISH_REASON_ABORTED)))
    await d.on_worker_message(w, wpb.WorkerMessage(step_failed=wpb.StepFailed(
        job_ids=[a], charged_job_ids=[a], charges_named=True, error="boom")))
    assert not d.state.knows(a) and d.state.waiting() == 0
    assert (await d.store.state(a)).status == "aborted"


async def test_a_prompt_longer_than_any_connected_worker_runs_is_refused(dispatcher, model_dir):
    """Before, the scheduler never read the context a worker registers (capped by its KV pool): a longer prompt was
    accepted and stayed queued for good. Now it is refused naming the prompt; a worker is given only jobs whose
    context it holds."""
    d = dispatcher
    tok = PromptTokenizer(str(model_dir))
    api = AliseServicer(d, d.store, tok, tok.max_model_len, TenantRegistry([TENANT]))
    small = session(d, "small", max_model_len=128)
    assert await d.worker_joined(small)
    long_prompt = to_generate_request({"prompt": "hello " * 300, "max_tokens": 8}, chat=False, request_id="long")
    context = HttpCallContext("unused")
    with pytest.raises(CallAborted) as refused:
        await anext(api.generate_for(TENANT, long_prompt, context))
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT and "prompt" in refused.value.message
    assert "128" in refused.value.message
    assert await d.store.state(keys.job_id(TENANT.name, "long")) is None        # no job was made
    # placement: a job read back with a longer context than a worker holds goes to one that holds it
    big = session(d, "big", max_model_len=4096)
    assert await d.worker_joined(big)
    ok = to_generate_request({"prompt": "hello " * 300, "max_tokens": 8}, chat=False, request_id="fits")
    stream = asyncio.create_task(anext(api.generate_for(TENANT, ok, context)))
    job_id = keys.job_id(TENANT.name, "fits")
    await wait_for(lambda: d.state.knows(job_id))
    await d.tick()
    assert assigns(small) == [] and assigns(big) == [job_id]
    stream.cancel()
    await asyncio.gather(stream, return_exceptions=True)


async def test_a_left_job_is_aborted_once_redis_answers_again(dispatcher_factory, model_dir, monkeypatch):
    """Before, the re-attach grace's abort met a Redis error and was dropped: nothing else aborts a left job, which
    ran on to max_tokens holding one of its tenant's live-job slots."""
    d = await dispatcher_factory(reattach_grace_s=0.1)
    tok = PromptTokenizer(str(model_dir))
    api = AliseServicer(d, d.store, tok, tok.max_model_len, TenantRegistry([TENANT]))
    [a] = await submitted(d, "a")
    read_state = d.store.state
    failures = []

    async def unavailable_twice(job_id):
        if len(failures) < 2:
            failures.append(job_id)
            raise redis.exceptions.ConnectionError("simulated outage")
        return await read_state(job_id)

    monkeypatch.setattr(d.store, "state", unavailable_twice)
    api._left(a, (await read_state(a)).record.fingerprint)
    for _ in range(600):
        if (await read_state(a)).status == "aborted":
            break
        await asyncio.sleep(0.05)
    assert (await read_state(a)).status == "aborted" and len(failures) == 2
    await wait_for(lambda: a not in api._pending_aborts)


async def test_late_messages_about_an_aborted_job_never_reach_a_new_job_with_its_id(dispatcher):
    """Before, an aborted job's late tokens and finish, sent by its worker before it read the abort, were recorded
    on a new request that had taken the id meanwhile and been placed on the same worker. Now a worker acknowledges
    each abort after everything it said about the job, and until then the scheduler sets aside what it says of it."""
    from dataclasses import replace

    from alise.v1 import generate_pb2 as pb

    d = dispatcher
    w, a = await placed_then_aborted(d)
    assert any(cmd.WhichOneof("kind") == "abort" and cmd.abort.job_id == a for cmd in drain(w))
    assert await d.submit(replace(valid_request("a"), fingerprint="another request"), TENANT)   # the id, reused
    await d.tick()
    assert assigns(w) == [a]

    async def says(**message) -> None:
        await d.on_worker_message(w, wpb.WorkerMessage(**message))

    await says(tokens=wpb.TokenEvents(deltas=[wpb.TokenDelta(job_id=a, token_ids=[9], text="OLD")]))
    await says(finished=wpb.JobFinished(job_id=a, finish_reason=pb.FINISH_REASON_STOP))
    await says(preempted=wpb.JobPreempted(job_id=a, mode=wpb.PREEMPT_MODE_SWAP))
    state = await d.store.state(a)
    assert (state.status, state.token_ids, state.record.fingerprint) == ("running", [], "another request")
    await says(finished=wpb.JobFinished(job_id=a, finish_reason=pb.FINISH_REASON_ABORTED))     # the acknowledgement
    await says(tokens=wpb.TokenEvents(deltas=[wpb.TokenDelta(job_id=a, token_ids=[5], text="new")]))
    state = await d.store.state(a)
    assert (state.status, state.token_ids, state.text) == ("running", [5], "new")              # the new job's own
    assert not w.unacked_aborts
    # a worker of an older build acknowledges nothing: nothing is awaited from it, nothing of it set aside
    old_build = session(d, "w2", acks_aborts=False)
    old_build.abort(a)
    assert not old_build.unacked_aborts
    message = wpb.WorkerMessage(tokens=wpb.TokenEvents(deltas=[wpb.TokenDelta(job_id=a, token_ids=[1])]))
    assert old_build.current(message) is message


async def test_a_job_longer_than_every_serving_workers_context_is_placed_to_fail_clearly(dispatcher):
    """A job validated while a worker with a longer context was connected (or none was) must not wait for good once
    only shorter ones serve: it is placed, and the worker's refusal fails it with an error."""
    d = dispatcher
    [a] = await submitted(d, "a")                    # no worker yet: the model's context applied
    short = session(d, "short", max_model_len=2)     # shorter than the job's 3 prompt tokens
    assert await d.worker_joined(short)
    await d.tick()
    assert assigns(short) == [a]


async def test_a_worker_that_leaves_with_a_job_still_recorded_on_it_stays_findable_by_the_sweep(dispatcher):
    """Review, session 23: a job recorded in Redis as running on a worker that this scheduler had already let go (a
    preemption report whose requeue Redis refused) was not requeued when the worker left, and the worker was dropped
    from the registry the orphan sweep walks: the job stayed "running" for good, holding its tenant's slot."""
    d = dispatcher
    w = session(d)
    assert await d.worker_joined(w)
    [job] = await submitted(d, "a")
    assert await d.store.claim(job, "w1")           # recorded on w1; this scheduler placed nothing there
    await d.worker_lost(w)
    assert "w1" in await d.store.known_workers()    # kept: a job is still recorded on it
    assert await d.recover_orphans() == 1
    state = await d.store.state(job)
    assert state.status == "queued" and "w1" not in await d.store.known_workers()


async def test_a_job_whose_record_is_gone_leaves_its_workers_entry_too(dispatcher):
    """Since a worker with a job recorded on it stays listed for the sweep (above), an entry whose job record is gone
    (an ended job's, or one Redis lost) must not keep it listed and counted as requeued at every sweep for good."""
    d = dispatcher
    [job] = await submitted(d, "a")
    assert await d.store.claim(job, "w1")           # w1 never connected here
    d.state.forget(job)
    await d.store.r.delete(keys.job(job))           # its record lost
    assert await d.recover_orphans() == 0           # nothing went back to the queue: not counted as requeued
    assert await d.store.worker_job_ids("w1") == [] and "w1" not in await d.store.known_workers()


async def registration_refused(port: int, register: wpb.WorkerMessage) -> grpc.aio.AioRpcError:
    """How the gateway ends a worker's Connect call that registers with `register` (it must end it with an error)."""
    from alise.v1 import worker_pb2_grpc as wpb_grpc

    from services.common.auth import bearer_metadata

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = wpb_grpc.WorkerGatewayStub(channel).Connect(iter([register]), metadata=bearer_metadata("t" * 32))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in call:
                pass
    return err.value


@contextlib.asynccontextmanager
async def gateway_serving(d):
    """The dispatcher's worker gateway on a free port, with service token "t" * 32; yields the port."""
    from services.common.auth import ServiceTokenCheck
    from services.common.grpc_server import build_server
    from services.common.lenient import add_lenient_service
    from services.scheduler.worker_sessions import WorkerGateway

    server, _, port = build_server([], "127.0.0.1:0")
    add_lenient_service(server, WorkerGateway(d, ServiceTokenCheck("t" * 32)), wpb, "WorkerGateway")
    await server.start()
    try:
        yield port
    finally:
        await server.stop(None)


async def test_a_worker_that_registers_while_the_store_refuses_is_told_to_retry(dispatcher):
    """Review, session 23: a join that met an unavailable (or fenced) job store ended the worker's call as UNKNOWN,
    with a traceback in the scheduler's log; and a join refused for an id already connected ended it with no error."""
    from services.scheduler.job_store import JobStore

    d = dispatcher
    [job] = await submitted(d, "a")
    await d.store.r.set(keys.SCHEDULER_LEASE, "new")
    assert await JobStore(d.store.r, leader="new").claim(job, "w1")   # the successor's worker w1 runs it
    d.store = JobStore(d.store.r, leader="old")                         # this scheduler's term ran out
    async with gateway_serving(d) as port:
        register = wpb.WorkerMessage(register=wpb.WorkerRegister(
            worker_id="w1", model=d.cfg.model_name, block_size=16, num_blocks=64, max_batch=4, max_model_len=2048))
        err = await registration_refused(port, register)
        assert err.code() == grpc.StatusCode.UNAVAILABLE and "job store" in err.details()
        assert "w1" not in d.sessions
        state = await d.store.state(job)
        assert (state.status, state.worker) == ("running", "w1")       # the refused requeue changed nothing

        async def taken(s):          # the id was taken between the gateway's own check and the join (a race)
            return False

        d.worker_joined = taken
        err = await registration_refused(port, register)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "already connected" in err.details()


@pytest.mark.parametrize("learn", [False, True])
async def test_a_benchmark_scheduler_teaches_the_predictor_lengths_forced_by_ignore_eos(dispatcher_factory, learn):
    """With a random-weight model a benchmark forces each output to the workload's true length (ignore_eos,
    max_tokens): with --learn-forced-lengths the finished job's length reaches the predictor's stream, so the
    predictor learns online as in serving; without it (serving) a forced length is censored."""
    from alise.v1 import generate_pb2 as pb

    from services.common.observations import STREAM

    d = await dispatcher_factory(policy="fcfs", learn_forced_lengths=learn)
    w = session(d)
    assert await d.worker_joined(w)
    [a] = await submitted(d, "a")                     # ignore_eos, max_tokens 8
    await d.tick()
    assert assigns(w) == [a]
    await d.on_worker_message(w, wpb.WorkerMessage(tokens=wpb.TokenEvents(
        deltas=[wpb.TokenDelta(job_id=a, token_ids=list(range(8)), text="x" * 8)])))
    await d.on_worker_message(w, wpb.WorkerMessage(finished=wpb.JobFinished(job_id=a,
                                                                            finish_reason=pb.FINISH_REASON_LENGTH)))
    assert (await d.store.state(a)).status == "finished"
    assert [int(f[b"output_tokens"]) for _, f in await d.store.r.xrange(STREAM)] == ([8] if learn else [])


async def test_the_early_rows_a_worker_registers_with_reach_the_policys_view_and_a_negative_count_is_refused(
        dispatcher):
    """The worker says how many jobs on their way to park it decodes at once (`--early-rows`), so that the policy
    sends no more (test_policies: test_alise_sends_no_more_jobs_to_park_than_the_worker_runs_at_once)."""
    from alise.v1 import worker_pb2_grpc as wpb_grpc

    from services.common.auth import bearer_metadata

    d = dispatcher
    fields = dict(model=d.cfg.model_name, block_size=16, num_blocks=64, max_batch=4, max_model_len=2048)
    async with gateway_serving(d) as port:
        err = await registration_refused(port, wpb.WorkerMessage(register=wpb.WorkerRegister(
            worker_id="w1", early_rows=-1, **fields)))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "early_rows" in err.details()
        assert "w1" not in d.sessions
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            register = wpb.WorkerMessage(register=wpb.WorkerRegister(worker_id="w2", early_rows=3, **fields))
            done = asyncio.Event()

            async def messages():              # the session lasts while the worker's side of the stream is open
                yield register
                await done.wait()

            call = wpb_grpc.WorkerGatewayStub(channel).Connect(messages(), metadata=bearer_metadata("t" * 32))
            deadline = asyncio.get_running_loop().time() + 30
            while "w2" not in d.sessions and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.02)
            [view] = d.state.snapshot(0, []).workers
            assert (view.worker_id, view.early_rows) == ("w2", 3)
            done.set()
            call.cancel()


async def test_a_job_that_has_waited_due_after_s_goes_first_in_the_queue_by_arrival(dispatcher_factory):
    """The hard bound behind aging (session 25 review: aging alone bounds how much later an overtaking job may come,
    not how long a job waits): once a job has waited due_after_s, the scheduler re-scores it in Redis, and no later
    job of its class is placed before it, however short."""
    d = await dispatcher_factory(policy="alise", due_after_s=5.0)
    assert await d.submit(valid_request("long", max_tokens=1000), TENANT)
    assert await d.submit(valid_request("short", max_tokens=2), TENANT)      # predicted 2 tokens: far less work
    long_id, short_id = keys.job_id(TENANT.name, "long"), keys.job_id(TENANT.name, "short")
    await d.snapshot()
    assert await d.store.queue_head(2) == [short_id, long_id]               # shortest first, while neither is due

    deadline = asyncio.get_running_loop().time() + 60
    while True:
        await d.snapshot()                        # each tick's snapshot re-scores the jobs that became due
        if await d.store.queue_head(2) == [long_id, short_id]:
            break
        assert asyncio.get_running_loop().time() < deadline, "the job that came first never went first"
        await asyncio.sleep(0.05)
    assert d.state.view(long_id).due


async def test_a_job_deep_in_a_predecessors_queue_still_becomes_due(dispatcher_factory):
    """Review of due_after_s (session 25): a scheduler reads jobs in from the queue's head (256 jobs), so a job a
    predecessor left deeper than that was never known here and never became due: behind a stream of shorter jobs
    it could wait for good. A new scheduler reads every queued job's arrival when it takes over."""
    many = Tenant("t", "0" * 64, max_live_jobs=1000)
    first = await dispatcher_factory(policy="alise", due_after_s=3.0)
    assert await first.submit(valid_request("long", max_tokens=1000), many)
    for i in range(300):                                  # shorter work: all ranked ahead of it
        assert await first.submit(valid_request(f"short{i}", max_tokens=2), many)
    long_id = keys.job_id(many.name, "long")
    assert (await first.store.queue_head(301))[-1] == long_id
    successor = await dispatcher_factory(policy="alise", due_after_s=3.0)     # the same Redis, nothing read yet
    assert await successor.recover_arrivals() == 301
    deadline = asyncio.get_running_loop().time() + 60
    while (await successor.store.queue_head(1)) != [long_id]:
        assert asyncio.get_running_loop().time() < deadline, "the job deep in the queue never became due"
        await successor.snapshot()
        await asyncio.sleep(0.05)


async def test_a_workers_own_preemptions_for_room_count_against_the_jobs_bound(dispatcher):
    """Found by review (issue 11, "preemptions per job <= the configured bound"): a worker that preempted a job for
    room told no one, so the job's count (what the policies bound, the client's num_preemptions) missed it and the
    worker, which knew no bound, could recompute it again and again. Now the worker names it, the scheduler counts it
    in Redis and in its state, and each assignment tells the worker how many preemptions the job has left."""
    d = dispatcher
    w = session(d)
    assert await d.worker_joined(w)
    [a] = await submitted(d, "a")
    await d.tick()
    [sent] = [cmd.assign for cmd in drain(w) if cmd.WhichOneof("kind") == "assign"]
    assert sent.HasField("preemptions_left") and sent.preemptions_left == d.cfg.max_preemptions == 2

    async def recomputed() -> None:
        await d.on_worker_message(w, wpb.WorkerMessage(recomputed=wpb.JobsRecomputed(job_ids=[a])))

    await recomputed()
    assert d.state.preemptions(a) == 1
    assert (await d.store.progress(a))[2] == 1 and (await d.store.state(a)).num_preemptions == 1  # a successor's count
    await d.on_worker_message(w, wpb.WorkerMessage(preempted=wpb.JobPreempted(job_id=a, mode=wpb.PREEMPT_MODE_SWAP)))
    await recomputed()                              # a late report: the job no longer runs there, nothing is counted
    assert d.state.preemptions(a) == 2 and (await d.store.state(a)).num_preemptions == 2
    await d.tick()                                  # resumed: none left
    [again] = [cmd.assign for cmd in drain(w) if cmd.WhichOneof("kind") == "assign"]
    assert again.job_id == a and again.HasField("preemptions_left") and again.preemptions_left == 0


async def test_a_preemption_order_that_crosses_the_workers_own_preemption_counts_one_loss(dispatcher):
    """Session 26 left it (RELIABILITY.md, the seventh review): the scheduler orders a job off its worker while the
    worker, out of room, preempts that job itself and reports it (JobsRecomputed). The order's answer came back as
    a preemption and was counted again, so the job reached its bound one loss early. One loss counts once."""
    d = dispatcher
    w = session(d)
    assert await d.worker_joined(w)
    [a] = await submitted(d, "a")
    await d.tick()
    drain(w)
    d._preempt(a, w)                                # the order is on its way ...
    await d.on_worker_message(w, wpb.WorkerMessage(recomputed=wpb.JobsRecomputed(job_ids=[a])))   # ... crossing this
    await d.on_worker_message(w, wpb.WorkerMessage(preempted=wpb.JobPreempted(job_id=a,
                                                                               mode=wpb.PREEMPT_MODE_RECOMPUTE)))
    assert d.state.preemptions(a) == 1
    assert (await d.store.progress(a))[2] == 1 and (await d.store.state(a)).num_preemptions == 1
    assert (await d.store.state(a)).status == "queued"
    await d.tick()                                  # placed again, with one preemption left, and ordered off again:
    [again] = [cmd.assign for cmd in drain(w) if cmd.WhichOneof("kind") == "assign"]
    assert again.job_id == a and again.preemptions_left == 1
    d._preempt(a, w)                                # an order nothing crossed counts as before
    await d.on_worker_message(w, wpb.WorkerMessage(preempted=wpb.JobPreempted(job_id=a,
                                                                               mode=wpb.PREEMPT_MODE_RECOMPUTE)))
    assert d.state.preemptions(a) == 2 and (await d.store.progress(a))[2] == 2
