"""How often the worker sends each job's new tokens to the scheduler.

Every token a worker sends costs the scheduler a few tens of microseconds of Python (recording it in Redis,
handing it to the client's stream, one gRPC message), and that, not the GPU, capped serving at about 70% of
the engine's offline speed at 512 running sequences (docs/BENCHMARKS.md). So with many sequences running,
each job's tokens are held and sent together every few steps: at most about `updates_per_step` job updates
leave per step on average (every ceil(running / updates_per_step) steps). A job's first tokens (its TTFT)
and its last ones (sent before its `finished` message) never wait, and below the threshold every step is
sent as it comes, so interactive loads see no change. `updates_per_step` = 0 sends every step.
"""
from __future__ import annotations

from services.worker.engine import TokenDelta


class TokenBatcher:
    def __init__(self, updates_per_step: int):
        self.updates_per_step = updates_per_step
        self._held: dict[str, TokenDelta] = {}     # per job: its tokens not yet sent, merged
        self._started: set[str] = set()            # jobs whose first tokens went out
        self._steps_held = 0

    def step(self, deltas: list[TokenDelta], finished: set[str], running: int) -> list[TokenDelta]:
        """One engine step's deltas in; the deltas to send now out (every job at most once)."""
        urgent = {j for j in finished if j in self._held}      # the finished: their last tokens
        for d in deltas:
            if d.job_id not in self._started or d.job_id in finished:
                urgent.add(d.job_id)
            held = self._held.get(d.job_id)
            if held is None:
                self._held[d.job_id] = TokenDelta(d.job_id, list(d.token_ids), d.text)
            else:
                held.token_ids += d.token_ids
                held.text += d.text
        self._steps_held += 1
        every = max(1, -(-running // self.updates_per_step)) if self.updates_per_step else 1
        out = self.take_all() if self._steps_held >= every else [self._held.pop(j) for j in urgent]
        self._started.update(d.job_id for d in out)
        self._started.difference_update(finished)
        return out

    def take_all(self) -> list[TokenDelta]:
        """Everything held (before a preempt, abort or failure report: tokens first)."""
        out = list(self._held.values())
        self._held.clear()
        self._steps_held = 0
        self._started.update(d.job_id for d in out)
        return out

    def forget(self, job_id: str) -> None:
        """The job left this worker (preempted, aborted): a later resume starts with an urgent first token."""
        self._started.discard(job_id)
        self._held.pop(job_id, None)

    def clear(self) -> None:
        """The session ended: held tokens are dropped with the jobs (the scheduler resumes from what it has)."""
        self._held.clear()
        self._started.clear()
        self._steps_held = 0
