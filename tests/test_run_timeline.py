"""bench/run_timeline.py: an interval of a run between two readings of the scheduler's /metrics page (here its
real registry's page) and /proc: only what happened in between, the gauges as they stood at the later one."""
from __future__ import annotations

from prometheus_client import generate_latest

from alise.v1 import worker_pb2 as wpb

from bench.run_timeline import interval, rows
from services.scheduler import metrics


def page() -> str:
    return generate_latest(metrics.REGISTRY).decode()


def test_an_interval_holds_what_the_scheduler_did_between_two_readings_only():
    metrics.WORKER_READER_WAIT.observe(5.0)             # before the interval: not in it
    metrics.PLACED.set(3)
    earlier = (10.0, {"scheduler": 4.0, "worker-0": 1.0}, page())
    for waited in (0.25, 0.5):
        metrics.WORKER_READER_WAIT.observe(waited)
    metrics.observe_worker_message(wpb.WorkerMessage(finished=wpb.JobFinished(job_id="t/a"), produced_unix_s=100.0,
                                                     left_outbox_unix_s=100.5), 101.0, 101.25)
    metrics.DISPATCH_TICK.observe(0.125)
    metrics.PLACED.set(7)
    metrics.QUEUED.set(2)
    got = interval(8.0, earlier, (12.0, {"scheduler": 6.0, "worker-0": 5.0}, page()))
    assert got["t_s"] == 4.0 and got["placed"] == 7 and got["queued"] == 2
    assert got["cpu_share"] == {"scheduler": 1.0, "worker-0": 2.0}          # CPU seconds over 2 s of wall time
    waits = got["scheduler_waits"]
    assert waits["worker_reader_wait_s"]["all"] == {"count": 2, "mean_s": 0.375}
    assert waits["worker_message_lag_s"]["outbox"] == {"count": 1, "mean_s": 0.5}
    assert waits["worker_message_lag_s"]["handled"] == {"count": 1, "mean_s": 1.25}
    assert waits["worker_message_handling_s"] == {"finished": {"count": 1, "mean_s": 0.25}}
    assert waits["dispatch_tick_s"]["all"] == {"count": 1, "mean_s": 0.125}
    assert any(line.startswith("  4.0 ") for line in rows([got]))
