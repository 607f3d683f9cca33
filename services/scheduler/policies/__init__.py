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

# The policy settings the scheduler's config and the simulator's both carry, under these same names: named once
# here, so a new setting reaches the live scheduler and the simulator alike.
POLICY_SETTINGS = ("max_preemptions", "aging_s", "preempt_mode", "park_kv_share", "park_after_s", "park_wait_factor",
                   "max_parking", "early_tokens")


def policy_options(settings) -> dict:
    """The policy settings of a SchedulerConfig or a SimConfig, for make_policy."""
    return {name: getattr(settings, name) for name in POLICY_SETTINGS}


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()


def make_policy(name: str, **options) -> Policy:
    """The named policy. `options` are the scheduler's policy settings: each sets the field of that name on the
    policies that have one (fcfs has no aging, say, and ignores it); an option no policy knows is a mistake
    (a misspelt name would otherwise change nothing, silently), so it is refused."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}") from None
    unknown = set(options) - set().union(*(_fields(c) for c in POLICIES.values()))
    if unknown:
        raise ValueError(f"unknown policy option(s) {sorted(unknown)}")
    fields = _fields(cls)
    return cls(**{k: v for k, v in options.items() if k in fields})
