"""ALISE: shortest predicted remaining time first, preemptive, with aging, inside priority classes.

Queue score = remaining_seconds - aging * (now - created). Because `now` is common to every job, ordering
by remaining_seconds + aging * created is the same order, and that score never needs updating while a
job waits: waiting longer lowers a job's effective score relative to newer ones (starvation bound).

Preemption: when the best waiting job fits nowhere, the running job with the longest predicted
remaining time on a full worker is preempted if it would take `preempt_ratio` times longer than the
waiting one and is not in a higher priority class; both times must come from the predictor, never from the
prior used while it is unreachable. One preemption per worker is in flight at a time.
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
    name: str = "alise"
    preemptive: bool = True

    def queue_score(self, job: JobView, cost: ExecTimeModel) -> float:
        base = job.remaining_seconds(cost) if job.predicted else 0.0   # unpredicted: arrival order
        return -job.priority * PRIORITY_CLASS_SPAN + base + self.aging * (job.created - SCORE_EPOCH)

    def plan(self, snap: Snapshot, cost: ExecTimeModel) -> Plan:
        placement = Placement.greedy(snap)
        preempt: list[tuple[str, str]] = []
        busy = {w.worker_id for w in snap.workers if w.preempting or w.draining}
        for waiting in placement.unplaced:
            victim = self._victim(waiting, [w for w in snap.workers if w.worker_id not in busy], cost)
            if victim is None:
                break       # later jobs in the queue are longer: they would not preempt either
            job, worker = victim
            preempt.append((job.job_id, worker.worker_id))
            busy.add(worker.worker_id)
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
            for job in w.running:
                if job.predicted and job.priority <= waiting.priority and (left := job.remaining_seconds(cost)) > best_s:
                    best, best_s = (job, w), left
        return best
