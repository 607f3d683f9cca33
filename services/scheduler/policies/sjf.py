"""Shortest (predicted) job first, non-preemptive, inside priority classes: the baseline a predictor alone
buys without preemption. An unpredicted job carries the scheduler's prior as its prediction (as in alise), so it
ranks as that much work, not ahead of every predicted job."""
from __future__ import annotations

from services.scheduler.exec_time import ExecTimeModel
from services.scheduler.policies.base import (PRIORITY_CLASS_SPAN, SCORE_EPOCH, JobView, Placement, Plan, Snapshot,
                                              due_score)


class SjfPolicy:
    name = "sjf"
    preemptive = False

    def queue_score(self, job: JobView, cost: ExecTimeModel) -> float:
        if job.due:                       # waited the scheduler's due_after_s: by arrival, ahead of the rest
            return due_score(job)
        return -job.priority * PRIORITY_CLASS_SPAN + job.remaining_seconds(cost) + 1e-9 * (job.created - SCORE_EPOCH)

    def plan(self, snap: Snapshot, cost: ExecTimeModel) -> Plan:
        return Plan(assign=tuple(Placement.greedy(snap).assign))
