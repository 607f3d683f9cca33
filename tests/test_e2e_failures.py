"""Failures through the live stack: scheduler restart, a lost worker, an unreachable predictor."""
from __future__ import annotations

import asyncio
import threading
import time

import grpc
from alise.v1 import generate_pb2 as pb

from services.common.local_stack import wait_healthy
from services.common.model_paths import DEFAULT_MODEL_NAME
from tests.helpers import (generate, generate_in_background, hf_greedy, job_status, kv_idle, request, stub_for,
                           wait_until)

PROMPT = "Explain why the sky is blue."


def submit_in_background(stub, req) -> threading.Thread:
    def run():
        try:
            generate(stub, req, timeout=300)
        except grpc.RpcError:
            pass                                  # the scheduler went away under this stream
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_scheduler_restart_keeps_the_queue(stack_factory, hf_model, tokenizer):
    stack = stack_factory(num_workers=0)
    stub = stub_for(stack)
    ids = [f"restart-{i}-{time.time_ns()}" for i in range(3)]
    for rid in ids:
        submit_in_background(stub, request(PROMPT, rid, max_tokens=8, ignore_eos=True))
    wait_until(lambda: all(job_status(stub, r) == pb.JOB_STATUS_QUEUED for r in ids), 30)
    stack.restart("scheduler", kill=True)          # SIGKILL: nothing is flushed on the way out
    wait_healthy(stack.address, 60)
    stub = stub_for(stack)
    assert stub.GetLoad(pb.LoadRequest()).queued == 3
    stack.add_worker()
    wait_until(lambda: all(job_status(stub, r) == pb.JOB_STATUS_FINISHED for r in ids), 120)
    expected = hf_greedy(hf_model, tokenizer, PROMPT, 8)
    for rid in ids:
        assert list(stub.GetJob(pb.GetJobRequest(request_id=rid)).token_ids) == expected


def test_lost_worker_jobs_are_requeued_and_continue(stack_factory, hf_model, tokenizer):
    stack = stack_factory(num_workers=1)
    stub = stub_for(stack)
    rid = f"lost-{time.time_ns()}"
    t, result = generate_in_background(stub, request(PROMPT, rid, max_tokens=64, ignore_eos=True))
    wait_until(lambda: len(stub.GetJob(pb.GetJobRequest(request_id=rid)).token_ids) >= 8
               if job_status(stub, rid) else False, 60, 0.05)
    stack.services["worker-0"].kill()
    wait_until(lambda: len(stub.GetLoad(pb.LoadRequest()).workers) == 0, 30)
    wait_until(lambda: job_status(stub, rid) == pb.JOB_STATUS_QUEUED, 10)    # requeued, tokens kept
    assert len(stub.GetJob(pb.GetJobRequest(request_id=rid)).token_ids) >= 8
    stack.restart("worker-0")
    t.join(300)
    tokens, _, final = result["out"]
    assert final.finish_reason == pb.FINISH_REASON_LENGTH and final.timings.num_preemptions >= 1
    assert tokens == hf_greedy(hf_model, tokenizer, PROMPT, 64)    # the client saw one seamless stream
    wait_until(lambda: kv_idle(stub), timeout=10)


def test_predictor_down_scheduler_keeps_serving(stack_factory):
    stack = stack_factory(with_predictor=False, scheduler_args=["--predictor-timeout-s", "0.2"])
    stub = stub_for(stack)
    tokens, text, final = generate(stub, request("Hello there", max_tokens=4, ignore_eos=True))
    assert len(tokens) == 4 and final.finish_reason == pb.FINISH_REASON_LENGTH
    assert not stub.GetLoad(pb.LoadRequest()).predictor_available


def test_worker_sigterm_drains_running_jobs(stack_factory):
    stack = stack_factory(num_workers=1)
    stub = stub_for(stack)
    rid = f"drain-{time.time_ns()}"
    t, result = generate_in_background(stub, request(PROMPT, rid, max_tokens=40, ignore_eos=True), timeout=120)
    wait_until(lambda: job_status(stub, rid) == pb.JOB_STATUS_RUNNING, 60, 0.02)
    worker = stack.services["worker-0"]
    worker.stop(timeout_s=60)                       # SIGTERM: NOT_SERVING, drain, then leave
    assert worker.proc.returncode == 0
    t.join(60)
    tokens, _, final = result["out"]
    assert len(tokens) == 40 and final.timings.num_preemptions == 0   # finished, not handed back
    wait_until(lambda: len(stub.GetLoad(pb.LoadRequest()).workers) == 0, 10)


def sample(text: str, name: str, **labels) -> float | None:
    """The value of the series `name` with exactly `labels` in a /metrics page, or None."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return None


def test_prometheus_metrics(stack_factory):
    import urllib.request

    from services.common.local_stack import free_port

    sched_port, worker_port = free_port(), free_port()
    stack = stack_factory(scheduler_args=["--metrics-port", str(sched_port)],
                          worker_args=["--metrics-port", str(worker_port)])
    prompt = "Tell me, in plain words and with one example each, what a hash map and a binary search tree are."
    generate(stub_for(stack), request(prompt, max_tokens=5, ignore_eos=True))

    def scrape(port):
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()

    model = {"model_name": DEFAULT_MODEL_NAME}              # every series carries the served model, as vLLM's do
    sched = scrape(sched_port)
    assert sample(sched, "vllm:e2e_request_latency_seconds_count", **model) == 1.0
    assert sample(sched, "alise:predictor_available", **model) == 1.0
    assert sample(sched, "vllm:request_success_total", finished_reason="length", **model) == 1.0
    assert sample(sched, "vllm:request_queue_time_seconds_count", **model) == 1.0
    assert sample(sched, "vllm:time_to_first_token_seconds_bucket", le="0.001", **model) is not None   # from 1 ms
    # the scheduler's cluster-wide queue is not the engines' vllm:num_requests_waiting (a sum would double-count)
    assert "vllm:num_requests_waiting" not in sched and sample(sched, "alise:num_requests_queued", **model) == 0.0
    wait_until(lambda: sample(scrape(worker_port), "vllm:kv_cache_usage_perc", **model) == 0.0, 10)
    assert sample(scrape(worker_port), "vllm:generation_tokens_total", **model) == 5.0
    # the same prompt again: its full blocks come from the prefix cache
    generate(stub_for(stack), request(prompt, max_tokens=5, ignore_eos=True))

    def counter(name):
        return sample(scrape(worker_port), name, **model) or 0.0
    wait_until(lambda: counter("vllm:prefix_cache_hits_total") >= 16, 10)
    assert counter("vllm:prefix_cache_queries_total") > counter("vllm:prefix_cache_hits_total")


def test_a_worker_whose_device_breaks_leaves_exits_non_zero_and_loses_no_job(stack_factory, model_dir, hf_model,
                                                                               tokenizer, monkeypatch):
    """The worker's own side of a broken device (server.py): its engine loop takes the device for broken after a
    failed step, the worker stops serving, drains briefly and exits non-zero (to be restarted on a fresh device),
    charging no job with the fault; the scheduler requeues what it held and another worker finishes it. Only the
    engine loop's side had a test (test_step_failure.py); this path had none."""
    from services.worker import server as worker_server
    from services.worker.config import WorkerConfig

    def always_fails(*args, **kwargs):
        raise RuntimeError("simulated device fault")

    def broken_engine(cfg):
        engine = real_build_engine(cfg)
        engine.runner.forward = always_fails
        engine.device_answers = lambda: False           # as after a CUDA error that leaves the context broken
        return engine

    real_build_engine = worker_server.build_engine
    monkeypatch.setattr(worker_server, "build_engine", broken_engine)
    stack = stack_factory(num_workers=0)
    monkeypatch.setenv("ALISE_SERVICE_TOKEN", stack.service_token)
    cfg = WorkerConfig(scheduler=stack.gateway_address, worker_id="broken", model_dir=str(model_dir), num_blocks=64)
    ended: list[BaseException] = []

    def run_worker():
        try:        # its own event loop, and a stop event of its own: signal handlers belong to the main thread
            asyncio.run(worker_server.serve(cfg, asyncio.Event()))
        except BaseException as e:  # noqa: BLE001 - SystemExit is what is expected
            ended.append(e)

    worker = threading.Thread(target=run_worker, daemon=True)
    worker.start()
    stub = stub_for(stack)
    wait_until(lambda: len(stub.GetLoad(pb.LoadRequest()).workers) == 1, 120)
    rid = f"broken-{time.time_ns()}"
    t, result = generate_in_background(stub, request(PROMPT, rid, max_tokens=16, ignore_eos=True))
    worker.join(120)
    assert not worker.is_alive() and ended, "the worker did not stop"
    assert isinstance(ended[0], SystemExit) and "does not answer" in str(ended[0].code), repr(ended[0])
    wait_until(lambda: len(stub.GetLoad(pb.LoadRequest()).workers) == 0, 30)
    assert job_status(stub, rid) == pb.JOB_STATUS_QUEUED            # requeued, not failed: it was not its fault
    stack.add_worker()
    t.join(300)
    tokens, _, final = result["out"]
    assert final.finish_reason == pb.FINISH_REASON_LENGTH and tokens == hf_greedy(hf_model, tokenizer, PROMPT, 16)
