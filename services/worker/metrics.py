"""Worker metrics (Prometheus), with vLLM's names so endpoint pickers, KEDA and dashboards work unchanged."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.worker.engine import EngineLoad

# This service's own registry (served by its /metrics): the worker and the scheduler share metric names
# (vLLM's), and one process (the test suite) may load both.
REGISTRY = CollectorRegistry()

RUNNING = Gauge("vllm:num_requests_running", "Sequences holding KV and scheduled every step", registry=REGISTRY)
WAITING = Gauge("vllm:num_requests_waiting", "Sequences assigned to this worker but not running", registry=REGISTRY)
SWAPPED = Gauge("alise:num_requests_swapped", "Preempted sequences whose KV is in host memory", registry=REGISTRY)
KV_USAGE = Gauge("vllm:kv_cache_usage_perc", "Fraction of KV blocks in use (0-1)", registry=REGISTRY)
KV_SWAPPED_BLOCKS = Gauge("alise:kv_swapped_blocks", "KV blocks held in host swap space", registry=REGISTRY)
PREEMPTIONS = Counter("vllm:num_preemptions", "Preemptions (scheduler-ordered and local)", registry=REGISTRY)
GENERATED = Counter("vllm:generation_tokens", "Tokens generated", registry=REGISTRY)
PREFIX_QUERIES = Counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                         registry=REGISTRY)
PREFIX_HITS = Counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache (prefill saved)",
                      registry=REGISTRY)
STEP = Histogram("alise:engine_step_seconds", "Wall time of one engine step",
                 buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2), registry=REGISTRY)

_last_totals: dict[Counter, int] = {}


def _advance(counter: Counter, total: int) -> None:
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
