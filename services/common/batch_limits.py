"""How many sequences one engine step may run, named once for the worker (which refuses a larger setting at start,
before it sizes its decode graphs for max_batch + early_rows rows) and the scheduler (which refuses a worker that
registers a larger batch)."""
from __future__ import annotations

MAX_STEP_ROWS = 4096            # no engine runs more sequences at once

# Jobs sent to be prefilled early that decode their early tokens beside a full batch, at most, by default. 8 rather
# than 32: on two H100s at 48 and 52 req/s (Llama-3-8B shape, ShareGPT chat) alise's mean normalized latency was
# 10-15% lower and its throughput 2-3% higher with 8, its TTFT p99 within 1.05x of fcfs's at 44-48 req/s
# (docs/BENCHMARKS.md, sessions 33 and 34; in simulation 8 rows cost Alpaca's TTFT p99 near capacity, not yet live).
# Named here, not in the step scheduler, so that the worker's config imports without numpy: the CLI's simulator
# reads it, and the client wheel has no numpy.
DEFAULT_EARLY_ROWS = 8
