"""The simulator on cases small enough to work out by hand (one worker, one second per iteration), and its
invariants on a random workload: every job finishes exactly once, no KV block is left in use."""
from __future__ import annotations

import math
import random

import pytest

from bench.simulator.cluster import SimConfig, SimRequest, Simulation, WorkerSpec, simulate, step_totals
from bench.step_times import MADE_OF_METRICS
from bench.simulator.cost import IterationCost
from bench.simulator.predictions import PredictorKind, SimPredictor, kendall_tau, sigma_for_tau
from services.common.log_normal import Z90

ONE_SECOND = IterationCost(base_s=1.0)          # every iteration takes 1 s, whatever it holds


def run(policy: str, requests: list[SimRequest], max_batch: int = 1, **kw):
    """One worker, 1 s iterations, true lengths; prefill-early off unless asked (the hand-worked cases above
    each test count iterations without it)."""
    kw.setdefault("park_kv_share", 0.0)
    cfg = SimConfig(policy=policy, cost=ONE_SECOND, worker=WorkerSpec(max_batch=max_batch, num_blocks=100),
                    predictor=SimPredictor(PredictorKind.ORACLE), reconsider_s=0.0, **kw)
    results, duration, _ = simulate(cfg, requests)
    return results, duration


def test_fcfs_runs_in_arrival_order_and_srpt_runs_the_short_job_first():
    # A (4-token prompt, 3 tokens) and B (1 token) both arrive at 0; one sequence at a time. Iterations:
    # fcfs: A's prefill -> token 1 at 1 s, tokens 2, 3 at 2 s, 3 s; then B's prefill -> its only token at 4 s.
    reqs = [SimRequest(0.0, 4, 3), SimRequest(0.0, 4, 1)]
    fcfs, duration = run("fcfs", reqs)
    assert [(r.ttft_s, r.e2e_s, r.queue_s) for r in fcfs] == [(1.0, 3.0, 0.0), (4.0, 4.0, 3.0)]
    assert duration == 4.0
    # oracle SRPT: B first (done at 1 s), then A: tokens at 2, 3, 4 s
    srpt, _ = run("oracle", reqs)
    assert [(r.ttft_s, r.e2e_s) for r in srpt] == [(2.0, 4.0), (1.0, 1.0)]


def test_messages_between_the_scheduler_and_a_worker_take_their_lags():
    # fcfs, one slot, A (3 tokens) and B (1 token) at 0. With no lag: A at 0-3 s, B's prefill 3 -> 4 s (as above).
    # The assignment of A reaches the worker 0.25 s late (A: 0.25 -> 3.25 s); A's finish reaches the scheduler
    # 0.5 s after it, which then sends B, 0.25 s on the way: B's iteration runs 4.0 -> 5.0 s.
    reqs = [SimRequest(0.0, 4, 3), SimRequest(0.0, 4, 1)]
    results, duration = run("fcfs", reqs, report_lag_s=0.5, command_lag_s=0.25)
    assert [(r.ttft_s, r.e2e_s, r.queue_s) for r in results] == [(1.25, 3.25, 0.0), (5.0, 5.0, 3.75)]
    assert duration == 5.0
    with pytest.raises(ValueError, match="report_lag_s"):
        SimConfig(policy="fcfs", cost=ONE_SECOND, report_lag_s=-1.0)


def test_kv_on_its_way_to_a_worker_counts_as_taken():
    # Room for one job's KV (2 blocks of 16; each 16-token prompt takes 2 with its next token). A is placed at 0 and
    # reaches the worker at 0.5 s; B arrives at 0.1 s, while A is on its way. B must wait for A's end (8.5 s), not be
    # placed beside it on room that only looked free (the worker then had to preempt it for A's KV).
    reqs = [SimRequest(0.0, 16, 8), SimRequest(0.1, 16, 8)]
    cfg = SimConfig(policy="fcfs", cost=ONE_SECOND, worker=WorkerSpec(max_batch=2, num_blocks=2, block_size=16),
                    predictor=SimPredictor(PredictorKind.ORACLE), reconsider_s=0.0, park_kv_share=0.0,
                    command_lag_s=0.5)
    results, duration, _ = simulate(cfg, reqs)
    assert [(r.e2e_s, r.preemptions) for r in results] == [(8.5, 0), (17.0 - 0.1, 0)]
    assert duration == 17.0


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_a_short_arrival_preempts_a_long_job_at_the_next_iteration(mode):
    # A: 40 tokens from 0 s (token 1 at 1 s, token 2 at 2 s). B (1 token) arrives at 1.5 s: the scheduler asks for
    # A's preemption, which takes effect when A's iteration ends at 2 s; B runs 2 -> 3 s. A resumes at 3 s: recompute
    # redoes its 4 + 2 tokens in one prefill iteration (token 3 at 4 s), swap brings its KV back (swap time 0 here)
    # and decodes token 3 at 4 s; tokens 4-40 follow, one a second: done at 41 s.
    reqs = [SimRequest(0.0, 4, 40), SimRequest(1.5, 4, 1)]
    results, _ = run("oracle", reqs, preempt_mode=mode)
    a, b = results
    assert (b.ttft_s, b.e2e_s) == (1.5, 1.5)
    assert (a.ttft_s, a.e2e_s, a.preemptions, a.output_tokens) == (1.0, 41.0, 1, 40)
    fcfs, _ = run("fcfs", reqs)
    assert fcfs[1].e2e_s == 40.0 - 1.5 + 1 and fcfs[0].preemptions == 0


def test_a_job_prefilled_early_gets_its_first_token_at_once_and_resumes_from_its_parked_kv():
    # One decode slot. A (4-token prompt, 3 tokens) and B (1 token) arrive at 0; SRPT gives the slot to B. With
    # prefill early, A is prefilled in the same iteration as B and parked with its first token (1 s); it takes the
    # freed slot and decodes tokens 2 and 3 from its kept KV (2 s, 3 s). Without it: A's prefill waits for B.
    reqs = [SimRequest(0.0, 4, 3), SimRequest(0.0, 4, 1)]
    early, _ = run("oracle", reqs, park_kv_share=0.5)
    assert [(r.ttft_s, r.e2e_s, r.preemptions) for r in early] == [(1.0, 3.0, 0), (1.0, 1.0, 0)]
    late, _ = run("oracle", reqs)
    assert [(r.ttft_s, r.e2e_s) for r in late] == [(2.0, 4.0), (1.0, 1.0)]


def test_a_parked_job_resumes_without_recompute_and_parked_kv_is_given_up_for_room():
    # As the preemption case above, by parking: A stops at 2 s with 2 tokens and its KV kept; B runs 2 -> 3 s; A
    # decodes token 3 at 4 s from its parked KV (no prefill), the rest one a second: done at 41 s, one preemption.
    reqs = [SimRequest(0.0, 4, 40), SimRequest(1.5, 4, 1)]
    (a, b), _ = run("oracle", reqs, preempt_mode="park")
    assert (b.ttft_s, b.e2e_s) == (1.5, 1.5) and (a.e2e_s, a.preemptions, a.output_tokens) == (41.0, 1, 40)
    # a pool of 5 blocks: A (48-token prompt) holds 4 when parked; B (40 + 1 tokens) needs 3: A's KV is dropped,
    # and A is recomputed when it resumes (its 48 + 2 tokens again in one iteration: token 3 at 4 s, done at 41 s)
    cfg = SimConfig(policy="oracle", cost=ONE_SECOND, worker=WorkerSpec(max_batch=1, num_blocks=5),
                    predictor=SimPredictor(PredictorKind.ORACLE), reconsider_s=0.0, preempt_mode="park")
    sim = Simulation(cfg, [SimRequest(0.0, 48, 40), SimRequest(1.5, 40, 1)])
    (a, b), _ = sim.run()
    assert (b.e2e_s, a.e2e_s, a.output_tokens) == (1.5, 41.0, 40)
    assert sim.workers["w0"].used_blocks == 0 and not sim.workers["w0"].parked


def test_prefill_is_chunked_by_the_token_budget_and_decodes_go_first():
    cost = IterationCost(base_s=0.0, per_prefill_token_s=0.01, per_seq_s=1.0)
    cfg = SimConfig(policy="fcfs", cost=cost, worker=WorkerSpec(max_batch=4, num_blocks=100, token_budget=100),
                    predictor=SimPredictor(PredictorKind.ORACLE), reconsider_s=0.0)
    # a 250-token prompt takes three iterations (100, 100, 50 tokens): 2 s, 2 s, 1.5 s -> first token at 5.5 s
    results, _, _ = simulate(cfg, [SimRequest(0.0, 250, 1)])
    assert results[0].ttft_s == pytest.approx(5.5)


def test_a_mixed_step_pays_its_fixed_extra_and_a_pure_decode_step_does_not():
    # 1 s a step, +2 s when it holds a prefill chunk: A (4-token prompt, 3 tokens) alone: prefill step 3 s (token 1),
    # two decode steps of 1 s: done at 5 s. B (2-token prompt, 1 token) arrives at 3.5 s, during A's first decode:
    # it joins the next step (4 -> 7 s, mixed: A's token 3 and B's only token).
    cost = IterationCost(base_s=1.0, per_mixed_step_s=2.0)
    cfg = SimConfig(policy="fcfs", cost=cost, worker=WorkerSpec(max_batch=4, num_blocks=100),
                    predictor=SimPredictor(PredictorKind.ORACLE), reconsider_s=0.0)
    results, _, _ = simulate(cfg, [SimRequest(0.0, 4, 3)])
    assert (results[0].ttft_s, results[0].e2e_s) == (3.0, 5.0)
    results, _, _ = simulate(cfg, [SimRequest(0.0, 4, 3), SimRequest(3.5, 2, 1)])
    assert [r.e2e_s for r in results] == [7.0, 3.5]


def test_every_job_finishes_once_and_the_kv_pool_ends_empty():
    rng = random.Random(1)
    # prompts of eight conversations share their leading blocks, so a 60-block pool evicts cached history
    reqs = sorted((SimRequest(rng.uniform(0, 20), n := rng.randint(1, 300), rng.randint(1, 300),
                              priority=rng.choice([0, 0, 1]),
                              prefix_keys=tuple(range(c := rng.randrange(8) * 100, c + n // 16)))
                   for _ in range(300)), key=lambda r: r.arrival_s)
    variants = [(mode, 0.0) for mode in ("recompute", "swap", "park")] + [("park", 0.7)]   # 0.7: prefill early
    for policy in ("fcfs", "priority", "sjf", "alise", "mlfq", "oracle"):
        for mode, park_share in variants:
            cfg = SimConfig(policy=policy, cost=IterationCost(base_s=0.01, per_prefill_token_s=1e-4), workers=3,
                            worker=WorkerSpec(max_batch=8, num_blocks=60, block_size=16, token_budget=256),
                            preempt_mode=mode, park_kv_share=park_share,
                            predictor=SimPredictor(PredictorKind.NOISY, sigma=1.0, seed=2))
            sim = Simulation(cfg, reqs)
            results, _ = sim.run()
            assert [r.index for r in results] == list(range(len(reqs)))
            assert all(r.output_tokens == reqs[r.index].output_len for r in results)
            assert not sim.jobs and not sim.queue and sim.state.running() == 0
            assert all(not w.running and not w.waiting and not w.host_kv and not w.parked and w.used_blocks == 0
                       for w in sim.workers.values()), (policy, mode, park_share)
            # every cached block is let go, and what stays cached fits the pool
            assert all(w.prefix_cache.held == 0 and 0 < w.prefix_cache.evictable <= 60 for w in sim.workers.values())


def test_noise_for_a_target_kendall_tau():
    rng = random.Random(0)
    lengths = [int(rng.lognormvariate(5, 1)) + 1 for _ in range(3000)]
    sigma = sigma_for_tau(lengths, 0.5)
    pred = SimPredictor(PredictorKind.NOISY, sigma=sigma, seed=3)
    from bench.simulator.predictions import kendall_tau
    tau = kendall_tau([pred.predict(n).mean for n in lengths], lengths)
    assert abs(tau - 0.5) < 0.05


def test_a_noisy_prediction_is_said_as_the_live_predictor_says_it():
    """Its estimate is the mean of its log-normal, above the median its deciles sit around (as live): the
    policies' E[L - g | L > g] sees the same shape in simulation as live."""
    pred = SimPredictor(PredictorKind.NOISY, sigma=0.8, seed=5)
    p = pred.predict(100)
    median = math.sqrt(p.deciles[4] * p.deciles[5])
    assert p.mean == pytest.approx(median * math.exp(0.8 ** 2 / 2))
    assert p.p90 == pytest.approx(median * math.exp(Z90 * 0.8))


def test_aging_bounds_how_long_a_flood_of_short_jobs_can_hold_back_a_long_one():
    """One long job (200 tokens) against short ones (2 tokens) arriving faster than one worker serves them, for
    100 s. Without aging the long job waits for the whole flood; with it, only jobs arriving within
    aging_s * ln(R_long / R_short) seconds of it (~22 s with the default time model) may overtake it."""
    reqs = [SimRequest(0.0, 10, 200)] + [SimRequest(0.01 + 0.15 * i, 10, 2) for i in range(667)]

    # prefill-early off: its early tokens would run the 2-token jobs to their end beside the long one, outside the
    # one decode slot this test is about
    def long_e2e(aging_s: float) -> float:
        cfg = SimConfig(policy="oracle", cost=IterationCost(base_s=0.1), worker=WorkerSpec(max_batch=1, num_blocks=100),
                        predictor=SimPredictor(PredictorKind.ORACLE), reconsider_s=0.0, aging_s=aging_s,
                        park_kv_share=0.0)
        results, _, _ = simulate(cfg, reqs)
        return results[0].e2e_s

    unbounded, bounded = long_e2e(1e9), long_e2e(5.0)
    assert unbounded > 120.0                      # starved until the flood is over
    # ~22 s of overtaking arrivals take ~30 s to serve (they come faster than they are served), plus its own 20 s
    assert bounded < 60.0, bounded

    # the hard bound, without aging: due after 10 s, the long job goes next (behind the one short job running
    # then, 0.2 s) and runs its own 20 s
    cfg = SimConfig(policy="oracle", cost=IterationCost(base_s=0.1), worker=WorkerSpec(max_batch=1, num_blocks=100),
                    predictor=SimPredictor(PredictorKind.ORACLE), reconsider_s=0.0, aging_s=1e9, due_after_s=10.0,
                    park_kv_share=0.0)
    due = simulate(cfg, reqs)[0][0].e2e_s
    assert 30.0 <= due <= 10.0 + 0.2 + 20.0 + 0.5, due


def test_the_cli_writes_each_runs_json_and_the_report(tmp_path):
    import csv
    import json

    from bench.simulate import main

    main(["--dataset-name", "synthetic", "--input-len", "32", "--output-len", "16", "--num-prompts", "50",
          "--rates", "5", "inf", "--policies", "fcfs", "alise", "--cost", "cpu-smollm2", "--max-batch", "8",
          "--out", str(tmp_path)])
    for label in ("fcfs-r5", "fcfs-rinf", "alise-r5", "alise-rinf"):
        summary = json.loads((tmp_path / f"{label}.json").read_text())
        assert summary["completed"] == 50 and summary["simulated"]
        with open(tmp_path / f"{label}.csv", newline="") as f:      # per request, in the live runs' columns
            rows = list(csv.DictReader(f))
        assert sorted(int(r["index"]) for r in rows) == list(range(50))
        assert all(r["ok"] == "True" and int(r["output_tokens"]) == 16 and float(r["e2e_s"]) > 0 for r in rows)
    assert "Simulation" in (tmp_path / "report.md").read_text()
    assert list(tmp_path.glob("*.png"))


def test_the_cli_sends_requests_with_an_arrival_traces_gaps(tmp_path):
    import json

    from bench.simulate import main

    trace = tmp_path / "trace.csv"           # bursts of five 10 ms apart, each after a 2 s lull
    times = [burst * 2.0 + k * 0.01 for burst in range(20) for k in range(5)]
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                     + "".join(f"2023-11-16 18:{int(t // 60):02d}:{t % 60:010.7f},10,10\n" for t in times))
    common = ["--dataset-name", "synthetic", "--input-len", "32", "--output-len", "16", "--num-prompts", "100",
              "--rates", "4", "--policies", "fcfs", "--cost", "cpu-smollm2", "--max-batch", "8"]
    for name, extra in (("poisson", []), ("trace", ["--arrival-trace", str(trace)])):
        main(common + extra + ["--out", str(tmp_path / name)])
    poisson, bursty = (json.loads((tmp_path / name / "fcfs-r4.json").read_text()) for name in ("poisson", "trace"))
    assert bursty["arrival_trace"] == str(trace) and "gaps of" in (tmp_path / "trace" / "report.md").read_text()
    # the same load in bursts of five at once: requests queue behind each other, where Poisson spreads them out
    assert bursty["ttft_s"]["mean"] > 1.5 * poisson["ttft_s"]["mean"]


def test_the_workers_reestimate_replaces_the_prediction_once_the_prompt_is_computed():
    rng = random.Random(3)
    reqs = sorted((SimRequest(rng.uniform(0, 30), rng.randint(20, 200), rng.randint(1, 400)) for _ in range(300)),
                  key=lambda r: r.arrival_s)
    cost = IterationCost(base_s=0.02, per_seq_s=2e-3, per_prefill_token_s=1e-4)
    spec = WorkerSpec(max_batch=8, num_blocks=400, token_budget=512)
    means = {}
    for probe in (None, SimPredictor(PredictorKind.ORACLE)):
        blind = SimPredictor(PredictorKind.NOISY, sigma=3.0, seed=1)      # a prompt predictor that ranks badly
        cfg = SimConfig(policy="alise", cost=cost, worker=spec, predictor=blind, reestimate=probe)
        sim = Simulation(cfg, reqs)
        results, _ = sim.run()
        if probe is None:
            assert all(r.repredicted_output_tokens == 0 for r in results)
        else:      # the scheduler ranked each job by the re-estimate from its first token on (here: the truth)
            assert all(r.repredicted_output_tokens == reqs[r.index].output_len for r in results)
        means[probe is not None] = sum(r.normalized_s for r in results) / len(results)
    # it changes only which running job is preempted (the queue was ordered before any prompt was read): a small gain
    assert means[True] < means[False], means


def test_parked_kv_is_kept_when_dropping_it_would_not_make_room():
    from bench.simulator.cluster import _Job, _Worker

    w = _Worker("w", WorkerSpec(num_blocks=10, block_size=4))
    parked = _Job(0, "p", SimRequest(0.0, 7, 5), 7, 5, 5.0, True)         # (7 + 0 + 1) tokens: 2 blocks
    w.parked["p"] = parked
    w.used_blocks = 8                                                      # 6 running + 2 parked
    assert w.room_for(5, only_if_enough=True) == [] and "p" in w.parked   # 8 - 2 + 5 > 10: nothing to gain
    assert w.room_for(3, only_if_enough=True) == ["p"] and w.used_blocks == 6   # 8 + 3 > 10, 6 + 3 fits


def test_admission_takes_its_time_and_admits_so_many_a_second():
    # As the first case, with 0.25 s of admission latency and at most 2 admissions a second: A is queued at 0.25 s
    # (token 1 at 1.25 s, 2 and 3 at 2.25, 3.25 s), B at 0.75 s (0.5 s after A), placed when A ends at 3.25 s: its
    # only token at 4.25 s. TTFT and e2e count from arrival, the queue time from acceptance, as live.
    reqs = [SimRequest(0.0, 4, 3), SimRequest(0.0, 4, 1)]
    fcfs, duration = run("fcfs", reqs, admit_s=0.25, admit_per_s=2.0)
    assert [(r.admit_s, r.ttft_s, r.e2e_s, r.queue_s) for r in fcfs] == [(0.25, 1.25, 3.25, 0.0), (0.75, 4.25, 4.25, 2.5)]
    assert duration == 4.25
    fcfs, _ = run("fcfs", reqs, admit_s=0.25)                 # no bound on the rate: both queued at 0.25 s
    assert [r.admit_s for r in fcfs] == [0.25, 0.25]
    for bad in ({"admit_s": -1.0}, {"admit_per_s": float("inf")}):
        with pytest.raises(ValueError):
            SimConfig(policy="fcfs", cost=ONE_SECOND, **bad)


def test_a_prompt_whose_history_is_cached_prefills_only_the_rest():
    # One sequence at a time, 16 tokens of prompt per 1 s iteration. A (48-token prompt: blocks k1 k2 k3) prefills
    # in 3 iterations: token 1 at 3 s, token 2 at 4 s. B starts with A's first two blocks (k1 k2, then k4): placed
    # at 4 s, it finds 32 tokens in the prefix cache and prefills the last 16 in one iteration: its token at 5 s.
    # Without shared keys it would take 3 iterations (7 s).
    cfg = SimConfig(policy="fcfs", cost=ONE_SECOND, worker=WorkerSpec(max_batch=1, num_blocks=100, token_budget=16),
                    predictor=SimPredictor(PredictorKind.ORACLE), reconsider_s=0.0, park_kv_share=0.0)
    shared = [SimRequest(0.0, 48, 2, prefix_keys=(1, 2, 3)), SimRequest(0.0, 48, 1, prefix_keys=(1, 2, 4))]
    (a, b), _, _ = simulate(cfg, shared)
    assert (a.ttft_s, a.e2e_s, b.ttft_s) == (3.0, 4.0, 5.0)
    (_, b), _, _ = simulate(cfg, [shared[0], SimRequest(0.0, 48, 1, prefix_keys=(5, 2, 3))])   # differs from the start
    assert b.ttft_s == 7.0


def test_a_prompt_is_looked_up_in_the_prefix_cache_when_its_first_chunk_runs_not_when_it_is_placed():
    # As the live worker does (step_scheduler._admit). Two sequences at a time, 16 prompt tokens a 1 s step. A
    # (48 tokens: k1 k2 k3) and B (48: k1 k2 k4) are placed together at 0; A's chunks take the budget of the first
    # three steps, so B's first chunk runs in the fourth, when k1 k2 are computed: it prefills its last 16 tokens
    # (15 beside A's decode, then 1): its token at 5 s. Looked up at placement it found nothing and prefilled all
    # 48 (token at 7 s); that made the simulator's fcfs prefill 18% more on chat3000 than the live worker counted.
    cfg = SimConfig(policy="fcfs", cost=ONE_SECOND, worker=WorkerSpec(max_batch=2, num_blocks=100, token_budget=16),
                    predictor=SimPredictor(PredictorKind.ORACLE), reconsider_s=0.0, park_kv_share=0.0)
    sim = Simulation(cfg, [SimRequest(0.0, 48, 2, prefix_keys=(1, 2, 3)), SimRequest(0.0, 48, 1, prefix_keys=(1, 2, 4))])
    (a, b), _ = sim.run()
    assert (a.ttft_s, a.e2e_s, b.ttft_s) == (3.0, 4.0, 5.0)
    # what the steps held, in a live run's terms: A's 48 prompt tokens and 15 of B's last 16 (its final one runs as
    # a decode row); rows: A in 4 steps, B in 2
    totals = step_totals(sim)["w0"]
    # context read: A's chunks 16 + 32 + 48, its decode 49; B's chunk 32 + 15, its decode 48; the one decode-only
    # step is B's last (A's decode shared its step with B's chunk). Prefill attention: A's 48 * 49 / 2 pairs, B's 15
    # tokens after 32 cached 15 * 32 + 15 * 16 / 2
    assert totals["steps"] == 5 and totals["made_of"] == {"rows": 6, "prefill_tokens": 63, "context_tokens": 240,
                                                          "prefill_pairs": 1176 + 600, "kept_kv_dropped": 0,
                                                          "decode_steps": 1, "decode_rows": 1,
                                                          "decode_context_tokens": 48}
    assert set(totals["made_of"]) == set(MADE_OF_METRICS.values())


def test_a_prompts_last_block_completed_by_a_one_token_last_chunk_joins_the_prefix_cache():
    # 1 s a step plus 10 ms a prompt token, 47 prompt tokens a step. A's 48-token prompt (blocks k1 k2 k3) prefills
    # 47 tokens, then its last one as a decode: that token completes k3. B (64 tokens: k1 k2 k3 k4) follows A and
    # finds all three blocks cached: it prefills only its last 16 tokens (1.16 s), not 32 (1.32 s).
    cost = IterationCost(base_s=1.0, per_prefill_token_s=0.01)
    cfg = SimConfig(policy="fcfs", cost=cost, worker=WorkerSpec(max_batch=1, num_blocks=100, token_budget=47),
                    predictor=SimPredictor(PredictorKind.ORACLE), reconsider_s=0.0, park_kv_share=0.0)
    (a, b), _, _ = simulate(cfg, [SimRequest(0.0, 48, 2, prefix_keys=(1, 2, 3)),
                                  SimRequest(0.0, 64, 1, prefix_keys=(1, 2, 3, 4))])
    assert b.ttft_s - a.e2e_s == pytest.approx(1.16)


def test_a_turns_prefill_pays_for_its_attention_over_the_cached_history():
    # 1 s a step plus 0.1 ms a query-key pair of prefill attention. A's 48-token prompt (k1 k2 k3) is computed in
    # one chunk (48 * 49 / 2 pairs); B (64 tokens: k1 k2 k3 k4) finds A's blocks cached and prefills its last 16
    # tokens, each attending to the 48 cached and to the new ones up to itself: 16 * 48 + 16 * 17 / 2 = 904 pairs
    cost = IterationCost(base_s=1.0, per_prefill_pair_s=1e-4)
    cfg = SimConfig(policy="fcfs", cost=cost, worker=WorkerSpec(max_batch=1, num_blocks=100, token_budget=100),
                    predictor=SimPredictor(PredictorKind.ORACLE), reconsider_s=0.0, park_kv_share=0.0)
    (a, b), _, _ = simulate(cfg, [SimRequest(0.0, 48, 2, prefix_keys=(1, 2, 3)),
                                  SimRequest(0.0, 64, 1, prefix_keys=(1, 2, 3, 4))])
    assert a.ttft_s == pytest.approx(1.1176)
    assert b.ttft_s - a.e2e_s == pytest.approx(1.0904)


def test_a_prompt_chunk_the_budget_cuts_to_one_token_is_a_prefill_as_live():
    # token budget 2: A's 2-token prompt fills step 1 (3 pairs); then A decodes and B's 3-token prompt gets one token
    # of budget a step. Such a chunk samples nothing: the live worker runs it on the mixed path and counts it as a
    # prefill (SeqChunk.decodes), 1 then 2 pairs; B's last token, which samples, is a decode row
    cfg = SimConfig(policy="fcfs", cost=ONE_SECOND, worker=WorkerSpec(max_batch=2, num_blocks=100, token_budget=2),
                    predictor=SimPredictor(PredictorKind.ORACLE), reconsider_s=0.0, park_kv_share=0.0)
    sim = Simulation(cfg, [SimRequest(0.0, 2, 3), SimRequest(0.0, 3, 1)])
    sim.run()
    made_of = step_totals(sim)["w0"]["made_of"]
    assert (made_of["prefill_tokens"], made_of["prefill_pairs"], made_of["decode_steps"]) == (4, 3 + 1 + 2, 1)


def test_a_simulated_worker_takes_no_more_jobs_to_park_at_once_than_its_early_rows():
    # A runs (max batch 1); three short jobs arrive at 0.5 s and are prefilled early (one early token each, then
    # parked). With 3 early rows all three get their first token in the next step (1.5 s); with 1, one at a time:
    # each takes a step to prefill and sample, and the next goes once it has parked.
    def ttfts(rows: int) -> list[float]:
        spec = WorkerSpec(max_batch=1, num_blocks=100, early_rows=rows)
        cfg = SimConfig(policy="alise", cost=ONE_SECOND, worker=spec,
                        predictor=SimPredictor(PredictorKind.ORACLE), reconsider_s=0.0, park_kv_share=0.9,
                        early_tokens=1)
        results, _, _ = simulate(cfg, [SimRequest(0.0, 16, 20)] + [SimRequest(0.5, 16, 5 + k) for k in range(3)])
        return [r.ttft_s for r in results[1:]]

    assert ttfts(3) == [1.5, 1.5, 1.5]
    assert ttfts(1) == [1.5, 3.5, 5.5]


def test_a_replayed_prediction_is_what_the_live_predictor_said_not_the_truth():
    """A (3 tokens) and B (1 token) arrive together, as in the first case above, but the live predictor said A is
    the short one: replaying its predictions, alise runs A first, as the live scheduler did; with the truth
    recorded it runs B first, as the oracle does."""
    def served(recorded: tuple[float, float]):
        reqs = [SimRequest(0.0, 4, 3, recorded_pred=recorded[0]), SimRequest(0.0, 4, 1, recorded_pred=recorded[1])]
        cfg = SimConfig(policy="alise", cost=ONE_SECOND, worker=WorkerSpec(max_batch=1, num_blocks=100),
                        predictor=SimPredictor(PredictorKind.REPLAY, sigma=0.5), reconsider_s=0.0, park_kv_share=0.0)
        results, _, _ = simulate(cfg, reqs)
        return [(r.ttft_s, r.e2e_s) for r in results]

    assert served((2.0, 50.0)) == [(1.0, 3.0), (4.0, 4.0)]            # fcfs's order: A believed shorter
    assert served((3.0, 1.0)) == [(2.0, 4.0), (1.0, 1.0)]             # the oracle's order


def test_a_replayed_prediction_keeps_its_value_and_gets_the_spread_of_the_live_errors():
    from bench.simulator.predictions import log_error_sigma

    pred = SimPredictor(PredictorKind.REPLAY, sigma=log_error_sigma([20.0, 5.0], [10, 10]))
    assert pred.sigma == pytest.approx(math.log(2))                    # errors +ln 2 and -ln 2
    assert log_error_sigma([20.0, 20.0], [10, 10]) == pytest.approx(math.log(2))   # a steady bias is uncertainty too
    p = pred.predict(10, recorded=20.0)
    assert p.predicted and p.mean == 20.0
    # the live predictor's estimate is its log-normal's mean, exp(mu + s^2 / 2): the quantiles sit around the
    # median exp(mu) below it, as live (not around the estimate, which put them all 1.5x too high at s ~ 0.9)
    median = 20.0 * math.exp(-pred.sigma ** 2 / 2)
    assert math.sqrt(p.deciles[4] * p.deciles[5]) == pytest.approx(median)
    assert p.p90 == pytest.approx(median * math.exp(Z90 * pred.sigma))
    nothing = pred.predict(10, recorded=0.0)                          # the live scheduler had no prediction
    assert not nothing.predicted and nothing.mean == pred.prior


def test_the_cli_replays_a_live_runs_predictions_and_refuses_another_workloads(tmp_path):
    import csv
    import json
    import lzma

    from bench.simulate import main

    lengths = tmp_path / "lengths.json"
    lengths.write_text(json.dumps([[32, 4 + i % 7] for i in range(40)]))
    live = tmp_path / "live.csv"
    with live.open("w", newline="") as f:                     # as `alise bench serve` writes it (columns trimmed)
        w = csv.writer(f)
        w.writerow(["index", "expected_output_tokens", "predicted_output_tokens", "ttft_s"])
        for i in range(30):
            w.writerow([i, 4 + i % 7, 40 - i, 0.1])
    common = ["--dataset-name", "lengths", "--dataset-path", str(lengths), "--num-prompts", "30", "--rates", "inf",
              "--policies", "alise", "--cost", "cpu-smollm2", "--max-batch", "4", "--out", str(tmp_path / "sim")]
    main(common + ["--predictor", "replay", "--predictions", str(live)])
    summary = json.loads((tmp_path / "sim" / "alise-rinf.json").read_text())
    assert summary["completed"] == 30 and summary["predictor"]["kind"] == "replay"
    # the live predictions rank the jobs by index, not by length: the tau the summary reports is theirs
    assert summary["predictor_kendall_tau"] == pytest.approx(
        kendall_tau([40 - i for i in range(30)], [4 + i % 7 for i in range(30)]), abs=1e-9)
    # a run kept xz-compressed (docs/results/*/*.csv.xz) replays the same
    (tmp_path / "live.csv.xz").write_bytes(lzma.compress(live.read_bytes()))
    main(common + ["--predictor", "replay", "--predictions", str(tmp_path / "live.csv.xz"), "--out",
                   str(tmp_path / "xz")])
    assert json.loads((tmp_path / "xz" / "alise-rinf.json").read_text())["predictor_kendall_tau"] == pytest.approx(
        summary["predictor_kendall_tau"], abs=1e-9)
    with pytest.raises(SystemExit, match="request 0 asked 4 output tokens"):
        main(common + ["--predictor", "replay", "--predictions", str(live), "--skip", "1"])
    with pytest.raises(SystemExit, match="go together"):
        main(common + ["--predictions", str(live)])
    stray = tmp_path / "stray.csv"
    stray.write_text("index,expected_output_tokens,predicted_output_tokens\n0,4,9\n0,4,9\n")
    with pytest.raises(SystemExit, match="index 0 is out of the workload's 0..29 or repeated"):
        main(common + ["--predictor", "replay", "--predictions", str(stray)])
    stray.write_text("index,expected_output_tokens,predicted_output_tokens\n0,4,lots\n")
    with pytest.raises(SystemExit, match="not numbers"):
        main(common + ["--predictor", "replay", "--predictions", str(stray)])


def test_inter_token_gaps_are_recorded_and_a_preemption_shows_as_one_long_gap():
    # the preemption case above: A's tokens at 1, 2 s, preempted (B runs 2 -> 3 s, recompute 3 -> 4 s), then one a second
    reqs = [SimRequest(0.0, 4, 40), SimRequest(1.5, 4, 1)]
    results, _ = run("oracle", reqs, preempt_mode="recompute")
    a, b = results
    assert a.itl_s == [1.0, 2.0] + [1.0] * 37 and b.itl_s == []
    quiet, _, _ = simulate(SimConfig(policy="oracle", cost=ONE_SECOND, worker=WorkerSpec(max_batch=1, num_blocks=100),
                                     predictor=SimPredictor(PredictorKind.ORACLE), reconsider_s=0.0,
                                     park_kv_share=0.0, record_itl=False), reqs)
    assert quiet[0].itl_s == [] and quiet[0].e2e_s == a.e2e_s


def test_a_decode_step_with_more_rows_than_the_batch_pays_the_over_batch_cost():
    assert IterationCost(base_s=1.0, over_batch_step_s=0.5).step(3, 0, 0, over_batch=True) == 1.5
    assert IterationCost(base_s=1.0, over_batch_step_s=0.5).step(3, 10, 0, mixed=True, over_batch=True) == 1.0
    # alise prefills waiting jobs early beside a full batch of 2: their early tokens make decode steps of 3-4 rows
    steps = []

    class Recorded(IterationCost):
        def step(self, seqs, prefill_tokens, context_tokens, mixed=False, over_batch=False, prefill_pairs=0):
            seconds = super().step(seqs, prefill_tokens, context_tokens, mixed, over_batch, prefill_pairs)
            steps.append((seqs, mixed, seconds))
            return seconds

    reqs = [SimRequest(0.0, 8, 40), SimRequest(0.0, 8, 40), SimRequest(0.1, 8, 5), SimRequest(0.1, 8, 5)]
    cfg = SimConfig(policy="alise", cost=Recorded(base_s=0.01, over_batch_step_s=0.5),
                    worker=WorkerSpec(max_batch=2, num_blocks=100, early_rows=2), park_kv_share=0.8, early_tokens=2,
                    predictor=SimPredictor(PredictorKind.ORACLE), reconsider_s=0.0)
    sim = Simulation(cfg, reqs)
    sim.run()
    decodes = [(seqs, seconds) for seqs, mixed, seconds in steps if not mixed]
    assert step_totals(sim)["w0"]["over_batch_steps"] == sum(seqs > 2 for seqs, _ in decodes) > 0
    assert all(seconds == pytest.approx(0.51 if seqs > 2 else 0.01) for seqs, seconds in decodes)
    assert all(seconds == pytest.approx(0.01) for _, mixed, seconds in steps if mixed)


def test_a_turns_history_evicted_for_room_is_computed_again():
    # One job at a time, a 10-block pool of 16 tokens. A (48 tokens: k1 k2 k3) runs and leaves its three blocks
    # cached; C (128 unrelated tokens, 9 blocks with its next token) then needs 9 of the 10 blocks, so two of A's
    # cached blocks are handed out, the first of them k1: B (64 tokens: k1 k2 k3 k4) finds no prefix and prefills
    # all 64. With room for everything, B prefills only its last 16. Until session 43 the simulator never evicted:
    # the simulated alise run at 68 req/s on an H100's pool computed 6% fewer prefill tokens than the live one.
    reqs = [SimRequest(0.0, 48, 2, prefix_keys=(1, 2, 3)), SimRequest(0.0, 128, 2, prefix_keys=tuple(range(11, 19))),
            SimRequest(0.0, 64, 1, prefix_keys=(1, 2, 3, 4))]

    def prefill_tokens(num_blocks: int) -> int:
        cfg = SimConfig(policy="fcfs", cost=ONE_SECOND,
                        worker=WorkerSpec(max_batch=1, num_blocks=num_blocks, token_budget=200),
                        predictor=SimPredictor(PredictorKind.ORACLE), reconsider_s=0.0, park_kv_share=0.0)
        sim = Simulation(cfg, reqs)
        sim.run()
        return step_totals(sim)["w0"]["made_of"]["prefill_tokens"]

    assert prefill_tokens(100) == 48 + 128 + 16
    assert prefill_tokens(10) == 48 + 128 + 64
