"""A failed engine step is reported and every job it held is requeued, or failed after repeated failures
(issue 8.2: one request used to stop a whole batch with no error while the scheduler kept its slots)."""
from __future__ import annotations

import asyncio
import contextlib

import pytest
from alise.v1 import generate_pb2 as pb
from alise.v1 import worker_pb2 as wpb

from services.scheduler import keys
from services.scheduler.tenants import Tenant
from services.scheduler.worker_sessions import WorkerSession
from services.worker.config import WorkerConfig
from tests.helpers import valid_request
from services.worker.engine_loop import EngineLoop, outgoing_message
from services.worker.factory import build_engine


def assign(job_id: str, prompt_ids: list[int], temperature: float, max_tokens: int = 32) -> wpb.SchedulerCommand:
    return wpb.SchedulerCommand(assign=wpb.AssignJob(job_id=job_id, prompt_token_ids=prompt_ids, sampling=pb.SamplingParams(
        temperature=temperature, max_tokens=max_tokens, ignore_eos=True)))


@contextlib.asynccontextmanager
async def engine_loop_running(engine):
    """The engine on its own thread, its messages arriving in the returned outbox, stopped at the end."""
    loop_thread = EngineLoop(engine, report_interval_s=0.1)
    outbox: asyncio.Queue = asyncio.Queue()
    loop_thread.attach(asyncio.get_running_loop(), outbox)
    loop_thread.start()
    try:
        yield loop_thread, outbox
    finally:
        loop_thread.stop()
        loop_thread.join(30)


async def next_message(outbox: asyncio.Queue, kind: str, job_id: str | None = None):
    while True:
        msg = outgoing_message(await asyncio.wait_for(outbox.get(), 120))
        if msg.WhichOneof("kind") == kind and (job_id is None or getattr(msg, kind).job_id == job_id):
            return getattr(msg, kind)


async def test_worker_reports_a_failed_step_with_every_job_it_held(model_dir, tokenizer):
    engine = build_engine(WorkerConfig(model_dir=str(model_dir), num_blocks=64, max_batch=8, token_budget=128))
    async with engine_loop_running(engine) as (loop_thread, outbox):
        ids = tokenizer.encode("Tell me a story.", add_special_tokens=False)
        # a job swapped out before the failure is back in the scheduler's queue already: not reported as failed,
        # but its swapped KV, which the failure drops, is
        loop_thread.submit(assign("swapped", ids, 0.0))
        await next_message(outbox, "tokens")
        loop_thread.submit(wpb.SchedulerCommand(preempt=wpb.PreemptJob(job_id="swapped", mode=wpb.PREEMPT_MODE_SWAP)))
        assert (await next_message(outbox, "preempted", "swapped")).mode == wpb.PREEMPT_MODE_SWAP
        # a value that would fail sampling (NaN: the scheduler refuses it, the worker checks again) fails its
        # own assignment only, never the batch it would have joined
        loop_thread.submit(assign("innocent", ids, 0.0, max_tokens=600))        # still running at the fault
        loop_thread.submit(assign("poison", ids, float("nan")))
        refused = await next_message(outbox, "step_failed")
        assert list(refused.job_ids) == ["poison"] and "temperature" in refused.error
        assert "innocent" in engine.seqs and "poison" not in engine.seqs
        # a fault inside the step itself (as a device error would raise): every job it held is reported
        forward = engine.runner.forward

        def faulty(*args, **kwargs):
            engine.runner.forward = forward                              # once
            raise RuntimeError("simulated device fault")
        engine.runner.forward = faulty
        failed = await next_message(outbox, "step_failed")
        assert list(failed.job_ids) == ["innocent"] and "simulated device fault" in failed.error
        assert list((await next_message(outbox, "kept_kv_dropped")).job_ids) == ["swapped"]
        assert not engine.seqs and engine.blocks.num_used == 0 and engine.blocks.num_swapped == 0   # nothing left
        loop_thread.submit(assign("after", ids, 0.0))                     # and the worker still serves
        assert (await next_message(outbox, "finished")).job_id == "after"
        # an assignment the engine refuses (here: a job it holds already) is reported, and dropped
        loop_thread.submit(assign("twice", ids, 0.0))
        loop_thread.submit(assign("twice", ids, 0.0))
        assert list((await next_message(outbox, "step_failed")).job_ids) == ["twice"]
        assert "twice" not in engine.seqs


async def test_a_failed_step_is_charged_to_the_jobs_new_to_the_batch(model_dir, tokenizer):
    """A request that breaks a step breaks the first one it joins: the failure is charged to the jobs that had not
    yet sampled a token here, not to the decodes that shared the step (each charge brings a job nearer to failing)."""
    from services.worker.sequence import SeqStatus

    engine = build_engine(WorkerConfig(model_dir=str(model_dir), num_blocks=64, max_batch=8, token_budget=128))
    async with engine_loop_running(engine) as (loop_thread, outbox):
        ids = tokenizer.encode("Tell me a story.", add_special_tokens=False)
        loop_thread.submit(assign("decoding", ids, 0.0, max_tokens=600))
        await next_message(outbox, "tokens")
        forward = engine.runner.forward

        def fails_with_the_newcomer(*args, **kwargs):
            newcomer = engine.seqs.get("new")
            if newcomer is not None and newcomer.status is SeqStatus.RUNNING:
                engine.runner.forward = forward                          # once
                raise RuntimeError("simulated fault of a poisonous request")
            return forward(*args, **kwargs)

        engine.runner.forward = fails_with_the_newcomer
        loop_thread.submit(assign("new", ids, 0.0))
        failed = await next_message(outbox, "step_failed")
    assert sorted(failed.job_ids) == ["decoding", "new"] and list(failed.charged_job_ids) == ["new"]


async def test_scheduler_charges_a_failed_step_only_to_the_jobs_the_worker_names(dispatcher):
    d = dispatcher
    session = WorkerSession("w1", d.cfg.model_name, block_size=16, num_blocks=100, max_batch=4, max_model_len=2048)
    await d.worker_joined(session)
    tenant = Tenant("t", "0" * 64)
    for j in ("a", "b"):
        assert await d.submit(valid_request(j), tenant)
    for _ in range(d.cfg.max_step_failures):
        await d.tick()
        assert next_assign(session) == {"t/a", "t/b"}
        await d.on_worker_message(session, wpb.WorkerMessage(step_failed=wpb.StepFailed(
            job_ids=["t/a", "t/b"], charged_job_ids=["t/b"], charges_named=True, error="boom")))
    assert (await d.store.state("t/b")).status == "failed"
    assert (await d.store.state("t/a")).status == "queued"            # it only shared the steps: never charged
    await d.tick()
    assert next_assign(session) == {"t/a"}
    await d.on_worker_message(session, wpb.WorkerMessage(step_failed=wpb.StepFailed(    # a failure in planning:
        job_ids=["t/a"], charges_named=True, error="boom")))                            # the worker charges nobody
    assert await d.store.r.hget(keys.job("t/a"), "step_failures") in (None, b"0")


def kept_kv_dropped() -> int:
    from prometheus_client import generate_latest

    from bench.step_times import parse_step_histogram
    from services.worker import metrics

    return dict(parse_step_histogram(generate_latest(metrics.REGISTRY).decode()).made_of)["kept_kv_dropped"]


async def test_what_a_failing_step_settled_before_it_raised_is_still_reported(model_dir, tokenizer):
    """Regression (review): a job parked after its first token in the same collect where a later job's token
    raised was dropped with no word: the scheduler kept it as running there for good."""
    from services.worker.sequence import SeqStatus

    engine = build_engine(WorkerConfig(model_dir=str(model_dir), num_blocks=64, max_batch=8, token_budget=128))
    loop_thread = EngineLoop(engine, report_interval_s=0.1)
    outbox: asyncio.Queue = asyncio.Queue()
    loop_thread.attach(asyncio.get_running_loop(), outbox)
    ids = tokenizer.encode("Tell me a story.", add_special_tokens=False)
    park = assign("p", ids, 0.0)
    park.assign.park_after_first_token = True
    loop_thread.submit(park)                       # both before the thread starts: one prefill step, p first
    loop_thread.submit(assign("x", ids, 0.0))
    append = engine._append_token

    def faulty(seq, token, out):
        if seq.job_id == "x" and engine.seqs["p"].status is SeqStatus.PARKED:
            raise RuntimeError("simulated fault while collecting")
        append(seq, token, out)
    engine._append_token = faulty
    dropped_before = kept_kv_dropped()
    loop_thread.start()
    try:
        seen = []
        while not seen or seen[-1][0] != "step_failed":
            msg = outgoing_message(await asyncio.wait_for(outbox.get(), 120))
            kind = msg.WhichOneof("kind")
            seen.append((kind, getattr(msg, kind)))
        parked = [m for k, m in seen if k == "preempted" and m.job_id == "p"]
        assert parked and parked[0].mode == wpb.PREEMPT_MODE_PARK        # its park is reported, not lost
        assert any(d.job_id == "p" and list(d.token_ids) for k, m in seen if k == "tokens" for d in m.deltas)
        assert list(seen[-1][1].job_ids) == ["x"]
        assert list((await next_message(outbox, "kept_kv_dropped")).job_ids) == ["p"]
        assert kept_kv_dropped() == dropped_before + 1         # and counted in the worker's /metrics
        assert not engine.seqs and engine.blocks.num_used == 0
    finally:
        loop_thread.stop()
        loop_thread.join(30)


@pytest.fixture
async def dispatcher(dispatcher_factory):
    return await dispatcher_factory(policy="fcfs", max_step_failures=2)


def next_assign(session: WorkerSession) -> set[str]:
    out = set()
    while not session.outbox.empty():
        cmd = session.outbox.get_nowait()
        if cmd.WhichOneof("kind") == "assign":
            out.add(cmd.assign.job_id)
    return out


async def test_scheduler_requeues_jobs_of_a_failed_step_then_fails_a_repeat_offender(dispatcher):
    d = dispatcher
    session = WorkerSession("w1", d.cfg.model_name, block_size=16, num_blocks=100, max_batch=4, max_model_len=2048)
    await d.worker_joined(session)
    tenant = Tenant("t", "0" * 64)
    a, b = "t/a", "t/b"
    events = d.hub.subscribe(a)
    for j in ("a", "b"):
        assert await d.submit(valid_request(j), tenant)
    await d.tick()
    assert next_assign(session) == {a, b}
    await d.on_worker_message(session, wpb.WorkerMessage(tokens=wpb.TokenEvents(deltas=[
        wpb.TokenDelta(job_id=a, token_ids=[7], text="x")])))
    await d.on_worker_message(session, wpb.WorkerMessage(step_failed=wpb.StepFailed(
        job_ids=[a, b], charged_job_ids=[a], charges_named=True, error="boom")))
    assert not d.state.workers["w1"].jobs                                            # the slots are free again
    for j in (a, b):
        assert (await d.store.state(j)).status == "queued"
    assert (await d.store.state(a)).token_ids == [7]                  # resumes from its tokens
    await d.tick()
    assert next_assign(session) == {a, b}
    await d.on_worker_message(session, wpb.WorkerMessage(step_failed=wpb.StepFailed(job_ids=[a], error="boom")))
    state = await d.store.state(a)
    assert (state.status, state.finish_reason) == ("failed", "error")
    assert (await d.store.state(b)).status == "running"                # b was not in the second failure
    chunk = await asyncio.wait_for(events.get(), 5)
    done = await asyncio.wait_for(events.get(), 5)
    assert chunk.response.chunk.token_ids == [7] and chunk.first_token == 0
    assert done.response.complete.finish_reason == pb.FINISH_REASON_ERROR      # the client hears about it


async def test_a_preemption_reported_after_an_abort_leaves_nothing_behind(dispatcher):
    """Regression: a `preempted` report racing an abort used to bring the ended job back into the scheduler's
    memory (and count a preemption) for good."""
    d = dispatcher
    session = WorkerSession("w1", d.cfg.model_name, block_size=16, num_blocks=100, max_batch=4, max_model_len=2048)
    assert await d.worker_joined(session)
    assert await d.submit(valid_request("a"), Tenant("t", "0" * 64))
    await d.tick()
    assert next_assign(session) == {"t/a"}
    assert (await d.abort("t/a"))[0]
    await d.on_worker_message(session, wpb.WorkerMessage(preempted=wpb.JobPreempted(
        job_id="t/a", mode=wpb.PREEMPT_MODE_SWAP)))
    assert not d.state.knows("t/a") and not d.state.workers["w1"].jobs
    assert (await d.store.state("t/a")).status == "aborted"


async def test_a_second_session_with_a_connected_workers_id_is_refused(dispatcher):
    d = dispatcher
    first = WorkerSession("w1", d.cfg.model_name, block_size=16, num_blocks=100, max_batch=4, max_model_len=2048)
    second = WorkerSession("w1", d.cfg.model_name, block_size=16, num_blocks=100, max_batch=4, max_model_len=2048)
    assert await d.worker_joined(first)
    assert not await d.worker_joined(second)
    assert d.sessions["w1"] is first


async def test_a_request_that_breaks_steps_while_decoding_fails_alone(dispatcher):
    """Regression (session 21's open item): a request that broke every step once decoding (no job new to the batch:
    the worker charges every job in the step) failed the jobs that shared its steps with it. Now such a failure
    charges nobody, its jobs run apart, and the one that breaks a step again is charged alone."""
    from services.scheduler.live_state import SUSPECT_CLEAR_TOKENS
    d = dispatcher
    session = WorkerSession("w1", d.cfg.model_name, block_size=16, num_blocks=100, max_batch=4, max_model_len=2048)
    await d.worker_joined(session)
    tenant = Tenant("t", "0" * 64)
    a, b, p, n = "t/a", "t/b", "t/p", "t/n"

    async def decoded(job_id: str, count: int) -> None:
        await d.on_worker_message(session, wpb.WorkerMessage(tokens=wpb.TokenEvents(deltas=[
            wpb.TokenDelta(job_id=job_id, token_ids=[7] * count, text="x" * count)])))

    async def fails(*in_step: str) -> None:
        await d.on_worker_message(session, wpb.WorkerMessage(step_failed=wpb.StepFailed(
            job_ids=list(in_step), charged_job_ids=list(in_step), charges_named=True, error="boom")))

    async def step_failures(job_id: str) -> int:
        return int(await d.store.r.hget(keys.job(job_id), "step_failures") or 0)

    for j in ("a", "b", "p"):
        assert await d.submit(valid_request(j), tenant)
    await d.tick()
    assert next_assign(session) == {a, b, p}
    for j in (a, b, p):
        await decoded(j, 1)
    await fails(a, b, p)                                    # p breaks the step; nothing tells it from a and b
    assert [await step_failures(j) for j in (a, b, p)] == [0, 0, 0]
    assert await d.submit(valid_request("n"), tenant)       # a job that was in no failure runs beside a suspect
    await d.tick()
    assert next_assign(session) == {a, n}                   # one suspect at a time
    await d.tick()
    assert next_assign(session) == set()
    await decoded(a, SUSPECT_CLEAR_TOKENS)                  # a decodes well past the failure: no longer a suspect
    await d.tick()
    assert next_assign(session) == {b}
    await decoded(b, SUSPECT_CLEAR_TOKENS)
    for _ in range(d.cfg.max_step_failures):
        await d.tick()
        assert p in next_assign(session)
        await fails(p, a, b, n)                             # p is the only suspect in the step: it alone is charged
    state = await d.store.state(p)
    assert (state.status, state.finish_reason) == ("failed", "error")
    assert [await step_failures(j) for j in (a, b, n)] == [0, 0, 0]
    assert {(await d.store.state(j)).status for j in (a, b, n)} == {"queued"}


async def test_a_worker_acknowledges_each_abort_after_all_it_said_about_the_job(model_dir, tokenizer):
    """The scheduler sets aside what a worker says about a job it was told to abort until the worker acknowledges
    the abort (a request may reuse the id meanwhile): the acknowledgement must come after the job's last token, and
    for a job the worker no longer holds too, or the scheduler would wait for it for good."""
    engine = build_engine(WorkerConfig(model_dir=str(model_dir), num_blocks=64, max_batch=8, token_budget=128))
    async with engine_loop_running(engine) as (loop_thread, outbox):
        ids = tokenizer.encode("Tell me a story.", add_special_tokens=False)
        loop_thread.submit(assign("a", ids, 0.0, max_tokens=600))
        await next_message(outbox, "tokens")
        loop_thread.submit(wpb.SchedulerCommand(abort=wpb.AbortJob(job_id="a")))
        loop_thread.submit(wpb.SchedulerCommand(abort=wpb.AbortJob(job_id="never-here")))
        seen = []
        while len([m for m in seen if m.WhichOneof("kind") == "finished"]) < 2:
            seen.append(outgoing_message(await asyncio.wait_for(outbox.get(), 120)))
        acks = [i for i, m in enumerate(seen) if m.WhichOneof("kind") == "finished"]
        assert [seen[i].finished.job_id for i in acks] == ["a", "never-here"]
        assert all(seen[i].finished.finish_reason == pb.FINISH_REASON_ABORTED for i in acks)
        after = [d.job_id for m in seen[acks[0] + 1:] if m.WhichOneof("kind") == "tokens" for d in m.tokens.deltas]
        assert "a" not in after and "a" not in engine.seqs


async def decoding_then_the_next_flush_fails(engine, loop_thread, outbox, ids) -> None:
    """Job "a" decoding; the next flush of the step in flight raises (once), as a device fault would."""
    loop_thread.submit(assign("a", ids, 0.0, max_tokens=600))
    await next_message(outbox, "tokens")
    flush = engine.flush

    def fails_once():
        engine.flush = flush
        raise RuntimeError("simulated fault of the step in flight")
    engine.flush = fails_once


async def test_an_abort_whose_flush_fails_drops_every_job_before_it_is_acknowledged(model_dir, tokenizer):
    """Review, session 22: an abort whose flush of the step in flight raised was never acknowledged (the scheduler
    set that id aside for good), and acknowledging it anyway would have let the job, still held, go on after."""
    engine = build_engine(WorkerConfig(model_dir=str(model_dir), num_blocks=64, max_batch=8, token_budget=128))
    async with engine_loop_running(engine) as (loop_thread, outbox):
        ids = tokenizer.encode("Tell me a story.", add_special_tokens=False)
        loop_thread.submit(assign("b", ids, 0.0, max_tokens=600))
        await decoding_then_the_next_flush_fails(engine, loop_thread, outbox, ids)
        loop_thread.submit(wpb.SchedulerCommand(abort=wpb.AbortJob(job_id="a")))
        failed = await next_message(outbox, "step_failed")
        assert sorted(failed.job_ids) == ["a", "b"] and "simulated fault" in failed.error
        ack = await next_message(outbox, "finished")
        assert (ack.job_id, ack.finish_reason) == ("a", pb.FINISH_REASON_ABORTED)
        assert not engine.seqs


async def test_a_refused_assignment_whose_flush_fails_leaves_the_engine_thread_serving(model_dir, tokenizer):
    """Review, session 22: refusing an assignment flushes the step in flight; when that flush raised, the exception
    left the engine thread, which died while the worker stayed registered, taking jobs it would never run."""
    engine = build_engine(WorkerConfig(model_dir=str(model_dir), num_blocks=64, max_batch=8, token_budget=128))
    async with engine_loop_running(engine) as (loop_thread, outbox):
        ids = tokenizer.encode("Tell me a story.", add_special_tokens=False)
        await decoding_then_the_next_flush_fails(engine, loop_thread, outbox, ids)
        loop_thread.submit(assign("a", ids, 0.0))                       # refused: the worker holds "a" already
        failed = await next_message(outbox, "step_failed")
        assert "simulated fault" in failed.error and "a" in failed.job_ids
        assert loop_thread.is_alive()
        loop_thread.submit(assign("after", ids, 0.0))                     # and it still serves
        assert (await next_message(outbox, "finished")).job_id == "after"


async def test_a_preemption_whose_flush_fails_drops_every_job_and_says_so(model_dir, tokenizer):
    """Review, session 23: a preemption's flush of the step in flight that raised was logged and ignored: nothing was
    reported, the sequences after the failing one waited for a token that was lost (the next step fed token id 0 in
    its place), and a job could be left never finishing."""
    engine = build_engine(WorkerConfig(model_dir=str(model_dir), num_blocks=64, max_batch=8, token_budget=128))
    async with engine_loop_running(engine) as (loop_thread, outbox):
        ids = tokenizer.encode("Tell me a story.", add_special_tokens=False)
        loop_thread.submit(assign("b", ids, 0.0, max_tokens=600))
        await decoding_then_the_next_flush_fails(engine, loop_thread, outbox, ids)
        loop_thread.submit(wpb.SchedulerCommand(preempt=wpb.PreemptJob(job_id="a", mode=wpb.PREEMPT_MODE_RECOMPUTE)))
        failed = await next_message(outbox, "step_failed")
        assert sorted(failed.job_ids) == ["a", "b"] and "simulated fault" in failed.error
        assert not engine.seqs and engine.blocks.num_used == 0
        loop_thread.submit(assign("after", ids, 0.0))                     # and it still serves
        assert (await next_message(outbox, "finished")).job_id == "after"


async def test_a_swap_whose_copy_fails_is_a_recompute_and_so_is_a_swap_back_that_fails(model_dir, tokenizer):
    """Review, session 23: a swap out whose copy to host memory raised (the gather's temporary out of device memory)
    left the job SWAPPED with nothing copied and nothing reported: the scheduler waited for it for good, and never
    preempted on that worker again. A swap back in that raised failed the job's assignment as a failed step."""
    engine = build_engine(WorkerConfig(model_dir=str(model_dir), num_blocks=64, max_batch=8, token_budget=128))
    async with engine_loop_running(engine) as (loop_thread, outbox):
        ids = tokenizer.encode("Tell me a story.", add_special_tokens=False)
        cache = engine.runner.cache
        copy_out, copy_in = cache.copy_out, cache.copy_in

        def broken(*args):
            raise RuntimeError("simulated: out of device memory")
        loop_thread.submit(assign("a", ids, 0.0, max_tokens=40))
        await next_message(outbox, "tokens", None)
        cache.copy_out = broken
        loop_thread.submit(wpb.SchedulerCommand(preempt=wpb.PreemptJob(job_id="a", mode=wpb.PREEMPT_MODE_SWAP)))
        assert (await next_message(outbox, "preempted", "a")).mode == wpb.PREEMPT_MODE_RECOMPUTE
        assert "a" not in engine.seqs and engine.blocks.num_swapped == 0 and engine.blocks.num_used == 0
        cache.copy_out = copy_out
        loop_thread.submit(assign("b", ids, 0.0, max_tokens=40))
        await next_message(outbox, "tokens", None)
        loop_thread.submit(wpb.SchedulerCommand(preempt=wpb.PreemptJob(job_id="b", mode=wpb.PREEMPT_MODE_SWAP)))
        assert (await next_message(outbox, "preempted", "b")).mode == wpb.PREEMPT_MODE_SWAP
        cache.copy_in = broken
        loop_thread.submit(assign("b", ids, 0.0, max_tokens=40))         # resumed here: its copy back fails
        done = await next_message(outbox, "finished", "b")
        assert done.finish_reason == pb.FINISH_REASON_LENGTH            # recomputed from its tokens, to the end
        assert not engine.seqs and engine.blocks.num_swapped == 0 and engine.blocks.num_used == 0


async def test_a_worker_whose_device_is_broken_stops_serving(model_dir, tokenizer):
    """Review, session 23: a worker whose device no longer ran anything (a CUDA error that leaves the context broken
    for good) stayed registered and looked idle: it drew jobs and failed every one of them. Now a failed step is
    followed by a check that the device still answers, and FATAL_FAILED_STEPS failures in a row stop it too."""
    from services.worker.engine_loop import FATAL_FAILED_STEPS

    ids = tokenizer.encode("Tell me a story.", add_special_tokens=False)

    def always_fails(*args, **kwargs):
        raise RuntimeError("simulated device fault")

    for device_answers in (False, True):
        engine = build_engine(WorkerConfig(model_dir=str(model_dir), num_blocks=64, max_batch=8, token_budget=128))
        engine.device_answers = lambda answers=device_answers: answers
        engine.runner.forward = always_fails
        reasons: list[str] = []
        loop_thread = EngineLoop(engine, report_interval_s=0.1, on_fatal=reasons.append)
        outbox: asyncio.Queue = asyncio.Queue()
        loop_thread.attach(asyncio.get_running_loop(), outbox)
        loop_thread.start()
        try:
            failures = 0
            while not reasons:
                loop_thread.submit(assign(f"j{failures}", ids, 0.0))
                failed = await next_message(outbox, "step_failed")
                failures += 1
                assert failures <= FATAL_FAILED_STEPS
            assert failures == (1 if not device_answers else FATAL_FAILED_STEPS)
            assert "does not answer" in reasons[0] if not device_answers else "in a row" in reasons[0]
            assert not failed.charged_job_ids           # the device's fault: the job is not charged with it
            loop_thread.submit(assign("later", ids, 0.0))
            assert not (await next_message(outbox, "step_failed")).charged_job_ids
            assert len(reasons) == 1                    # said once
        finally:
            loop_thread.stop()
            loop_thread.join(30)
