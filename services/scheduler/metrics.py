"""Scheduler metrics (Prometheus). vLLM's names where one exists, ours under `alise:`."""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUESTS_WAITING = Gauge("vllm:num_requests_waiting", "Jobs queued in the scheduler")
REQUESTS_RUNNING = Gauge("vllm:num_requests_running", "Jobs placed on workers")
PREEMPTIONS = Counter("vllm:num_preemptions", "Preemptions ordered by the scheduler")
TTFT = Histogram("vllm:time_to_first_token_seconds", "Accepted -> first token",
                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
E2E = Histogram("vllm:e2e_request_latency_seconds", "Accepted -> finished",
                buckets=(0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600))
PREDICTOR_FAILURES = Counter("alise:predictor_failures", "Predict calls that failed or timed out")
PREDICTOR_UP = Gauge("alise:predictor_available", "1 if the last Predict call succeeded")
REQUEUED_LOST = Counter("alise:jobs_requeued_worker_lost", "Jobs requeued because their worker went away")
REJECTED = Counter("alise:requests_rejected", "Requests refused at admission", ["field"])
