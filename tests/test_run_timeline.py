"""bench/run_timeline.py: an interval of a run between two readings of the scheduler's /metrics page (here its
real registry's page) and /proc: only what happened in between, the gauges as they stood at the later one; the
sampler over a served page, and how it ends when the page goes away. bench/redis_commands.py: a run's commands."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from prometheus_client import generate_latest, start_http_server

from alise.v1 import worker_pb2 as wpb

from bench.redis_commands import commands_during
from bench.run_timeline import Reading, interval, read_page, rows, sample_timeline, while_arriving
from services.common.local_stack import free_port
from services.scheduler import metrics


def page() -> str:
    return generate_latest(metrics.REGISTRY).decode()


def read(at: float, cpu: dict[str, float]) -> Reading:
    text = page()
    return Reading(at, cpu, *read_page(text))


def test_an_interval_holds_what_the_scheduler_did_between_two_readings_only():
    for gauge in (metrics.PLACED, metrics.QUEUED):      # other tests may have set them under other model names
        gauge.family.clear()
    metrics.WORKER_READER_WAIT.observe(5.0)             # before the interval: not in it
    metrics.PLACED.set(3)
    earlier = read(10.0, {"scheduler": 4.0, "worker-0": 1.0})
    for waited in (0.25, 0.5):
        metrics.WORKER_READER_WAIT.observe(waited)
    metrics.observe_worker_message(wpb.WorkerMessage(finished=wpb.JobFinished(job_id="t/a"), produced_unix_s=100.0,
                                                     left_outbox_unix_s=100.5), 101.0, 101.25)
    metrics.DISPATCH_TICK.observe(0.125)
    metrics.PLACED.set(7)
    metrics.QUEUED.set(2)
    got = interval(8.0, earlier, read(12.0, {"scheduler": 6.0, "worker-0": 5.0}))
    assert got["t_s"] == 4.0 and got["placed"] == 7 and got["queued"] == 2
    assert got["cpu_share"] == {"scheduler": 1.0, "worker-0": 2.0}          # CPU seconds over 2 s of wall time
    waits = got["scheduler_waits"]
    assert waits["worker_reader_wait_s"]["all"] == {"count": 2, "mean_s": 0.375}
    assert waits["worker_message_lag_s"]["outbox"] == {"count": 1, "mean_s": 0.5}
    assert waits["worker_message_lag_s"]["handled"] == {"count": 1, "mean_s": 1.25}
    assert waits["worker_message_handling_s"] == {"finished": {"count": 1, "mean_s": 0.25}}
    assert waits["dispatch_tick_s"]["all"] == {"count": 1, "mean_s": 0.125}
    assert any(line.startswith("  4.0 ") for line in rows([got]))


@dataclass
class ServedPage:
    """What the sampler reads of a LocalStack: its processes (none here but the test's own) and the port of the
    scheduler's /metrics page (here the scheduler module's real registry, served)."""
    scheduler_metrics_port: int
    services: dict = field(default_factory=dict)
    redis: None = None


async def test_the_sampler_hands_an_interval_each_period_and_ends_with_an_error_when_the_page_goes():
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=metrics.REGISTRY)
    line: list[dict] = []
    sampler = asyncio.create_task(sample_timeline(ServedPage(port), line.append, period_s=0.05))
    try:
        deadline = time.monotonic() + 60
        while len(line) < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert len(line) >= 3 and "error" not in line[0], line
        assert [p["t_s"] for p in line] == sorted(p["t_s"] for p in line) and line[0]["t_s"] > 0
        assert "client" in line[0]["cpu_share"] and "placed" in line[0]
        server.shutdown()                                # the scheduler goes away: the timeline says so and ends
        server.server_close()
        await asyncio.wait_for(sampler, 60)
        assert "error" in line[-1] and "the timeline ended" in rows(line)[-1]
    finally:
        sampler.cancel()
        server.shutdown()
        thread.join(10)


def test_a_runs_redis_commands_are_the_differences_busiest_first_without_the_benchmarks_own():
    before = {"get": {"calls": 10.0, "usec": 50.0}, "info": {"calls": 1.0, "usec": 9.0}}
    after = {"get": {"calls": 14.0, "usec": 70.0}, "evalsha": {"calls": 8.0, "usec": 800.0},
             "info": {"calls": 2.0, "usec": 18.0}, "del": {"calls": 0.0, "usec": 0.0}}
    assert commands_during(before, after, requests=4) == {
        "evalsha": {"calls": 8, "usec": 800, "per_request": 2.0}, "get": {"calls": 4, "usec": 20, "per_request": 1.0}}


def test_a_timeline_while_requests_arrive_in_a_few_numbers():
    def second(t: float, cpu: float, passes: int, idle: float, lag: float) -> dict:
        return {"t_s": t, "cpu_share": {"scheduler": cpu}, "placed": 1,
                "scheduler_waits": {"dispatch_tick_s": {"all": {"count": passes, "mean_s": 0.01}},
                                    "worker_reader_wait_s": {"all": {"count": 10, "mean_s": idle / 10}},
                                    "worker_message_lag_s": {"received": {"count": 10, "mean_s": lag}}}}

    line = [second(1.0, 0.5, 40, 0.9, 0.01), second(2.0, 1.1, 60, 0.3, 2.0), second(3.0, 0.2, 10, 1.0, 5.0),
            {"t_s": 3.5, "error": "gone"}]
    got = while_arriving(line, until_s=2.0)          # the third second came after the arrivals: its lag counts
    assert got["scheduler_cpu"] == 0.8 and got["passes_per_s"] == 50
    assert abs(got["reader_idle_s_per_s"] - 0.6) < 1e-9 and (got["worst_lag_s"], got["worst_lag_at_s"]) == (5.0, 3.0)
    assert while_arriving([], 10.0) == {} and while_arriving([{"t_s": 1.0, "error": "x"}], 10.0) == {}
