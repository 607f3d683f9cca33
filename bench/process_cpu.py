"""CPU seconds of this process and of a local stack's services, read from /proc: how close each one runs to a
full core during a measured run (the serving path is bound by single Python processes)."""
from __future__ import annotations

import os
from pathlib import Path


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of a process so far (this one by default), threads included."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stack_pids(stack) -> dict[str, int]:
    """Each service of a LocalStack, and its Redis, by name."""
    pids = {name: svc.proc.pid for name, svc in stack.services.items()}
    if getattr(stack, "redis", None) is not None:          # (not when the stack uses a Redis of its own)
        pids["redis"] = stack.redis.proc.pid
    return pids


def process_cpu(stack) -> dict[str, float]:
    """CPU seconds so far of the client (this process), each service of a LocalStack, and its Redis."""
    return {"client": cpu_seconds(), **{name: cpu_seconds(pid) for name, pid in stack_pids(stack).items()}}


def allowed_cpus(pid: int) -> list[int]:
    """The CPUs any thread of a process may run on now (the union of its threads' masks)."""
    cpus: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            cpus |= os.sched_getaffinity(int(task.name))
        except ProcessLookupError:                         # a thread that ended while we looked
            pass
    return sorted(cpus)


def process_cpus(stack) -> dict[str, list[int]]:
    """Where each process of a LocalStack may run: a pinned stack's shows its pinning held for every thread."""
    return {name: allowed_cpus(pid) for name, pid in stack_pids(stack).items()}


def cpu_share(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, float]:
    """Share of one core each process used between two readings `seconds` apart."""
    return {k: (after[k] - before[k]) / seconds for k in after if k in before} if seconds > 0 else {}
