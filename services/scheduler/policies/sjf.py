"""Shortest (predicted) job first, non-preemptive, inside priority classes: the baseline a predictor alone
buys without preemption. Unpredicted jobs keep arrival order among themselves."""
from __future__ import annotations

from services.scheduler.exec_time import ExecTimeModel
from services.scheduler.policies.base import PRIORITY_CLASS_SPAN, SCORE_EPOCH, JobView, Placement, Plan, Snapshot


class SjfPolicy:
    name = "sjf"
    preemptive = False

    def queue_score(self, job: JobView, cost: ExecTimeModel) -> float:
        base = job.remaining_seconds(cost) if job.predicted else 0.0
        return -job.priority * PRIORITY_CLASS_SPAN + base + 1e-9 * (job.created - SCORE_EPOCH)

    def plan(self, snap: Snapshot, cost: ExecTimeModel) -> Plan:
        return Plan(assign=tuple(Placement.greedy(snap).assign))
