"""Scheduler metrics (Prometheus). vLLM's names where one exists, ours under `alise:`."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# This service's own registry (served by its /metrics): the worker and the scheduler share metric names
# (vLLM's), and one process (the test suite) may load both.
REGISTRY = CollectorRegistry()

REQUESTS_WAITING = Gauge("vllm:num_requests_waiting", "Jobs queued in the scheduler", registry=REGISTRY)
REQUESTS_RUNNING = Gauge("vllm:num_requests_running", "Jobs placed on workers", registry=REGISTRY)
PREEMPTIONS = Counter("vllm:num_preemptions", "Preemptions ordered by the scheduler", registry=REGISTRY)
TTFT = Histogram("vllm:time_to_first_token_seconds", "Accepted -> first token",
                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120), registry=REGISTRY)
E2E = Histogram("vllm:e2e_request_latency_seconds", "Accepted -> finished",
                buckets=(0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600), registry=REGISTRY)
PREDICTOR_FAILURES = Counter("alise:predictor_failures", "Predict calls that failed or timed out", registry=REGISTRY)
PREDICTOR_UP = Gauge("alise:predictor_available", "1 if the last Predict call succeeded", registry=REGISTRY)
REQUEUED_LOST = Counter("alise:jobs_requeued_worker_lost", "Jobs requeued because their worker went away", registry=REGISTRY)
REJECTED = Counter("alise:requests_rejected", "Requests refused at admission", ["field"], registry=REGISTRY)
FAILED = Counter("alise:jobs_failed", "Jobs failed after too many failed engine steps on their workers", registry=REGISTRY)
