"""A run second by second: each service's CPU share, the scheduler's queued and placed jobs, how late its workers'
messages reached it by stage, how long it took to handle them by kind and how long its readers sat idle. The
run's totals (bench/scheduler_waits.py) say that messages came late; this says when: in stalls or all along,
with the load, and whether the scheduler (its reader never idle) or what is before it held them back.

Sampled from /proc and the scheduler's /metrics page by `alise bench sweep` while requests go out; reading the
page costs the scheduler a few milliseconds a second."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import NamedTuple

from bench.process_cpu import cpu_share, process_cpu
from bench.scheduler_waits import SchedulerWaits, waits_of
from bench.step_times import metrics_page

GAUGES = {"alise:num_requests_queued": "queued", "alise:num_requests_placed": "placed"}
PERIOD_S = 1.0


def read_page(text: str) -> tuple[SchedulerWaits, dict[str, float]]:
    """The scheduler's waits so far and its queued and placed jobs now (summed over models), from one parse of its
    /metrics page."""
    from prometheus_client.parser import text_string_to_metric_families     # as bench.step_times: loaded lazily

    families = list(text_string_to_metric_families(text))
    return waits_of(families), {GAUGES[f.name]: sum(s.value for s in f.samples) for f in families if f.name in GAUGES}


class Reading(NamedTuple):
    at: float                      # monotonic seconds
    cpu: dict[str, float]          # each process's CPU seconds so far
    waits: SchedulerWaits          # the scheduler's wait histograms so far
    gauges: dict[str, float]       # its queued and placed jobs now


def reading(stack) -> Reading:
    """One point of the timeline: /proc and the scheduler's /metrics page, read and parsed (in a thread: the
    client's event loop sends the run's requests meanwhile)."""
    page = metrics_page(stack.scheduler_metrics_port)
    return Reading(time.monotonic(), process_cpu(stack), *read_page(page))


def interval(start: float, earlier: Reading, later: Reading) -> dict:
    """What happened between two readings: {"t_s" (the later's seconds since start), "cpu_share", "queued",
    "placed", "scheduler_waits"} (the waits as bench/scheduler_waits.py sums them, over this interval only)."""
    return {"t_s": round(later.at - start, 3), "cpu_share": cpu_share(earlier.cpu, later.cpu, later.at - earlier.at),
            **later.gauges, "scheduler_waits": later.waits.minus(earlier.waits).summary()}


async def sample_timeline(stack, sink: Callable[[dict], None], period_s: float = PERIOD_S) -> None:
    """Until cancelled, hand `sink` one interval (above) every period_s. A reading that fails (the stack going
    down) ends the timeline with {"t_s", "error"}, not the run."""
    start = time.monotonic()
    try:
        earlier = await asyncio.to_thread(reading, stack)
        while True:
            await asyncio.sleep(period_s)
            later = await asyncio.to_thread(reading, stack)
            sink(interval(start, earlier, later))
            earlier = later
    except Exception as e:  # noqa: BLE001 - the run's results matter more than its timeline
        sink({"t_s": round(time.monotonic() - start, 3), "error": repr(e)})


def part(p: dict, metric: str, label: str = "all") -> dict:
    """One interval's {"count", "mean_s"} of a scheduler wait (bench/scheduler_waits.py names), {} if none."""
    return p["scheduler_waits"].get(metric, {}).get(label, {})


def seconds(w: dict) -> float:
    """The seconds a wait's observations add up to."""
    return w.get("count", 0) * w.get("mean_s", 0.0)


def while_arriving(timeline: list[dict], until_s: float) -> dict:
    """A run's timeline in a few numbers: while its requests arrived (the intervals ending by until_s) the
    scheduler's mean CPU share, dispatch passes a second and its readers' idle seconds a second; over the whole run
    the worst second's mean message lag (received) and when it was. {} for a run without a timeline."""
    line = [p for p in timeline if "error" not in p]
    arriving = [p for p in line if p["t_s"] <= until_s] or line[:1]
    if not arriving:
        return {}
    lag = lambda p: part(p, "worker_message_lag_s", "received").get("mean_s", 0.0)      # noqa: E731
    worst = max(line, key=lag)
    n = len(arriving)
    return {"scheduler_cpu": sum(p["cpu_share"].get("scheduler", 0.0) for p in arriving) / n,
            "passes_per_s": sum(part(p, "dispatch_tick_s").get("count", 0) for p in arriving) / n,
            "reader_idle_s_per_s": sum(seconds(part(p, "worker_reader_wait_s")) for p in arriving) / n,
            "worst_lag_s": lag(worst), "worst_lag_at_s": worst["t_s"]}


def rows(timeline: list[dict]) -> list[str]:
    """One line a second: time, CPU of scheduler and worker-0, queued and placed, the messages' lag by stage,
    tokens' and finishes' handling (ms), the seconds the workers' readers sat idle (summed over workers: near the
    interval's length for each worker whose reader keeps up), the dispatch loop's passes and their mean (ms)."""
    head = ("t_s  cpu_sched cpu_w0 queued placed  msgs lag_outbox lag_recv lag_handled  tok_ms fin_ms idle_s"
            " ticks tick_ms")
    out = [head]
    for p in timeline:
        if "error" in p:
            out.append(f"{p['t_s']:5.1f} the timeline ended: {p['error']}")
            continue
        mean = lambda metric, label="all": part(p, metric, label).get("mean_s", float("nan"))      # noqa: E731
        lag, handling = "worker_message_lag_s", "worker_message_handling_s"
        out.append(f"{p['t_s']:5.1f} {p['cpu_share'].get('scheduler', 0):6.2f} {p['cpu_share'].get('worker-0', 0):6.2f}"
                   f" {p.get('queued', 0):6.0f} {p.get('placed', 0):6.0f}"
                   f" {part(p, lag, 'received').get('count', 0):5d} {mean(lag, 'outbox'):9.3f}"
                   f" {mean(lag, 'received'):8.3f} {mean(lag, 'handled'):8.3f} {1e3 * mean(handling, 'tokens'):8.1f}"
                   f" {1e3 * mean(handling, 'finished'):6.1f} {seconds(part(p, 'worker_reader_wait_s')):5.2f}"
                   f" {part(p, 'dispatch_tick_s').get('count', 0):5d} {1e3 * mean('dispatch_tick_s'):7.2f}")
    return out


def main() -> None:
    """python -m bench.run_timeline out/sweep/alise-r64.json [more.json]: each run's timeline, a line a second."""
    import json
    import sys

    for path in sys.argv[1:]:
        print(path)
        print("\n".join(rows(json.load(open(path)).get("timeline", []))))


if __name__ == "__main__":
    main()
