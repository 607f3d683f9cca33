"""A property test of the job lifecycle against a real Redis (issue 11): random sequences of arrivals, claims,
token appends, preemptions, failed steps, finishes, cancellations and lost workers, each checked against a
plain model. Whatever the order: every accepted job is always in exactly one place (queued, held by one worker,
or ended), ends at most once and never changes after (finished, failed or cancelled), keeps every token it was
given, and the count of preemptions the scheduler ordered (which the policies bound) leaves out lost workers;
the queue, the workers' job sets and the tenant's live set hold exactly the jobs the model says."""
from __future__ import annotations

import asyncio

import redis.asyncio as aioredis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from services.scheduler import keys
from services.scheduler.job_store import CreateOutcome, JobRecord, JobStore, RequeueCause, StepFailureOutcome
from tests.helpers import job_sampling

TENANT = "t"
WORKERS = ("w1", "w2", "w3")
MAX_STEP_FAILURES = 2
FINAL = ("finished", "failed", "aborted")


class JobLifecycle(RuleBasedStateMachine):
    redis_url = ""                                   # set by the test

    jobs = Bundle("jobs")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.client = aioredis.from_url(self.redis_url)
        self.run(self.client.flushdb())
        self.store = JobStore(self.client)
        self.status: dict[str, str] = {}             # the model: job -> queued / running / finished / failed / aborted
        self.holder: dict[str, str] = {}             # running job -> its worker
        self.tokens: dict[str, list[int]] = {}
        self.failures: dict[str, int] = {}
        self.preemptions: dict[str, int] = {}
        self.next_id = 0

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        self.run(self.client.aclose())
        self.loop.close()

    # -- rules: each does what the dispatcher does and checks the store's answer against the model ------------
    @rule(target=jobs)
    def arrive(self):
        job_id = f"{TENANT}/j{self.next_id}"
        self.next_id += 1
        rec = JobRecord(job_id=job_id, prompt_ids=[1, 2, 3], prompt_text="hi", sampling=job_sampling(8),
                        pred_len=10, pred_p90=20, predicted=True, fingerprint=job_id)
        assert self.run(self.store.create(rec, float(self.next_id), 1000, 1000)) is CreateOutcome.CREATED
        self.status[job_id], self.tokens[job_id], self.failures[job_id], self.preemptions[job_id] = "queued", [], 0, 0
        return job_id

    @rule(job=jobs, worker=st.sampled_from(WORKERS))
    def claim(self, job, worker):
        ok = self.run(self.store.claim(job, worker))
        assert ok == (self.status[job] == "queued")            # never run twice, never run a final job
        if ok:
            self.status[job], self.holder[job] = "running", worker

    @rule(job=jobs, worker=st.sampled_from(WORKERS), new=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=3))
    def append(self, job, worker, new):
        [count] = self.run(self.store.append_many(worker, [(job, new, "x")]))
        held = self.status[job] == "running" and self.holder[job] == worker
        assert (count > 0) == held                            # only the holder's tokens are kept
        if held:
            self.tokens[job] += new
            assert count == len(self.tokens[job])

    @rule(job=jobs, worker=st.sampled_from(WORKERS))
    def preempt(self, job, worker):
        ok = self.run(self.store.requeue(job, worker, 0.5, cause=RequeueCause.PREEMPTED))
        held = self.status[job] == "running" and self.holder[job] == worker
        assert ok == held
        if ok:
            self.status[job] = "queued"
            self.preemptions[job] += 1
            del self.holder[job]

    @rule(job=jobs, worker=st.sampled_from(WORKERS))
    def step_fails(self, job, worker):
        outcome = self.run(self.store.fail_step(job, worker, 0.5, MAX_STEP_FAILURES))
        if not (self.status[job] == "running" and self.holder[job] == worker):
            assert outcome is StepFailureOutcome.NOT_HELD
            return
        self.failures[job] += 1
        del self.holder[job]
        if self.failures[job] >= MAX_STEP_FAILURES:
            assert outcome is StepFailureOutcome.FAILED
            self.status[job] = "failed"
        else:
            assert outcome is StepFailureOutcome.REQUEUED
            self.status[job] = "queued"

    @rule(job=jobs, worker=st.sampled_from(WORKERS))
    def finish(self, job, worker):
        ok = self.run(self.store.finish(job, worker, "stop"))
        assert ok == (self.status[job] == "running" and self.holder[job] == worker)   # ends once, by its holder
        if ok:
            self.status[job] = "finished"
            del self.holder[job]

    @rule(job=jobs)
    def cancel(self, job):
        aborted, previous, worker, _ = self.run(self.store.abort(job))
        assert aborted == (self.status[job] not in FINAL)
        if aborted:
            assert previous == self.status[job] and worker == self.holder.get(job, "")
            self.status[job] = "aborted"
            self.holder.pop(job, None)

    @rule(worker=st.sampled_from(WORKERS))
    def lose_worker(self, worker):
        # what the dispatcher does when a worker's session ends: its jobs go back to the queue
        for job in self.run(self.store.worker_job_ids(worker)):
            assert self.run(self.store.requeue(job, worker, 0.5))
        for job in [j for j, w in self.holder.items() if w == worker]:
            self.status[job] = "queued"
            del self.holder[job]

    # -- what must hold after every step --------------------------------------------------------------------
    @invariant()
    def store_matches_the_model(self):
        queued = set(self.run(self.store.queue_head(10_000)))
        assert queued == {j for j, s in self.status.items() if s == "queued"}
        for w in WORKERS:
            assert set(self.run(self.store.worker_job_ids(w))) == {j for j, h in self.holder.items() if h == w}
        live = {m.decode() for m in self.run(self.client.smembers(keys.tenant_live(TENANT)))}
        assert live == {j for j, s in self.status.items() if s not in FINAL}
        for job, status in self.status.items():
            state = self.run(self.store.state(job))
            assert state.status == status and state.token_ids == self.tokens[job]
            ordered = self.run(self.client.hget(keys.job(job), "ordered_preemptions"))
            assert int(ordered or 0) == self.preemptions[job]
            assert state.worker == self.holder.get(job, "") or status in FINAL


def test_every_job_ends_once_whatever_the_order_of_events(redis_server):
    JobLifecycle.redis_url = redis_server.url
    run_state_machine_as_test(JobLifecycle, settings=settings(
        max_examples=60, stateful_step_count=40, deadline=None, derandomize=True,
        suppress_health_check=list(HealthCheck)))
