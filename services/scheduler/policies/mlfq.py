"""Skip-join multi-level feedback queue (FastServe, Wu et al. 2023): preemptive, and needs no predictor.

Level i of `levels` has a quantum of base_quantum_s * 2**i seconds of service. A job's level is the first whose
cumulative quanta cover the service it has had, counting its prefill (so a long prompt skips the top levels on
arrival, FastServe's skip-join) and its generated tokens, both timed by the execution-time model. Lower levels
go first, arrival order within a level, priority classes above all. When a job waits and the workers are full,
the running job at the deepest level below the waiting job's is preempted (one per worker at a time, each job
at most `max_preemptions` times, so a long job cannot be bounced forever).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from services.scheduler.exec_time import ExecTimeModel
from services.scheduler.policies.base import (PRIORITY_CLASS_SPAN, SCORE_EPOCH, JobView, Placement, Plan,
                                              Snapshot, WorkerView, preempt_for_waiting)

LEVEL_SPAN = 1.0e9          # a level outranks any arrival-time difference (seconds since SCORE_EPOCH)


@dataclass
class MlfqPolicy:
    base_quantum_s: float = 0.25   # the top level's quantum: one short answer's worth of service
    levels: int = 6
    max_preemptions: int = 2
    name: str = "mlfq"
    preemptive: bool = True

    def level(self, job: JobView, cost: ExecTimeModel) -> int:
        """The first level whose cumulative quanta, base * (2**(i+1) - 1), cover the job's service so far."""
        service = cost.total(job.prompt_len, job.generated)
        i = math.ceil(math.log2(service / self.base_quantum_s + 1)) - 1 if service > 0 else 0
        return min(max(i, 0), self.levels - 1)

    def queue_score(self, job: JobView, cost: ExecTimeModel) -> float:
        return (-job.priority * PRIORITY_CLASS_SPAN + self.level(job, cost) * LEVEL_SPAN
                + (job.created - SCORE_EPOCH))

    def plan(self, snap: Snapshot, cost: ExecTimeModel) -> Plan:
        placement = Placement.greedy(snap)
        ranked = {}                        # worker id -> its running jobs, deepest level first (built on demand)
        preempt = preempt_for_waiting(placement, list(snap.workers),
                                      lambda waiting, workers: self._victim(waiting, workers, cost, ranked))
        return Plan(assign=tuple(placement.assign), preempt=preempt)

    def _victim(self, waiting: JobView, workers: list[WorkerView], cost: ExecTimeModel,
                ranked: dict[str, list[tuple[int, JobView]]]) -> tuple[JobView, WorkerView] | None:
        """The running job at the deepest level strictly below the waiting job's (and not of a higher class).
        `ranked` keeps each worker's jobs by level across the calls of one plan (as alise's search does: a plan
        asks once per full worker, plus one)."""
        mine = self.level(waiting, cost)
        best, best_level = None, mine
        for w in workers:
            if (jobs := ranked.get(w.worker_id)) is None:
                jobs = ranked[w.worker_id] = sorted(((self.level(job, cost), job) for job in w.running),
                                                    key=lambda lj: -lj[0])
            for lvl, job in jobs:
                if lvl <= best_level:
                    break                            # the rest are no deeper
                if job.priority <= waiting.priority and job.preemptions < self.max_preemptions:
                    best, best_level = (job, w), lvl
                    break                            # this worker's deepest qualifying job
        return best
