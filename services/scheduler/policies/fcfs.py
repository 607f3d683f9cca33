"""First come, first served (vLLM's default): arrival order, no preemption, priorities ignored."""
from __future__ import annotations

from services.scheduler.exec_time import ExecTimeModel
from services.scheduler.policies.base import SCORE_EPOCH, JobView, Placement, Plan, Snapshot


class FcfsPolicy:
    name = "fcfs"
    preemptive = False

    def queue_score(self, job: JobView, cost: ExecTimeModel) -> float:
        return job.created - SCORE_EPOCH

    def plan(self, snap: Snapshot, cost: ExecTimeModel) -> Plan:
        return Plan(assign=tuple(Placement.greedy(snap).assign))
