"""Fault injection with real processes (issue 8): SIGKILL Redis, the scheduler, a worker or the predictor in
the middle of a workload, or SIGSTOP a worker, with and without stop strings. Every test ends with the counts that matter:
accepted, completed, lost (0), duplicated tokens (0), and text identical to an undisturbed run."""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field

import grpc
import pytest
from alise.v1 import generate_pb2 as pb

from services.common.local_stack import wait_healthy
from tests.helpers import job_status, request, stub_for, wait_until

NEVER = "@@never-in-this-output@@"      # a stop string that never matches: text is held back all along
PROMPTS = ["Explain why the sky is blue.", "Write a short poem about rivers.", "List five fruits and their colours.",
           "Describe how a bicycle works."]
TOKENS = 40


@dataclass
class Result:
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    final: pb.GenerateComplete | None = None
    attempts: int = 0


def workload(tag: str) -> list[pb.GenerateRequest]:
    """Greedy requests, half of them with stop strings, so text and tokens are reproducible run to run."""
    return [request(p, f"{tag}-{i}-{uuid.uuid4().hex[:8]}", max_tokens=TOKENS, ignore_eos=True,
                    stop=[NEVER, "\n\n\n\n"] if i % 2 else [])
            for i, p in enumerate(PROMPTS)]


def stream(stack, req: pb.GenerateRequest, out: Result, retry: bool) -> None:
    """One client. With `retry`, it sends the same request again when the stream breaks: the scheduler
    re-attaches it, replaying the output so far in the first chunk, so each attempt starts from scratch."""
    while True:
        out.attempts += 1
        out.tokens, out.text = [], ""
        try:
            for resp in stub_for(stack).Generate(req, timeout=600):
                if resp.HasField("chunk"):
                    out.tokens += resp.chunk.token_ids
                    out.text += resp.chunk.text
                else:
                    out.final = resp.complete
            return
        except grpc.RpcError as e:
            if not retry or e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                raise
            wait_healthy(stack.address, 120)


def run(stack, reqs, during=None, retry=False) -> list[Result]:
    """Run the requests concurrently; `during(ids)` is the fault, injected once every job has tokens."""
    results = [Result() for _ in reqs]
    threads = [threading.Thread(target=stream, args=(stack, r, out, retry), daemon=True)
               for r, out in zip(reqs, results)]
    for t in threads:
        t.start()
    if during is not None:
        stub = stub_for(stack)
        wait_until(lambda: all(len(stub.GetJob(pb.GetJobRequest(request_id=r.request_id)).token_ids) >= 4
                               if job_status(stub, r.request_id) else False for r in reqs), 180, 0.05)
        during([r.request_id for r in reqs])
    for t in threads:
        t.join(600)
    return results


def check(reference: list[Result], results: list[Result], label: str) -> None:
    completed = sum(r.final is not None and r.final.finish_reason == pb.FINISH_REASON_LENGTH for r in results)
    duplicated = sum(max(0, len(r.tokens) - TOKENS) for r in results)
    same_text = sum(r.text == ref.text and r.final is not None and r.final.text == ref.final.text
                    for r, ref in zip(results, reference))
    same_tokens = sum(r.tokens == ref.tokens for r, ref in zip(results, reference))
    print(f"\n[{label}] accepted {len(results)}, completed {completed}, lost {len(results) - completed}, "
          f"duplicated tokens {duplicated}, token-identical {same_tokens}, text-identical {same_text}, "
          f"client attempts {sum(r.attempts for r in results)}")
    assert completed == len(results) and duplicated == 0
    assert same_tokens == len(results) and same_text == len(results)


@pytest.fixture(scope="module")
def stack(stack_factory):
    return stack_factory(num_workers=1)


@pytest.fixture
def healthy(stack):
    """Every test starts from a whole stack: whatever an earlier test killed and left dead is restarted."""
    if stack.redis.proc.poll() is not None:
        stack.redis.restart(kill=False)
    for name, svc in stack.services.items():
        if svc.proc.poll() is not None:
            stack.restart(name)
    wait_healthy(stack.address, 120)
    stack.wait_workers(1, 180)
    return stack


@pytest.fixture(scope="module")
def reference(stack):
    return run(stack, workload("reference"))


def test_redis_sigkill_loses_no_job_and_answers_unavailable_while_away(healthy, reference):
    stack = healthy
    seen_while_down = []

    def kill_redis(ids):
        time.sleep(1.5)                 # AOF is fsynced every second: what was accepted is on disk now
        stack.redis.kill()
        try:
            stub_for(stack).GetJob(pb.GetJobRequest(request_id=ids[0]), timeout=30)
        except grpc.RpcError as e:
            seen_while_down.append(e.code())
        stack.redis.restart(kill=False)

    results = run(stack, workload("redis"), during=kill_redis)
    assert seen_while_down == [grpc.StatusCode.UNAVAILABLE]
    check(reference, results, "redis SIGKILL")


def test_scheduler_sigkill_clients_re_attach_and_get_the_rest(healthy, reference):
    stack = healthy
    results = run(stack, workload("sched"), during=lambda ids: stack.restart("scheduler", kill=True), retry=True)
    assert all(r.attempts >= 2 for r in results)           # every stream broke and was re-attached
    check(reference, results, "scheduler SIGKILL")


def test_worker_sigkill_jobs_continue_on_the_restarted_worker(healthy, reference):
    stack = healthy
    results = run(stack, workload("worker"), during=lambda ids: stack.restart("worker-0", kill=True))
    assert all(r.final.timings.num_preemptions >= 1 for r in results)    # every job was moved
    check(reference, results, "worker SIGKILL")


def test_predictor_sigkill_jobs_are_still_admitted_and_served(healthy, reference):
    stack = healthy
    stack.services["predictor"].kill()
    late = workload("nopredictor")
    results = run(stack, late)                  # admitted with the prior while the predictor is gone
    stack.restart("predictor")
    check(reference, results, "predictor SIGKILL")


def test_one_of_two_workers_sigkilled_under_load(stack_factory, reference):
    """Two workers share the load; one is killed: its jobs move to the survivor and finish there, and the
    others never notice. Same counts as above."""
    pair = stack_factory(num_workers=2)
    reqs = workload("pair")
    stub = stub_for(pair)

    def kill_busy_worker(ids):
        load = stub.GetLoad(pb.LoadRequest())
        busiest = max(load.workers, key=lambda w: w.running).worker_id
        pair.services[busiest].kill()

    results = run(pair, reqs, during=kill_busy_worker)
    assert sum(r.final.timings.num_preemptions >= 1 for r in results) >= 1      # some jobs were moved
    check(reference, results, "1 of 2 workers SIGKILL")
    assert len(stub.GetLoad(pb.LoadRequest()).workers) == 1


def stop_the_worker_until_it_leaves(stack, within_s: float, queued: list[bool]):
    """The fault: SIGSTOP the stack's only worker (it keeps its connection open, as a hung process or a cut-off node
    looks), wait until the scheduler drops it from the worker list, note whether its jobs went back to the queue,
    then SIGCONT it. The scheduler takes a worker off its list first and then requeues its jobs one by one (so no
    new job is sent to it meanwhile): the statuses are read once they settle, not at the instant it leaves (CI's
    stop 35 read them in between and saw them all still running)."""
    stub = stub_for(stack)

    def statuses(ids):
        return [job_status(stub, i) for i in ids]

    def during(ids):
        pid = stack.services["worker-0"].proc.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            wait_until(lambda: len(stub.GetLoad(pb.LoadRequest()).workers) == 0, within_s, 0.2)
            with contextlib.suppress(TimeoutError):
                wait_until(lambda: all(s == pb.JOB_STATUS_QUEUED for s in statuses(ids)), 30, 0.2)
            seen = statuses(ids)
            print(f"\nstatuses once the worker left: {[pb.JobStatus.Name(s) for s in seen]}")
            queued.extend(s == pb.JOB_STATUS_QUEUED for s in seen)
        finally:
            os.kill(pid, signal.SIGCONT)
    return during


def test_a_stopped_worker_loses_its_jobs_to_the_queue_and_finishes_them_when_it_answers_again(stack_factory, reference):
    """A stopped worker is taken for lost once it has been silent past the scheduler's limit: it leaves the worker
    list and its jobs go back to the queue instead of staying "running" for ever. Resumed, it reconnects and
    finishes them, token for token as an undisturbed run."""
    quiet = stack_factory(num_workers=1, scheduler_args=["--worker-silence-s", "5"], worker_args=["--heartbeat-s", "0.5"])
    queued_while_stopped: list[bool] = []
    # within the silence limit and well before keepalive (~30 s) would end the connection anyway
    results = run(quiet, workload("stopped"), during=stop_the_worker_until_it_leaves(quiet, 25, queued_while_stopped))
    assert queued_while_stopped and all(queued_while_stopped)
    assert all(r.final.timings.num_preemptions >= 1 for r in results)     # every job was moved
    check(reference, results, "worker SIGSTOP")


def test_keepalive_ends_the_connection_of_a_worker_that_stops_answering(stack_factory, reference):
    """The same stopped worker with the silence watchdog out of the way (an hour): HTTP/2 keepalive alone must end
    its connection (a ping every 20 s, unanswered for 10 s: keepalive.py), so its jobs go back to the queue and
    finish after it resumes. Without keepalive the open TCP connection would keep them "running" for 15 minutes
    or more."""
    watchless = stack_factory(num_workers=1, scheduler_args=["--worker-silence-s", "3600"])
    queued_while_stopped: list[bool] = []
    results = run(watchless, workload("keepalive"),
                  during=stop_the_worker_until_it_leaves(watchless, 90, queued_while_stopped))
    assert queued_while_stopped and all(queued_while_stopped)
    check(reference, results, "worker SIGSTOP, keepalive only")
