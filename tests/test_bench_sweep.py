"""`alise bench sweep`: the report's arithmetic (throughput at a latency bound, sustainable capacity), its figures,
and a small sweep of 2 rates x 2 policies on live local stacks through the CLI."""
from __future__ import annotations

import csv
import json

import pytest

from bench.serve_metrics import RequestResult, summarize
from bench.sweep_report import Run, capacity, crossing_rate, markdown, plot, throughput_at_bound
from client.cli import main as cli_main


def run_of(policy: str, rate: float, completed_per_s: float, norm: float) -> Run:
    """A run of 10 requests over 10 / completed_per_s seconds, each with the given normalized latency."""
    duration = 10 / completed_per_s
    results = [RequestResult(index=i, expected_output_tokens=10, ok=True, output_tokens=10, e2e_s=norm * 10,
                             ttft_s=norm) for i in range(10)]
    return Run(policy, rate, summarize(results, duration, [50, 99]), tuple([norm] * 10))


def test_throughput_at_a_latency_bound_and_capacity_per_policy(tmp_path):
    runs = [run_of("fcfs", 1, 1.0, 0.05), run_of("fcfs", 2, 2.0, 0.2), run_of("fcfs", 4, 2.1, 0.9),
            run_of("alise", 1, 1.0, 0.04), run_of("alise", 2, 2.0, 0.08), run_of("alise", 4, 3.7, 0.3)]
    assert throughput_at_bound(runs, 0.1) == {"fcfs": 1, "alise": 2}
    assert capacity(runs) == {"fcfs": 2, "alise": 4}              # 2.1 of 4 req/s is under 90%: backlog grows
    figures = plot(runs, tmp_path)
    assert len(figures) == 4 and all(f.stat().st_size > 1000 for f in figures)
    text = markdown(runs, 0.1, figures)
    assert "| alise | 2 | 2.00x | 4 |" in text and "| fcfs | 4 |" in text


def test_the_crossing_rate_is_read_between_the_swept_rates():
    runs = [run_of("fcfs", 40, 1.0, 0.06), run_of("fcfs", 50, 1.0, 0.14),        # crosses 0.1 at 45
            run_of("alise", 40, 1.0, 0.03), run_of("alise", 60, 1.0, 0.07), run_of("alise", 80, 1.0, 0.13),
            run_of("sjf", 40, 1.0, 0.2), run_of("sjf", 50, 1.0, 0.3),           # over the bound everywhere
            run_of("oracle", 40, 1.0, 0.02), run_of("oracle", float("inf"), 1.0, 0.5)]   # never over at a rate
    got = crossing_rate(runs, 0.1)
    assert got["fcfs"] == ("=", pytest.approx(45.0)) and got["alise"] == ("=", pytest.approx(70.0))
    assert got["sjf"] == ("<", 40) and got["oracle"] == (">=", 40)
    text = markdown(runs, 0.1, [])
    assert "| alise | 70.0 | 1.56x |" in text and "| sjf | < 40.0 | - |" in text and "| oracle | >= 40.0 | >= 0.89x |" in text
    nothing_done = Run("mlfq", 60, summarize([RequestResult(index=0, expected_output_tokens=10, error="gone")], 1.0,
                                              [50]), ())
    assert crossing_rate([run_of("mlfq", 40, 1.0, 0.05), nothing_done], 0.1)["mlfq"] == (">=", 40)


def test_a_small_sweep_on_live_stacks_writes_runs_figures_and_report(tmp_path, model_dir):
    import os

    out = tmp_path / "sweep"
    sweep = ["bench", "sweep", "--dataset-name", "synthetic", "--num-prompts", "4", "--input-len", "16",
             "--output-len", "6", "--ignore-eos", "--policies", "fcfs", "alise", "--rates", "2", "8", "--prime", "2",
             "--worker-arg=--max-batch=8", "--out", str(out)]
    # the policies of a rate run at once, each stack on its own half of the CPUs (CI and the dev VM have 2)
    assert cli_main([*sweep, "--side-by-side"]) == 0
    half = len(os.sched_getaffinity(0)) // 2
    for policy in ("fcfs", "alise"):
        for rate in ("2", "8"):
            summary = json.loads((out / f"{policy}-r{rate}.json").read_text())
            assert summary["completed"] == 4 and summary["total_output_tokens"] == 24
            assert len(list(csv.DictReader(open(out / f"{policy}-r{rate}.csv")))) == 4
            # each process's share of a core over the measured run: the scheduler and the worker did work
            assert summary["cpu_share"]["scheduler"] > 0 and summary["cpu_share"]["worker-0"] > 0
            # the worker's engine steps during the measured run, from its /metrics (priming steps not counted)
            steps = summary["step_times"]["worker-0"]
            assert steps["steps"] >= 6 and steps["mean_s"] > 0, steps
            assert 0 <= steps["share_over_s"]["0.05"] <= steps["share_over_s"]["0.002"] <= 1
            # and where the engine thread's time went, stepping or not (services/worker/metrics.EngineActivity)
            assert steps["engine_thread_s"]["step"] >= steps["steps"] * steps["mean_s"] * 0.99, steps
            # and what the steps held: a row for each sequence a step ran, the prompts' tokens prefilled
            assert steps["made_of"]["rows"] >= steps["steps"] and steps["made_of"]["prefill_tokens"] > 0, steps
            # and where the placed jobs waited on the worker: each of the 4 came in a command and joined a step
            waits = steps["assignment_wait_s"]
            assert waits["delivery"]["count"] >= 4 and waits["waiting_line"]["count"] >= 4, waits
            # and the scheduler's side: each request's admission by stage, each placement's wait for the stream
            admission = summary["scheduler_waits"]["admission_s"]
            assert all(admission[stage]["count"] >= 4 for stage in ("validate", "predict", "store")), admission
            assert summary["scheduler_waits"]["command_wait_s"]["assign"]["count"] >= 4, summary["scheduler_waits"]
            # and how late the scheduler's event loop and the client's ran what was due (a watcher every 50 ms)
            assert summary["scheduler_waits"]["event_loop_lag_s"]["all"]["count"] >= 2, summary["scheduler_waits"]
            # and how long the worker's messages (4 jobs' tokens and finishes at least) took to reach the scheduler and
            # to be acted on, from when its engine produced them (one machine: one clock)
            # (a reading may fall between one message's stages: a count apart)
            lag = summary["scheduler_waits"]["worker_message_lag_s"]
            assert lag["received"]["count"] >= 8 and 0 <= lag["received"]["count"] - lag["handled"]["count"] <= 1, lag
            assert 0 <= lag["outbox"]["mean_s"] <= lag["received"]["mean_s"] <= lag["handled"]["mean_s"] < 30, lag
            # and how long the scheduler took over each kind: its tokens and finishes at least
            handling = summary["scheduler_waits"]["worker_message_handling_s"]
            assert handling["tokens"]["count"] >= 4 and handling["finished"]["count"] >= 4, handling
            # and how long its reader waited for each message (its idle time)
            assert summary["scheduler_waits"]["worker_reader_wait_s"]["all"]["count"] >= 8, summary["scheduler_waits"]
            # and its dispatch loop's passes (admissions, finishes, the periodic pass; at least dispatch_gap_s apart)
            assert summary["scheduler_waits"]["dispatch_tick_s"]["all"]["count"] >= 4, summary["scheduler_waits"]
            # and the run second by second (bench/run_timeline.py): a reading a second or so, none failed
            line = summary["timeline"]
            assert len(line) >= summary["duration_s"] // 2 - 1 and not any("error" in p for p in line), line
            assert all(p["cpu_share"]["scheduler"] >= 0 and p["placed"] >= 0 for p in line), line
            # and the Redis commands the run took: the tokens' append script among them
            assert summary["redis_commands"]["evalsha"]["calls"] >= 4, summary["redis_commands"]
            client_lag = summary["client_loop_lag_s"]
            assert client_lag["count"] >= 2 and 0 <= client_lag["mean"] <= client_lag["max"], client_lag
            # and the scheduler's sample of those steps, that bench.simulator.calibrate --from-runs fits a cost to
            sample = summary["workers"][0]["step_sample"]
            assert sample and all(len(row) == 8 and row[0] >= 1 and row[1] > 0 for row in sample), sample[:3]
            assert all(row[6] == 0 for row in sample)        # a CPU worker's steps have no device time
            # prefill attention's query-key pairs: a chunk of n tokens has at least n(n+1)/2 >= n; decodes none
            assert all(row[7] >= row[3] if row[3] else row[7] == 0 for row in sample), sample[:3]
            assert any(row[3] > 0 for row in sample) and all(row[2] >= row[0] for row in sample)  # prefills, rows
            # every thread of every process of the stack stayed on one share, read from the live processes
            shares = {tuple(cpus) for cpus in summary["cpus"].values()}
            assert len(shares) == 1 and len(shares.pop()) == half, summary["cpus"]
    share = {(p, r): json.loads((out / f"{p}-r{r}.json").read_text())["cpus"]["worker-0"]
             for p in ("fcfs", "alise") for r in ("2", "8")}
    assert not set(share["fcfs", "2"]) & set(share["alise", "2"])         # apart at the same time
    assert share["fcfs", "2"] == share["alise", "8"] and share["alise", "2"] == share["fcfs", "8"]   # and rotated
    assert len(json.loads((out / "sweep.json").read_text())) == 4
    report = (out / "report.md").read_text()
    assert "| alise | 8 |" in report and "normalized_latency_vs_rate.png" in report

    # --resume keeps the saved runs (no stack is started for them) and runs only what is missing: side by side, the
    # rate's whole group (a policy run alone would meet another machine speed). The report is rebuilt from all.
    (out / "alise-r8.json").unlink()
    mtimes = lambda: {p.name: p.stat().st_mtime_ns for p in out.glob("*-r*.json")}
    before = mtimes()
    first = {r["policy"] + str(r["rate"]): r for r in json.loads((out / "sweep.json").read_text())}
    (out / "report.md").unlink()
    assert cli_main([*sweep, "--side-by-side", "--resume"]) == 0
    after = mtimes()
    assert after["fcfs-r2.json"] == before["fcfs-r2.json"] and after["alise-r2.json"] == before["alise-r2.json"]
    assert after["fcfs-r8.json"] != before["fcfs-r8.json"]
    rows = {r["policy"] + str(r["rate"]): r for r in json.loads((out / "sweep.json").read_text())}
    assert rows["fcfs2.0"] == first["fcfs2.0"] and rows["alise2.0"] == first["alise2.0"]
    again = json.loads((out / "alise-r8.json").read_text())
    assert again["completed"] == 4 and again["side_by_side"] and len(again["cpus"]["worker-0"]) == half
    assert "| alise | 8 |" in (out / "report.md").read_text()
    assert (out / "normalized_latency_cdf.png").stat().st_size > 1000
    # one at a time (the default), a run saved side by side is not kept: it runs again, alone, on every CPU
    alone = [*sweep[:sweep.index("--policies")], "--policies", "fcfs", "--rates", "2", "--prime", "2",
             "--worker-arg=--max-batch=8", "--out", str(out), "--resume"]
    assert cli_main(alone) == 0
    run = json.loads((out / "fcfs-r2.json").read_text())
    assert not run["side_by_side"] and set(run["cpus"]["worker-0"]) == os.sched_getaffinity(0)


def test_work_pace_tells_a_level_backlog_from_a_growing_one():
    from bench.serve_metrics import work_pace

    def req(i: int, start: float, first: float, end: float, n: int = 10, ok: bool = True) -> RequestResult:
        return RequestResult(index=i, expected_output_tokens=n, start_s=start, ok=ok, output_tokens=n if ok else 0,
                             ttft_s=first - start if ok else None, e2e_s=end - start if ok else None)

    # one 10-token request a second for 100 s, each served over 5 s: the server keeps up (the final drain aside)
    assert work_pace([req(t, t, t + 0.5, t + 5.0) for t in range(100)]) == pytest.approx(1.0, abs=0.05)
    # served one at a time, 2 s each, in arrival order: half the work asked for gets done, the backlog grows
    assert work_pace([req(t, t, 2.0 * t, 2.0 * t + 2.0) for t in range(100)]) == pytest.approx(0.5, abs=0.05)
    assert work_pace([req(i, 0.0, 0.5, 1.0) for i in range(50)]) is None         # all at once: nothing to tell
    # without ignore_eos requests stop before the length they asked for: a server that keeps up still does
    early = [req(t, t, t + 0.5, t + 5.0) for t in range(100)]
    early = [RequestResult(**{**r.__dict__, "expected_output_tokens": 40}) for r in early]
    assert work_pace(early) == pytest.approx(1.0, abs=0.05)
    half_failed = [req(t, t, t + 0.5, t + 5.0, ok=t % 2 == 0) for t in range(100)]
    assert work_pace(half_failed) == pytest.approx(0.5, abs=0.05)


def test_alternate_order_runs_rate_by_rate_and_reverses_the_policies_every_other_rate():
    from bench.sweep import run_groups, run_order

    assert run_order(["fcfs", "alise"], [1.0, 2.0], alternate=False) == [
        ("fcfs", 1.0), ("fcfs", 2.0), ("alise", 1.0), ("alise", 2.0)]
    assert run_order(["fcfs", "alise"], [1.0, 2.0, 3.0], alternate=True) == [
        ("fcfs", 1.0), ("alise", 1.0), ("alise", 2.0), ("fcfs", 2.0), ("fcfs", 3.0), ("alise", 3.0)]
    # one run at a time, or side by side: every policy of a rate at once
    assert run_groups(["fcfs", "alise"], [1.0, 2.0], alternate=False, side_by_side=False) == [
        [("fcfs", 1.0)], [("fcfs", 2.0)], [("alise", 1.0)], [("alise", 2.0)]]
    assert run_groups(["fcfs", "alise"], [1.0, 2.0], alternate=False, side_by_side=True) == [
        [("fcfs", 1.0), ("alise", 1.0)], [("fcfs", 2.0), ("alise", 2.0)]]


def test_side_by_side_runs_get_equal_cpu_shares_that_rotate_from_rate_to_rate():
    from bench.sweep import cpu_shares

    assert cpu_shares([0, 1], 2, turn=0) == [(0,), (1,)]
    assert cpu_shares([0, 1], 2, turn=1) == [(1,), (0,)]
    # three runners on eight CPUs: two each, two left over; over three turns each runner holds each share once
    turns = [cpu_shares(list(range(8)), 3, turn) for turn in range(3)]
    assert turns[0] == [(0, 1), (2, 3), (4, 5)]
    for runner in range(3):
        assert sorted(t[runner] for t in turns) == [(0, 1), (2, 3), (4, 5)]


def test_side_by_side_refuses_gpu_workers_which_would_share_one_gpu(tmp_path):
    with pytest.raises(ValueError, match="GPU workers would share one GPU"):
        cli_main(["bench", "sweep", "--dataset-name", "synthetic", "--num-prompts", "2", "--policies", "fcfs",
                  "--rates", "1", "--side-by-side", "--worker-arg=--device=cuda", "--out", str(tmp_path)])


def test_a_policy_variant_runs_the_policy_with_its_own_worker_scheduler_and_predictor_flags():
    from bench.sweep import variant_flags

    args = ["noprobe=--length-probe-layer=-2", "big=--num-blocks=2048", "noprobe=--max-batch=8"]
    sched = ["noearly=--park-kv-share=0", "noprobe=--aging-s=30"]
    pred = ["novotes=--message-weight=0", "noprobe=--prior=64"]
    assert variant_flags("alise", args, sched, pred) == ("alise", [], [], [])
    assert variant_flags("alise@noprobe", args, sched, pred) == (
        "alise", ["--length-probe-layer=-2", "--max-batch=8"], ["--aging-s=30"], ["--prior=64"])
    assert variant_flags("fcfs@big", args, sched, pred) == ("fcfs", ["--num-blocks=2048"], [], [])
    assert variant_flags("alise@noearly", args, sched, pred) == ("alise", [], ["--park-kv-share=0"], [])
    assert variant_flags("alise@novotes", args, sched, pred) == ("alise", [], [], ["--message-weight=0"])
    with pytest.raises(ValueError, match="no --variant-worker-arg, --variant-scheduler-arg or "
                                         "--variant-predictor-arg typo=FLAG"):
        variant_flags("alise@typo", args, sched, pred)
    for bad in ("noprobe", "noprobe=", "=--max-batch=8"):     # no flag, or no variant: refused, not passed on
        for i, option in enumerate(("worker", "scheduler", "predictor")):
            lists = [list(args), list(sched), list(pred)]
            lists[i].append(bad)
            with pytest.raises(ValueError, match=f"--variant-{option}-arg .*expected VARIANT=FLAG"):
                variant_flags("alise@noprobe", *lists)


def test_a_variants_flags_reach_its_stacks_services_and_only_its_own():
    import argparse

    from bench.sweep import add_arguments, stack_flags

    p = argparse.ArgumentParser()
    add_arguments(p)
    a = p.parse_args(["--dataset-name", "synthetic", "--rates", "1", "--ignore-eos", "--predictor-arg=--prior=64",
                      "--variant-predictor-arg=nv=--message-weight=0", "--variant-worker-arg=big=--num-blocks=9"])
    worker, scheduler, predictor = stack_flags(a, "alise@nv")
    assert predictor == ["--read-only", "--prior=64", "--message-weight=0"]    # never saves, whatever the variant
    assert scheduler[:2] == ["--policy", "alise"] and "--no-predict-within-max-tokens" in scheduler
    assert "--num-blocks=9" not in worker and worker[0] == "--length-probe-read-only"
    assert stack_flags(a, "alise")[2] == ["--read-only", "--prior=64"]
    assert "--num-blocks=9" in stack_flags(a, "fcfs@big")[0]


def test_a_saved_run_reads_back_as_it_was_measured(tmp_path):
    from bench.serve import save
    from bench.sweep import load_run

    results = [RequestResult(index=i, expected_output_tokens=10, start_s=0.1 * i, ok=True, prompt_tokens=5,
                             output_tokens=10, ttft_s=0.2, e2e_s=1.0 + i, queue_s=0.01,
                             admit_s=0.03 * (i + 1) if i < 2 else None,         # the last one not measured
                             preemptions=i % 2, predicted_output_tokens=12, finish_reason="length")
               for i in range(3)]
    save(tmp_path / "fcfs-r2.json", summarize(results, 5.0, [50, 99]), results)
    summary, normalized = load_run(tmp_path, "fcfs", 2)
    assert normalized == tuple(r.normalized_s for r in results)
    assert summary["admit_s"]["mean"] == pytest.approx(0.045)                       # of the two measured
    with open(tmp_path / "fcfs-r2.csv", newline="") as f:
        from bench.sweep import saved_result
        back = [saved_result(row) for row in csv.DictReader(f)]
    assert [(r.admit_s, r.queue_s, r.preemptions) for r in back] == [(r.admit_s, r.queue_s, r.preemptions) for r in results]


def test_step_times_are_the_difference_of_two_readings_of_the_workers_histogram():
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    from bench.step_times import (ASSIGNMENT_WAIT_METRIC, DEVICE_STEP_METRIC, DEVICE_WAITED_METRIC, STEP_METRIC,
                                  THREAD_METRIC, parse_step_histogram)

    registry = CollectorRegistry()
    steps = Histogram(STEP_METRIC, "steps", ["model_name"], registry=registry, buckets=(0.01, 0.05))
    steps.labels("m").observe(0.2)                                       # before the run: not counted
    before = parse_step_histogram(generate_latest(registry).decode())
    for seconds in (0.005, 0.02, 0.03, 0.07):
        steps.labels("m").observe(seconds)
    run = parse_step_histogram(generate_latest(registry).decode()).minus(before).summary()
    assert run["steps"] == 4 and run["mean_s"] == pytest.approx(0.125 / 4)
    assert run["share_over_s"] == {"0.01": pytest.approx(0.75), "0.05": pytest.approx(0.25)}
    assert parse_step_histogram("# a page without the metric\n").summary() == {"steps": 0}
    # the engine thread's seconds by activity, as differences too
    thread = Counter(THREAD_METRIC, "thread", ["model_name", "activity"], registry=registry)
    thread.labels("m", "idle").inc(5.0)
    first = parse_step_histogram(generate_latest(registry).decode())
    thread.labels("m", "idle").inc(1.5)
    thread.labels("m", "flush").inc(0.25)
    spent = parse_step_histogram(generate_latest(registry).decode()).minus(first).summary()["engine_thread_s"]
    assert spent == {"idle": pytest.approx(1.5), "flush": pytest.approx(0.25)}
    # on a GPU, the device's seconds by step kind and its waits for the host, as differences too
    device = Counter(DEVICE_STEP_METRIC, "device", ["model_name", "step"], registry=registry)
    waited = Counter(DEVICE_WAITED_METRIC, "waited", ["model_name"], registry=registry)
    device.labels("m", "decode").inc(3.0)
    first = parse_step_histogram(generate_latest(registry).decode())
    device.labels("m", "decode").inc(2.0)
    device.labels("m", "mixed").inc(0.5)
    waited.labels("m").inc(0.125)
    spent = parse_step_histogram(generate_latest(registry).decode()).minus(first).summary()["device_s"]
    assert spent == {"decode": pytest.approx(2.0), "mixed": pytest.approx(0.5), "waited": pytest.approx(0.125)}
    # where placed jobs waited on the worker, by stage: counts and means of the run's observations
    wait = Histogram(ASSIGNMENT_WAIT_METRIC, "wait", ["model_name", "stage"], registry=registry, buckets=(0.1, 1.0))
    wait.labels("m", "delivery").observe(9.0)
    first = parse_step_histogram(generate_latest(registry).decode())
    for seconds in (0.01, 0.03):
        wait.labels("m", "delivery").observe(seconds)
    wait.labels("m", "waiting_line").observe(2.5)
    spent = parse_step_histogram(generate_latest(registry).decode()).minus(first).summary()["assignment_wait_s"]
    assert spent == {"delivery": {"count": 2, "mean_s": pytest.approx(0.02)},
                     "waiting_line": {"count": 1, "mean_s": pytest.approx(2.5)}}
    # read across a worker restart: the counters began again, so the difference means nothing
    assert "error" in before.minus(parse_step_histogram(generate_latest(registry).decode())).summary()


def test_scheduler_waits_are_the_difference_of_two_readings_by_stage_and_command():
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from bench.scheduler_waits import parse_scheduler_waits

    registry = CollectorRegistry()
    admission = Histogram("alise:admission_seconds", "a", ["model_name", "stage"], registry=registry, buckets=(0.1,))
    command = Histogram("alise:worker_command_wait_seconds", "c", ["model_name", "command"], registry=registry,
                        buckets=(0.1,))
    lag = Histogram("alise:event_loop_lag_seconds", "l", ["model_name"], registry=registry, buckets=(0.1,))
    admission.labels("m", "predict").observe(7.0)                      # before the run: not counted
    lag.labels("m").observe(3.0)
    before = parse_scheduler_waits(generate_latest(registry).decode())
    for seconds in (0.2, 0.4):
        admission.labels("m", "predict").observe(seconds)
    admission.labels("m", "store").observe(0.003)
    command.labels("m", "assign").observe(0.05)
    for seconds in (0.01, 0.03):
        lag.labels("m").observe(seconds)
    run = parse_scheduler_waits(generate_latest(registry).decode()).minus(before).summary()
    assert run == {"admission_s": {"predict": {"count": 2, "mean_s": pytest.approx(0.3)},
                                   "store": {"count": 1, "mean_s": pytest.approx(0.003)}},
                   "command_wait_s": {"assign": {"count": 1, "mean_s": pytest.approx(0.05)}},
                   "event_loop_lag_s": {"all": {"count": 2, "mean_s": pytest.approx(0.02)}}}
    assert parse_scheduler_waits("# a page without them\n").summary() == {}


def test_the_report_is_written_again_over_runs_that_separate_calls_saved(tmp_path, capsys):
    from bench.serve import save

    def results(e2e: float) -> list[RequestResult]:
        return [RequestResult(index=i, expected_output_tokens=10, start_s=0.1 * i, ok=True, prompt_tokens=5,
                              output_tokens=10, ttft_s=0.2, e2e_s=e2e, queue_s=0.01, predicted_output_tokens=12,
                              finish_reason="length") for i in range(4)]
    # as two calls would leave them: fcfs at 44 and 46, a policy variant at 46 and 50, and files of other kinds
    for label, e2e in (("fcfs-r44", 0.9), ("fcfs-r46", 1.2), ("alise@er8-r46", 0.5), ("alise@er8-r50", 0.8)):
        r = results(e2e)
        save(tmp_path / f"{label}.json", summarize(r, 2.0, [50, 99]), r)
    (tmp_path / "sweep.json").write_text("[]")
    (tmp_path / "alise-r48.json").write_text("{}")          # its CSV missing: not a saved run
    assert cli_main(["bench", "report", str(tmp_path)]) == 0
    runs = json.loads((tmp_path / "sweep.json").read_text())
    assert [(r["policy"], r["rate"]) for r in runs] == [("alise@er8", 46), ("alise@er8", 50),
                                                       ("fcfs", 44), ("fcfs", 46)]
    report = (tmp_path / "report.md").read_text()
    assert "| alise@er8 | 50 |" in report and "| fcfs | 44 |" in report
    assert (tmp_path / "normalized_latency_vs_rate.png").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli_main(["bench", "report", str(empty)]) == 2
    assert "no saved runs" in capsys.readouterr().err
