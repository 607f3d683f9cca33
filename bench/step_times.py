"""How long a worker's engine steps took during a measured run, from its Prometheus /metrics.

The worker keeps a histogram of its step wall times (`alise:engine_step_seconds`, services/worker/metrics.py).
A sweep reads it before and after each measured run; the difference is that run's steps: how many, their mean,
and how they spread over the buckets. Two policies that serve the same requests at the same rate should differ
here only in what they ask the engine to do (prefills early, preemptions), so this is where a policy that makes
steps slower shows, apart from what the client sees.
"""
from __future__ import annotations

import urllib.request
from dataclasses import dataclass

STEP_METRIC = "alise:engine_step_seconds"
THREAD_METRIC = "alise:engine_thread_seconds"     # the engine thread's wall time by activity (step, flush, idle, ...)
# what the steps held, summed over steps (services/worker/metrics.py): the name each gets in a run's summary
MADE_OF_METRICS = {"alise:step_rows": "rows", "alise:prefill_tokens": "prefill_tokens",
                   "alise:step_context_tokens": "context_tokens", "alise:prefill_attention_pairs": "prefill_pairs",
                   "alise:kept_kv_dropped": "kept_kv_dropped",
                   "alise:decode_steps": "decode_steps", "alise:decode_step_rows": "decode_rows",
                   "alise:decode_step_context_tokens": "decode_context_tokens"}
# on a GPU, the device's seconds: running decode-only steps, steps with prefill, and idle between back-to-back steps
# waiting for the host (services/worker/metrics.py). Their sum against the steps' wall time says which one bounds
DEVICE_STEP_METRIC, DEVICE_WAITED_METRIC = "alise:device_step_seconds", "alise:device_waited_seconds"
# where placed jobs waited on the worker: delivery to the engine thread, its waiting line (services/worker/metrics.py)
ASSIGNMENT_WAIT_METRIC = "alise:assignment_wait_seconds"


@dataclass(frozen=True)
class StepHistogram:
    buckets: tuple[tuple[float, float], ...]     # (upper bound in seconds, steps at or under it: cumulative)
    count: float
    sum_s: float
    thread_s: tuple[tuple[str, float], ...] = ()     # (activity, engine thread seconds spent on it: cumulative)
    made_of: tuple[tuple[str, float], ...] = ()      # (MADE_OF_METRICS name, its total over the steps: cumulative)
    device_s: tuple[tuple[str, float], ...] = ()     # ("decode" / "mixed" / "waited", device seconds: cumulative)
    waits: tuple[tuple[tuple[str, str], float], ...] = ()   # ((stage, "count" / "sum"), of ASSIGNMENT_WAIT_METRIC)

    def minus(self, earlier: "StepHistogram") -> "StepHistogram":
        def minus(now, then):
            then = dict(then)
            return tuple((k, v - then.get(k, 0.0)) for k, v in now)
        return StepHistogram(minus(self.buckets, earlier.buckets), self.count - earlier.count,
                             self.sum_s - earlier.sum_s, minus(self.thread_s, earlier.thread_s),
                             minus(self.made_of, earlier.made_of), minus(self.device_s, earlier.device_s),
                             minus(self.waits, earlier.waits))

    def summary(self) -> dict:
        """Steps, their mean, the share that took longer than each bucket's bound, and the engine thread's seconds
        by activity (where a worker spent the time it was not stepping), and what the steps held (rows, prefill and
        context tokens, kept KV dropped)."""
        if self.count < 0:      # a difference of two readings across a worker restart: its counters began again
            return {"error": "the worker's step counter went down between the readings (restarted?)"}
        extra = {"engine_thread_s": dict(self.thread_s)} if self.thread_s else {}
        if self.made_of:
            extra["made_of"] = {k: int(v) for k, v in self.made_of}
        if self.device_s:
            extra["device_s"] = dict(self.device_s)
        if self.waits:
            extra["assignment_wait_s"] = means_by_label(dict(self.waits))
        if self.count == 0:
            return {"steps": 0, **extra}
        return {"steps": int(self.count), "mean_s": self.sum_s / self.count,
                "share_over_s": {f"{le:g}": 1.0 - n / self.count for le, n in self.buckets if le != float("inf")},
                **extra}


def parse_step_histogram(text: str) -> StepHistogram:
    """The step histogram in a /metrics page (summed over label sets: one worker serves one model)."""
    # imported here: the CLI loads bench.sweep for every command, and needs only grpc and protobuf itself
    from prometheus_client.parser import text_string_to_metric_families

    buckets: dict[float, float] = {}
    thread: dict[str, float] = {}
    made_of: dict[str, float] = {}
    device: dict[str, float] = {}
    waits: dict[str, float] = {}
    count = total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name == ASSIGNMENT_WAIT_METRIC:
            waits = histogram_label_sums(family, "stage")
            continue
        if family.name in (DEVICE_STEP_METRIC, DEVICE_WAITED_METRIC):
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    kind = sample.labels.get("step", "waited")
                    device[kind] = device.get(kind, 0.0) + sample.value
            continue
        if family.name in MADE_OF_METRICS:
            name = MADE_OF_METRICS[family.name]
            made_of[name] = sum(s.value for s in family.samples if s.name.endswith("_total"))
            continue
        if family.name == THREAD_METRIC:
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    thread[sample.labels["activity"]] = thread.get(sample.labels["activity"], 0.0) + sample.value
            continue
        if family.name != STEP_METRIC:
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                le = float(sample.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + sample.value
            elif sample.name.endswith("_count"):
                count += sample.value
            elif sample.name.endswith("_sum"):
                total += sample.value
    return StepHistogram(tuple(sorted(buckets.items())), count, total, tuple(sorted(thread.items())),
                         tuple(sorted(made_of.items())), tuple(sorted(device.items())), tuple(sorted(waits.items())))


def histogram_label_sums(family, label: str | None) -> dict[tuple[str, str], float]:
    """A histogram family's observations and their seconds by one label's value: {(value, "count" / "sum"): total}
    (summed over the other labels, such as the model's; with no label, all of them as the value "all")."""
    out: dict[tuple[str, str], float] = {}
    for sample in family.samples:
        if (part := sample.name.rsplit("_", 1)[-1]) in ("count", "sum"):
            key = (sample.labels[label] if label else "all", part)
            out[key] = out.get(key, 0.0) + sample.value
    return out


def means_by_label(sums: dict[tuple[str, str], float]) -> dict[str, dict]:
    """{value: {"count", "mean_s"}} of histogram_label_sums (or a difference of two of them), values observed."""
    counts = {value: n for (value, part), n in sums.items() if part == "count" and n > 0}
    return {value: {"count": int(n), "mean_s": sums.get((value, "sum"), 0.0) / n} for value, n in sorted(counts.items())}


def metrics_page(port: int, host: str = "127.0.0.1", timeout_s: float = 10.0) -> str:
    """A service's Prometheus /metrics page, as text."""
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout_s) as r:
        return r.read().decode()


def read_step_histogram(port: int) -> StepHistogram:
    return parse_step_histogram(metrics_page(port))
