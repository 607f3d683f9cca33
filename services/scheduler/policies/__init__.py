"""Scheduling policies by name: the one registry the scheduler and the simulator look them up in."""
from __future__ import annotations

import dataclasses

from services.scheduler.policies.alise import AlisePolicy
from services.scheduler.policies.base import Policy
from services.scheduler.policies.fcfs import FcfsPolicy
from services.scheduler.policies.mlfq import MlfqPolicy
from services.scheduler.policies.priority import PriorityPolicy
from services.scheduler.policies.sjf import SjfPolicy

POLICIES = {"fcfs": FcfsPolicy, "priority": PriorityPolicy, "sjf": SjfPolicy, "alise": AlisePolicy,
            "mlfq": MlfqPolicy}


def make_policy(name: str, **options) -> Policy:
    """The named policy; `options` set the fields of the policies that have them (others ignore them)."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}") from None
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    return cls(**{k: v for k, v in options.items() if k in fields})
