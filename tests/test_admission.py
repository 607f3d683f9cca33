"""Admission bounds (issue 8.5): the queue is bounded by jobs and by predicted queued work; beyond either,
a new job is refused (the API answers RESOURCE_EXHAUSTED with a retry hint), never queued without limit."""
from __future__ import annotations

import pytest

from services.scheduler.job_store import CreateOutcome, RequeueCause
from services.scheduler.tenants import Tenant
from tests.helpers import valid_request

TENANT = Tenant("t", "0" * 64, max_live_jobs=10_000)


async def test_queue_bound_by_jobs(dispatcher_factory):
    d = await dispatcher_factory(max_queued_jobs=3)
    outcomes = [await d.submit(valid_request(f"j{i}"), TENANT) for i in range(5)]
    assert outcomes == [CreateOutcome.CREATED] * 3 + [CreateOutcome.QUEUE_FULL] * 2
    assert await d.store.queue_length() == 3


async def test_queue_bound_by_predicted_work(dispatcher_factory):
    d = await dispatcher_factory(max_queued_work_s=2.0)
    outcomes = []
    for i in range(200):
        outcomes.append(await d.submit(valid_request(f"j{i}", max_tokens=256), TENANT))
        await d.tick()                                 # the tick measures what is queued
        if outcomes[-1] is CreateOutcome.WORK_FULL:
            break
    assert outcomes[-1] is CreateOutcome.WORK_FULL and 1 < len(outcomes) < 200
    assert d.queued_work_s > 2.0
    assert await d.store.queue_length() == len(outcomes) - 1


async def test_a_new_scheduler_keeps_the_preemption_count_of_jobs_it_takes_over(dispatcher_factory):
    """The policies bound how often a job is preempted; the count lives in Redis, so a scheduler that restarts
    (or takes over) must read it back, not start every job at zero."""
    first = await dispatcher_factory()
    assert await first.submit(valid_request("j0"), TENANT) is CreateOutcome.CREATED
    job_id = next(iter(await first.store.queue_head(10)))
    for _ in range(2):                                  # preempted twice, then its worker was lost once
        assert await first.store.claim(job_id, "w1")
        assert await first.store.requeue(job_id, "w1", 1.0, cause=RequeueCause.PREEMPTED)
    assert await first.store.claim(job_id, "w1") and await first.store.requeue(job_id, "w1", 1.0)
    restarted = await dispatcher_factory()
    snap = await restarted.snapshot()
    assert [j.preemptions for j in snap.queued] == [2]


async def test_max_tokens_bounds_predictions_unless_a_benchmark_forces_lengths_with_it(dispatcher_factory):
    """A request cannot run past max_tokens, so its predicted length is bounded by it. A benchmark that forces
    every output's length through max_tokens (ignore_eos) would thereby tell the scheduler the true lengths;
    with --no-predict-within-max-tokens the policies see the prediction (here the prior: no predictor runs)."""
    for bounded, expected in ((True, 5), (False, 128)):
        d = await dispatcher_factory(predict_within_max_tokens=bounded)
        await d.store.r.flushdb()
        assert await d.submit(valid_request(f"j{bounded}", max_tokens=5), TENANT) is CreateOutcome.CREATED
        [job] = (await d.snapshot()).queued
        assert job.remaining_tokens == pytest.approx(expected, rel=0.05), (bounded, job)


async def test_a_workers_length_estimate_is_bounded_and_kept_only_for_its_running_jobs(dispatcher_factory):
    """Regression (review): an estimate of 1e300 tokens was stored as is, and building the job's timings
    (an int32 field) then raised; NaN was stored too. Now it is bounded like any prediction (max_tokens)."""
    from alise.v1 import worker_pb2 as wpb

    from services.scheduler.job_messages import timings

    d = await dispatcher_factory()
    for i in range(2):
        assert await d.submit(valid_request(f"r{i}", max_tokens=8), TENANT) is CreateOutcome.CREATED
    running, queued = sorted(await d.store.queue_head(10))
    assert await d.store.claim(running, "w1")
    await d._on_estimates("w1", wpb.LengthEstimates(estimates=[
        wpb.LengthEstimate(job_id=running, output_tokens=1e300), wpb.LengthEstimate(job_id=queued, output_tokens=3),
        wpb.LengthEstimate(job_id="t/unknown", output_tokens=3)]))
    state = await d.store.state(running)
    assert state.record.repred_len == 8 and timings(state).repredicted_output_tokens == 8
    assert (await d.store.state(queued)).record.repred_len == 0                 # not running on w1: not kept
    await d._on_estimates("w1", wpb.LengthEstimates(estimates=[wpb.LengthEstimate(job_id=running,
                                                                                  output_tokens=float("nan"))]))
    assert (await d.store.state(running)).record.repred_len == 8              # NaN changes nothing
