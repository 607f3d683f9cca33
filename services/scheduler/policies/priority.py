"""Static priorities (vLLM-style): higher priority class first, arrival order within a class."""
from __future__ import annotations

from services.scheduler.exec_time import ExecTimeModel
from services.scheduler.policies.base import PRIORITY_CLASS_SPAN, SCORE_EPOCH, JobView, Placement, Plan, Snapshot


class PriorityPolicy:
    name = "priority"
    preemptive = False

    def queue_score(self, job: JobView, cost: ExecTimeModel) -> float:
        return -job.priority * PRIORITY_CLASS_SPAN + (job.created - SCORE_EPOCH)

    def plan(self, snap: Snapshot, cost: ExecTimeModel) -> Plan:
        return Plan(assign=tuple(Placement.greedy(snap).assign))
