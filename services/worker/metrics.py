"""Worker metrics (Prometheus), with vLLM's names and its `model_name` label, so endpoint pickers, KEDA and
dashboards work unchanged: each worker is one engine, as a vLLM pod is."""
from __future__ import annotations

import time
from enum import Enum

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common.model_metrics import Labelled, ModelLabel
from services.worker.engine import EngineLoad

# This service's own registry (served by its /metrics): one process (the test suite) may load several services.
REGISTRY = CollectorRegistry()
MODEL = ModelLabel()


def _labelled(cls, name: str, doc: str, labels: tuple[str, ...] = (), **kwargs) -> Labelled:
    return Labelled(cls(name, doc, ["model_name", *labels], registry=REGISTRY, **kwargs), MODEL)


RUNNING = _labelled(Gauge, "vllm:num_requests_running", "Sequences holding KV and scheduled every step")
WAITING = _labelled(Gauge, "vllm:num_requests_waiting", "Sequences assigned to this worker but not running")
SWAPPED = _labelled(Gauge, "alise:num_requests_swapped", "Preempted sequences whose KV is in host memory")
KV_USAGE = _labelled(Gauge, "vllm:kv_cache_usage_perc", "Fraction of KV blocks in use (0-1)")
KV_SWAPPED_BLOCKS = _labelled(Gauge, "alise:kv_swapped_blocks", "KV blocks held in host swap space")
PREEMPTIONS = _labelled(Counter, "vllm:num_preemptions", "Preemptions (scheduler-ordered and local)")
GENERATED = _labelled(Counter, "vllm:generation_tokens", "Tokens generated")
PREFIX_QUERIES = _labelled(Counter, "vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache")
PREFIX_HITS = _labelled(Counter, "vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache (prefill saved)")
# What the steps held, summed over steps (per step: divide by the step histogram's count). Two policies serving the
# same requests differ here in the work they make: recomputed contexts show as prefill tokens beyond the prompts.
STEP_ROWS = _labelled(Counter, "alise:step_rows", "Sequences run by engine steps, summed over steps")
PREFILL_TOKENS = _labelled(Counter, "alise:prefill_tokens",
                           "Tokens computed by prefill: prompts, and contexts recomputed after a preemption")
CONTEXT_TOKENS = _labelled(Counter, "alise:step_context_tokens", "KV tokens read by engine steps, summed over steps")
PREFILL_PAIRS = _labelled(Counter, "alise:prefill_attention_pairs",
                          "Query-key pairs computed by prefill chunks' attention (over cached history and themselves)")
# ... and of those, the decode-only steps (the CUDA graphs): with the device's time of these steps, a run's decode
# speed against a step-time model that is linear in steps, rows and context (bench/step_times.py)
DECODE_STEPS = _labelled(Counter, "alise:decode_steps", "Engine steps with no prefill (decodes only)")
DECODE_ROWS = _labelled(Counter, "alise:decode_step_rows", "Sequences run by decode-only steps, summed over steps")
DECODE_CONTEXT = _labelled(Counter, "alise:decode_step_context_tokens",
                           "KV tokens read by decode-only steps, summed over steps")
KEPT_KV_DROPPED = _labelled(Counter, "alise:kept_kv_dropped",
                            "Jobs whose kept KV (parked, or swapped to host) was given up: recomputed where they resume")
# On a GPU: how long the device ran the steps, and how long it sat idle between two back-to-back steps, waiting for
# the host (planning, launching, collecting, sending): the host time the overlap of steps did not hide. Their sum
# against the step histogram's sum says whether the engine is bound by the device or by Python (bench/step_times.py)
DEVICE_STEP = _labelled(Counter, "alise:device_step_seconds", "Device time of engine steps, by step kind",
                        labels=("step",))
DEVICE_WAITED = _labelled(Counter, "alise:device_waited_seconds",
                          "Device idle between back-to-back engine steps, waiting for the host")
# Where a placed job waits on its way into a step: "delivery", from its assignment's arrival at this worker to the
# engine thread taking it (between steps), and "waiting_line", from then to the first step that runs it (it waits
# there while the batch, the token budget or the KV pool is full; a job dropped before it runs is not counted)
ASSIGNMENT_WAIT = _labelled(Histogram, "alise:assignment_wait_seconds", "Where placed jobs wait on a worker",
                            labels=("stage",),
                            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
STEP = _labelled(Histogram, "alise:engine_step_seconds", "Wall time of one engine step",
                 # fine from 20 to 100 ms, where a GPU worker's steps under load fall (bench/step_times.py reads them)
                 buckets=(0.002, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.15, 0.2, 0.5, 1, 2))


class EngineActivity(str, Enum):
    """What the engine thread spends its wall time on (`alise:engine_thread_seconds`): the steps themselves, sending
    their tokens and events, collecting the step in flight before a preempt or abort (`flush`: no step of its own,
    and the next step starts with nothing in flight), applying the scheduler's other commands, waiting for a
    command with no work (`idle`), and load reports."""
    STEP = "step"
    EMIT = "emit"
    FLUSH = "flush"
    COMMANDS = "commands"
    IDLE = "idle"
    REPORT = "report"


ENGINE_THREAD = _labelled(Counter, "alise:engine_thread_seconds", "Engine thread wall time by activity",
                          labels=("activity",))


class ActivityClock:
    """The engine thread's wall time, whole, split by activity: each charge gives the time since the last one."""

    def __init__(self):
        self._last = time.perf_counter()

    def charge(self, activity: EngineActivity) -> None:
        now = time.perf_counter()
        ENGINE_THREAD.labels(activity=activity.value).inc(now - self._last)
        self._last = now


_last_totals: dict[Labelled, int] = {}


def _advance(counter: Labelled, total: int) -> None:
    """The engine keeps running totals; the counter follows them."""
    counter.inc(max(0, total - _last_totals.get(counter, 0)))
    _last_totals[counter] = total


def observe_load(load: EngineLoad) -> None:
    RUNNING.set(load.running)
    WAITING.set(load.waiting)
    SWAPPED.set(load.swapped)
    KV_USAGE.set(load.used_blocks / load.total_blocks if load.total_blocks else 0.0)
    KV_SWAPPED_BLOCKS.set(load.swapped_blocks)
    _advance(PREEMPTIONS, load.num_preemptions)
    _advance(PREFIX_QUERIES, load.prefix_queried_tokens)
    _advance(PREFIX_HITS, load.prefix_hit_tokens)
