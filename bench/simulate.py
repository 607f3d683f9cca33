"""`alise bench simulate`: request rates x policies on a simulated cluster (bench/simulator/), with the same
summaries, figures and report as a live `alise bench sweep`.

Workloads are lengths only: a text dataset is tokenized once (its prompt and reply lengths), a lengths JSON or an
Azure trace is read as is; with more --num-prompts than the dataset has, requests are drawn from it at random
(seeded). Every (policy, rate) gets the same requests, arrival times and predictions' noise. Chat workloads
(`sharegpt-chat`) also carry their prompts' block keys, so the simulated workers' prefix cache finds the history
an earlier turn of the conversation left, as the live workers' does. Each (policy, rate) writes its summary JSON and
a per-request CSV in the live runs' columns, so a simulated run can be set beside a live one request by request.

    python -m bench.simulate --dataset-name sharegpt --dataset-path ../shared/data/sharegpt_sample_1000.json \\
        --rates 20 30 40 --policies fcfs alise oracle --cost h200-llama3-8b --out sim
"""
from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from bench.serve import (add_arrival_arguments, add_dataset_arguments, arrival_fields, arrival_offsets, arrival_trace,
                         open_run_csv, open_tokenizer, save)
from bench.serve_metrics import summarize
from bench.simulator.cluster import SIM_POLICIES, SimConfig, SimRequest, Simulation, WorkerSpec, step_totals
from bench.simulator.cost import PRESETS, load_cost
from bench.simulator.predictions import PredictorKind, SimPredictor, log_error_sigma, sigma_for_tau
from bench.sweep_report import Run, markdown, plot
from bench.workloads import BenchRequest, Dataset, Limits, length_records, load, rendered_chat
from services.common.preempt_mode import PreemptMode
from services.scheduler.config import SchedulerConfig
from services.scheduler.exec_time import ExecTimeModel


def exec_model_arg(text: str) -> ExecTimeModel:
    t0, a, b = (float(x) for x in text.split(","))
    return ExecTimeModel(t0, a, b)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_dataset_arguments(p)
    p.add_argument("--tokenizer", help="tokenizer directory for text datasets (default: the local model)")
    p.add_argument("--rates", nargs="+", type=float, required=True, help="request rates (req/s); inf = all at once")
    add_arrival_arguments(p).add_argument("--trace-times", action="store_true",
                                          help="azure: the trace's own arrival times (rates ignored)")
    p.add_argument("--policies", nargs="+", default=["fcfs", "alise", "oracle"], choices=SIM_POLICIES)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--max-batch", type=int, default=128)
    p.add_argument("--num-blocks", type=int, default=55_000, help="KV blocks per worker")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--token-budget", type=int, default=8192, help="tokens per iteration")
    p.add_argument("--early-rows", type=int, default=WorkerSpec.early_rows,
                   help="jobs on their way to park a worker decodes at once, as the worker's --early-rows")
    p.add_argument("--cost", default="h200-llama3-8b", help=f"iteration cost: a preset ({', '.join(PRESETS)}) or JSON")
    p.add_argument("--preempt-mode", type=PreemptMode, choices=list(PreemptMode), default=SchedulerConfig.preempt_mode)
    p.add_argument("--knee-share", type=float, default=SchedulerConfig.knee_share,
                   help="admit up to the batch within this share of max throughput (0 = up to max batch)")
    p.add_argument("--max-preemptions", type=int, default=SchedulerConfig.max_preemptions)
    p.add_argument("--park-kv-share", type=float, default=SchedulerConfig.park_kv_share,
                   help="alise: prefill waiting jobs early and park them while KV use is under this share (0 = off)")
    p.add_argument("--park-after-s", type=float, default=SchedulerConfig.park_after_s,
                   help="alise: prefill early only jobs that have waited this long (0 = every waiting job)")
    p.add_argument("--admit-s", type=float, default=0.0,
                   help="a request reaches the scheduler's queue this long after it arrives (live H200: 25-40 ms)")
    p.add_argument("--admit-per-s", type=float, default=0.0,
                   help="the scheduler admits at most this many requests a second (live H200: ~200; 0 = no bound)")
    p.add_argument("--over-batch-step-s", type=float, default=None,
                   help="a decode-only step with more rows than the batch (early jobs beside a full batch) costs this "
                        "much more than its rows say (H100, session 32: ~0.0035); default: the cost's own (0)")
    p.add_argument("--report-lag-s", type=float, default=0.0,
                   help="what a worker did (a finish, a park) reaches the scheduler this much later (live: ~a step)")
    p.add_argument("--command-lag-s", type=float, default=0.0,
                   help="what the scheduler decided (an assignment, a preemption) reaches a worker this much later")
    p.add_argument("--park-wait-factor", type=float, default=SchedulerConfig.park_wait_factor,
                   help="alise: ... and this many times the queue's mean wait now (0 = off)")
    p.add_argument("--max-parking", type=int, default=SchedulerConfig.max_parking,
                   help="alise: at most this many jobs on their way to be prefilled early on a worker at once")
    p.add_argument("--early-tokens", type=int, default=SchedulerConfig.early_tokens,
                   help="alise: a job prefilled early generates this many tokens before it parks")
    p.add_argument("--due-after-s", type=float, default=SchedulerConfig.due_after_s,
                   help="a job that has waited this long goes first in its class, by arrival (0 = off)")
    p.add_argument("--aging-s", type=float, default=SchedulerConfig.aging_s,
                   help="alise: waiting this long makes a job's predicted work count e times less")
    p.add_argument("--max-tokens", type=int, default=4096, help="max_tokens of every request")
    p.add_argument("--predictor", type=PredictorKind, choices=list(PredictorKind), default=PredictorKind.NOISY)
    noise = p.add_mutually_exclusive_group()
    noise.add_argument("--pred-sigma", type=float, help="noisy: log-normal sigma of the predictions")
    noise.add_argument("--kendall-tau", type=float, default=0.25,
                       help="noisy: the sigma giving this Kendall tau on the workload (default: 0.25, measured live)")
    p.add_argument("--predictions", type=Path,
                   help="replay: a live run's per-request CSV (`alise bench serve`/`sweep`) on the same workload and "
                        "--skip; each request gets the prediction the live predictor made for it")
    p.add_argument("--repredict-tau", type=float, default=0.0,
                   help="the worker's length probe: once a prompt is computed, its job is re-estimated with the "
                        "noise giving this Kendall tau (0 = off; measured live on CPU: 0.46)")
    p.add_argument("--exec-model", type=exec_model_arg, default=ExecTimeModel(), metavar="T0,A,B",
                   help="the time model the scheduler ranks jobs by: seconds per prefill token, decode seconds per "
                        "token of context and per step (default: the scheduler's own defaults)")
    p.add_argument("--tick-s", type=float, default=0.0, help="scheduler decides at most once per tick (0 = every event)")
    p.add_argument("--reconsider-s", type=float, default=0.1, help="with jobs waiting, decide at least this often")
    p.add_argument("--latency-bound", type=float, default=0.1, help="mean normalized latency bound (s/token)")
    p.add_argument("--percentiles", default="50,90,99")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", type=int, default=0,
                   help="leave out the dataset's first N requests (a live sweep's --prime requests: the same workload)")
    p.add_argument("--out", type=Path, default=Path("simulation"))


# past this many requests a run keeps no inter-token gaps (one float a token: ~1 GB at 100,000 ShareGPT requests)
ITL_MAX_REQUESTS = 20_000

Row = tuple[int, int, "float | None", tuple[int, ...]]     # prompt tokens, output tokens, trace arrival, block keys


def workload_lengths(a: argparse.Namespace) -> list[Row]:
    """(prompt tokens, output tokens, trace arrival or None, prompt block keys) of the dataset, in file order."""
    if a.dataset_name in (Dataset.SYNTHETIC, Dataset.LENGTHS, Dataset.AZURE):
        return [(p, o, t, ()) for p, o, t in length_records(a.dataset_name, a.dataset_path, a.skip + a.num_prompts,
                                                            a.input_len, a.output_len, Limits())[a.skip:]]
    if a.dataset_path is None:
        raise SystemExit(f"--dataset-path is needed for {a.dataset_name.value}")
    tokenizer = open_tokenizer(a.tokenizer)
    reqs = load(a.dataset_name, a.dataset_path, a.skip + a.num_prompts, tokenizer, seed=a.seed)[a.skip:]
    return [(r.prompt_tokens, r.output_tokens, r.arrival_s, chat_block_keys(r, tokenizer, a.block_size))
            for r in reqs if r.output_tokens > 0]


def chat_block_keys(req: BenchRequest, tokenizer, block_size: int) -> tuple[int, ...]:
    """One key per full block of a chat request's rendered prompt, naming the prompt up to that block's end (as the
    worker's prefix cache keys its blocks; here Python's hash of the token prefix, enough within one run); () for a
    request sent as plain text, whose prompts share no history."""
    if not req.as_chat:
        return ()
    ids = tokenizer.encode(rendered_chat(req, tokenizer), add_special_tokens=False)
    keys, h = [], 0
    for end in range(block_size, len(ids) + 1, block_size):
        h = hash((h, tuple(ids[end - block_size:end])))
        keys.append(h)
    return tuple(keys)


def requests_at(rows: list[Row], n: int, rate: float, a: argparse.Namespace,
                recorded: list[float] | None = None, trace: Sequence[float] = ()) -> list[SimRequest]:
    """n requests from the rows (drawn at random past the rows' end), each with its recorded prediction if any;
    `trace`: the gaps of --arrival-trace (arrival_trace(a), read once by the caller)."""
    rng = random.Random(a.seed)
    picks = list(range(min(n, len(rows)))) + [rng.randrange(len(rows)) for _ in range(n - len(rows))]
    if a.trace_times:
        times = [rows[i][2] or 0.0 for i in picks]
    else:
        times = arrival_offsets(len(picks), rate, a.burstiness, a.seed, trace)
    return [SimRequest(t, rows[i][0], rows[i][1], prefix_keys=rows[i][3],
                       recorded_pred=recorded[i] if recorded else 0.0) for t, i in zip(times, picks)]


def recorded_predictions(path: Path, rows: list[Row]) -> list[float]:
    """The live predictor's estimate for each row, from a live run's per-request CSV of the same workload (its
    `index` column is the request's place in the workload after --skip). Checked: every request the run sent asked
    for the output length the row has, so a CSV of another workload or skip is refused. A live job the predictor
    did not answer for carries the scheduler's prior in the CSV and is replayed as that guess (the CSV cannot tell
    it apart; none of the 2,000 in the H200 runs of 2026-12-03)."""
    with open_run_csv(path) as f:
        reader = csv.DictReader(f)
        missing = {"index", "expected_output_tokens", "predicted_output_tokens"} - set(reader.fieldnames or ())
        if missing:
            raise SystemExit(f"--predictions {path}: not a per-request CSV of a live run (no {', '.join(sorted(missing))})")
        live = list(reader)
    if not live:
        raise SystemExit(f"--predictions {path}: no requests in it")
    if len(live) > len(rows):
        raise SystemExit(f"--predictions {path}: {len(live)} requests, more than the workload's {len(rows)}")
    recorded = [0.0] * len(rows)
    seen = set()
    for r in live:
        try:
            i, asked = int(r["index"]), int(r["expected_output_tokens"])
            predicted = float(r["predicted_output_tokens"] or 0)
        except ValueError as e:
            raise SystemExit(f"--predictions {path}: a row that is not numbers ({e})") from None
        if not 0 <= i < len(rows) or i in seen:
            raise SystemExit(f"--predictions {path}: index {i} is out of the workload's 0..{len(rows) - 1} or repeated")
        seen.add(i)
        if asked != rows[i][1]:
            raise SystemExit(f"--predictions {path}: request {i} asked {r['expected_output_tokens']} output tokens, "
                             f"the workload's has {rows[i][1]}: another workload or --skip")
        recorded[i] = predicted
    if len(live) < len(rows):
        print(f"--predictions: {len(live)} of {len(rows)} requests have a recorded prediction; the rest get the "
              f"scheduler's prior", file=sys.stderr)
    return recorded


def predictor_for(a: argparse.Namespace, lengths: list[int], recorded: list[float] | None = None) -> SimPredictor:
    sigma = 0.0
    if a.predictor is PredictorKind.NOISY:
        sigma = a.pred_sigma if a.pred_sigma is not None else sigma_for_tau(lengths, a.kendall_tau, a.seed)
    elif a.predictor is PredictorKind.REPLAY:
        sigma = log_error_sigma(recorded or [], lengths)
    return SimPredictor(a.predictor, sigma=sigma, seed=a.seed)


def simulate_sweep(a: argparse.Namespace) -> list[Run]:
    a.out.mkdir(parents=True, exist_ok=True)
    lengths = workload_lengths(a)
    if not lengths:
        raise SystemExit("the workload is empty")
    cost = load_cost(a.cost)
    if a.over_batch_step_s is not None:
        cost = replace(cost, over_batch_step_s=a.over_batch_step_s)
    if a.num_prompts > ITL_MAX_REQUESTS:
        print(f"more than {ITL_MAX_REQUESTS} requests: inter-token gaps are not kept (no ITL in the summaries)",
              file=sys.stderr)
    if (a.predictor is PredictorKind.REPLAY) != (a.predictions is not None):
        raise SystemExit("--predictor replay and --predictions go together")
    recorded = recorded_predictions(a.predictions, lengths) if a.predictions else None
    predictor = predictor_for(a, [row[1] for row in lengths], recorded)
    probe_sigma = sigma_for_tau([row[1] for row in lengths], a.repredict_tau, a.seed + 1) if a.repredict_tau else None
    spec = WorkerSpec(a.max_batch, a.num_blocks, a.block_size, a.token_budget, a.early_rows)
    percentiles = [float(x) for x in a.percentiles.split(",")]
    runs, trace = [], arrival_trace(a)
    for policy in a.policies:
        for rate in a.rates:
            requests = requests_at(lengths, a.num_prompts, rate, a, recorded, trace)
            cfg = SimConfig(policy=policy, cost=cost, workers=a.workers, worker=spec, preempt_mode=a.preempt_mode,
                            max_tokens=a.max_tokens, predictor=SimPredictor(predictor.kind, predictor.sigma, seed=a.seed),
                            reconsider_s=a.reconsider_s, tick_s=a.tick_s, knee_share=a.knee_share,
                            max_preemptions=a.max_preemptions, aging_s=a.aging_s, park_kv_share=a.park_kv_share,
                            park_after_s=a.park_after_s, park_wait_factor=a.park_wait_factor, admit_s=a.admit_s,
                            max_parking=a.max_parking, exec_model=a.exec_model, due_after_s=a.due_after_s,
                            early_tokens=a.early_tokens, admit_per_s=a.admit_per_s, report_lag_s=a.report_lag_s,
                            command_lag_s=a.command_lag_s, record_itl=a.num_prompts <= ITL_MAX_REQUESTS,
                            reestimate=SimPredictor(PredictorKind.NOISY, probe_sigma, seed=a.seed + 1)
                            if probe_sigma is not None else None)
            started = time.perf_counter()
            sim = Simulation(cfg, requests)
            results, duration = sim.run()
            wall = time.perf_counter() - started
            summary = summarize(results, duration, percentiles)
            label = f"{policy}-r{rate:g}"
            summary.update(label=label, policy=policy, request_rate=rate, **arrival_fields(a), simulated=True,
                           wall_s=wall, decisions=sim.decisions, workers=a.workers, cost=cost.to_json(),
                           step_times=step_totals(sim),
                           predictor={"kind": predictor.kind.value, "sigma": predictor.sigma},
                           repredict_sigma=probe_sigma)
            save(a.out / f"{label}.json", summary, results)     # and the per-request CSV, as a live run keeps
            runs.append(Run(policy, rate, summary, tuple(r.normalized_s for r in results if r.normalized_s is not None)))
            print(f"{label}: {len(results)} requests, mean normalized {summary['normalized_latency_s']['mean']:.4f} "
                  f"s/token, p99 {summary['normalized_latency_s']['p99']:.4f}, {summary['output_throughput']:.0f} "
                  f"tok/s, simulated {duration:.1f} s in {wall:.1f} s wall ({sim.decisions} decisions)", flush=True)
    write_report(runs, a, predictor, cost)
    return runs


def arrivals_text(a: argparse.Namespace) -> str:
    if a.trace_times:
        return "at the trace's own times"
    if a.arrival_trace:
        return f"with the gaps of {a.arrival_trace} scaled to the rate"
    return "Poisson" if a.burstiness == 1 else f"gamma gaps of shape {a.burstiness:g}"


def write_report(runs: list[Run], a: argparse.Namespace, predictor: SimPredictor, cost) -> Path:
    figures = plot(runs, a.out)
    tau = ("" if predictor.kind not in (PredictorKind.NOISY, PredictorKind.REPLAY)
           else f", log-normal sigma {predictor.sigma:.3f}" + (f" (replayed from {a.predictions})" if a.predictions else ""))
    header = (f"Simulated: {a.workers} worker(s), max batch {a.max_batch}, {a.num_blocks} KV blocks of {a.block_size}, "
              f"token budget {a.token_budget}; iteration cost {cost.source or a.cost}; predictor {predictor.kind.value}"
              f"{tau}; preempt by {a.preempt_mode} (at most {a.max_preemptions} per job); knee share {a.knee_share}; "
              f"park KV share {a.park_kv_share}; "
              f"{a.dataset_name.value} x {a.num_prompts}; arrivals {arrivals_text(a)}.\n\n")
    path = a.out / "report.md"
    path.write_text(header + markdown(runs, a.latency_bound, figures, title="Simulation"))
    (a.out / "simulation.json").write_text(json.dumps([{"policy": r.policy, "rate": r.rate, "summary": r.summary}
                                                       for r in runs], indent=2))
    print(f"report: {path}")
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="alise bench simulate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    simulate_sweep(p.parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
