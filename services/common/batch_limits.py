"""How many sequences one engine step may run, named once for the worker (which refuses a larger setting at start,
before it sizes its decode graphs for max_batch + early_rows rows) and the scheduler (which refuses a worker that
registers a larger batch)."""
from __future__ import annotations

MAX_STEP_ROWS = 4096            # no engine runs more sequences at once
