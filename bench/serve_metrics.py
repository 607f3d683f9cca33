"""Per-request results of a serving benchmark and their summary: the numbers `vllm bench serve` prints, plus
the paper's normalized latency (e2e / output tokens), queueing, preemptions, fairness and predictor quality."""
from __future__ import annotations

from dataclasses import dataclass, field

# metric name in --goodput -> the per-request value it bounds (milliseconds)
GOODPUT_METRICS = ("ttft", "tpot", "e2el")


@dataclass
class RequestResult:
    index: int
    expected_output_tokens: int            # what the workload asked for (the dataset's output length)
    start_s: float = 0.0                   # when it was sent, from the start of the run
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    queue_s: float = 0.0                   # the scheduler's: accepted -> first placed on a worker
    # sent -> accepted (validation, tokenizing, prediction), plus the first token's way back to the client: client
    # TTFT minus the server's (counted from acceptance); None where not measured (the HTTP backend)
    admit_s: float | None = None
    preemptions: int = 0
    predicted_output_tokens: int = 0
    repredicted_output_tokens: int = 0     # the worker's estimate from the model's hidden state (0: none)
    finish_reason: str = ""

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first."""
        if self.e2e_s is None or self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    @property
    def normalized_s(self) -> float | None:
        """End-to-end latency per output token: the paper's per-request metric."""
        return self.e2e_s / self.output_tokens if self.e2e_s is not None and self.output_tokens else None


def parse_goodput(specs: list[str]) -> dict[str, float]:
    """['ttft:500', 'tpot:50'] -> {'ttft': 0.5, 'tpot': 0.05} (seconds)."""
    slo = {}
    for spec in specs:
        name, _, ms = spec.partition(":")
        if name not in GOODPUT_METRICS or not ms:
            raise ValueError(f"goodput: {spec!r} is not METRIC:MS with METRIC in {', '.join(GOODPUT_METRICS)}")
        slo[name] = float(ms) / 1000
    return slo


def meets(r: RequestResult, slo: dict[str, float]) -> bool:
    if not r.ok:
        return False
    values = {"ttft": r.ttft_s, "tpot": r.tpot_s, "e2el": r.e2e_s}
    for name, bound in slo.items():
        if values[name] is None:
            if name == "tpot":               # a one-token output has no time per output token
                continue
            return False
        if values[name] > bound:
            return False
    return True


def distribution(values: list[float], percentiles: list[float]) -> dict[str, float]:
    if not values:
        return {}
    import numpy as np

    a = np.asarray(values, dtype=float)
    out = {"mean": float(a.mean()), "median": float(np.median(a)), "std": float(a.std())}
    out.update({f"p{p:g}": float(np.percentile(a, p)) for p in percentiles})
    return out


def kendall_tau(x: list[float], y: list[float]) -> float | None:
    """Rank agreement of predicted and true lengths (tau-b, ties allowed)."""
    if len(x) < 2:
        return None
    from scipy.stats import kendalltau

    tau = kendalltau(x, y).statistic
    return None if tau != tau else float(tau)            # NaN when one side is constant


def fairness(done: list[RequestResult]) -> dict[str, float]:
    """Mean e2e of the shortest half and of the longest tenth of the jobs (by true output length): a
    shortest-first policy should lower the first without raising the second much."""
    if not done:
        return {}
    by_len = sorted(done, key=lambda r: r.output_tokens)
    short, long_ = by_len[:max(1, len(by_len) // 2)], by_len[-max(1, len(by_len) // 10):]
    return {"shortest_half_mean_e2e_s": sum(r.e2e_s for r in short) / len(short),
            "longest_tenth_mean_e2e_s": sum(r.e2e_s for r in long_) / len(long_)}


PACE_MIN_ARRIVALS = 20     # fewer arrivals in the window say nothing about the backlog


def work_pace(results: list[RequestResult]) -> float | None:
    """Output tokens served per output token asked for, over the second half of the arrival window.

    Asked for: the output lengths of the requests that arrive in the window (what each produced in the end, or
    what it asked for if it failed: without ignore_eos a request may stop early). Served: every request's tokens,
    spread evenly from its first token to its end, that fall in the window. While the server keeps up, its
    backlog stays level and the two match (about 1); when it cannot, the backlog grows and the share falls
    towards capacity / offered load. Tokens, not completions: a shortest-first policy finishes more requests
    early and fewer late without serving more. The first half is left out: nothing completes until the first
    requests have run; requests/s over the whole run against the offered rate would count the final drain
    and call any finite run near capacity unsustained. None when the window is too short to tell (all at once).
    """
    if len(results) < 2:
        return None
    starts = sorted(r.start_s for r in results)
    lo, hi = (starts[0] + starts[-1]) / 2, starts[-1]
    arriving = [r for r in results if lo <= r.start_s <= hi]
    asked = sum(r.output_tokens if r.ok else r.expected_output_tokens for r in arriving)
    if hi - lo < 1.0 or len(arriving) < PACE_MIN_ARRIVALS or asked <= 0:
        return None
    served = 0.0
    for r in results:
        if not r.ok or r.e2e_s is None:
            continue
        first, end = r.start_s + (r.ttft_s if r.ttft_s is not None else r.e2e_s), r.start_s + r.e2e_s
        if end <= first:
            served += r.output_tokens if lo <= end <= hi else 0
        else:
            served += r.output_tokens * max(0.0, min(end, hi) - max(first, lo)) / (end - first)
    return served / asked


def summarize(results: list[RequestResult], duration_s: float, percentiles: list[float],
              slo: dict[str, float] | None = None) -> dict:
    done = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in done)
    s = {
        "requests": len(results), "completed": len(done), "failed": len(results) - len(done),
        "errors": sorted({r.error for r in results if r.error})[:10],
        "duration_s": duration_s,
        "request_throughput": len(done) / duration_s if duration_s else 0.0,
        "output_throughput": out_tokens / duration_s if duration_s else 0.0,
        "total_token_throughput": (out_tokens + sum(r.prompt_tokens for r in done)) / duration_s if duration_s else 0.0,
        "total_input_tokens": sum(r.prompt_tokens for r in done), "total_output_tokens": out_tokens,
        "preemptions": sum(r.preemptions for r in done),
        "max_preemptions_per_request": max((r.preemptions for r in done), default=0),
    }
    for name, values in (("ttft_s", [r.ttft_s for r in done if r.ttft_s is not None]),
                         ("tpot_s", [r.tpot_s for r in done if r.tpot_s is not None]),
                         ("itl_s", [x for r in done for x in r.itl_s]),
                         ("e2e_s", [r.e2e_s for r in done]),
                         ("normalized_latency_s", [r.normalized_s for r in done if r.normalized_s is not None]),
                         ("queue_s", [r.queue_s for r in done]),
                         ("admit_s", [r.admit_s for r in done if r.admit_s is not None])):
        s[name] = distribution(values, percentiles)
    s["fairness"] = fairness(done)
    s["work_pace"] = work_pace(results)
    predicted = [r for r in done if r.predicted_output_tokens > 0]
    s["predictor_kendall_tau"] = kendall_tau([r.predicted_output_tokens for r in predicted],
                                             [r.output_tokens for r in predicted])
    # the same jobs ranked by what the scheduler last believed: the worker's re-estimate where it made one
    s["repredicted_jobs"] = sum(r.repredicted_output_tokens > 0 for r in done)
    s["repredicted_kendall_tau"] = kendall_tau(
        [r.repredicted_output_tokens or r.predicted_output_tokens for r in predicted],
        [r.output_tokens for r in predicted])
    if slo:
        good = sum(meets(r, slo) for r in done)
        s["goodput"] = {"slo_s": slo, "requests_meeting": good, "request_goodput": good / duration_s if duration_s else 0.0}
    return s


def format_summary(s: dict) -> str:
    lines = [f"{'=' * 20} Serving benchmark result: {s.get('label', '')} {'=' * 20}",
             f"{'Successful requests:':<40}{s['completed']:>10}",
             f"{'Failed requests:':<40}{s['failed']:>10}",
             f"{'Benchmark duration (s):':<40}{s['duration_s']:>10.2f}",
             f"{'Total input tokens:':<40}{s['total_input_tokens']:>10}",
             f"{'Total generated tokens:':<40}{s['total_output_tokens']:>10}",
             f"{'Request throughput (req/s):':<40}{s['request_throughput']:>10.2f}",
             f"{'Output token throughput (tok/s):':<40}{s['output_throughput']:>10.1f}",
             f"{'Preemptions (max per request):':<40}{s['preemptions']:>6} ({s['max_preemptions_per_request']})"]
    if "goodput" in s:
        lines.append(f"{'Request goodput (req/s):':<40}{s['goodput']['request_goodput']:>10.2f}")
    for name, title, scale in (("ttft_s", "Time to first token (ms)", 1e3), ("tpot_s", "Time per output token (ms)", 1e3),
                               ("itl_s", "Inter-token latency (ms)", 1e3), ("e2e_s", "End-to-end latency (s)", 1),
                               ("normalized_latency_s", "Normalized latency (s/token)", 1),
                               ("queue_s", "Queue time (s)", 1), ("admit_s", "Admission (s)", 1)):
        d = s.get(name) or {}
        if d:
            cells = "  ".join(f"{k} {v * scale:.3f}" for k, v in d.items() if k != "std")
            lines.append(f"{title + ':':<32}{cells}")
    f = s.get("fairness") or {}
    if f:
        lines.append(f"{'Mean e2e shortest 50% / longest 10%:':<40}{f['shortest_half_mean_e2e_s']:.2f} s / "
                     f"{f['longest_tenth_mean_e2e_s']:.2f} s")
    if s.get("predictor_kendall_tau") is not None:
        lines.append(f"{'Predictor Kendall tau (live):':<40}{s['predictor_kendall_tau']:>10.3f}")
    for e in s.get("errors", []):
        lines.append(f"error: {e}")
    return "\n".join(lines)
