"""Scheduler metrics (Prometheus), labelled with `model_name`.

Request-level series that mean what vLLM's mean (TTFT, end-to-end, queue time, prompt tokens, finished requests)
keep vLLM's names: workers do not export them, so a sum over pods counts each request once. Series whose meaning
differs from a worker's same-named one are `alise:`: the scheduler's queue and placed jobs are cluster-wide, the
workers' `vllm:num_requests_waiting / running` are per engine.
"""
from __future__ import annotations

import math
import re
from enum import Enum

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common.model_metrics import Labelled, ModelLabel

# This service's own registry (served by its /metrics): one process (the test suite) may load several services.
REGISTRY = CollectorRegistry()
MODEL = ModelLabel()
# vLLM's TTFT buckets start at 1 ms: a short prompt on a GPU answers in tens of ms
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                   40.0, 80.0, 160.0, 640.0, 2560.0)
PER_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                     0.75, 1.0, 2.5, 5.0, 7.5, 10.0)


def _labelled(cls, name: str, doc: str, labels: tuple[str, ...] = (), **kwargs) -> Labelled:
    return Labelled(cls(name, doc, ["model_name", *labels], registry=REGISTRY, **kwargs), MODEL)


QUEUED = _labelled(Gauge, "alise:num_requests_queued", "Jobs waiting at the scheduler (all workers)")
PLACED = _labelled(Gauge, "alise:num_requests_placed", "Jobs placed on workers (all workers)")
# the autoscaling signal (chart: autoscaling.*): how long the head of the queue would keep one worker busy
QUEUED_WORK = _labelled(Gauge, "alise:queued_predicted_work_seconds",
                        "Predicted seconds of work at the head of the queue (all workers)")
WORKERS = _labelled(Gauge, "alise:workers_connected", "Workers with a live session")
PREEMPTIONS = _labelled(Counter, "alise:num_preemptions_ordered", "Preemptions the scheduler ordered")
TTFT = _labelled(Histogram, "vllm:time_to_first_token_seconds", "Accepted -> first token", buckets=LATENCY_BUCKETS)
E2E = _labelled(Histogram, "vllm:e2e_request_latency_seconds", "Accepted -> finished", buckets=LATENCY_BUCKETS)
QUEUE_TIME = _labelled(Histogram, "vllm:request_queue_time_seconds", "Accepted -> first placed on a worker",
                       buckets=LATENCY_BUCKETS)
# A command for a worker (assign, preempt, abort, ...) from the dispatcher's send to its worker's stream taking it: a
# busy event loop, or a stream held back by flow control, shows here as placements that reach workers late
COMMAND_WAIT = _labelled(Histogram, "alise:worker_command_wait_seconds",
                         "A command's wait between the dispatcher and its worker's stream", ("command",),
                         buckets=LATENCY_BUCKETS)


class AdmissionStage(str, Enum):
    """Where a request spends its time on its way in (alise:admission_seconds): before its job exists, its client
    waits."""
    VALIDATE = "validate"    # checking and tokenizing a valid request (a chat template rendered), on a thread's turn
    PREDICT = "predict"      # the Predict call (its wait for a batch included; a failed one up to its timeout)
    STORE = "store"          # scoring it and the create call to Redis, whatever it answers (limits are checked there)


# A busy predictor, a busy event loop or a slow Redis shows here as requests slow to get in (clients see it in TTFT)
ADMISSION = _labelled(Histogram, "alise:admission_seconds", "A request's admission by stage", ("stage",),
                      buckets=LATENCY_BUCKETS)
# How late the scheduler's event loop runs what is due (services/common/loop_lag.py): a request's way in before and
# after its admission stages, and its tokens' way out, wait this long in a loop that is behind
EVENT_LOOP_LAG = _labelled(Histogram, "alise:event_loop_lag_seconds", "How late the event loop ran a due callback",
                           buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))


class MessageLagStage(str, Enum):
    """How far behind the scheduler is with what workers tell it (alise:worker_message_lag_seconds), counted from
    when the worker's engine produced the message: a first token stamped late, a finish acted on late (its slot
    given to the next job late) show here."""
    OUTBOX = "outbox"        # taken from the worker's outbox by its stream (its event loop, or the stream, behind)
    RECEIVED = "received"    # taken off the stream by the scheduler (the network, the scheduler's reader behind)
    HANDLED = "handled"      # acted on: Redis updated, clients' streams fed, the dispatcher woken


LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
WORKER_MESSAGE_LAG = _labelled(Histogram, "alise:worker_message_lag_seconds",
                               "A worker's message from its engine to the scheduler, by stage", ("stage",),
                               buckets=LAG_BUCKETS)
# The scheduler reads a worker's messages one at a time: one slow to handle holds back every message behind it
WORKER_MESSAGE_HANDLING = _labelled(Histogram, "alise:worker_message_handling_seconds",
                                    "The scheduler's handling of a worker's message, by kind", ("kind",),
                                    buckets=LAG_BUCKETS)

# How long a worker's reader waited for that worker's next message: its share of a second is the reader's idle
# time. Messages that arrive late (alise:worker_message_lag_seconds) while the reader never waits were held back by
# the scheduler itself; late while it waits, by the worker or the stream between.
WORKER_READER_WAIT = _labelled(Histogram, "alise:worker_reader_wait_seconds",
                               "How long the scheduler's reader of a worker's stream waited for its next message",
                               buckets=LAG_BUCKETS)

# One pass of the dispatch loop (snapshot, plan, its commands): one follows admissions and worker messages that
# change placements, at least dispatch_gap_s after the pass before (events meanwhile are decided together)
DISPATCH_TICK = _labelled(Histogram, "alise:dispatch_tick_seconds", "One pass of the dispatch loop, wall time",
                          buckets=LAG_BUCKETS)


def observe_worker_message(msg, received_unix_s: float, handled_unix_s: float) -> None:
    """A worker's message's lag by stage (stamped by a worker that stamps them; clocks a little apart across hosts
    never make one below 0; a stamp that is not a finite time is not counted: one inf would make the sum inf for good)
    and its handling time here."""
    if 0 < (produced := msg.produced_unix_s) < math.inf:
        for stage, at in ((MessageLagStage.OUTBOX, msg.left_outbox_unix_s), (MessageLagStage.RECEIVED, received_unix_s),
                          (MessageLagStage.HANDLED, handled_unix_s)):
            if 0 < at < math.inf:
                WORKER_MESSAGE_LAG.labels(stage=stage.value).observe(max(0.0, at - produced))
    WORKER_MESSAGE_HANDLING.labels(kind=msg.WhichOneof("kind") or "none").observe(handled_unix_s - received_unix_s)


TPOT = _labelled(Histogram, "vllm:request_time_per_output_token_seconds",
                 "Per request: (end-to-end - TTFT) / (output tokens - 1)", buckets=PER_TOKEN_BUCKETS)
PROMPT_TOKENS = _labelled(Counter, "vllm:prompt_tokens", "Prompt tokens of finished requests")
SUCCESS = _labelled(Counter, "vllm:request_success", "Requests that ended, by finish reason", ("finished_reason",))
PREDICTOR_FAILURES = _labelled(Counter, "alise:predictor_failures", "Predict calls that failed or timed out")
PREDICTOR_UP = _labelled(Gauge, "alise:predictor_available", "1 if the last Predict call succeeded")
REQUEUED_LOST = _labelled(Counter, "alise:jobs_requeued_worker_lost", "Jobs requeued because their worker went away")
REJECTED = _labelled(Counter, "alise:requests_rejected", "Requests refused at admission", ("field",))
FAILED = _labelled(Counter, "alise:jobs_failed", "Jobs failed after too many failed engine steps on their workers")
SUSPECTED = _labelled(Counter, "alise:jobs_suspected",
                      "Jobs of a failed engine step with no one job to blame, run apart until one breaks a step alone")

_INDEX = re.compile(r"\[\d+\]")


def metric_field(field: str) -> str:
    """A refused field's name as a metric label: without list indexes ("chat.messages[5000].content" ->
    "chat.messages[].content"), so that clients cannot add a label value, and a series, per request."""
    return _INDEX.sub("[]", field)[:64]
