"""What one scheduling decision costs the scheduler's event loop, by policy and cluster size.

The dispatcher builds a Snapshot from LiveState and asks the policy for a plan at every tick, on the asyncio loop
that also relays every token to the clients: a slow decision delays every stream. This builds a LiveState as the
scheduler would hold it under load (every worker full, jobs waiting, every job predicted with deciles) and times
the snapshot and each policy's plan, with no Redis or gRPC around them.

    python -m bench.decision_cost --workers 1 4 8 --running 512 --queued 256
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

from services.scheduler.config import SchedulerConfig
from services.scheduler.exec_time import ExecTimeModel
from services.scheduler.live_state import JobFacts, LiveState, WorkerState
from services.scheduler.policies import make_policy, policy_options

DECILES = (0.2, 0.35, 0.5, 0.65, 0.8, 1.0, 1.3, 1.7, 2.3, 3.6)   # a predictor's spread around its mean


def loaded_state(workers: int, running: int, queued: int, seed: int = 0) -> tuple[LiveState, list[str]]:
    """`workers` full workers of `running` jobs each, and `queued` jobs waiting (ids returned in queue order)."""
    rng = random.Random(seed)
    state: LiveState[None] = LiveState()
    for k in range(workers):
        state.add_worker(WorkerState(f"w{k}", block_size=16, num_blocks=55_425, max_batch=running))

    def facts(i: int) -> JobFacts:
        mean = rng.lognormvariate(5.5, 1.0)
        return JobFacts(f"j{i}", 0, 1000.0 + 0.02 * i, rng.randint(100, 1000), 4096, mean, 3.6 * mean, True,
                        tuple(mean * d for d in DECILES))

    for k in range(workers):
        for i in range(running):
            f = facts(k * running + i)
            state.track(f, generated=rng.randint(1, 300))
            state.placed(f.job_id, f"w{k}")
    waiting = [facts(workers * running + i) for i in range(queued)]
    for f in waiting:
        state.track(f)
    return state, [f.job_id for f in sorted(waiting, key=lambda f: f.pred_len)]


def timed(fn, repeats: int) -> float:
    """Median milliseconds of `fn()` over `repeats` calls."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.decision_cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", nargs="+", type=int, default=[1, 4, 8])
    p.add_argument("--running", type=int, default=512, help="running jobs per worker (its max batch)")
    p.add_argument("--queued", type=int, default=256, help="jobs waiting (the dispatcher's queue lookahead)")
    p.add_argument("--policies", nargs="+", default=["fcfs", "sjf", "mlfq", "alise"])
    p.add_argument("--repeats", type=int, default=20)
    a = p.parse_args(argv)
    cost = ExecTimeModel()
    print("| workers | running jobs | snapshot ms | " + " | ".join(f"{name} plan ms" for name in a.policies) + " |")
    print("|---|---|---|" + "---|" * len(a.policies))
    for workers in a.workers:
        state, queue = loaded_state(workers, a.running, a.queued)
        snap_ms = timed(lambda: state.snapshot(1100.0, queue), a.repeats)
        snap = state.snapshot(1100.0, queue)
        # each policy as the scheduler builds it with its default settings
        policies = [make_policy(name, **policy_options(SchedulerConfig(policy=name))) for name in a.policies]
        plans = [timed(lambda: policy.plan(snap, cost), a.repeats) for policy in policies]
        print(f"| {workers} | {workers * a.running} | {snap_ms:.1f} | " + " | ".join(f"{ms:.1f}" for ms in plans) + " |")


if __name__ == "__main__":
    main()
