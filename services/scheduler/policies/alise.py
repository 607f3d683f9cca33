"""ALISE: shortest predicted remaining time first, preemptive, with aging, inside priority classes.

Queue score = remaining_seconds - aging * (now - created). Because `now` is common to every job, ordering
by remaining_seconds + aging * created is the same order, and that score never needs updating while a
job waits: a job is never overtaken by one that arrives more than (its remaining time - the newcomer's) / aging
seconds after it.

Preemption only where it pays. When the best waiting job fits nowhere, a running job (the victim) on a full
worker is preempted only if all of these hold:
- both times come from the predictor (never from the prior used while it is unreachable), and the victim is
  not in a higher priority class;
- the victim would take `preempt_ratio` times longer than the waiting job, and is not near its own end (at
  least `near_end_tokens` predicted tokens left);
- the wait it saves pays for it: without a preemption the waiting job would get the worker's first slot to
  free up, so the saving is the shortest remaining time among that worker's running jobs, and it must exceed
  `preempt_margin` times the victim's preemption cost (recomputing its context, from the time model). In a
  large batch some job finishes soon, so preemption is rare there; with a few long jobs it pays;
- the victim has been preempted fewer than `max_preemptions` times.
One preemption per worker is in flight at a time; the longest qualifying victim goes first.
"""
from __future__ import annotations

from dataclasses import dataclass

from services.scheduler.exec_time import ExecTimeModel
from services.scheduler.policies.base import (PRIORITY_CLASS_SPAN, SCORE_EPOCH, JobView, Placement, Plan,
                                              Snapshot, WorkerView)


@dataclass
class AlisePolicy:
    aging: float = 0.05            # seconds of predicted work forgiven per second waited
    preempt_ratio: float = 4.0     # preempt only when the running job is this many times longer
    preempt_margin: float = 2.0    # ... and the wait saved is this many times the victim's preemption cost
    max_preemptions: int = 2       # ... and it was preempted fewer times than this
    near_end_tokens: float = 16.0  # ... and it has at least this many predicted tokens left
    name: str = "alise"
    preemptive: bool = True

    def queue_score(self, job: JobView, cost: ExecTimeModel) -> float:
        base = job.remaining_seconds(cost) if job.predicted else 0.0   # unpredicted: arrival order
        return -job.priority * PRIORITY_CLASS_SPAN + base + self.aging * (job.created - SCORE_EPOCH)

    def plan(self, snap: Snapshot, cost: ExecTimeModel) -> Plan:
        placement = Placement.greedy(snap)
        preempt: list[tuple[str, str]] = []
        open_workers = [w for w in snap.workers if not (w.preempting or w.draining)]
        for waiting in placement.unplaced:
            victim = self._victim(waiting, open_workers, cost)
            if victim is None:
                break       # later jobs in the queue are longer: they would not preempt either
            job, worker = victim
            preempt.append((job.job_id, worker.worker_id))
            open_workers.remove(worker)
        return Plan(assign=tuple(placement.assign), preempt=tuple(preempt))

    def _victim(self, waiting: JobView, workers: list[WorkerView],
                cost: ExecTimeModel) -> tuple[JobView, WorkerView] | None:
        # A prior is the same guess for every job: comparing two of them (or one with a prediction) says
        # nothing about which is shorter, and preempting on it only thrashes (recompute for nothing).
        if not waiting.predicted:
            return None
        need = waiting.remaining_seconds(cost)
        best, best_s = None, self.preempt_ratio * need
        for w in workers:
            left = [(job.remaining_seconds(cost), job) for job in w.running]
            if not left:
                continue
            saving = min(s for s, _ in left)          # when this worker's first slot would free up anyway
            for s, job in left:
                if (s > best_s and job.predicted and job.priority <= waiting.priority
                        and job.preemptions < self.max_preemptions and job.remaining_tokens >= self.near_end_tokens
                        and saving > self.preempt_margin * cost.preemption(job.prompt_len + job.generated)):
                    best, best_s = (job, w), s
        return best
