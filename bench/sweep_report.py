"""A sweep's runs (policy x request rate) summarised: the paper's latency-vs-rate figures, throughput at a latency
bound, sustainable capacity and a markdown report. Pure functions of the runs' summaries (bench/serve_metrics.py),
so the same report comes out of live sweeps and of simulations."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# a run keeps up with its offered load while it serves at least this share of the output tokens asked for
# (serve_metrics.work_pace); below it the backlog grows
SUSTAINED_SHARE = 0.9


@dataclass(frozen=True)
class Run:
    policy: str
    rate: float
    summary: dict                      # serve_metrics.summarize(...)
    normalized: tuple[float, ...]      # every completed request's normalized latency (for the CDF)


def mean_normalized(run: Run) -> float:
    return run.summary["normalized_latency_s"].get("mean", float("inf"))


def sustained(run: Run) -> bool:
    """The server keeps pace with the work arriving: above this rate the backlog grows without bound. A run whose pace
    cannot be told (all requests at once) is judged by requests/s against the offered rate."""
    s = run.summary
    pace = s.get("work_pace")
    if pace is None:
        pace = s["request_throughput"] / run.rate if run.rate > 0 else 0.0
    return s["failed"] == 0 and pace >= SUSTAINED_SHARE


def throughput_at_bound(runs: list[Run], bound_s: float) -> dict[str, float]:
    """Per policy: the highest rate whose mean normalized latency stays under `bound_s` (0 if none does)."""
    best: dict[str, float] = {}
    for r in runs:
        ok = mean_normalized(r) <= bound_s
        best[r.policy] = max(best.get(r.policy, 0.0), r.rate if ok else 0.0)
    return best


def crossing_rate(runs: list[Run], bound_s: float) -> dict[str, tuple[str, float]]:
    """Per policy: where its mean normalized latency first crosses `bound_s` as the rate rises, read between the
    swept rates by linear interpolation (the paper's metric, less coarse than the highest swept rate under the
    bound). ("=", rate) when two swept rates bracket the crossing, (">=", highest rate) when no run went over the
    bound, ("<", lowest rate) when none stayed under it, (">=", lower rate) when the run above it completed
    nothing (no latency to interpolate to). Only the first crossing counts: a noisy curve that dips back under
    the bound at a higher rate is judged by where it first went over (throughput_at_bound takes the other view)."""
    out: dict[str, tuple[str, float]] = {}
    for policy in sorted({r.policy for r in runs}):
        points = sorted((r.rate, mean_normalized(r)) for r in runs if r.policy == policy and r.rate != float("inf"))
        if not points:
            continue
        if points[0][1] > bound_s:
            out[policy] = ("<", points[0][0])
            continue
        out[policy] = (">=", points[-1][0])
        for (r0, m0), (r1, m1) in zip(points, points[1:]):
            if m0 <= bound_s < m1:
                out[policy] = ("=", r0 + (r1 - r0) * (bound_s - m0) / (m1 - m0)) if m1 < float("inf") else (">=", r0)
                break
    return out


def crossing_ratio(kind: str, rate: float, base: tuple[str, float] | None) -> str:
    """A policy's crossing against fcfs's, when fcfs's is known: "1.25x", or ">= 1.58x" for a lower bound."""
    if not base or base[0] != "=" or not base[1] or kind == "<":
        return "-"
    return f"{'' if kind == '=' else '>= '}{rate / base[1]:.2f}x"


def capacity(runs: list[Run]) -> dict[str, float]:
    """Per policy: the highest rate it sustained."""
    out: dict[str, float] = {}
    for r in runs:
        out[r.policy] = max(out.get(r.policy, 0.0), r.rate if sustained(r) else 0.0)
    return out


def table(runs: list[Run]) -> list[dict]:
    rows = []
    for r in sorted(runs, key=lambda r: (r.policy, r.rate)):
        s = r.summary
        rows.append({"policy": r.policy, "rate": r.rate, "completed": s["completed"], "failed": s["failed"],
                     "req_per_s": s["request_throughput"], "out_tok_per_s": s["output_throughput"],
                     "norm_mean": s["normalized_latency_s"].get("mean"), "norm_p99": s["normalized_latency_s"].get("p99"),
                     "ttft_p99": s["ttft_s"].get("p99"), "longest10_e2e": s["fairness"].get("longest_tenth_mean_e2e_s"),
                     "shortest50_e2e": s["fairness"].get("shortest_half_mean_e2e_s"),
                     "preemptions": s["preemptions"], "sustained": sustained(r)})
    return rows


def plot(runs: list[Run], out_dir: Path) -> list[Path]:
    """PNG figures: mean and p99 normalized latency vs rate, p99 TTFT vs rate, long-job latency vs rate, and the
    CDF of normalized latency at the highest rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    policies = sorted({r.policy for r in runs})
    by = {p: sorted((r for r in runs if r.policy == p), key=lambda r: r.rate) for p in policies}
    figures = [("normalized_latency_vs_rate.png", "normalized latency (s/token)",
                lambda r: (r.summary["normalized_latency_s"].get("mean"), r.summary["normalized_latency_s"].get("p99"))),
               ("ttft_p99_vs_rate.png", "p99 TTFT (s)", lambda r: (r.summary["ttft_s"].get("p99"),)),
               ("long_job_latency_vs_rate.png", "mean e2e of the longest 10% (s)",
                lambda r: (r.summary["fairness"].get("longest_tenth_mean_e2e_s"),))]
    paths = []
    for name, ylabel, values in figures:
        fig, ax = plt.subplots(figsize=(6, 4))
        for p in policies:
            rates = [r.rate for r in by[p]]
            series = list(zip(*(values(r) for r in by[p])))
            for i, ys in enumerate(series):
                ax.plot(rates, ys, marker="o", linestyle="-" if i == 0 else "--", label=p if i == 0 else f"{p} p99")
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(ylabel)
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        paths.append(out_dir / name)
    fig, ax = plt.subplots(figsize=(6, 4))
    top = max(r.rate for r in runs)
    for p in policies:
        values = np.sort([x for r in by[p] if r.rate == top for x in r.normalized])
        if len(values):
            ax.plot(values, np.arange(1, len(values) + 1) / len(values), label=p)
    ax.set_xscale("log")
    ax.set_xlabel(f"normalized latency (s/token) at {top:g} req/s")
    ax.set_ylabel("share of requests")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "normalized_latency_cdf.png", dpi=110)
    plt.close(fig)
    return paths + [out_dir / "normalized_latency_cdf.png"]


def markdown(runs: list[Run], bound_s: float, figures: list[Path], title: str = "Sweep") -> str:
    at_bound, cap = throughput_at_bound(runs, bound_s), capacity(runs)
    base = at_bound.get("fcfs")
    lines = [f"# {title}", "", "| policy | rate | done | req/s | out tok/s | norm. mean | norm. p99 | TTFT p99 | "
             "short 50% e2e | long 10% e2e | preempt | sustained |", "|" + "---|" * 12]
    for row in table(runs):
        lines.append("| {policy} | {rate:g} | {completed} | {req_per_s:.2f} | {out_tok_per_s:.0f} | {nm} | {np99} | "
                     "{ttft} | {short} | {long} | {preemptions} | {sus} |".format(
                         **row, nm=_f(row["norm_mean"]), np99=_f(row["norm_p99"]), ttft=_f(row["ttft_p99"]),
                         short=_f(row["shortest50_e2e"]), long=_f(row["longest10_e2e"]),
                         sus="yes" if row["sustained"] else "no"))
    lines += ["", f"Throughput at a mean normalized latency bound of {bound_s:g} s/token, and sustainable capacity "
                  f"(highest rate whose runs served >= {SUSTAINED_SHARE:.0%} of the output tokens asked for while requests arrived):", "",
              "| policy | rate at bound | vs fcfs | capacity |", "|---|---|---|---|"]
    for p in sorted(at_bound):
        ratio = f"{at_bound[p] / base:.2f}x" if base else "-"
        lines.append(f"| {p} | {at_bound[p]:g} | {ratio} | {cap[p]:g} |")
    crossing = crossing_rate(runs, bound_s)
    if crossing:
        lines += ["", f"Where the mean normalized latency crosses {bound_s:g} s/token, between the swept rates "
                      "(linear interpolation):", "", "| policy | crossing rate | vs fcfs |", "|---|---|---|"]
        for p, (kind, rate) in crossing.items():
            lines.append(f"| {p} | {'' if kind == '=' else kind + ' '}{rate:.1f} | "
                         f"{crossing_ratio(kind, rate, crossing.get('fcfs'))} |")
    lines += [""] + [f"![{f.stem}]({f.name})" for f in figures]
    return "\n".join(lines) + "\n"


def _f(v) -> str:
    return "-" if v is None else f"{v:.3f}"
