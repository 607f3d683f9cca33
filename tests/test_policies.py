"""Policies are pure functions of a snapshot: tested without Redis, gRPC or a model."""
from dataclasses import replace

import pytest

from services.scheduler.exec_time import ExecTimeModel, expected_remaining_tokens
from services.scheduler.policies import make_policy
from services.scheduler.policies.base import JobView, Plan, Snapshot, WorkerView

COST = ExecTimeModel()


def job(jid, pred, created=0.0, priority=0, generated=0, running=False, max_tokens=4096, kv_on="",
        predicted=True, preemptions=0, prompt_len=20, suspect=False):
    return JobView(job_id=jid, priority=priority, created=1.7e9 + created, prompt_len=prompt_len, max_tokens=max_tokens,
                   pred_len=pred, pred_p90=pred * 2, predicted=predicted, generated=generated, running=running,
                   kv_on=kv_on, preemptions=preemptions, suspect=suspect)


def worker(wid="w", slots=1, running=(), free_blocks=100, preempting=False):
    return WorkerView(worker_id=wid, max_batch=slots, free_blocks=free_blocks, block_size=16,
                      running=tuple(running), preempting=preempting)


def ordered(policy_name, jobs):
    policy = make_policy(policy_name)
    return [j.job_id for j in sorted(jobs, key=lambda j: policy.queue_score(j, COST))]


def test_fcfs_orders_by_arrival_and_alise_and_sjf_by_predicted_work():
    jobs = [job("long", 500, created=0), job("short", 5, created=1), job("mid", 50, created=2)]
    assert ordered("fcfs", jobs) == ["long", "short", "mid"]
    assert ordered("alise", jobs) == ["short", "mid", "long"]
    assert ordered("sjf", jobs) == ["short", "mid", "long"]
    # unpredicted jobs all carry the same prior: among them, arrival order; against predicted ones, the prior's work
    prior = [job("b", 128, created=2, predicted=False), job("a", 128, created=1, predicted=False)]
    assert ordered("sjf", prior) == ["a", "b"]
    assert ordered("sjf", prior + [job("short", 5, created=3)])[0] == "short"   # regression: prior jobs went first


def test_priority_class_outranks_predicted_work():
    jobs = [job("short-low", 5, priority=0), job("long-high", 500, priority=5)]
    assert ordered("alise", jobs) == ["long-high", "short-low"]
    assert ordered("priority", [job("a", 5, created=0), job("b", 5, created=1, priority=1)]) == ["b", "a"]


def test_aging_lets_an_old_long_job_overtake_new_short_ones():
    old_long = job("old-long", 100, created=0)
    new_short = job("new-short", 5, created=10_000)
    assert ordered("alise", [old_long, new_short]) == ["old-long", "new-short"]


@pytest.mark.parametrize("name", ["alise", "sjf"])
def test_a_due_job_goes_first_in_its_class_by_arrival(name):
    long_due = job("long-due", 5000, created=0)._replace(due=True)
    later_due = job("later-due", 1, created=5)._replace(due=True)
    short = job("short", 1, created=10)
    high = job("high", 5000, created=20, priority=1)
    assert ordered(name, [short, later_due, high, long_due]) == ["high", "long-due", "later-due", "short"]


def test_a_due_job_is_never_preempted_for_one_that_is_not():
    policy = make_policy("alise")
    running = job("long", 3000, generated=10, running=True)
    snap = Snapshot(1.7e9, (job("short", 5),), (worker(running=[running]),))
    assert policy.plan(snap, COST).preempt == (("long", "w"),)
    due = replace(snap, workers=(worker(running=[running._replace(due=True)]),))
    assert policy.plan(due, COST).preempt == ()


def test_remaining_tokens_past_the_prediction():
    assert expected_remaining_tokens(100, 200, 10, 1000) == 90
    assert expected_remaining_tokens(100, 200, 150, 1000) == 50     # past the mean: expect p90
    assert expected_remaining_tokens(100, 200, 300, 1000) == 300    # past p90: as long again
    assert expected_remaining_tokens(100, 200, 300, 310) == 10      # never beyond max_tokens


def test_alise_preempts_the_long_running_job_for_a_much_shorter_one():
    running = job("long", 1000, generated=10, running=True)
    snap = Snapshot(now=0, queued=(job("short", 5),), workers=(worker(running=[running]),))
    plan = make_policy("alise").plan(snap, COST)
    assert plan.assign == () and plan.preempt == (("long", "w"),)
    assert make_policy("fcfs").plan(snap, COST).preempt == ()


def test_alise_does_not_preempt_for_similar_work_or_higher_priority_or_twice():
    policy = make_policy("alise")
    similar = Snapshot(0, (job("b", 400),), (worker(running=[job("a", 500, running=True)]),))
    assert policy.plan(similar, COST).preempt == ()
    higher = Snapshot(0, (job("b", 5),), (worker(running=[job("a", 900, priority=1, running=True)]),))
    assert policy.plan(higher, COST).preempt == ()
    busy = Snapshot(0, (job("b", 5),), (worker(running=[job("a", 900, running=True)], preempting=True),))
    assert policy.plan(busy, COST).preempt == ()


@pytest.mark.parametrize("mode", ["recompute", "park"])
def test_alise_never_preempts_a_job_that_aging_would_put_straight_back_in_the_freed_slot(mode):
    """Regression (session 25 review): the victim test compared remaining seconds only. A victim that arrived long
    before the waiting job still ranks ahead of it once requeued (aging), so it took the freed slot straight back:
    a preemption spent, and with recompute a recompute paid, while the waiting job still waited."""
    policy = make_policy("alise", preempt_mode=mode)
    old = job("old", 3000, created=0, generated=10, running=True)
    later = 3 * policy.aging_s                       # by then `old`'s work counts e^3 = 20x less (aging)
    young = job("young", 300, created=later)         # 10x shorter, but that much younger: aging ranks `old` first
    snap = Snapshot(1.7e9 + later, (young,), (worker(running=[old]),))
    assert policy.queue_score(policy.requeued(old, snap.workers[0]), COST) < policy.queue_score(young, COST)
    assert policy.plan(snap, COST).preempt == ()
    # the same two jobs arriving together: the short one ranks first once the long one is back, so it pays
    together = Snapshot(1.7e9 + later, (young._replace(created=old.created),), snap.workers)
    assert policy.plan(together, COST).preempt == (("old", "w"),)


def test_alise_preempts_only_where_the_freed_slot_can_take_the_waiting_job():
    """Regression (session 25 review): the victim was chosen without asking whether the waiting job could use the
    slot: a worker whose context is too short for it, or whose KV would still be too full, preempted for nothing."""
    policy = make_policy("alise")
    running = job("long", 1000, generated=10, running=True)
    waiting = job("short", 5, prompt_len=3000)                     # 188 blocks of 16
    short_context = replace(worker(running=[running]), max_model_len=2048)
    assert policy.plan(Snapshot(1.7e9, (waiting,), (short_context,)), COST).preempt == ()
    full = worker(running=[running], free_blocks=10)                # 10 free + the victim's 2: not 188
    assert policy.plan(Snapshot(1.7e9, (waiting,), (full,)), COST).preempt == ()
    roomy = worker(running=[running], free_blocks=200)
    assert policy.plan(Snapshot(1.7e9, (waiting,), (roomy,)), COST).preempt == (("long", "w"),)


def test_a_waiting_job_with_no_victim_does_not_end_the_search_for_those_behind_it():
    """Regression (session 25 review): the search stopped at the first waiting job that found no victim, taking the
    jobs behind it to be longer; with aging a job further down (that came later) may be far shorter."""
    policy = make_policy("alise")
    running = job("long", 400, generated=10, running=True)
    ahead = job("old-mid", 300, created=-200)         # ranked first (it came 200 s earlier), not 4x shorter
    behind = job("new-short", 5)
    snap = Snapshot(1.7e9, (ahead, behind), (worker(running=[running]),))
    assert policy.plan(snap, COST).preempt == (("long", "w"),)


def test_alise_never_preempts_on_prior_guesses():
    """Regression (issue 8.6): without predictions the queue is in arrival order, yet preemption compared
    prior-based times, so the same long jobs were preempted again and again."""
    policy = make_policy("alise")
    for waiting_predicted, running_predicted in ((False, False), (False, True), (True, False)):
        running = job("long", 1000, generated=10, running=True, predicted=running_predicted)
        snap = Snapshot(0, (job("short", 5, predicted=waiting_predicted),), (worker(running=[running]),))
        assert policy.plan(snap, COST).preempt == ()


@pytest.mark.parametrize("name", ["fcfs", "priority", "sjf", "alise", "mlfq"])
def test_a_job_waiting_for_kv_room_is_not_overtaken_on_its_worker_by_jobs_behind_it(name):
    """Regression (session 25 review): a job that found too few free blocks was passed over and the jobs behind it
    were placed, taking each block that freed up: a long prompt (or a higher class) could wait for good."""
    head = job("head", 5, priority=5, prompt_len=3000)                 # 188 blocks; 100 free of 400
    behind = job("behind", 5, created=1, prompt_len=100)
    w = replace(worker("w", slots=4, free_blocks=100), num_blocks=400)
    assert make_policy(name).plan(Snapshot(1.7e9 + 2, (head, behind), (w,)), COST).assign == ()
    # another worker still takes the jobs behind it; the one held is the one with the most room
    w2 = replace(worker("w2", slots=4, free_blocks=50), num_blocks=400)
    assert make_policy(name).plan(Snapshot(1.7e9 + 2, (head, behind), (w, w2)), COST).assign == (("behind", "w2"),)
    # a worker whose whole pool could never hold the job is not held for it
    small = replace(w, num_blocks=150)
    assert make_policy(name).plan(Snapshot(1.7e9 + 2, (head, behind), (small,)), COST).assign == (("behind", "w"),)


def test_a_worker_held_for_a_job_is_neither_preempted_on_nor_parked_on_for_the_jobs_behind_it():
    """Review of the hold (session 25): a job left waiting only because its worker was held still found a victim
    there, and prefill-early parked jobs there: each slot or block so freed went to someone else than the job
    holding the worker, and parked KV delayed it."""
    head = job("head", 5, priority=5, prompt_len=3000)                 # 188 blocks; 100 free of 400
    behind = job("behind", 5, created=1, prompt_len=20)
    w = replace(worker("w", slots=4, free_blocks=100, running=[job("long", 1000, generated=10, running=True)]),
                num_blocks=400)
    plan = make_policy("alise", park_kv_share=0.9).plan(Snapshot(1.7e9 + 2, (head, behind), (w,), fresh=(behind,)),
                                                        COST)
    assert plan == Plan()
    # unheld (the head gone), the same worker takes it at once
    assert make_policy("alise").plan(Snapshot(1.7e9 + 2, (behind,), (w,)), COST).assign == (("behind", "w"),)


def test_placement_respects_slots_blocks_and_swap_affinity():
    snap = Snapshot(0, (job("a", 5), job("b", 5, kv_on="w2"), job("c", 5)),
                    (worker("w1", slots=2), worker("w2", slots=1), worker("w3", slots=1, free_blocks=1)))
    plan = make_policy("fcfs").plan(snap, COST)
    assert dict(plan.assign) == {"a": "w1", "b": "w2", "c": "w1"}


@pytest.mark.parametrize("name", ["fcfs", "priority", "sjf", "alise", "mlfq"])
def test_no_policy_places_a_suspect_beside_another(name):
    """Suspects (jobs of a failed step no one could be blamed for) run apart, so that a step failing again holds one
    job to blame; other jobs are placed around them as usual."""
    queued = (job("s1", 5, suspect=True), job("s2", 6, created=1, suspect=True), job("n", 7, created=2),
              job("s3", 8, created=3, suspect=True))
    snap = Snapshot(0, queued, (worker("w1", slots=4), worker("w2", slots=4)))
    assign = make_policy(name).plan(snap, COST).assign
    on = {jid: wid for jid, wid in assign}
    assert set(on) == {"s1", "s2", "n"} and on["s1"] != on["s2"]        # s3 waits: both workers hold a suspect
    busy = Snapshot(0, queued[1:], (worker("w1", slots=4, running=[job("r", 5, running=True, suspect=True)]),))
    assert make_policy(name).plan(busy, COST).assign == (("n", "w1"),)


def test_a_suspect_with_no_worker_to_preempt_on_does_not_stop_the_search_for_the_jobs_behind_it():
    running = [job("long-s", 1000, generated=10, running=True, suspect=True),
               job("long", 1000, generated=10, running=True)]
    queued = (job("short-s", 5, suspect=True), job("short", 5, created=1))
    snap = Snapshot(0, queued, (worker(slots=2, running=running),))
    preempt = make_policy("alise").plan(snap, COST).preempt     # short-s finds none (w holds a suspect): short does
    assert len(preempt) == 1 and preempt[0][1] == "w"


def test_a_job_no_serving_worker_can_hold_is_placed_for_the_worker_to_refuse():
    """Review, session 22: where a worker's context is capped by its KV pool, a job longer than every serving
    worker's context needs more blocks than any pool too, and was never placed (queued for good). It is placed, and
    the worker's refusal fails it; a job some worker holds still goes only to one that holds it."""
    capped = WorkerView(worker_id="w", max_batch=4, free_blocks=500, block_size=16, num_blocks=500, max_model_len=8000)
    too_long = job("long", 10, prompt_len=9000)
    assert make_policy("fcfs").plan(Snapshot(0, (too_long,), (capped,)), COST).assign == (("long", "w"),)
    big = replace(capped, worker_id="big", free_blocks=1000, num_blocks=1000, max_model_len=16000)
    assert make_policy("fcfs").plan(Snapshot(0, (too_long,), (capped, big)), COST).assign == (("long", "big"),)


def test_no_preemption_frees_a_slot_for_a_suspect_where_it_could_not_run():
    long_suspect = job("long", 1000, generated=10, running=True, suspect=True)
    waiting = job("short", 5, suspect=True)
    beside = Snapshot(0, (waiting,), (worker(slots=2, running=[long_suspect, job("x", 1000, generated=10, running=True)]),))
    assert make_policy("alise").plan(beside, COST).preempt == ()
    assert make_policy("mlfq").plan(beside, COST).preempt == ()
    alone = Snapshot(0, (waiting,), (worker(running=[job("long", 1000, generated=10, running=True)]),))
    assert make_policy("alise").plan(alone, COST).preempt == (("long", "w"),)   # a worker with no suspect: as usual
    w = WorkerView(worker_id="w", max_batch=1, free_blocks=90, block_size=16, num_blocks=100,
                   running=(job("r", 50, running=True),))
    fresh = (waiting, job("b", 6))
    early = make_policy("alise", park_kv_share=0.5).plan(Snapshot(0, fresh, (w,), fresh=fresh), COST).prefill_early
    assert early == (("b", "w"),)                                     # nor is a suspect prefilled early


def test_remaining_tokens_from_deciles():
    deciles = (10, 20, 30, 40, 50, 60, 70, 80, 90, 100)
    assert expected_remaining_tokens(0, 0, 0, 1000, deciles) == 55            # the mean of the deciles
    assert expected_remaining_tokens(0, 0, 75, 1000, deciles) == 15           # mean excess of 80, 90, 100
    assert expected_remaining_tokens(0, 0, 150, 1000, deciles) == 150         # beyond all of them


def test_alise_preempts_at_most_max_preemptions_times():
    snap = lambda n: Snapshot(0, (job("short", 5),), (worker(running=[job("long", 1000, generated=10, running=True,
                                                                          preemptions=n)]),))
    assert make_policy("alise", max_preemptions=2).plan(snap(1), COST).preempt == (("long", "w"),)
    assert make_policy("alise", max_preemptions=2).plan(snap(2), COST).preempt == ()
    assert make_policy("alise", max_preemptions=0).plan(snap(0), COST).preempt == ()


def test_alise_does_not_preempt_a_job_near_its_end():
    # predicted 40 tokens, 30 generated: 10 left, under near_end_tokens (16), although 4x the waiting job's work
    near_end = job("long", 40, generated=30, running=True, prompt_len=5)
    snap = Snapshot(0, (job("short", 1, prompt_len=1),), (worker(running=[near_end]),))
    assert make_policy("alise").plan(snap, COST).preempt == ()
    assert make_policy("alise", near_end_tokens=4).plan(snap, COST).preempt == (("long", "w"),)


def test_alise_preempts_only_when_the_wait_saved_pays_for_the_recompute():
    # a 3000-token context costs 3 s to recompute; the worker's other job frees a slot in ~0.3 s anyway
    victim = job("long", 2000, generated=10, running=True, prompt_len=3000)
    soon_done = job("almost", 10, generated=0, running=True)
    waiting = (job("short", 5),)
    crowded = Snapshot(0, waiting, (worker(slots=2, running=[victim, soon_done]),))
    assert make_policy("alise").plan(crowded, COST).preempt == ()
    # alone on its worker, the long job would hold the slot for ~60 s: that wait is worth a 3 s recompute
    alone = Snapshot(0, waiting, (worker(slots=1, running=[victim]),))
    assert make_policy("alise").plan(alone, COST).preempt == (("long", "w"),)


def test_alise_preempts_by_parking_without_the_recompute_gate():
    # the crowded case above: parking keeps the victim's KV, so nothing is recomputed and the gate does not apply
    victim = job("long", 2000, generated=10, running=True, prompt_len=3000)
    crowded = Snapshot(0, (job("short", 5),), (worker(slots=2, running=[victim, job("almost", 10, running=True)]),))
    assert make_policy("alise", preempt_mode="park").plan(crowded, COST).preempt == (("long", "w"),)


def test_a_park_that_would_cost_a_recompute_must_pay_like_one():
    # the waiting job needs 2 blocks and 1 is free: the worker would drop parked KV (the victim's) for it
    victim = job("long", 2000, generated=10, running=True, prompt_len=3000)
    crowded = Snapshot(0, (job("short", 5),), (worker(slots=2, running=[victim, job("almost", 10, running=True)],
                                                      free_blocks=1),))
    assert make_policy("alise", preempt_mode="park").plan(crowded, COST).preempt == ()


def test_alise_prefills_early_only_fresh_jobs_within_the_kv_share_and_the_parking_bound():
    # one slot, taken; 100 blocks of 16, 40 in use. Jobs of 20-token prompts need 2 blocks each.
    w = WorkerView(worker_id="w", max_batch=1, free_blocks=60, block_size=16, num_blocks=100,
                   running=(job("r", 50, running=True),))
    queued = (job("a", 5), job("b", 6, generated=3), job("c", 7, kv_on="w"), job("d", 8), job("e", 9),
              job("f", 10, prompt_len=2000))
    snap = Snapshot(0, queued, (w,), fresh=queued)
    plan = make_policy("alise", park_kv_share=0.5).plan(snap, COST)
    # b has had its first token, c waits with its KV kept; 40 + 2 + 2 blocks stay under 50; f needs 126
    assert plan.assign == () and plan.prefill_early == (("a", "w"), ("d", "w"), ("e", "w"))
    assert make_policy("alise", park_kv_share=0.43).plan(snap, COST).prefill_early == (("a", "w"),)
    assert make_policy("alise", park_kv_share=0.9, max_parking=2).plan(
        replace(snap, workers=(replace(w, parking=1),)), COST).prefill_early == (("a", "w"),)
    assert make_policy("alise").plan(snap, COST).prefill_early == ()                           # off by default
    assert make_policy("fcfs", park_kv_share=0.5).plan(snap, COST).prefill_early == ()
    # oldest first, whatever the queue's order: the snapshot's `fresh` list decides who is prefilled first
    by_age = replace(snap, fresh=(queued[4], queued[0]))
    assert make_policy("alise", park_kv_share=0.5, max_parking=1).plan(by_age, COST).prefill_early == (("e", "w"),)


def test_alise_prefills_early_only_where_the_early_tokens_fit_too():
    """Regression (session 26 left it): the room check counted the prompt and one token, but a job prefilled early
    decodes its early tokens before it parks, and the worker then found no room for them. 10 blocks of 16 under a
    0.5 share leave 5: a 60-token prompt needs 4 blocks for its first token, 6 with 32 early tokens; a job allowed
    only 8 tokens needs 5."""
    w = WorkerView(worker_id="w", max_batch=1, free_blocks=10, block_size=16, num_blocks=10,
                   running=(job("r", 50, running=True),))
    fresh = (job("a", 9, prompt_len=60),)
    snap = Snapshot(0, fresh, (w,), fresh=fresh)
    early = lambda n, jobs=fresh: make_policy("alise", park_kv_share=0.5, early_tokens=n).plan(
        replace(snap, queued=jobs, fresh=jobs), COST).prefill_early
    assert early(1) == (("a", "w"),)
    assert early(32) == ()
    capped = (job("a", 9, prompt_len=60, max_tokens=8),)
    assert early(32, capped) == (("a", "w"),)
    with pytest.raises(ValueError, match="early_tokens"):
        make_policy("alise", early_tokens=0)


def test_alise_sends_no_more_jobs_to_park_than_the_worker_runs_at_once():
    """Regression (session 27 left it): a worker decodes at most its `early_rows` jobs on their way to park beside
    a full batch; the policy sent up to `max_parking` (32), and the rest waited at the worker with no first token.
    The worker below runs 2 at once and has 1 in flight: one more goes, the next waiting job stays queued."""
    w = WorkerView(worker_id="w", max_batch=1, free_blocks=1000, block_size=16, num_blocks=1000, parking=1,
                   early_rows=2, running=(job("r", 50, running=True),))
    fresh = tuple(job(f"f{k}", 9, created=k) for k in range(3))
    snap = Snapshot(1.7e9 + 5, fresh, (w,), fresh=fresh)
    assert make_policy("alise", park_kv_share=0.9).plan(snap, COST).prefill_early == (("f0", "w"),)
    said_none = replace(snap, workers=(replace(w, early_rows=0),))       # an older worker: max_parking alone
    assert len(make_policy("alise", park_kv_share=0.9).plan(said_none, COST).prefill_early) == 3


def test_alise_prefills_early_only_on_a_worker_whose_context_holds_the_job():
    """Regression (session 25 review): prefill-early chose by KV room alone. A worker with more free KV but a
    shorter context got the long prompt, refused it, and the refusal was charged to the job as a failed step: after
    two it failed, though the other worker could run it."""
    small = WorkerView(worker_id="small", max_batch=1, free_blocks=950, block_size=16, num_blocks=1000,
                       max_model_len=4096, running=(job("r1", 50, running=True),))
    big = WorkerView(worker_id="big", max_batch=1, free_blocks=900, block_size=16, num_blocks=1000,
                     max_model_len=32768, running=(job("r2", 50, running=True),))
    long_prompt, short_prompt = job("long", 9, prompt_len=10_000), job("short", 9, prompt_len=100, created=1)
    snap = Snapshot(1.7e9 + 5, (long_prompt, short_prompt), (small, big), fresh=(long_prompt, short_prompt))
    assert make_policy("alise", park_kv_share=0.9).plan(snap, COST).prefill_early == (("long", "big"),
                                                                                     ("short", "small"))


def test_alise_prefills_early_only_jobs_that_have_waited_park_after_s():
    w = WorkerView(worker_id="w", max_batch=1, free_blocks=90, block_size=16, num_blocks=100,
                   running=(job("r", 50, running=True),))
    fresh = (job("old", 9, created=0.0), job("mid", 8, created=3.0), job("new", 5, created=4.5))   # oldest first
    snap = Snapshot(1.7e9 + 5.0, tuple(sorted(fresh, key=lambda j: j.pred_len)), (w,), fresh=fresh)
    early = lambda after: make_policy("alise", park_kv_share=0.5, park_after_s=after).plan(snap, COST).prefill_early
    assert early(0.0) == (("old", "w"), ("mid", "w"), ("new", "w"))
    assert early(2.0) == (("old", "w"), ("mid", "w"))          # waited 5 and 2 s; "new" only 0.5 s
    assert early(6.0) == ()


def test_alise_park_threshold_follows_the_queues_mean_wait():
    w = WorkerView(worker_id="w", max_batch=1, free_blocks=90, block_size=16, num_blocks=100,
                   running=(job("r", 50, running=True),))
    fresh = (job("old", 9, created=0.0), job("mid", 8, created=3.0), job("new", 5, created=4.5))   # waited 5, 2, 0.5 s
    snap = Snapshot(1.7e9 + 5.0, tuple(sorted(fresh, key=lambda j: j.pred_len)), (w,), fresh=fresh, mean_wait_s=1.5)
    early = lambda factor, after=0.0: make_policy("alise", park_kv_share=0.5, park_wait_factor=factor,
                                                  park_after_s=after).plan(snap, COST).prefill_early
    assert early(0.0) == (("old", "w"), ("mid", "w"), ("new", "w"))   # off
    assert early(1.0) == (("old", "w"), ("mid", "w"))                 # waited over 1.5 s
    assert early(2.0) == (("old", "w"),)                              # over 3 s
    assert early(1.0, after=4.0) == (("old", "w"),)                   # the larger of the two thresholds
    assert make_policy("alise", park_kv_share=0.5, park_wait_factor=1.0).plan(
        replace(snap, mean_wait_s=0.0), COST).prefill_early == early(0.0)   # no wait known yet: every job


def test_alise_sends_at_most_max_parking_jobs_to_be_prefilled_early_at_once():
    w = WorkerView(worker_id="w", max_batch=1, free_blocks=90, block_size=16, num_blocks=100,
                   running=(job("r", 50, running=True),), parking=1)               # one already on its way
    fresh = tuple(job(f"f{i}", 9, created=float(i)) for i in range(4))
    snap = Snapshot(1.7e9 + 5.0, fresh, (w,), fresh=fresh)
    early = lambda n: make_policy("alise", park_kv_share=0.5, max_parking=n).plan(snap, COST).prefill_early
    assert early(32) == tuple((f"f{i}", "w") for i in range(4))
    assert early(3) == (("f0", "w"), ("f1", "w"))                    # 3 in flight at most, one already is
    assert early(1) == ()
    with pytest.raises(ValueError, match="max_parking"):
        make_policy("alise", max_parking=0)


def test_parked_kv_counts_as_room_for_placement():
    # 2 free blocks, 6 parked: a 40-token job (3 blocks) is placed; the worker gives up parked KV for it
    w = WorkerView(worker_id="w", max_batch=2, free_blocks=2, block_size=16, num_blocks=8, parked_blocks=6)
    assert make_policy("fcfs").plan(Snapshot(0, (job("a", 5, prompt_len=40),), (w,)), COST).assign == (("a", "w"),)
    assert make_policy("fcfs").plan(Snapshot(0, (job("a", 5, prompt_len=40),), (replace(w, parked_blocks=0),)),
                                    COST).assign == ()


def test_mlfq_demotes_by_service_had_skips_long_prompts_down_and_ignores_predictions():
    fresh = job("fresh", pred=5000, created=5)                               # its prediction is never read
    served = job("served", pred=5, created=0, generated=100)                 # ~3 s of service: level 3
    long_prompt = job("long-prompt", pred=5, created=1, prompt_len=2000)     # 2 s of prefill: joins at level 3
    later_fresh = job("later-fresh", pred=1, created=6)
    policy = make_policy("mlfq")
    assert [policy.level(j, COST) for j in (fresh, served, long_prompt)] == [0, 3, 3]
    assert ordered("mlfq", [served, later_fresh, long_prompt, fresh]) == ["fresh", "later-fresh", "served",
                                                                         "long-prompt"]
    assert ordered("mlfq", [fresh, job("vip", 5, created=9, generated=500, priority=1)])[0] == "vip"


def test_mlfq_preempts_a_deeper_running_job_for_a_waiting_one_and_bounds_it():
    deep = job("deep", 5, generated=400, running=True)
    plan = make_policy("mlfq").plan(Snapshot(now=1.7e9 + 10, queued=(job("new", 5, created=9),),
                                             workers=(worker(running=[deep]),)), COST)
    assert plan.preempt == (("deep", "w"),) and plan.assign == ()
    for running in (job("same-level", 5, created=1, running=True),          # not deeper: no preemption
                    job("deep", 5, generated=400, running=True, preemptions=2),  # preempted enough
                    job("deep", 5, generated=400, running=True, priority=1)):    # a higher class
        plan = make_policy("mlfq").plan(Snapshot(now=1.7e9 + 10, queued=(job("new", 5, created=9),),
                                                 workers=(worker(running=[running]),)), COST)
        assert plan.preempt == (), running.job_id


def test_make_policy_sets_known_options_and_refuses_unknown_ones():
    assert make_policy("alise", aging_s=7.0, max_preemptions=1).aging_s == 7.0
    assert make_policy("fcfs", aging_s=7.0).name == "fcfs"          # an option of other policies: no effect here
    with pytest.raises(ValueError, match="agng_s"):
        make_policy("alise", agng_s=7.0)                            # misspelt: refused, not silently ignored
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("srtf")


def test_alise_refuses_park_thresholds_that_are_negative_or_not_numbers():
    import pytest

    for bad in ({"park_wait_factor": -1.0}, {"park_wait_factor": float("nan")}, {"park_after_s": float("inf")}):
        with pytest.raises(ValueError):
            make_policy("alise", **bad)


class CountingCost(ExecTimeModel):
    """The default time model, counting how many remaining-time estimates a decision asks for."""
    calls = 0

    def remaining(self, *args, **kwargs):
        CountingCost.calls += 1
        return super().remaining(*args, **kwargs)


def full_workers(n_workers: int, per_worker: int, seed: int = 0) -> tuple[WorkerView, ...]:
    import random

    rng = random.Random(seed)
    return tuple(WorkerView(worker_id=f"w{k}", max_batch=per_worker, free_blocks=0, block_size=16, running=tuple(
        job(f"r{k}-{i}", rng.choice([5, 50, 500, 5000]), created=rng.random(), generated=rng.randrange(40),
            running=True, priority=rng.choice([0, 0, 1]), preemptions=rng.choice([0, 0, 1, 2]),
            predicted=rng.random() > 0.1, prompt_len=rng.randrange(1, 400))
        for i in range(per_worker))) for k in range(n_workers))


def reference_victims(policy, snap, cost):
    """The plain search the policy must agree with: every running job of every open worker, afresh for each waiting
    job, keeping the longest that qualifies (the first of equals)."""
    from services.scheduler.policies.base import Placement, preempt_for_waiting

    placement = Placement.greedy(snap)

    def victim(waiting, workers):
        best, best_s = None, policy.preempt_ratio * waiting.remaining_seconds(cost)
        for w in workers:
            left = [(j.remaining_seconds(cost), j) for j in w.running]
            saving = min((s for s, _ in left), default=0.0)
            for s, j in left:
                if (s > best_s and w.holds_context(waiting)
                        and placement.blocks_left[w.worker_id] + w.blocks_needed(j) >= w.blocks_needed(waiting)
                        and j.predicted and j.priority <= waiting.priority and j.preemptions < policy.max_preemptions
                        and j.remaining_tokens >= policy.near_end_tokens
                        and saving > policy.preempt_margin * len(left) * cost.preemption(j.prompt_len + j.generated)
                        and policy.queue_score(policy.requeued(j, w), cost) > policy.queue_score(waiting, cost)):
                    best, best_s = (j, w), s
        return best

    return preempt_for_waiting(placement, list(snap.workers), victim, skip=lambda waiting: not waiting.predicted)


@pytest.mark.parametrize("seed", range(20))
def test_alise_picks_the_same_victims_as_the_plain_search(seed):
    import random

    rng = random.Random(seed)
    workers = full_workers(rng.randrange(1, 5), rng.randrange(1, 12), seed)
    waiting = tuple(sorted((job(f"q{i}", rng.choice([1, 2, 3, 40]), created=i, priority=rng.choice([0, 1]),
                                predicted=rng.random() > 0.2) for i in range(rng.randrange(1, 6))),
                           key=lambda j: j.pred_len))
    policy = make_policy("alise", preempt_margin=rng.choice([0.0, 2.0]))
    snap = Snapshot(1.7e9 + 10, waiting, workers)
    assert policy.plan(snap, COST).preempt == reference_victims(policy, snap, COST)


def test_an_alise_decision_estimates_each_running_job_once_however_many_workers_are_full():
    # 8 full workers x 64 jobs, short jobs waiting: the search used to estimate every running job again for each
    # waiting job it tried (8 + 1 times here), 62 ms a decision at 8 x 512 jobs
    snap = Snapshot(1.7e9 + 10, tuple(job(f"q{i}", 1, created=i) for i in range(10)), full_workers(8, 64))
    CountingCost.calls = 0
    plan = make_policy("alise", preempt_margin=0.0).plan(snap, CountingCost())
    assert len(plan.preempt) == 8                                 # one per worker
    # and each running job's queue score once preempted (which must rank behind the waiting job) at most once
    assert CountingCost.calls <= 2 * 8 * 64 + 10, CountingCost.calls


def test_the_decision_cost_bench_times_full_workers_and_a_queue(capsys):
    from bench.decision_cost import loaded_state, main

    state, queue = loaded_state(workers=2, running=8, queued=4)
    snap = state.snapshot(1100.0, queue)
    assert [len(w.running) for w in snap.workers] == [8, 8] and len(snap.queued) == 4
    main(["--workers", "1", "2", "--running", "8", "--queued", "4", "--repeats", "1", "--policies", "fcfs", "alise"])
    out = capsys.readouterr().out
    assert "| 1 | 8 |" in out and "| 2 | 16 |" in out and "alise plan ms" in out


@pytest.mark.parametrize("seed", range(10))
def test_mlfq_picks_the_same_victims_as_the_plain_search(seed):
    import random

    from services.scheduler.policies.base import Placement, preempt_for_waiting

    rng = random.Random(seed)
    policy = make_policy("mlfq", base_quantum_s=0.01)
    snap = Snapshot(1.7e9 + 10, tuple(job(f"q{i}", 5, created=i, priority=rng.choice([0, 1]))
                                      for i in range(rng.randrange(1, 6))),
                    full_workers(rng.randrange(1, 5), rng.randrange(1, 12), seed))

    def deepest(waiting, workers):               # every running job of every open worker, afresh each time
        best, best_level = None, policy.level(waiting, COST)
        for w in workers:
            for j in w.running:
                if (lvl := policy.level(j, COST)) > best_level and j.priority <= waiting.priority \
                        and j.preemptions < policy.max_preemptions:
                    best, best_level = (j, w), lvl
        return best

    expected = preempt_for_waiting(Placement.greedy(snap), list(snap.workers), deepest)
    assert policy.plan(snap, COST).preempt == expected
    if seed in (0, 3, 6, 9):                     # clusters that do preempt (checked: the comparison is not all empty)
        assert expected


def test_the_scheduler_and_the_simulator_carry_every_policy_setting_with_the_same_default():
    import dataclasses

    from bench.simulator.cluster import SimConfig
    from services.scheduler.config import SchedulerConfig
    from services.scheduler.policies import POLICY_SETTINGS

    sim = {f.name: f.default for f in dataclasses.fields(SimConfig)}
    live = {f.name: f.default for f in dataclasses.fields(SchedulerConfig)}
    for name in (*POLICY_SETTINGS, "knee_share", "due_after_s"):     # and the live state's own settings
        assert name in sim and name in live, name
        assert sim[name] == live[name], name
    from services.scheduler.policies import POLICIES

    fields = {f.name for cls in POLICIES.values() if dataclasses.is_dataclass(cls) for f in dataclasses.fields(cls)}
    assert set(POLICY_SETTINGS) <= fields                          # each reaches some policy
