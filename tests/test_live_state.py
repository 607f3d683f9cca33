"""LiveState: the scheduler's one owner of placements, tokens and swapped KV, and the Snapshot built from it."""
from __future__ import annotations

import math

import pytest

from services.common.log_normal import DECILE_Z, Z90
from services.scheduler.live_state import JobFacts, LiveState, WorkerState


def facts(job_id: str, prompt_len: int = 30, pred: float = 10.0, max_tokens: int = 100) -> JobFacts:
    return JobFacts(job_id=job_id, priority=0, created=1.0, prompt_len=prompt_len, max_tokens=max_tokens,
                    pred_len=pred, pred_p90=2 * pred, predicted=True)


def state_with(*worker_ids: str) -> LiveState:
    s: LiveState = LiveState()
    for w in worker_ids:
        s.add_worker(WorkerState(w, block_size=16, num_blocks=10, max_batch=2))
    return s


def test_placement_reserves_blocks_until_the_next_load_report():
    s = state_with("w1")
    s.track(facts("a", prompt_len=30))
    s.set_generated("a", 2)
    s.placed("a", "w1")
    assert s.workers["w1"].free_blocks == 10 - 3           # 30 + 2 + 1 tokens -> 3 blocks of 16
    s.load_report("w1", used_blocks=4, draining=False)     # the worker's own count replaces the promise
    assert s.workers["w1"].free_blocks == 6
    snap = s.snapshot(5.0, [])
    assert [j.job_id for j in snap.workers[0].running] == ["a"] and snap.workers[0].running[0].generated == 2


def test_swapped_copy_is_remembered_and_dropped_with_its_worker():
    s = state_with("w1", "w2")
    s.track(facts("a"))
    s.placed("a", "w1")
    s.left_worker("a", "w1")
    s.kept_kv("a", "w1", parked=False)
    assert s.view("a").kv_on == "w1"
    assert s.placed("a", "w2") == "w1"                     # resumed elsewhere: w1's stale copy must go
    assert s.view("a").kv_on == ""
    s.left_worker("a", "w2")
    s.kept_kv("a", "w2", parked=False)
    assert s.remove_worker("w2") == [] and s.view("a").kv_on == ""
    s.kept_kv("a", "w2", parked=False)                               # a late report from a worker that left: ignored
    assert s.view("a").kv_on == ""


def test_snapshot_keeps_queue_order_and_skips_unknown_jobs():
    s = state_with("w1")
    for j in ("a", "b", "c"):
        s.track(facts(j))
    s.placed("c", "w1")
    s.preempt_sent("c", "w1")
    snap = s.snapshot(0.0, ["b", "gone", "a"])
    assert [j.job_id for j in snap.queued] == ["b", "a"]
    assert snap.workers[0].preempting and snap.workers[0].running[0].running
    assert s.forget("c") is None and not s.workers["w1"].jobs and not s.workers["w1"].preempting
    assert s.running() == 0


def test_a_worker_reestimate_moves_the_predictors_median_there_and_keeps_its_spread():
    """The predictor says a log-normal: mean exp(mu + s^2 / 2) above its median exp(mu). The worker's estimate is
    a median (a regression of log length): the distribution moves until its median is there, the mean with it.
    Moving the mean there instead put the job's median at 400 / exp(s^2 / 2) = 243 (s = 1): ranked 1.6x shorter
    than a job predicted 400 at the prompt."""
    s = state_with("w1")
    median, sd = 10.0, 1.0
    s.track(JobFacts(job_id="j", priority=0, created=1.0, prompt_len=30, max_tokens=1000,
                     pred_len=median * math.exp(sd * sd / 2), pred_p90=median * math.exp(Z90 * sd), predicted=True,
                     pred_deciles=tuple(median * math.exp(z * sd) for z in DECILE_Z)))
    before = s.view("j", running=True)
    assert before.remaining_tokens < 40
    s.repredict("j", 400.0)
    after = s.view("j", running=True)                                       # the cached view was rebuilt
    assert math.sqrt(after.pred_deciles[4] * after.pred_deciles[5]) == pytest.approx(400.0)
    assert after.pred_deciles == pytest.approx(tuple(40.0 * q for q in before.pred_deciles))
    assert after.pred_len == pytest.approx(40.0 * before.pred_len)
    assert after.pred_p90 == pytest.approx(40.0 * before.pred_p90)
    # ranked as a job the predictor had said 400 for at the prompt
    fresh = JobFacts(job_id="k", priority=0, created=1.0, prompt_len=30, max_tokens=1000,
                     pred_len=400.0 * math.exp(sd * sd / 2), pred_p90=400.0 * math.exp(Z90 * sd), predicted=True,
                     pred_deciles=tuple(400.0 * math.exp(z * sd) for z in DECILE_Z))
    s.track(fresh)
    assert after.remaining_tokens == pytest.approx(s.view("k", running=True).remaining_tokens)
    s.track(JobFacts(job_id="j2", priority=0, created=1.0, prompt_len=30, max_tokens=1000, pred_len=10.0,
                     pred_p90=20.0, predicted=True))
    s.repredict("j2", 400.0)                                                # no deciles: the estimate is the mean
    assert s.view("j2").pred_len == 400.0 and s.view("j2").pred_p90 == 800.0
    assert s.usable_estimate("j", 5000.0) == 1000.0                        # bounded by max_tokens, as predictions
    for bad in (0.0, -3.0, float("nan"), float("inf")):
        assert s.usable_estimate("j", bad) is None
    assert s.usable_estimate("unknown", 5.0) is None
    s.repredict("j", 1e300)                                                 # bounded however it comes
    assert s.view("j").pred_len == 1000.0
    s.track(JobFacts(job_id="p", priority=0, created=1.0, prompt_len=30, max_tokens=1000, pred_len=50.0,
                     pred_p90=150.0, predicted=False))
    s.repredict("p", 80.0)                                                  # no prompt prediction: it becomes one
    assert s.view("p").predicted and s.view("p").pred_len == 80.0


def test_a_job_parked_after_its_first_token_is_not_running_nor_counted_as_preempted():
    from services.common.preempt_mode import PreemptMode

    s = state_with("w1", "w2")
    s.track(facts("a", prompt_len=30))
    s.placed("a", "w1", park=True)
    assert s.parking_on("a", "w1") and s.workers["w1"].reserved_blocks == 2
    snap = s.snapshot(0.0, [])
    assert snap.workers[0].running == () and snap.workers[0].parking == 1          # no decode slot taken
    s.set_generated("a", 1)
    s.preempted("a", "w1", PreemptMode.PARK, counted=False)                          # parked as asked
    v = s.view("a")
    assert (v.kv_on, v.parked, v.preemptions) == ("w1", True, 0)
    s.load_report("w1", used_blocks=2, draining=False)
    assert s.snapshot(0.0, ["a"]).workers[0].parked_blocks == 2                      # 30 + 1 + 1 tokens
    s.placed("a", "w1")                                                              # resumed where its KV is
    assert s.workers["w1"].reserved_blocks == 0 and s.view("a").kv_on == ""
    s.preempted("a", "w1", PreemptMode.PARK)                                         # a preemption by parking
    assert s.view("a").preemptions == 1 and s.workers["w1"].parked == {"a"}
    assert s.placed("a", "w2") == "w1"                                               # moved: w1's KV must go
    assert s.workers["w1"].parked == set() and s.workers["w2"].reserved_blocks == 2


def test_parked_kv_the_worker_dropped_is_no_longer_counted_or_preferred():
    from services.common.preempt_mode import PreemptMode

    s = state_with("w1")
    s.track(facts("a", prompt_len=30))
    s.placed("a", "w1")
    s.set_generated("a", 3)
    s.preempted("a", "w1", PreemptMode.PARK)
    assert s.snapshot(0.0, ["a"]).workers[0].parked_blocks == 3
    s.kv_dropped("a", "w2")                                          # about another worker: ignored
    assert s.view("a").parked
    s.kv_dropped("a", "w1")
    v = s.view("a")
    assert (v.kv_on, v.parked) == ("", False) and s.snapshot(0.0, ["a"]).workers[0].parked_blocks == 0


def test_a_job_back_without_a_first_token_keeps_its_arrival_place_for_prefill_early():
    s = state_with("w1")
    for i, j in enumerate("abc"):
        s.track(JobFacts(job_id=j, priority=0, created=float(i), prompt_len=10, max_tokens=100, pred_len=10.0,
                         pred_p90=20.0, predicted=True))
    s.placed("a", "w1")
    assert [v.job_id for v in s.snapshot(0.0, []).fresh] == ["b", "c"]
    s.left_worker("a", "w1")                                         # its worker was lost before its first token
    assert [v.job_id for v in s.snapshot(0.0, []).fresh] == ["a", "b", "c"]


def test_prefill_early_sees_a_higher_class_first_however_many_older_jobs_of_a_lower_one_wait():
    """Regression (session 25 review): jobs without a first token were listed by arrival alone and a snapshot shows
    the first `fresh_limit`: a high-priority job behind that many older low-priority ones was never prefilled early."""
    s = state_with("w1")
    for i in range(300):
        s.track(JobFacts(job_id=f"low{i}", priority=0, created=float(i), prompt_len=10, max_tokens=100,
                         pred_len=10.0, pred_p90=20.0, predicted=True))
    s.track(JobFacts(job_id="high", priority=5, created=400.0, prompt_len=10, max_tokens=100, pred_len=10.0,
                     pred_p90=20.0, predicted=True))
    fresh = [v.job_id for v in s.snapshot(500.0, [], fresh_limit=256).fresh]
    assert fresh[:3] == ["high", "low0", "low1"] and len(fresh) == 256
    s.set_generated("high", 1)                                       # its first token: no longer fresh
    assert [v.job_id for v in s.snapshot(500.0, [], fresh_limit=2).fresh] == ["low0", "low1"]
    s.forget("low0")
    assert [v.job_id for v in s.snapshot(500.0, [], fresh_limit=2).fresh] == ["low1", "low2"]


def test_a_request_that_takes_an_ended_jobs_id_is_not_made_due_by_the_old_jobs_arrival():
    # review of session 30: the old job's entry stayed in the due-heap after it ended, and when it came up the new
    # job under that id was marked due at once, going by arrival ahead of jobs not due yet
    s: LiveState = LiveState(due_after_s=10.0)
    s.track(JobFacts(job_id="t/r", priority=0, created=0.0, prompt_len=10, max_tokens=100, pred_len=10.0,
                     pred_p90=20.0, predicted=True))
    s.forget("t/r")
    s.track(JobFacts(job_id="t/r", priority=0, created=8.0, prompt_len=10, max_tokens=100, pred_len=10.0,
                     pred_p90=20.0, predicted=True))
    assert s.become_due(11.0) == [] and not s.is_due("t/r")
    assert s.become_due(18.5) == ["t/r"] and s.is_due("t/r")


def test_jobs_become_due_once_they_have_waited_due_after_s_and_only_waiting_ones_are_rescored():
    s: LiveState = LiveState(due_after_s=10.0)
    s.add_worker(WorkerState("w1", block_size=16, num_blocks=10, max_batch=2))
    for i, j in enumerate("abc"):
        s.track(JobFacts(job_id=j, priority=0, created=float(i), prompt_len=10, max_tokens=100, pred_len=10.0,
                         pred_p90=20.0, predicted=True))
    s.placed("a", "w1")
    assert s.become_due(9.5) == [] and not s.view("b").due
    assert s.become_due(11.0) == ["b"]          # a came first but runs: due from its next time in the queue
    assert s.view("a", running=True).due and s.requeued_view("a", "w1", None, counted=False).due
    assert s.view("b").due and s.is_due("b")
    s.not_due_yet(["b"], 11.0)                  # its new score did not reach the queue (Redis failed): unmarked,
    assert not s.view("b").due                  # and named again next time
    assert s.become_due(11.5) == ["b"]
    assert s.view("b").due and not s.view("c").due
    s.forget("c")
    assert s.become_due(100.0) == [] and s.become_due(200.0) == []            # each job once; an ended one never
    # a job a predecessor queued, known here only by its id and arrival, is named once it is due
    s.expect_queued("old", 50.0)
    assert s.become_due(55.0) == [] and s.become_due(61.0) == ["old"] and s.become_due(500.0) == []
    off: LiveState = LiveState()
    off.track(JobFacts(job_id="x", priority=0, created=0.0, prompt_len=10, max_tokens=100, pred_len=10.0,
                       pred_p90=20.0, predicted=True))
    assert off.become_due(1e9) == [] and not off.view("x").due              # 0: never due, nothing kept for it


def test_the_view_a_requeued_job_is_scored_by_is_the_one_it_will_have():
    from services.common.preempt_mode import PreemptMode

    s = state_with("w1")
    s.track(facts("a"))
    s.set_generated("a", 4)
    s.placed("a", "w1")
    s.left_worker("a", "w1")
    view = s.requeued_view("a", "w1", PreemptMode.PARK, counted=True)
    s.preempted("a", "w1", PreemptMode.PARK, counted=True)          # what the dispatcher records once Redis has it
    assert view == s.view("a") and (view.kv_on, view.parked, view.preemptions, view.running) == ("w1", True, 1, False)
    lost = s.requeued_view("a", "w1", None, counted=False)          # dropped with its worker: no KV, no count
    assert (lost.kv_on, lost.parked, lost.preemptions) == ("", False, 1)


def test_mean_wait_is_jobs_waiting_over_the_rate_they_get_slots():
    s = state_with("w1")
    for j in "abcdefgh":
        s.track(facts(j))
    assert s.snapshot(100.0, []).mean_wait_s == 0.0        # no history yet
    s.placed("a", "w1")
    s.placed("b", "w1")
    s.placed("c", "w1", park=True)                         # sent to be parked: not a slot, and not waiting either
    assert s.waiting() == 5
    assert s.snapshot(104.0, []).mean_wait_s == 5 * 4.0 / 2   # 5 waiting, 2 slots given in 4 s
    assert s.snapshot(110.0, []).mean_wait_s == 5 * 10.0 / 2
    # nothing got a slot for a whole window: the wait is the window times the jobs waiting, not infinite, and a
    # gap between snapshots longer than the window counts as the window
    s2 = state_with("w1")
    s2.track(facts("x"))
    s2.snapshot(100.0, [])
    assert s2.snapshot(130.0, []).mean_wait_s == 1 * 20.0
    # old history leaves the window: only the last WAIT_WINDOW_S count
    for t in range(131, 180):
        s2.snapshot(float(t), [])
    assert 20.0 <= s2.snapshot(180.0, []).mean_wait_s <= 20.25
    # the clock went back: start over rather than count a negative span
    assert s2.snapshot(90.0, []).mean_wait_s == 1 * 20.0


def test_a_failure_shared_by_jobs_none_suspect_charges_none_and_makes_them_suspects():
    """A request that breaks every step it decodes in looks, to its worker, like every job of those steps. The
    first shared failure charges nobody; the jobs become suspects until each has decoded SUSPECT_CLEAR_TOKENS; the
    next failure holds one suspect (they run apart), which alone is charged."""
    from services.scheduler.live_state import SUSPECT_CLEAR_TOKENS
    s = state_with("w1")
    for j in ("a", "b", "p"):
        s.track(facts(j))
        s.set_generated(j, 5)
    assert s.blame(["a"]) == {"a"}                          # one job named: it is charged, as before
    assert s.blame(["a", "b", "p", "gone"]) == set()        # several and none suspect: none charged
    assert all(s.view(j).suspect for j in ("a", "b", "p"))
    s.set_generated("a", 5 + SUSPECT_CLEAR_TOKENS - 1)
    assert s.view("a").suspect
    s.set_generated("a", 5 + SUSPECT_CLEAR_TOKENS)          # decoded past the point: cleared
    assert not s.view("a").suspect
    s.track(facts("n"))
    assert s.blame(["p", "n"]) == {"p"}                      # the suspect in the step is charged, not the others
    assert not s.view("n").suspect
    assert s.blame([]) == set()                              # a failure in planning: nobody


def test_a_failure_with_a_suspect_beside_newcomers_is_charged_to_the_suspect():
    """A suspect that has sampled on its worker is not new there: when newcomers share the step that fails, the
    worker charges them. The suspect is charged, and the newcomers become suspects instead (either may be the cause)."""
    s = state_with("w1")
    for j in ("s", "x", "n"):
        s.track(facts(j))
        s.set_generated(j, 5)
    assert s.blame(["s", "x"]) == set()                      # both suspects now
    s.set_generated("x", 100)                                # x decoded on: cleared
    assert s.blame(["n"], in_step=["s", "n"]) == {"s"}
    assert s.view("n").suspect and not s.view("x").suspect
    # a suspect only waiting on that worker was in no step: the newcomer that broke its first step is charged
    # (review: the suspect was charged for it)
    s.track(facts("m"))
    assert s.blame(["m"], in_step=["m"]) == {"m"}


def test_a_job_sent_to_park_reserves_room_for_its_early_tokens_until_the_load_report():
    """Review of session 27: the policy's prefill-early check counted the early tokens, but the placement reserved
    the prompt and one token, so the ticks before the worker's next load report saw that room as free and could
    fill it. 30 + 32 tokens in blocks of 16: 4 blocks (2 for the prompt alone); a job allowed 8 tokens: 3."""
    s = state_with("w1")
    s.track(facts("a", prompt_len=30))
    s.placed("a", "w1", park=True, early_tokens=32)
    assert s.workers["w1"].reserved_blocks == 4
    s.track(facts("b", prompt_len=30, max_tokens=8))
    s.placed("b", "w1", park=True, early_tokens=32)
    assert s.workers["w1"].reserved_blocks == 4 + 3


def test_a_preemption_order_never_answered_is_void_once_the_job_is_placed_again():
    """Review of session 27: a preemption order the worker never answers (the job already parked or swapped there)
    left the job in `preempting` for good; a later preemption for room then marked its next real order's answer as
    counted already, and one loss went uncounted. Placing the job again clears both."""
    s = state_with("w1")
    s.track(facts("a"))
    s.placed("a", "w1")
    s.preempt_sent("a", "w1")
    s.recomputed("a", "w1")
    assert s.loss_counted("a", "w1")
    s.placed("a", "w1")
    assert not s.loss_counted("a", "w1") and "a" not in s.workers["w1"].preempting
    s.preempt_sent("a", "w1")
    s.forget("a")
    assert "a" not in s.workers["w1"].preempting and "a" not in s.workers["w1"].counted_preempting
