"""The scheduler times each command for a worker from the dispatcher's send to its worker's stream taking it
(alise:worker_command_wait_seconds, by command): placements that reach a worker late show there."""
from __future__ import annotations

import asyncio

from alise.v1 import worker_pb2 as wpb
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from services.scheduler import metrics
from services.scheduler.worker_sessions import CommandOutbox


def waits() -> dict[str, tuple[float, float]]:
    """command -> (count, sum of seconds) as the scheduler's /metrics shows them now."""
    out: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(generate_latest(metrics.REGISTRY).decode()):
        if family.name != "alise:worker_command_wait_seconds":
            continue
        for s in family.samples:
            if s.name.endswith(("_count", "_sum")):
                out.setdefault(s.labels["command"], [0.0, 0.0])[s.name.endswith("_sum")] += s.value
    return {k: tuple(v) for k, v in out.items()}


async def test_each_command_is_timed_from_its_send_to_its_stream_taking_it():
    before = waits()
    outbox, closed = CommandOutbox(), object()
    outbox.put_nowait(wpb.SchedulerCommand(assign=wpb.AssignJob(job_id="t/a")))
    outbox.put_nowait(wpb.SchedulerCommand(abort=wpb.AbortJob(job_id="t/b")))
    outbox.put_nowait(closed)                       # the session's end: not a command, not timed
    await asyncio.sleep(0.2)                        # the stream is slow to take them
    assert (await outbox.get()).assign.job_id == "t/a"
    assert outbox.get_nowait().abort.job_id == "t/b"
    assert outbox.get_nowait() is closed and outbox.empty()
    after = waits()
    for kind in ("assign", "abort"):
        count, seconds = (a - b for a, b in zip(after[kind], before.get(kind, (0.0, 0.0))))
        assert count == 1 and 0.2 <= seconds < 30, (kind, count, seconds)
