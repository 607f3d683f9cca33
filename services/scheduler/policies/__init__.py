"""Scheduling policies by name: the one registry the scheduler and the simulator look them up in."""
from __future__ import annotations

from services.scheduler.policies.alise import AlisePolicy
from services.scheduler.policies.base import Policy
from services.scheduler.policies.fcfs import FcfsPolicy
from services.scheduler.policies.priority import PriorityPolicy

POLICIES = {"fcfs": FcfsPolicy, "priority": PriorityPolicy, "alise": AlisePolicy}


def make_policy(name: str) -> Policy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}") from None
