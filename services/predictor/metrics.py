"""Predictor metrics (Prometheus), under `alise:predictor_`."""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

BATCH_SECONDS = Histogram("alise:predictor_batch_seconds", "Time to predict one coalesced batch",
                          buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
BATCH_PROMPTS = Histogram("alise:predictor_batch_prompts", "Prompts per coalesced batch",
                          buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
LEARNED = Counter("alise:predictor_observations", "True lengths learned", ["source"])    # stream | observe
INDEX_ENTRIES = Gauge("alise:predictor_index_entries", "Prompts in the retrieval index")
KIND_SLOPE = Gauge("alise:predictor_kind_slope", "How much of a prediction's difference from its kind's centre is "
                   "served (1: all; kind_reliability.py), learned from finished jobs", ["kind"])
