"""ALISE: shortest predicted remaining time first, preemptive, with aging, inside priority classes.

Queue order: remaining_seconds * exp(-(now - created) / aging_s), lowest first: a job's predicted work counts
e times less for every aging_s seconds it has waited. `now` is common to every job, so ordering by
ln(remaining_seconds) + created / aging_s is the same order, and that score never changes while a job waits.
The bound it gives is relative, so it holds whatever the scale of the time model: a job is overtaken only by
jobs that are shorter by a factor exp(d / aging_s), d being how much later they arrived; e.g. with aging_s =
45 (the default), a job that arrives 104 s later must be 10x shorter, one that arrives 207 s later 100x shorter.
A hard bound on top (the scheduler's `due_after_s`): once a job has waited that long it is due, and due jobs go
first in their class, by arrival (base.due_score). From then on it is offered each freed slot before any later job
of its class (where it finds no KV room, no later job takes the worker it waits for), and it is never preempted
for a job that is not due (it would rank ahead of it once requeued; see below): its wait past due_after_s is
what FCFS gives it among the jobs that came before it, plus the time a slot takes to free.

Preemption only where it pays. When the best waiting job fits nowhere, a running job (the victim) on a full
worker is preempted only if all of these hold:
- both times come from the predictor (never from the prior used while it is unreachable), and the victim is
  not in a higher priority class;
- the victim would take `preempt_ratio` times longer than the waiting job, and is not near its own end (at
  least `near_end_tokens` predicted tokens left);
- the wait it saves pays for it: without a preemption the waiting job would get the worker's first slot to
  free up, so the saving is the shortest remaining time among that worker's running jobs. Recomputing the
  victim's context later lengthens that step for every job in the batch, so the cost is the recompute time
  (from the time model) times the batch size; the saving must exceed `preempt_margin` times it. In a large
  batch some job finishes soon and a recompute delays many, so preemption is rare there; with a few long
  jobs it pays;
- the victim has been preempted fewer than `max_preemptions` times;
- once back in the queue, the victim ranks behind the waiting job. Aging can rank an older victim ahead of a
  younger, much shorter job: preempting it would hand the freed slot straight back to it, spending one of its
  preemptions and, with recompute, a recompute, for nothing.
One preemption per worker is in flight at a time; the longest qualifying victim goes first. With preemption by
parking (PreemptMode.PARK: the victim stops decoding but keeps its KV on the GPU, and resumes there at once) a
preemption costs the victim no recompute, so only the ratio, the bound and the near-end rule limit it.

Prefill early (`park_kv_share` > 0). KV room on a large GPU far exceeds what the decode slots (the throughput
knee) use, so a job that must wait for a slot is prefilled at once and parked: it gets its first token now, and
its decode waits, in queue order, for a slot. TTFT no longer depends on the rank a job's predicted length gives
it, while decode slots still go to the shortest predicted work. Parked KV is bounded: a worker takes jobs to
park while its KV in use (promised blocks included) stays under `park_kv_share` of its pool, at most
`max_parking` in flight at a time (fewer where the worker said it runs fewer at once: its `early_rows`); the
worker gives parked KV back first when its pool runs short.
Prefilling early is work done now for a job that decodes later: past capacity, prefilling every arrival at
once puts the prompts of jobs SRPT serves last ahead of the decodes of those it serves first (with ~550-token
chat prompts at 1.35x capacity it cost the shortest half 20% in e2e, live and simulated). `park_after_s` keeps
it for jobs that have waited that long already: the ones a slot does not reach soon, whose TTFT it bounds.
A fixed wait fits one load only: `park_wait_factor` follows it, prefilling early the jobs that have waited
that many times the queue's current mean wait (Snapshot.mean_wait_s, by Little's law). Below capacity the mean
wait is short and nearly every waiting job is prefilled soon; past it the mean wait grows with the backlog, so
only the jobs SRPT leaves behind longer than FCFS would on average get their first token early, and their
prompts no longer run ahead of the decodes of the jobs served first. The threshold is the larger of the two.
Early tokens (the scheduler's `early_tokens`, sent with each job to prefill early): the job decodes that many
tokens before it parks, so one whose whole output is that short ends there. A predictor that ranks a short job
long leaves it waiting behind the queue, and such jobs make the normalized-latency tail; running every waiting
job's first tokens finds them, as the first queue of an MLFQ does, while decode slots still go by predicted
remaining time. With it, prefilling every waiting job (`park_wait_factor` 0, the default) measured better than the
load-following threshold (docs/BENCHMARKS.md, "Early tokens live").
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from services.common.preempt_mode import PreemptMode
from services.scheduler.exec_time import ExecTimeModel
from services.scheduler.policies.base import (PRIORITY_CLASS_SPAN, SCORE_EPOCH, JobView, Placement, Plan,
                                              Snapshot, WorkerView, due_score, preempt_for_waiting, requeued_view)


@dataclass
class AlisePolicy:
    # waiting this long makes a job's predicted work count e times less. Parking bounds TTFT by itself, so aging
    # only has to keep long jobs from falling far behind FCFS. A predictor whose estimates are compressed towards
    # the middle (live on chat: ln-spread 0.5 against the true 1.06) leaves little predicted work between jobs,
    # and a short aging_s then orders the backlog by arrival: 30 s (15 until session 34) lowered the simulated
    # mean 2-8% on chat3000. 45 s since session 41, once first messages were pulled toward their kind's centre
    # (session 39): live on one H100, mean -5% / -13% / -8% and p99 -17% / -21% / -9% against 30 s at 44 / 64 /
    # 68 req/s, TTFT p99 1.29x and the longest tenth 1.18x of fcfs's at 44 (docs/BENCHMARKS.md, "Aging 45 s live")
    aging_s: float = 45.0
    preempt_ratio: float = 4.0     # preempt only when the running job is this many times longer
    preempt_margin: float = 2.0    # ... and the wait saved is this many times the victim's preemption cost
    max_preemptions: int = 2       # ... and it was preempted fewer times than this
    near_end_tokens: float = 16.0  # ... and it has at least this many predicted tokens left
    preempt_mode: PreemptMode = PreemptMode.RECOMPUTE   # what a preemption costs the victim (park: nothing)
    park_kv_share: float = 0.0     # prefill waiting jobs early while KV use stays under this share; 0 = off
    max_parking: int = 32          # ... at most this many on their way to be parked on a worker at once
    park_after_s: float = 0.0      # ... only jobs that have waited this long (0: every waiting job)
    park_wait_factor: float = 0.0  # ... and this many times the queue's mean wait (0: off)
    early_tokens: int = 1          # ... each decoding this many tokens before it parks: room is checked for them
    name: str = "alise"
    preemptive: bool = True

    def __post_init__(self) -> None:
        self.preempt_mode = PreemptMode(self.preempt_mode)     # its value ("park") is accepted too
        # the scheduler's config and the simulator both build this policy: one check for both (NaN fails too)
        for name in ("park_after_s", "park_wait_factor"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be >= 0 and finite, got {getattr(self, name)}")
        if self.early_tokens < 1:
            raise ValueError(f"early_tokens must be >= 1, got {self.early_tokens}")
        if self.max_parking < 1:
            raise ValueError(f"max_parking must be >= 1 (park_kv_share 0 turns prefill-early off), got {self.max_parking}")

    def queue_score(self, job: JobView, cost: ExecTimeModel) -> float:
        # an unpredicted job carries the scheduler's prior as its prediction: ranked as that much work
        return self._score(job, job.remaining_seconds(cost))

    def _score(self, job: JobView, work: float) -> float:
        if job.due:
            return due_score(job)
        return -job.priority * PRIORITY_CLASS_SPAN + math.log(max(work, 1e-6)) + (job.created - SCORE_EPOCH) / self.aging_s

    def plan(self, snap: Snapshot, cost: ExecTimeModel) -> Plan:
        placement = Placement.greedy(snap)
        ranked = {}                        # worker id -> its running jobs, longest remaining first (built on demand)
        requeued = {}                      # job id -> its queue score once preempted (built on demand)
        # never preempt for a prior guess (see _victim); a later, predicted job may
        preempt = preempt_for_waiting(placement, list(snap.workers),
                                      lambda waiting, workers: self._victim(waiting, workers, cost, ranked, requeued,
                                                                            placement.blocks_left),
                                      skip=lambda waiting: not waiting.predicted)
        early = self._prefill_early(snap, placement) if self.park_kv_share > 0 else ()
        return Plan(assign=tuple(placement.assign), preempt=preempt, prefill_early=early)

    def _prefill_early(self, snap: Snapshot, placement: Placement) -> tuple[tuple[str, str], ...]:
        """Waiting jobs without a first token, by priority class and then oldest first (TTFT goes by arrival,
        whatever a job's predicted rank), to be prefilled and parked where KV room allows, on a worker whose
        context holds the job (another would refuse it, charging it a failed step), and never on a worker held for
        a job waiting for its KV room (parked KV there would delay it)."""
        workers = [w for w in snap.workers if w.worker_id not in placement.held]
        assigned = {j for j, _ in placement.assign}
        room = {w.worker_id: [self.park_kv_share * w.num_blocks - (w.num_blocks - w.free_blocks),
                              min(self.max_parking, w.early_rows or self.max_parking) - w.parking]
                for w in workers if not w.draining}
        by_id = {w.worker_id: w for w in workers}
        out = []
        wait = max(self.park_after_s, self.park_wait_factor * snap.mean_wait_s)
        for job in snap.fresh:
            if wait and snap.now - job.created < wait:
                continue                             # not yet (`fresh` is oldest first only roughly)
            if job.generated or job.kv_on or job.job_id in assigned or job.suspect:   # has its first token or KV,
                continue                                                                 # runs now, or runs apart
            need = {wid: by_id[wid].blocks_needed(job, self.early_tokens) for wid in room}
            fits = [wid for wid, (blocks, n) in room.items()
                    if n > 0 and blocks >= need[wid] and by_id[wid].holds_context(job)]
            if not fits:
                continue                             # a shorter prompt further down may still fit
            wid = max(fits, key=lambda w: room[w][0])
            room[wid][0] -= need[wid]
            room[wid][1] -= 1
            out.append((job.job_id, wid))
        return tuple(out)

    def requeued(self, job: JobView, worker: WorkerView) -> JobView:
        """A running job as it would wait again once preempted from `worker` (what its queue score would be)."""
        return requeued_view(job, worker.worker_id, self.preempt_mode, counted=True)

    def _requeued_score(self, job: JobView, worker: WorkerView, cost: ExecTimeModel, cache: dict[str, float]) -> float:
        if (score := cache.get(job.job_id)) is None:
            score = cache[job.job_id] = self.queue_score(self.requeued(job, worker), cost)
        return score

    def _victim(self, waiting: JobView, workers: list[WorkerView], cost: ExecTimeModel,
                ranked: dict[str, list[tuple[float, JobView]]], requeued: dict[str, float],
                blocks_left: dict[str, int]) -> tuple[JobView, WorkerView] | None:
        """The longest qualifying running job on any of `workers`, or None. `ranked` keeps each worker's running
        jobs by remaining time, longest first, across the calls of one plan: a plan with W full workers asks this
        up to W + 1 times, and recomputing every job's remaining time each time cost 62 ms a decision at 8
        workers x 512 jobs (the scheduler's event loop, which relays every token, waits meanwhile); `requeued` keeps
        the candidates' queue scores once preempted the same way."""
        # (plan passes over a waiting job with only a prior: a prior is the same guess for every job, so
        # preempting on it only thrashes)
        need = waiting.remaining_seconds(cost)
        waiting_score = self._score(waiting, need)
        best, best_s = None, self.preempt_ratio * need
        parks = self.preempt_mode is PreemptMode.PARK
        for w in workers:
            if not w.holds_context(waiting):
                continue                             # a slot freed here could not take it
            left = ranked.get(w.worker_id)
            if left is None:
                left = ranked[w.worker_id] = sorted(((job.remaining_seconds(cost), job) for job in w.running),
                                                    key=lambda sj: -sj[0])
            if not left:
                continue
            saving = left[-1][0]                     # when this worker's first slot would free up anyway
            # parking costs nothing only if the waiting job fits without the worker dropping parked KV for it (the
            # victim's own, first of all): else it may cost a recompute, which must pay like any other
            free_park = parks and w.free_blocks >= w.blocks_needed(waiting)
            # KV room left after this plan's placements; the victim's blocks must cover the rest
            room = blocks_left.get(w.worker_id, w.free_blocks + w.parked_blocks) - w.blocks_needed(waiting)
            for s, job in left:
                if s <= best_s:
                    break                            # the rest are shorter still
                if (room + w.blocks_needed(job) >= 0 and job.predicted and job.priority <= waiting.priority
                        and job.preemptions < self.max_preemptions and job.remaining_tokens >= self.near_end_tokens
                        and (free_park or saving > self.preempt_margin * len(left) * cost.preemption(
                            job.prompt_len + job.generated))
                        and self._requeued_score(job, w, cost, requeued) > waiting_score):
                    best, best_s = (job, w), s
                    break                            # this worker's longest qualifying job
        return best
