"""Where the scheduler's time went during a run, from two readings of its /metrics: a request's admission by stage
(validate, predict, store: services/scheduler/metrics.AdmissionStage), its commands' wait for their worker's
stream, by command, how late its event loop ran what was due, and how long its workers' messages took from their
engines to it and to be acted on. A run whose clients wait long to be accepted, whose placements reach the worker
late, or whose tokens and finishes reach the scheduler late says here which part was slow (a busy predictor, its
event loop, Redis, a reader behind)."""
from __future__ import annotations

from dataclasses import dataclass

from bench.step_times import histogram_label_sums, means_by_label, metrics_page

# metric -> (its label, the name of its part of the run's summary; a metric of no label of its own sums as "all")
WAIT_METRICS = {"alise:admission_seconds": ("stage", "admission_s"),
                "alise:worker_command_wait_seconds": ("command", "command_wait_s"),
                "alise:event_loop_lag_seconds": (None, "event_loop_lag_s"),
                "alise:worker_message_lag_seconds": ("stage", "worker_message_lag_s"),
                "alise:worker_message_handling_seconds": ("kind", "worker_message_handling_s"),
                "alise:worker_reader_wait_seconds": (None, "worker_reader_wait_s"),
                "alise:dispatch_tick_seconds": (None, "dispatch_tick_s")}


@dataclass(frozen=True)
class SchedulerWaits:
    sums: tuple[tuple[tuple[str, str, str], float], ...]     # ((metric, label value, "count" / "sum"), cumulative)

    def minus(self, earlier: "SchedulerWaits") -> "SchedulerWaits":
        then = dict(earlier.sums)
        return SchedulerWaits(tuple((k, v - then.get(k, 0.0)) for k, v in self.sums))

    def summary(self) -> dict:
        """{"admission_s": {stage: {"count", "mean_s"}}, "command_wait_s": {command: ...},
        "event_loop_lag_s": {"all": ...}, "worker_message_lag_s": {"outbox" / "received" / "handled": ...},
        "worker_message_handling_s": {kind: ...}, "worker_reader_wait_s": {"all": ...},
        "dispatch_tick_s": {"all": ...}}: those observed."""
        if any(v < 0 for (_, _, part), v in self.sums if part == "count"):   # readings across a scheduler restart
            return {"error": "the scheduler's counts went down between the readings (restarted?)"}
        out = {}
        for metric, (_, name) in WAIT_METRICS.items():
            sums = {(value, part): v for (m, value, part), v in self.sums if m == metric}
            if sums:
                out[name] = means_by_label(sums)
        return out


def parse_scheduler_waits(text: str) -> SchedulerWaits:
    from prometheus_client.parser import text_string_to_metric_families    # as bench.step_times: the CLI loads lazily

    return waits_of(text_string_to_metric_families(text))


def waits_of(families) -> SchedulerWaits:
    """The waits among a /metrics page's parsed families."""
    sums = []
    for family in families:
        if family.name in WAIT_METRICS:
            sums += [((family.name, value, part), v)
                     for (value, part), v in histogram_label_sums(family, WAIT_METRICS[family.name][0]).items()]
    return SchedulerWaits(tuple(sorted(sums)))


def read_scheduler_waits(port: int) -> SchedulerWaits:
    return parse_scheduler_waits(metrics_page(port))
