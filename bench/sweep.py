"""`alise bench sweep`: request rates x scheduling policies on one machine in one run, with a report.

For each (policy, rate) a fresh local stack is started (Redis, predictor, scheduler with that policy, worker(s);
the worker flags choose CPU or GPU) and primed with a burst of other requests; every run gets the same workload
with the same arrival times. Each run's summary (JSON) and per-request rows (CSV) are written under --out, then
the figures (PNG) and a markdown report (bench/sweep_report.py).

`--side-by-side` runs the policies of a rate at the same time, each stack pinned to its own share of the CPUs
(rotated from rate to rate): on a VM whose speed drifts by ~20% between runs minutes apart, runs one after another
measure the drift more than the policy, while runs side by side see the same machine.
"""
from __future__ import annotations

import argparse
import asyncio
import csv
import json
import math
import os
from pathlib import Path

from bench.process_cpu import cpu_share, process_cpu, process_cpus
from bench.redis_commands import commands_during, read_commandstats
from bench.run_timeline import sample_timeline
from bench.scheduler_waits import SchedulerWaits, read_scheduler_waits
from bench.serve import (Target, add_workload_arguments, arrival_fields, arrival_trace, load_workload, open_tokenizer,
                         run, save, worker_loads)
from bench.serve_metrics import RequestResult, distribution, summarize, work_pace
from bench.step_times import StepHistogram, read_step_histogram
from bench.sweep_report import Run, markdown, plot
from services.common.loop_lag import watch_loop_lag


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_workload_arguments(p)
    p.add_argument("--policies", nargs="+", default=["fcfs", "alise"],
                   help="policies to run; POLICY@VARIANT runs POLICY with VARIANT's --variant-worker-arg, "
                        "--variant-scheduler-arg and --variant-predictor-arg flags, as a "
                        "run of its own (e.g. alise@noprobe), so variants alternate with the policies")
    p.add_argument("--variant-worker-arg", action="append", default=[], metavar="VARIANT=FLAG",
                   help="an extra worker flag for runs of POLICY@VARIANT only (repeat), e.g. "
                        "--variant-worker-arg=noprobe=--length-probe-layer=-2")
    p.add_argument("--variant-scheduler-arg", action="append", default=[], metavar="VARIANT=FLAG",
                   help="an extra scheduler flag for runs of POLICY@VARIANT only (repeat), e.g. "
                        "--variant-scheduler-arg=noearly=--park-kv-share=0")
    p.add_argument("--variant-predictor-arg", action="append", default=[], metavar="VARIANT=FLAG",
                   help="an extra predictor flag for runs of POLICY@VARIANT only (repeat), e.g. "
                        "--variant-predictor-arg=novotes=--message-weight=0")
    p.add_argument("--rates", nargs="+", type=float, required=True, help="request rates (req/s) to sweep")
    p.add_argument("--prime", type=int, default=20, help="requests sent at once before a policy's runs")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--worker-arg", action="append", default=[], help="extra worker flag (repeat), e.g. --device=cuda")
    p.add_argument("--scheduler-arg", action="append", default=[], help="extra scheduler flag (repeat)")
    p.add_argument("--predictor-arg", action="append", default=[],
                   help="extra predictor flag (repeat), e.g. --predictor-arg=--model-dir=DIR (a trained predictor)")
    p.add_argument("--resume", action="store_true",
                   help="keep the runs already saved under --out (same labels, run the same way: side by side or "
                        "not) and run only the missing ones (with --side-by-side, a rate's whole group): a sweep "
                        "split over several sessions on one machine still makes one report")
    p.add_argument("--alternate", action="store_true",
                   help="run rate by rate, the policies in turn and their order reversed at every other rate, so "
                        "a machine that drifts (or a slow first run) does not favour one policy")
    p.add_argument("--side-by-side", action="store_true",
                   help="run the policies of each rate at the same time, each stack pinned to its own equal share of "
                        "this process's CPUs (the shares rotate from rate to rate), so that every policy meets the "
                        "same machine speed; needs at least one CPU per policy")
    p.add_argument("--latency-bound", type=float, default=0.1, help="mean normalized latency bound (s/token)")
    p.add_argument("--out", type=Path, default=Path("sweep"))


def sweep(a: argparse.Namespace) -> list[Run]:
    cpus = sorted(os.sched_getaffinity(0))
    if a.side_by_side and len(cpus) < len(a.policies):
        raise ValueError(f"--side-by-side: {len(a.policies)} policies need as many CPUs, this process has {len(cpus)}")
    if a.side_by_side and any("cuda" in arg for arg in a.worker_arg):
        raise ValueError("--side-by-side shares out CPUs only: GPU workers would share one GPU")
    a.out.mkdir(parents=True, exist_ok=True)
    workload = load_workload(a, open_tokenizer(a.tokenizer), extra=a.prime)
    prime, measured = workload[:a.prime], workload[a.prime:]
    percentiles = [float(x) for x in a.percentiles.split(",")]
    trace = arrival_trace(a)           # read (and checked) once, before any stack starts
    for spec in a.policies:            # a variant without flags fails now, not after the runs before it
        variant_flags(spec, a.variant_worker_arg, a.variant_scheduler_arg, a.variant_predictor_arg)
    runs = []
    for group in run_groups(a.policies, a.rates, a.alternate, a.side_by_side):
        rate = group[0][1]
        # a saved run is kept only if it ran the same way (side by side or alone: the machine each had differs)
        saved = [run if a.resume and (run := load_run(a.out, policy, rate)) is not None
                 and run[0].get("side_by_side", False) == a.side_by_side else None for policy, _ in group]
        if None in saved:  # a group runs whole: a policy run alone later would meet another machine speed
            shares = cpu_shares(cpus, len(group), a.rates.index(rate)) if a.side_by_side else [()]
            saved = run_together(a, [policy for policy, _ in group], rate, shares, prime, measured, percentiles,
                                 trace)
        for (policy, _), (summary, normalized) in zip(group, saved):
            runs.append(Run(policy, rate, summary, normalized))
            print(f"{summary['label']}: {summary['completed']}/{summary['requests']} done, mean normalized "
                  f"{summary['normalized_latency_s'].get('mean', float('nan')):.3f} s/token", flush=True)
    report(runs, a.out, a.latency_bound)
    return runs


def run_groups(policies: list[str], rates: list[float], alternate: bool, side_by_side: bool) -> list[list[tuple]]:
    """The runs in the order they start, grouped by what runs at once: one (policy, rate) at a time, or with
    --side-by-side every policy of a rate together."""
    if side_by_side:
        return [[(p, r) for p in policies] for r in rates]
    return [[pair] for pair in run_order(policies, rates, alternate)]


def cpu_shares(cpus: list[int], n: int, turn: int) -> list[tuple[int, ...]]:
    """`cpus` cut into `n` equal shares (a remainder stays unused), rotated by `turn`: over n turns each runner
    gets each share once, so a faster core (or one that also serves the benchmark client) favours nobody."""
    size = len(cpus) // n
    shares = [tuple(cpus[i * size:(i + 1) * size]) for i in range(n)]
    return [shares[(i + turn) % n] for i in range(n)]


def run_order(policies: list[str], rates: list[float], alternate: bool) -> list[tuple[str, float]]:
    """(policy, rate) in the order they run: policy by policy, or rate by rate with the policies alternating."""
    if not alternate:
        return [(p, r) for p in policies for r in rates]
    return [(p, r) for i, r in enumerate(rates) for p in (policies if i % 2 == 0 else policies[::-1])]


def variant_flags(spec: str, worker_args: list[str], scheduler_args: list[str] = (),
                  predictor_args: list[str] = ()) -> tuple[str, list[str], list[str], list[str]]:
    """'POLICY@VARIANT' -> (POLICY, the worker, scheduler and predictor flags given for VARIANT); a plain 'POLICY'
    has none. A variant with no flags is refused: it would run the plain policy under another name."""
    policy, _, variant = spec.partition("@")
    if not variant:
        return policy, [], [], []
    flags = []
    for option, args in (("--variant-worker-arg", worker_args), ("--variant-scheduler-arg", scheduler_args),
                         ("--variant-predictor-arg", predictor_args)):
        if bad := [arg for arg in args if not all(arg.partition("="))]:
            raise ValueError(f"{option} {bad[0]!r}: expected VARIANT=FLAG")
        flags.append([arg.partition("=")[2] for arg in args if arg.partition("=")[0] == variant])
    if not any(flags):
        raise ValueError(f"policy {spec!r}: no --variant-worker-arg, --variant-scheduler-arg or "
                         f"--variant-predictor-arg {variant}=FLAG given")
    return policy, *flags


def run_label(policy: str, rate: float) -> str:
    return f"{policy}-r{rate:g}"


def load_run(out: Path, policy: str, rate: float) -> tuple[dict, tuple] | None:
    """A run saved by an earlier sweep into `out`: its summary and every completed request's normalized latency
    (e2e / output tokens, from the per-request CSV), or None when it is not there."""
    path = out / f"{run_label(policy, rate)}.json"
    if not path.is_file() or not path.with_suffix(".csv").is_file():
        return None
    with open(path.with_suffix(".csv"), newline="") as f:
        results = [saved_result(row) for row in csv.DictReader(f)]
    normalized = tuple(r.normalized_s for r in results if r.ok and r.normalized_s is not None)
    summary = json.loads(path.read_text())
    summary["work_pace"] = work_pace(results)     # added since some runs were saved: computed from their requests
    return summary, normalized


def saved_runs(out: Path) -> list[Run]:
    """Every run saved into `out` (by one sweep or by several calls of one), by policy then rate: a report can be
    written again over runs that separate calls measured on one warm machine."""
    runs = []
    for path in out.glob("*-r*.json"):
        policy, _, label_rate = path.stem.rpartition("-r")   # run_label's form; a policy variant may hold '-'
        try:
            rate = float(label_rate)
        except ValueError:                                    # a JSON file of another kind
            continue
        if policy and (saved := load_run(out, policy, rate)) is not None:
            runs.append(Run(policy, rate, *saved))
    return sorted(runs, key=lambda r: (r.policy, r.rate))


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", type=Path, help="a sweep's --out folder: its saved runs (POLICY-rRATE.json and .csv)")
    p.add_argument("--latency-bound", type=float, default=0.1, help="mean normalized latency bound (s/token)")


def report_saved(a: argparse.Namespace) -> Path:
    runs = saved_runs(a.dir)
    if not runs:
        raise ValueError(f"no saved runs (POLICY-rRATE.json with its .csv) in {a.dir}")
    return report(runs, a.dir, a.latency_bound)


def saved_result(row: dict) -> RequestResult:
    """A request as `save` wrote it to CSV (without its inter-token latencies)."""
    def opt(v: str) -> float | None:
        return float(v) if v not in ("", "None") else None
    return RequestResult(index=int(row["index"]), expected_output_tokens=int(row["expected_output_tokens"]),
                         start_s=float(row["start_s"]), ok=row["ok"] == "True", error=row["error"],
                         prompt_tokens=int(row["prompt_tokens"]), output_tokens=int(row["output_tokens"]),
                         ttft_s=opt(row["ttft_s"]), e2e_s=opt(row["e2e_s"]), queue_s=float(row["queue_s"]),
                         admit_s=opt(row.get("admit_s", "")),     # (not in runs saved before it was measured)
                         preemptions=int(row["preemptions"]),
                         predicted_output_tokens=int(row["predicted_output_tokens"]),
                         repredicted_output_tokens=int(row.get("repredicted_output_tokens") or 0),
                         finish_reason=row["finish_reason"])


def run_together(a: argparse.Namespace, policies: list[str], rate: float, shares: list[tuple[int, ...]], prime,
                 measured, percentiles, trace: list[float]) -> list[tuple[dict, tuple]]:
    """Each policy at `rate` on a stack of its own, pinned to its share of the CPUs (`()`: unpinned), all measured
    at once; (summary, normalized latencies) per policy. A stack of its own per run: the same prompts sent again to
    a running stack would hit its prefix cache and teach its predictor their lengths, so later runs would be
    flattered."""
    stacks = []
    try:
        for policy, cpus in zip(policies, shares):
            stacks.append(start_stack(a, policy, rate, cpus))
        measures = asyncio.run(measure_together(a, stacks, rate, prime, measured, trace))
    finally:
        for stack in stacks:
            stack.stop()
    out = []
    for policy, (results, duration, extras) in zip(policies, measures):
        summary = summarize(results, duration, percentiles)
        summary.update(label=run_label(policy, rate), policy=policy, request_rate=rate, **arrival_fields(a), **extras,
                       side_by_side=a.side_by_side)
        save(a.out / f"{summary['label']}.json", summary, results)
        out.append((summary, tuple(r.normalized_s for r in results if r.ok and r.normalized_s is not None)))
    return out


def stack_flags(a: argparse.Namespace, policy: str) -> tuple[list[str], list[str], list[str]]:
    """The worker's, scheduler's and predictor's flags for a run of `policy` (POLICY or POLICY@VARIANT)."""
    policy_name, worker_flags, scheduler_flags, predictor_flags = variant_flags(
        policy, a.variant_worker_arg, a.variant_scheduler_arg, a.variant_predictor_arg)
    # with ignore_eos each request's max_tokens is its true length: the scheduler must not predict with it
    blind = ["--no-predict-within-max-tokens"] if a.ignore_eos else []
    # predictor and length probe learn online within the run but never save it: runs must not teach each other
    return (["--length-probe-read-only", *a.worker_arg, *worker_flags],
            ["--policy", policy_name, "--serve-step-sample", *blind, *a.scheduler_arg, *scheduler_flags],
            ["--read-only", *a.predictor_arg, *predictor_flags])


def start_stack(a: argparse.Namespace, policy: str, rate: float, cpus: tuple[int, ...]):
    from services.common.local_stack import LocalStack

    worker_args, scheduler_args, predictor_args = stack_flags(a, policy)
    return LocalStack(log_dir=a.out / f"stack-{run_label(policy, rate)}", num_workers=a.workers,
                      worker_args=worker_args, scheduler_args=scheduler_args, predictor_args=predictor_args,
                      worker_metrics=True, scheduler_metrics=True, cpus=cpus).start(timeout_s=900)


async def measure_together(a: argparse.Namespace, stacks: list, rate: float, prime, measured,
                           trace: list[float]) -> list[tuple[list[RequestResult], float, dict]]:
    """Prime every stack, then send each the measured requests on one schedule, at once: (results, duration,
    summary extras) per stack."""
    targets = [Target(s.address, s.api_key, str(s.tls_files.ca) if s.tls_files else "", chat=a.chat,
                      max_tokens=a.max_tokens) for s in stacks]
    if prime:
        await asyncio.gather(*(run(prime, t, rate=math.inf, burstiness=1.0, seed=a.seed, max_concurrency=0,
                                   ignore_eos=a.ignore_eos, label=f"prime-{i}", progress=False)
                               for i, t in enumerate(targets)))
    before = [(process_cpu(s), worker_steps(s), scheduler_waits(s), redis_commands(s)) for s in stacks]
    client_lags: list[float] = []        # the client's own event loop (one for every stack): a slow client shows here
    watcher = asyncio.create_task(watch_loop_lag(client_lags.append))
    timelines: list[list[dict]] = [[] for _ in stacks]     # each stack's run second by second (bench/run_timeline.py)
    samplers = [asyncio.create_task(sample_timeline(s, line.append)) for s, line in zip(stacks, timelines)]
    try:
        measures = await asyncio.gather(*(run(measured, t, rate=rate, burstiness=a.burstiness, seed=a.seed,
                                              max_concurrency=a.max_concurrency, ignore_eos=a.ignore_eos,
                                              label=f"run-{i}", trace=trace, progress=i == 0)
                                          for i, t in enumerate(targets)))
    finally:
        for task in (watcher, *samplers):
            task.cancel()
    out = []
    for stack, target, (cpu_before, steps_before, waits_before, commands_before), (results, duration), timeline in zip(
            stacks, targets, before, measures, timelines):
        extras = {"cpu_share": cpu_share(cpu_before, process_cpu(stack), duration),  # one at a full core limits a run
                  "step_times": steps_during(steps_before, worker_steps(stack)),
                  "scheduler_waits": waits_during(waits_before, scheduler_waits(stack)),
                  "client_loop_lag_s": lag_summary(client_lags),
                  "cpus": process_cpus(stack), "timeline": timeline,
                  "redis_commands": commands_between(commands_before, redis_commands(stack), len(results))}
        try:
            extras["workers"] = await worker_loads(target)   # what the scheduler learned of them (the simulator's cost)
        except Exception as e:  # noqa: BLE001 - the run's results matter more than this extra
            extras["workers"] = [{"error": repr(e)}]
        out.append((results, duration, extras))
    return out


def lag_summary(lags: list[float]) -> dict:
    """The client's event-loop lag over a run (services/common/loop_lag.py), seconds: how often it was watched, its
    mean, median, p99 and worst."""
    return {"count": len(lags), **distribution(lags, [99]), **({"max": max(lags)} if lags else {})}


def redis_commands(stack) -> "dict | Exception":
    """The stack's Redis commands so far, by command (an unreadable Redis as its error: the run matters more)."""
    try:
        return read_commandstats(stack.redis_url)
    except Exception as e:  # noqa: BLE001 - reported in the run's JSON instead
        return e


def commands_between(before: "dict | Exception", after: "dict | Exception", requests: int) -> dict:
    """The Redis commands between two readings (bench/redis_commands.py), or what kept them from being read."""
    if isinstance(before, Exception) or isinstance(after, Exception):
        return {"error": repr(before if isinstance(before, Exception) else after)}
    return commands_during(before, after, requests)


def worker_steps(stack) -> dict[str, "StepHistogram | Exception"]:
    """Each worker's step-time histogram now (an unreadable one as its error: the run matters more)."""
    out: dict[str, StepHistogram | Exception] = {}
    for name, port in stack.metrics_ports.items():
        try:
            out[name] = read_step_histogram(port)
        except Exception as e:  # noqa: BLE001 - reported in the run's JSON instead
            out[name] = e
    return out


def scheduler_waits(stack) -> "SchedulerWaits | Exception":
    """The scheduler's admission and command waits now (an unreadable reading as its error: the run matters more)."""
    try:
        return read_scheduler_waits(stack.scheduler_metrics_port)
    except Exception as e:  # noqa: BLE001 - reported in the run's JSON instead
        return e


def waits_during(before: "SchedulerWaits | Exception", after: "SchedulerWaits | Exception") -> dict:
    """The scheduler's waits between two readings (bench/scheduler_waits.py), or what kept them from being read."""
    if isinstance(before, Exception) or isinstance(after, Exception):
        return {"error": repr(before if isinstance(before, Exception) else after)}
    return after.minus(before).summary()


def steps_during(before: dict, after: dict) -> dict[str, dict]:
    """Per worker, the steps between two readings (bench/step_times.py), or what kept them from being read."""
    out = {}
    for name, h in after.items():
        earlier = before.get(name)
        if isinstance(h, StepHistogram) and isinstance(earlier, StepHistogram):
            out[name] = h.minus(earlier).summary()
        else:
            out[name] = {"error": repr(h if not isinstance(h, StepHistogram) else earlier)}
    return out


def report(runs: list[Run], out: Path, bound_s: float) -> Path:
    figures = plot(runs, out)
    path = out / "report.md"
    path.write_text(markdown(runs, bound_s, figures))
    (out / "sweep.json").write_text(json.dumps([{"policy": r.policy, "rate": r.rate, "summary": r.summary}
                                               for r in runs], indent=2))
    print(f"report: {path}")
    return path
