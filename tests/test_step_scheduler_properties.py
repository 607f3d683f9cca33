"""The worker's step scheduler under random commands (add, park after the first token, park, resume, abort) and
KV pressure, without a model: a step's last chunk of a sequence samples one token, as the engine does, either at
once or, as the engine's overlapped steps do, collected only after the next step is planned (a token in flight,
`num_pending`; a park ordered meanwhile waits for it, an abort collects it first). Whatever happens (sequences with
and without preemptions left under the scheduler's bound among them), every sequence is in exactly one place, the
blocks in use are exactly the blocks the live sequences hold, and every job runs to its end, leaving the pool
empty."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.worker.block_manager import BlockManager
from services.worker.sequence import Finish, Sampling, Sequence, SeqStatus
from services.worker.step_scheduler import StepScheduler

OPS = st.lists(st.tuples(st.sampled_from(["add", "add_park", "step", "step", "step", "park", "resume", "abort"]),
                         st.integers(0, 1000), st.integers(1, 40), st.integers(1, 12)), max_size=80)


class Harness:
    def __init__(self, num_blocks: int, overlap: bool = False, prefix: bool = False):
        self.overlap = overlap                         # tokens are collected a step later, as the engine's are
        self.in_flight: list[Sequence] = []            # sampled by the last step, not yet collected
        # prefix: with the prefix cache, sequences of one prompt family share blocks, and a step's decode rows are
        # grouped by the blocks they share (group_prefix_rows, by their 4th block: blocks of 2 tokens let prompts this
        # short reach it, so the grouping moves rows in some schedules, not only in none)
        bs = 2 if prefix else 4
        self.blocks = BlockManager(num_blocks=num_blocks, block_size=bs, prefix_caching=prefix)
        # as the engine sizes it: a sequence alone always fits the pool
        self.sched = StepScheduler(self.blocks, max_batch=3, token_budget=16, max_model_len=num_blocks * bs,
                                   early_rows=2,      # early jobs beyond two wait their turn
                                   group_prefix_rows=prefix)
        self.live: dict[str, Sequence] = {}
        self.n = 0

    def add(self, prompt_len: int, max_tokens: int, park: bool, preemptions_left: int | None = None,
            early_tokens: int = 1, family: int = 0) -> None:
        prompt_len = min(prompt_len, self.sched.max_model_len - 1)     # the engine refuses longer ones
        self.n += 1
        # prompts of one family share their blocks through the prefix cache (when it is on)
        seq = Sequence(f"s{self.n}", [1 + family] * prompt_len, Sampling(max_tokens=max_tokens, ignore_eos=True),
                       park_on_sample=park, preemptions_left=preemptions_left,
                       park_at_output=early_tokens if park else 0)
        self.live[seq.job_id] = seq
        self.sched.add(seq)

    def step(self) -> None:
        plan = self.sched.schedule()
        assert len(plan.chunks) <= self.sched.max_rows     # what the decode graphs are captured for
        # a sequence preempted in a step is never also in its plan (its chunk would write blocks it no longer holds)
        assert not {c.seq for c in plan.chunks} & set(plan.preempted)
        # nor one whose token in flight parks it or ends it (its room frees a step later; recomputing it would charge
        # a preemption to a job that parks or ends anyway, and throw its KV away)
        assert not [s for s in plan.preempted if s.num_pending and (s.parks_on_pending
                                                                    or s.reaches_length(self.sched.max_model_len))]
        for seq in plan.evicted:                       # the engine forgets them (the scheduler recomputes them)
            assert not seq.num_pending                 # parked: nothing of it is in flight
            self.drop(seq)
        launched = []
        for c in plan.chunks:
            self.sched.record_computed(c.seq)          # its KV written: full blocks join the prefix cache
            seq = c.seq
            assert seq.num_pending == 0 or c.num_tokens == 1     # a token in flight is fed to the next step alone
            if seq.job_id not in self.live or c.start + c.num_tokens != seq.num_tokens:
                continue
            if self.overlap:                           # its last token's KV is in: it samples one, on the device
                seq.num_pending += 1
                launched.append(seq)
            else:
                self.sample(seq)
        if self.overlap:                               # the step before this one is collected after its launch
            self.settle()
            self.in_flight = launched

    def settle(self) -> None:
        """The step in flight is collected (after the next step's launch, or before an abort or a preemption)."""
        in_flight, self.in_flight = self.in_flight, []
        for seq in in_flight:
            seq.num_pending -= 1
            if self.live.get(seq.job_id) is seq:      # else aborted since it was launched
                self.sample(seq)

    def sample(self, seq: Sequence) -> None:
        seq.output_ids.append(7)
        if len(seq.output_ids) >= seq.sampling.max_tokens or seq.num_tokens >= self.sched.max_model_len:
            self.sched.finish(seq, Finish.LENGTH)
            self.drop(seq)
        elif seq.park_on_sample and len(seq.output_ids) >= seq.park_at_output:
            assert self.sched.park(seq)             # as the engine does once its early tokens are out (or ordered)

    def park(self, seq: Sequence) -> None:
        """The scheduler's preemption by parking, as the engine takes it: once its token in flight is collected
        (Engine.park_when_sampled), else at once after the step in flight (the engine loop's flush)."""
        if not self.sched.park_after_sample(seq):
            self.settle()
            self.sched.park(seq)

    def drop(self, seq: Sequence) -> None:
        self.sched.drop(seq)
        self.live.pop(seq.job_id, None)

    def pick(self, k: int, status: SeqStatus) -> Sequence | None:
        seqs = [s for s in self.live.values() if s.status is status]
        return seqs[k % len(seqs)] if seqs else None

    def check(self) -> None:
        places = [*self.sched.running, *self.sched.parked, *self.sched.waiting]
        assert len(places) == len(set(map(id, places))) and {s.job_id for s in places} == set(self.live)
        assert all(s.status is SeqStatus.PARKED for s in self.sched.parked)
        assert all(s.status is SeqStatus.RUNNING for s in self.sched.running)
        held = {b for s in self.live.values() for b in self.blocks.table(s.job_id)}     # shared blocks count once
        assert self.blocks.num_used == len(held)
        assert all(self.blocks.rows.table(s.job_id) == self.blocks.table(s.job_id)
                   for s in self.live.values() if s.job_id in self.blocks.rows)


@pytest.mark.parametrize("prefix", [False, True], ids=["own-blocks", "shared-prefixes"])
@pytest.mark.parametrize("overlap", [False, True], ids=["sampled-at-once", "tokens-in-flight"])
@settings(max_examples=150, deadline=None)
@given(OPS, st.integers(6, 40))
def test_park_resume_and_eviction_keep_every_block_accounted_for(overlap, prefix, ops, num_blocks):
    h = Harness(num_blocks, overlap, prefix)
    for op, k, prompt_len, max_tokens in ops:
        if op in ("add", "add_park"):
            # preemptions left under the scheduler's bound: none (an older scheduler), 0 or 1; early tokens 1-4
            h.add(prompt_len, max_tokens, park=op == "add_park", preemptions_left=(None, 0, 1)[k % 3],
                  early_tokens=1 + k % 4, family=k % 5 % 3)   # not k % 3: that is the bound
        elif op == "step":
            h.step()
        elif op == "park" and (seq := h.pick(k, SeqStatus.RUNNING)) is not None:
            h.park(seq)
        elif op == "resume" and (seq := h.pick(k, SeqStatus.PARKED)) is not None:
            h.sched.unpark(seq)
        elif op == "abort" and h.live:
            h.settle()                                 # the engine collects the step in flight first...
            if h.live:                                 # ...which may have ended the job
                h.drop(list(h.live.values())[k % len(h.live)])
        h.check()
    for seq in [s for s in h.live.values() if s.status is SeqStatus.PARKED]:
        h.sched.unpark(seq)                            # the scheduler resumes everything parked...
    for _ in range(10_000):                            # ...and every job runs to its end
        if not (h.sched.running or h.sched.waiting or h.in_flight):
            break
        h.step()
        for seq in [s for s in h.live.values() if s.status is SeqStatus.PARKED]:
            h.sched.unpark(seq)
        h.check()
    assert not h.live and h.blocks.num_used == 0


def seq(job_id: str, prompt_len: int, park: bool = False) -> Sequence:
    return Sequence(job_id, [1] * prompt_len, Sampling(max_tokens=8, ignore_eos=True), park_on_sample=park)


def test_a_job_on_its_way_to_be_parked_never_preempts_a_running_one():
    # 3 blocks of 4: u (parked with 3 tokens, 1 block) is resumed after p (11-token prompt, its first 4 computed)
    # was admitted to be parked, so u is the newest running job. p's last 7 tokens need 2 more blocks, 1 is free:
    # p waits for room; it used to preempt u, a job that was decoding, to make it.
    blocks = BlockManager(num_blocks=3, block_size=4)
    sched = StepScheduler(blocks, max_batch=4, token_budget=4, max_model_len=12)
    u = seq("u", 2)
    sched.add(u)
    sched.schedule()
    u.output_ids.append(7)
    assert sched.park(u)
    p = seq("p", 11, park=True)
    sched.add(p)
    sched.schedule()
    sched.unpark(u)
    sched.token_budget = 16
    plan = sched.schedule()
    assert plan.preempted == [] and [(c.seq.job_id, c.num_tokens) for c in plan.chunks] == [("u", 1)]


def test_a_parking_job_that_does_not_fit_does_not_hold_back_the_others():
    blocks = BlockManager(num_blocks=4, block_size=4)
    sched = StepScheduler(blocks, max_batch=4, token_budget=32, max_model_len=16)
    held = seq("held", 12)
    sched.add(held)
    sched.schedule()
    assert sched.park(held)                              # 3 blocks parked, 1 free
    big, small = seq("big", 10, park=True), seq("small", 7)
    sched.add(big), sched.add(small)
    plan = sched.schedule()
    # big (3 blocks) does not fit and may not evict; small may: held's KV goes, small runs, big keeps waiting
    assert [c.seq.job_id for c in plan.chunks] == ["small"] and plan.evicted == [held]
    assert list(sched.waiting) == [big]


def test_parked_kv_is_dropped_only_when_that_makes_room():
    def parked_and_free(running_tokens: int):
        blocks = BlockManager(num_blocks=4, block_size=4)
        sched = StepScheduler(blocks, max_batch=4, token_budget=32, max_model_len=16)
        held = seq("held", 2)
        sched.add(held)
        if running_tokens:
            sched.add(seq("r", running_tokens))
        sched.schedule()
        assert sched.park(held)                          # 1 block parked
        sched.add(seq("w", 15))                          # needs all 4 blocks
        return sched, held
    sched, held = parked_and_free(0)                     # 3 free + 1 parked: dropping it makes room
    assert sched.schedule().evicted == [held]
    sched, held = parked_and_free(6)                     # r holds 2: 1 free + 1 parked is not enough
    assert sched.schedule().evicted == [] and list(sched.parked) == [held]


def test_a_job_parking_after_its_token_in_flight_is_not_recomputed_for_room():
    """With overlapped steps a job ordered to park keeps running until its token in flight is collected. A job that
    needs room meanwhile waits one step and then takes the parked KV; it used to recompute the parking job (the
    newest running) at once, which then came back as a prefill nobody asked for."""
    blocks = BlockManager(num_blocks=2, block_size=4)
    sched = StepScheduler(blocks, max_batch=4, token_budget=16, max_model_len=8)
    a, b = seq("a", 4), seq("b", 4)
    sched.add(a), sched.add(b)
    assert len(sched.schedule().chunks) == 2 and blocks.num_free == 0
    for s in (a, b):                    # launched: each sampled a token, still on the device
        s.num_pending = 1
    assert sched.park_after_sample(b)   # the scheduler's preemption by parking (Engine.park_when_sampled)
    plan = sched.schedule()             # a needs a second block for its next token: none is free
    assert plan.chunks == [] and plan.preempted == [] and plan.evicted == []
    assert list(sched.running) == [a, b] and blocks.num_blocks_of("b") == 1
    for s in (a, b):                    # the step in flight is collected: b parks
        s.num_pending = 0
        s.output_ids.append(7)
    assert sched.park(b)
    plan = sched.schedule()
    assert plan.evicted == [b] and plan.preempted == [] and [(c.seq, c.num_tokens) for c in plan.chunks] == [(a, 1)]


def parked_then_a_long_prompt(num_blocks: int, block_size: int, budget: int, decode_len: int, prompt_len: int,
                              prompt_steps: int):
    """A job d prefilled and parked after its first token, then a long prompt p admitted and prefilled for
    `prompt_steps` steps, then d resumed (so d is last in `running`): (scheduler, block manager, d, p)."""
    blocks = BlockManager(num_blocks=num_blocks, block_size=block_size)
    sched = StepScheduler(blocks, max_batch=4, token_budget=budget, max_model_len=1024)
    d = seq("d", decode_len)
    sched.add(d)
    sched.schedule()
    d.output_ids.append(7)
    assert sched.park(d)
    p = seq("p", prompt_len)
    sched.add(p)
    for _ in range(prompt_steps):
        assert [c.seq for c in sched.schedule().chunks] == [p]
    sched.unpark(d)
    return sched, blocks, d, p


def test_a_resumed_decode_is_planned_before_a_long_prompt_still_being_prefilled():
    # d's decode goes first every step: it used to wait behind p's chunks, which took the whole budget, until p's
    # prompt was done (docs: "a long prompt never stalls decodes")
    sched, _, d, _ = parked_then_a_long_prompt(64, 16, budget=64, decode_len=10, prompt_len=600, prompt_steps=1)
    for _ in range(3):
        plan = sched.schedule()
        assert [(c.seq.job_id, c.num_tokens) for c in plan.chunks] == [("d", 1), ("p", 63)]
        d.output_ids.append(7)


def test_a_resumed_decode_already_planned_is_not_the_one_preempted_for_a_prompts_room():
    # found by review of the decodes-first order: d is planned first; p's next chunk then needs room and the victim
    # was "the newest running", d, whose chunk was in the plan already: the step then failed on a sequence without
    # blocks. Now the victim is the newest not yet planned: p itself waits.
    sched, blocks, d, p = parked_then_a_long_prompt(6, 4, budget=8, decode_len=3, prompt_len=24, prompt_steps=2)
    plan = sched.schedule()
    assert [(c.seq.job_id, c.num_tokens) for c in plan.chunks] == [("d", 1)] and plan.preempted == [p]
    assert blocks.rows.row("d") is not None


def preempted_for_room(left_older: int | None, left_newer: int | None) -> tuple[str, Sequence, Sequence]:
    """Two sequences decode in a pool that holds two blocks each; the first to need a third makes the worker preempt
    one for room. Returns the one preempted."""
    h = Harness(num_blocks=4)
    h.add(7, 20, park=False)
    h.add(7, 20, park=False)
    older, newer = h.live["s1"], h.live["s2"]
    older.preemptions_left, newer.preemptions_left = left_older, left_newer
    for _ in range(5):
        plan = h.sched.schedule()
        for c in plan.chunks:
            if c.start + c.num_tokens == c.seq.num_tokens:
                c.seq.output_ids.append(7)
        if plan.preempted:
            assert len(plan.preempted) == 1
            h.check()
            return plan.preempted[0].job_id, older, newer
    raise AssertionError("no preemption for room")


def test_the_worker_preempts_for_room_a_sequence_with_preemptions_left_under_its_bound():
    # found by review (issue 11, "preemptions per job <= the configured bound"): out of KV the worker took the
    # newest sequence whatever its count, so one job could be recomputed again and again. Now the newest with
    # preemptions left goes first, and its count goes down.
    victim, older, _ = preempted_for_room(left_older=1, left_newer=0)
    assert victim == "s1" and older.preemptions_left == 0
    victim, _, newer = preempted_for_room(left_older=None, left_newer=0)    # None: an older scheduler, no bound
    assert victim == "s1"
    victim, _, newer = preempted_for_room(left_older=1, left_newer=1)        # both may be: the newest, as before
    assert victim == "s2" and newer.preemptions_left == 0
    # none has any left: the newest all the same (a step that makes no room runs nothing), its count stays at 0
    victim, _, newer = preempted_for_room(left_older=0, left_newer=0)
    assert victim == "s2" and newer.preemptions_left == 0


def test_early_jobs_alone_in_a_full_pool_park_where_they_stand_instead_of_waiting_on_each_other():
    # found by review (session 26): two jobs decoding their early tokens outgrew a 4-block pool; an early job never
    # takes KV from others, so each waited for the other and every step planned nothing, for good (the engine then
    # waits for a command the scheduler never sends: it counts neither job as running). Now a blocked early job
    # with a token out parks where it stands, and its KV is the first given up for room.
    h = Harness(num_blocks=4)
    for _ in range(2):
        h.add(7, 20, park=True, early_tokens=5)
    parked = []
    for _ in range(20):
        plan = h.sched.schedule()
        now_parked = getattr(plan, "parked", ())            # (a StepPlan before this mend had no such list)
        assert plan.chunks or now_parked, "a step planned nothing and parked nothing"
        parked += now_parked
        for c in plan.chunks:
            if c.start + c.num_tokens == c.seq.num_tokens:
                c.seq.output_ids.append(7)
                if len(c.seq.output_ids) >= c.seq.park_at_output:
                    assert h.sched.park(c.seq)
        h.check()
        if not h.sched.running:
            break
    assert parked and not h.sched.running and len(h.sched.parked) == 2
    assert all(0 < len(s.output_ids) < 5 for s in parked)    # stopped short of their early tokens


def waiting_for_room() -> tuple[Harness, Sequence, Sequence]:
    """A 6-block pool (blocks of 4) where a prompt in chunks, `a`, needs 3 more blocks with 1 free, beside a planned
    decode, `b`; neither has a preemption left under the scheduler's bound."""
    h = Harness(num_blocks=6)
    h.add(3, 50, park=False, preemptions_left=0)          # b: 1 block
    h.add(30, 50, park=False, preemptions_left=0)         # a: 13 tokens (4 blocks) in the first step
    b, a = h.live["s1"], h.live["s2"]
    plan = h.sched.schedule()
    assert [(c.seq, c.num_tokens) for c in plan.chunks] == [(b, 3), (a, 13)] and h.blocks.num_free == 1
    b.output_ids.append(7)
    return h, a, b


def test_a_sequence_waiting_for_room_keeps_new_ones_from_taking_it():
    # review of session 26 (mended in 788be09 without a test of its own): a step where a sequence waited for room
    # still admitted new sequences, which took the blocks it waited for. A 2-token prompt arriving now fits the free
    # block; it must wait too.
    h, a, b = waiting_for_room()
    h.add(2, 5, park=False)
    plan = h.sched.schedule()
    assert [c.seq for c in plan.chunks] == [b], "a new sequence was admitted while one waited for room"
    assert a in h.sched.running and not plan.preempted and a.preemptions_left == 0
    h.check()


def test_with_no_preemption_left_under_the_bound_a_sequence_waits_while_another_runs():
    # review of session 26 (mended in 788be09 without a test of its own): with no sequence left to preempt under
    # the bound, the newest unplanned one was preempted all the same, past its bound, though the one needing room
    # could wait while another ran. Three 1-block sequences fill a 3-block pool; b's next token fits its block, a's
    # and c's need a new one.
    h = Harness(num_blocks=3)
    for prompt in (3, 4, 4):
        h.add(prompt, 50, park=False, preemptions_left=0)
    b, a, c = (h.live[f"s{i}"] for i in (1, 2, 3))
    plan = h.sched.schedule()
    assert [x.seq for x in plan.chunks] == [b, a, c] and h.blocks.num_free == 0
    for seq in (b, a, c):
        seq.output_ids.append(7)
    plan = h.sched.schedule()
    assert not plan.preempted, "a sequence was preempted past its bound while another could run"
    assert [x.seq for x in plan.chunks] == [b] and {a, c} <= set(h.sched.running)
    h.check()


def test_a_sequence_first_in_the_step_waits_rather_than_preempt_past_the_bound_one_that_fits_as_it_is():
    # review of session 29: the fallback "nothing is planned, so preempt the newest all the same" was taken in the
    # middle of the planning loop, before the sequences after the one needing room were looked at. a (one full
    # block) needs a second; b's next token fits its own block (and ends it), so b runs and a waits, keeping its KV
    h = Harness(num_blocks=2)
    h.add(4, 4, park=False, preemptions_left=0)
    h.add(2, 2, park=False, preemptions_left=0)
    a, b = h.live["s1"], h.live["s2"]
    plan = h.sched.schedule()
    assert [(c.seq, c.num_tokens) for c in plan.chunks] == [(a, 4), (b, 2)] and h.blocks.num_free == 0
    a.output_ids.append(7)
    b.output_ids.append(7)
    plan = h.sched.schedule()
    assert not plan.preempted and b.preemptions_left == 0, "b was preempted past its bound though it could run"
    assert [c.seq for c in plan.chunks] == [b] and a in h.sched.running
    h.check()


def waiting_beside_one_freeing_soon(b_max_tokens: int) -> tuple[Harness, Sequence, Sequence]:
    """A 5-block pool: b (a 4-token prompt) and a prompt in chunks, a (12 of its 19 tokens), leave 1 block free; b's
    token is in flight (overlapped scheduling plans the next step before the last one is collected). a's next chunk
    needs 2 more blocks; a 3-token newcomer would fit the free one."""
    h = Harness(num_blocks=5)
    h.add(4, b_max_tokens, park=False)
    h.add(19, 5, park=False)
    b, a = h.live["s1"], h.live["s2"]
    plan = h.sched.schedule()
    assert [(c.seq, c.num_tokens) for c in plan.chunks] == [(b, 4), (a, 12)] and h.blocks.num_free == 1
    b.num_pending = 1
    h.add(3, 5, park=False)
    return h, a, b


def test_a_sequence_whose_token_in_flight_ends_it_is_not_preempted_for_room():
    # review of session 29: b's token in flight ends it by length, so it is not planned, which made it the newest
    # unplanned sequence but one, and a the victim of its own need: recomputed, its 12 prompt tokens thrown away (or,
    # in other orders, b reported recomputed: a preemption charged to a job finishing in the same step), for blocks
    # b gives back one step later anyway. Now a waits that step, and no newcomer takes the free block meanwhile
    h, a, b = waiting_beside_one_freeing_soon(b_max_tokens=1)
    plan = h.sched.schedule()
    assert not plan.preempted and not plan.chunks, [c.seq.job_id for c in plan.chunks]
    assert a in h.sched.running and a.num_computed == 12 and len(h.sched.waiting) == 1


def test_while_a_sequence_waits_for_one_about_to_park_no_new_one_is_admitted():
    # review of session 29: waiting one step for a job about to park (its KV becomes parked KV, given up first) did
    # not stop admissions, so a newcomer took the free block and the waiting prompt was recomputed the step after
    h, a, b = waiting_beside_one_freeing_soon(b_max_tokens=5)
    assert h.sched.park_after_sample(b)                       # the scheduler orders b parked as its token lands
    plan = h.sched.schedule()
    assert not plan.preempted and not plan.chunks, [c.seq.job_id for c in plan.chunks]
    assert a in h.sched.running and len(h.sched.waiting) == 1


def test_early_jobs_beside_a_full_batch_take_at_most_early_rows():
    # session 26 left it (RELIABILITY.md): early jobs rode beside a full batch without a bound of the worker's own,
    # so a step could have more rows than the decode graphs were captured for (a GPU then ran it eagerly). Now at
    # most `early_rows` of them run at once; the rest wait their turn at the worker, and run as the first park.
    blocks = BlockManager(num_blocks=64, block_size=4)
    sched = StepScheduler(blocks, max_batch=2, token_budget=64, max_model_len=64, early_rows=2)
    seqs = [Sequence(f"n{i}", [1] * 3, Sampling(max_tokens=50, ignore_eos=True)) for i in range(2)]
    seqs += [Sequence(f"e{i}", [1] * 3, Sampling(max_tokens=50, ignore_eos=True), park_on_sample=True,
                      park_at_output=2) for i in range(4)]
    for seq in seqs:
        sched.add(seq)
    seen_early = set()
    for _ in range(12):
        plan = sched.schedule()
        rows = [c.seq for c in plan.chunks]
        assert len(rows) <= 2 + 2 and sum(s.park_on_sample for s in sched.running) <= 2
        seen_early |= {s.job_id for s in rows if s.park_on_sample}
        for c in plan.chunks:
            if c.start + c.num_tokens == c.seq.num_tokens:
                c.seq.output_ids.append(7)
                if c.seq.park_on_sample and len(c.seq.output_ids) >= c.seq.park_at_output:
                    assert sched.park(c.seq)
    assert seen_early == {"e0", "e1", "e2", "e3"} and len(sched.parked) == 4    # every one had its turn
    assert [s.job_id for s in sched.running] == ["n0", "n1"]


def test_a_job_resumed_into_a_full_batch_waits_for_a_row_keeping_its_kv():
    # session 28 left it (RELIABILITY.md): a resumed job joined `running` whatever its size, so a step could plan
    # more rows than the decode graphs were captured for (a GPU then ran it eagerly, slower). Now the step plans at
    # most max_batch + early_rows rows, the earliest admitted first: the resumed job waits for a row with its KV
    # (not a prompt still being prefilled, which decodes-first order would have put last), and takes the first one
    # freed; nor does a job to park take an early row the resumed one pushed past the step's rows.
    blocks = BlockManager(num_blocks=64, block_size=4)
    sched = StepScheduler(blocks, max_batch=2, token_budget=16, max_model_len=64, early_rows=1)     # 3 rows a step
    c, d, a = (Sequence(x, [1] * 3, Sampling(max_tokens=50, ignore_eos=True)) for x in "cda")
    b = Sequence("b", [1] * 40, Sampling(max_tokens=50, ignore_eos=True))
    e = Sequence("e", [1] * 3, Sampling(max_tokens=50, ignore_eos=True), park_on_sample=True, park_at_output=1)

    def step(expected: list[tuple[Sequence, int]]) -> None:
        plan = sched.schedule()
        assert [(ch.seq.job_id, ch.num_tokens) for ch in plan.chunks] == [(s.job_id, n) for s, n in expected]
        assert not plan.preempted
        for ch in plan.chunks:
            if ch.start + ch.num_tokens == ch.seq.num_tokens:
                ch.seq.output_ids.append(7)

    def ends(seq: Sequence) -> None:
        sched.finish(seq, Finish.STOP)
        sched.drop(seq)

    for seq in (c, d):
        sched.add(seq)
    step([(c, 3), (d, 3)])
    assert sched.park(c) and sched.park(d)
    for seq in (a, b):
        sched.add(seq)
    step([(a, 3), (b, 13)])                            # b's prompt is under way
    sched.unpark(c)                                    # the scheduler resumes c and d into a full batch
    sched.unpark(d)
    sched.add(e)                                       # and sends a job to park: no row is left for it
    held = blocks.table("d")
    step([(a, 1), (c, 1), (b, 14)])                    # the earliest admitted three: b's prompt goes on, d waits
    step([(a, 1), (c, 1), (b, 13)])
    assert d.status is SeqStatus.RUNNING and blocks.table("d") == held and e in sched.waiting
    ends(a)
    step([(b, 1), (c, 1), (d, 1)])                     # a's row is d's; e still has none
    ends(b)
    step([(c, 1), (d, 1), (e, 3)])                     # a row free: e runs its early token beside the batch


def test_an_early_job_shorter_than_its_early_tokens_holds_room_only_to_its_end():
    # review of session 27: the worker promised a job to prefill early room for all its early tokens even when its
    # max_tokens ends it sooner (the scheduler's reservation stops at its end): 30 + 8 tokens, not 30 + 32
    short = Sequence("s", [1] * 30, Sampling(max_tokens=8), park_on_sample=True, park_at_output=32)
    long = Sequence("l", [1] * 30, Sampling(max_tokens=100), park_on_sample=True, park_at_output=32)
    assert (short.tokens_to_hold, long.tokens_to_hold) == (38, 62)
