"""The scheduler learns each worker's step-time model from its load reports and admits up to the throughput knee."""
from __future__ import annotations

import random

import pytest

from services.scheduler.live_state import LiveState, WorkerState
from services.scheduler.worker_speed import REFIT_EVERY, StepModel, StepReservoir, StepSums, WorkerSpeed, fit

TRUE = StepModel(base_s=0.005, per_seq_s=1e-5, per_prefill_token_s=3e-5, per_context_token_s=2.5e-8)


def reports(model: StepModel, n: int, seed: int = 0, noise: float = 0.02) -> list[StepSums]:
    """Reports of a few steps each, of varied make-up, timed by `model` with a little noise."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        steps = rng.randint(1, 20)
        seqs, prefill, context, seconds = 0, 0, 0, 0.0
        for _ in range(steps):
            b, p = rng.randint(1, 128), rng.choice([0, 0, 0, rng.randint(2, 2000)])
            c = b * rng.randint(50, 2000)
            seqs, prefill, context = seqs + b, prefill + p, context + c
            seconds += model.step(b, p, c) * (1 + rng.uniform(-noise, noise))
        out.append(StepSums(steps, seconds, seqs, prefill, context))
    return out


def test_the_step_sample_is_bounded_and_keeps_the_whole_session_not_its_end():
    # the window holds the last rows only (a drain at the end of a run, say); the sample, for calibrating the
    # simulator, must hold the whole session's mix: rows from each part of it, about as many from each
    speed = WorkerSpeed()
    rows = [StepSums(1, 0.01 + i * 1e-6, 8, 0, 100) for i in range(20_000)]
    for r in rows:
        speed.observe(r)
    kept = speed.sample()
    assert len(kept) == 1024 and len(set(map(id, kept))) == 1024
    quarters = [sum(1 for r in kept if q * 5000 <= round((r.seconds - 0.01) * 1e6) < (q + 1) * 5000) for q in range(4)]
    assert all(180 <= n <= 330 for n in quarters), quarters      # 256 expected in each
    small = StepReservoir(4)
    for r in rows[:3]:
        small.offer(r)
    assert small.rows() == rows[:3]                              # fewer than its size: every row kept


@pytest.mark.parametrize("device_s", [float("nan"), float("inf"), -1.0])
def test_a_device_time_that_is_not_a_time_is_kept_as_unknown(device_s):
    # a worker's report reaches the step sample (and from there `alise bench` and the simulator's calibration): a
    # device time that is not a finite, non-negative number is a bad report, kept as 0 (a CPU worker's, unknown)
    speed = WorkerSpeed()
    speed.observe(StepSums(1, 0.02, 8, 0, 100, 0, device_s))
    speed.observe(StepSums(1, 0.02, 8, 0, 100, 0, 0.015))
    assert sorted(r.device_seconds for r in speed.sample()) == [0.0, 0.015]


def test_fit_recovers_the_step_model_from_summed_reports():
    got = fit(reports(TRUE, 64))
    assert got is not None
    assert got.base_s == pytest.approx(TRUE.base_s, rel=0.1)
    for shape in ((1, 0, 500), (64, 0, 64 * 1000), (256, 0, 256 * 2000), (8, 2000, 8 * 300)):
        assert got.step(*shape) == pytest.approx(TRUE.step(*shape), rel=0.05), shape


MIXED = StepModel(base_s=0.005, per_seq_s=1e-5, per_prefill_token_s=3e-5, per_context_token_s=2.5e-8,
                  per_mixed_step_s=0.004)


def single_steps(model: StepModel, n: int, mixed_share: float, seed: int = 0) -> list[StepSums]:
    """Single steps as a GPU worker reports them: mixed ones (with prefill chunks) pay the model's fixed extra."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        b, mixed = rng.randint(1, 512), rng.random() < mixed_share
        p, c = (rng.randint(2, 4000) if mixed else 0), b * rng.randint(50, 2000)
        out.append(StepSums(1, model.step(b, p, c, mixed) * (1 + rng.uniform(-0.02, 0.02)), b, p, c, int(mixed)))
    return out


def test_fit_separates_the_fixed_cost_of_a_mixed_step():
    got = fit(single_steps(MIXED, 256, mixed_share=0.8))
    assert got is not None
    assert got.per_mixed_step_s == pytest.approx(MIXED.per_mixed_step_s, rel=0.15)
    assert got.base_s == pytest.approx(MIXED.base_s, rel=0.15)
    for shape in ((512, 0, 512 * 700, 0), (512, 60, 512 * 700, 1), (8, 2000, 8 * 300, 1)):
        assert got.step(*shape) == pytest.approx(MIXED.step(*shape), rel=0.05), shape


def test_when_every_step_is_mixed_the_extra_stays_in_the_base():
    got = fit(single_steps(MIXED, 256, mixed_share=1.0))
    assert got is not None and got.per_mixed_step_s == 0
    assert got.step(64, 100, 64 * 500) == pytest.approx(MIXED.step(64, 100, 64 * 500, 1), rel=0.05)
    almost = single_steps(MIXED, 256, mixed_share=1.0)
    almost[0] = StepSums(1, MIXED.step(64, 0, 64 * 500), 64, 0, 64 * 500, 0)   # one pure decode step in 256
    assert fit(almost) is not None                            # a shaky mixed term is dropped, not the whole model


def test_the_knee_counts_the_mixed_steps_fixed_cost_as_often_as_steps_are_mixed():
    folded = StepModel(MIXED.base_s + MIXED.per_mixed_step_s, MIXED.per_seq_s, MIXED.per_prefill_token_s,
                       MIXED.per_context_token_s)         # what the fit gives when every recent step was mixed
    assert MIXED.knee(512, 700, 0.95, mixed_share=1.0) == folded.knee(512, 700, 0.95)
    assert MIXED.knee(512, 700, 0.95, mixed_share=0.0) < MIXED.knee(512, 700, 0.95, mixed_share=1.0)
    speed = WorkerSpeed()
    for r in single_steps(MIXED, 100, mixed_share=0.25, seed=4):
        speed.observe(r)
    assert 0.1 < speed.mixed_share() < 0.4


def test_the_mixed_share_counts_only_the_rows_in_the_window():
    speed = WorkerSpeed(window=16)
    rows = [StepSums(steps=1 + i % 3, seconds=0.01, seqs=8, prefill_tokens=0, context_tokens=800,
                     mixed_steps=(1 + i % 3) if i < 20 else 0) for i in range(40)]
    for i, r in enumerate(rows):
        speed.observe(r)
        window = rows[max(0, i - 15):i + 1]
        assert speed.mixed_share() == pytest.approx(sum(w.mixed_steps for w in window) / sum(w.steps for w in window))
    assert speed.mixed_share() == 0.0                        # the mixed rows have all left the window
    with pytest.raises(ValueError, match="window"):            # too short to fit a model in
        WorkerSpeed(window=0)


def test_no_model_until_the_reports_separate_the_constants():
    same = [StepSums(10, 0.1, 640, 0, 64_000)] * 30          # every report alike: base and per-seq inseparable
    assert fit(same) is None
    assert fit(reports(TRUE, 5)) is None                      # too few


def test_knee_is_where_throughput_flattens():
    # throughput B / (base + B k): with base 5 ms and k = 10 us + 25 ns x 1000 = 35 us per sequence,
    # 95% of batch 256's throughput is reached at B = 0.95 * 256 * 5 / (5 + 256 * 0.035 * 0.05) = 223.2 -> 224
    assert TRUE.knee(256, 1000, 0.95) == 224
    slow_per_seq = StepModel(0.005, 2e-3, 0, 0)               # per-sequence work dominates: throughput flat early
    assert slow_per_seq.knee(256, 0, 0.95) == 40              # 0.95 * 256 * 5 / (5 + 256 * 2 * 0.05) = 39.7
    assert StepModel(0, 1e-3, 0, 0).knee(64, 0, 0.9) == 64    # no fixed cost: nothing to learn, keep max batch


def test_live_state_admits_up_to_the_knee_once_it_knows_the_worker():
    state: LiveState = LiveState(knee_share=0.8)
    state.add_worker(WorkerState("w", block_size=16, num_blocks=1000, max_batch=128))
    assert state.snapshot(0, []).workers[0].max_batch == 128  # nothing learned yet
    slow = StepModel(0.005, 1e-3, 0, 0)
    for r in reports(slow, 16):
        state.load_report("w", 0, False, [r], mean_context=100)
    limit = state.snapshot(0, []).workers[0].max_batch
    assert abs(limit - slow.knee(128, 100, 0.8)) <= 2 and limit < 128
    off: LiveState = LiveState(knee_share=0.0)
    off.add_worker(WorkerState("w", block_size=16, num_blocks=1000, max_batch=128))
    for r in reports(slow, 16):
        off.load_report("w", 0, False, [r], mean_context=100)
    assert off.snapshot(0, []).workers[0].max_batch == 128


def test_worker_speed_refits_after_enough_new_rows():
    speed = WorkerSpeed(window=128)
    assert speed.model() is None
    for r in reports(TRUE, 16):
        speed.observe(r)
    first = speed.model()
    assert first is not None and speed.model() is first
    speed.observe(StepSums(0, 0.0, 0, 0, 0))                  # an empty report changes nothing
    for r in reports(TRUE, REFIT_EVERY - 1, seed=1):
        speed.observe(r)
    assert speed.model() is first                             # not enough new rows yet
    speed.observe(reports(TRUE, 1, seed=2)[0])
    assert speed.model() is not first


def test_a_report_whose_time_is_not_a_finite_number_teaches_nothing():
    """Regression (session 25 review): a row timed at infinity was kept, and the fit gave no model (admission fell
    back to the max batch) until the row left the 512-row window."""
    speed = WorkerSpeed(window=128)
    speed.observe(StepSums(3, float("inf"), 30, 0, 3000))
    speed.observe(StepSums(3, float("nan"), 30, 0, 3000))
    for r in reports(TRUE, 16):
        speed.observe(r)
    got = speed.model()
    assert got is not None and got.base_s == pytest.approx(TRUE.base_s, rel=0.1)
