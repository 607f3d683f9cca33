"""The scheduler's in-memory view of live jobs and workers, and the Snapshot a policy decides on.

One owner: this module is the only writer of what the scheduler remembers between ticks (which jobs run
where, tokens generated, KV kept for waiting jobs (swapped out or parked), blocks promised, preemptions in
flight). It does no I/O, so the
live dispatcher (which mirrors Redis and worker reports into it) and the simulator (which drives it from
simulated events) build their snapshots with the same code. Redis stays the source of truth for jobs;
everything here can be rebuilt from it and from the workers' reports.
"""
from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Generic, Iterable, TypeVar

from services.common.log_normal import median_of
from services.common.preempt_mode import PreemptMode
from services.scheduler.exec_time import P90_OVER_GUESS
from services.scheduler.policies.base import JobView, Snapshot, WorkerView, kv_blocks, requeued_view
from services.scheduler.worker_speed import StepSums, WorkerSpeed

R = TypeVar("R")     # what the owner keeps with a job (the dispatcher: its JobRecord; the simulator: nothing)

# The queue's mean wait is measured over this much recent time: long enough to average many placements, short
# enough to follow the load as it changes.
WAIT_WINDOW_S = 20.0
WAIT_MARK_S = 0.25     # at most one mark this often (a tick is 50 ms; the simulator decides far more often)
# A suspect (see LiveState.blame) is cleared once it has generated this many tokens past the failure: a request that
# breaks steps while decoding breaks the next one it is in, so a job that decodes this far was not the cause. Few:
# suspects run one per worker, so a large batch's suspects take their turns (about 4 steps each) one by one.
SUSPECT_CLEAR_TOKENS = 4


@dataclass(frozen=True)
class JobFacts:
    """What a policy may know about a job that does not change while it lives, except its predicted length,
    which the worker may re-estimate once it has read the prompt (`repredicted`)."""
    job_id: str
    priority: int
    created: float
    prompt_len: int
    max_tokens: int
    pred_len: float
    pred_p90: float
    predicted: bool
    pred_deciles: tuple[float, ...] = ()

    def repredicted(self, output_tokens: float) -> "JobFacts":
        """The worker's estimate of the whole output moves the prompt predictor's distribution: its spread (p90,
        deciles) is kept in proportion, so E[L - g | L > g] still follows its shape. The estimate is a median (the
        probe regresses log length, as the predictor does), so the distribution moves until its median is there:
        the predictor's mean lies above its median (by exp(s^2 / 2), 1.5x at s = 0.9), and moving the mean there
        instead ranked every re-estimated job that much shorter than the jobs waiting beside it. Like any
        prediction it is bounded by max_tokens (the job cannot run longer)."""
        output_tokens = min(output_tokens, self.max_tokens)
        median = median_of(self.pred_deciles, self.pred_len)
        ratio = output_tokens / median if self.predicted and median > 0 else 0.0
        if ratio > 0:
            return replace(self, pred_len=min(self.pred_len * ratio, self.max_tokens), pred_p90=self.pred_p90 * ratio,
                           pred_deciles=tuple(q * ratio for q in self.pred_deciles))
        return replace(self, pred_len=output_tokens, pred_p90=P90_OVER_GUESS * output_tokens, predicted=True, pred_deciles=())


def job_view(f: JobFacts, generated: int = 0, running: bool = False, kv_on: str = "",
             preemptions: int = 0, parked: bool = False, suspect: bool = False, due: bool = False) -> JobView:
    return JobView(f.job_id, f.priority, f.created, f.prompt_len, f.max_tokens, f.pred_len, f.pred_p90, f.predicted,
                   generated, running, kv_on, f.pred_deciles, preemptions, parked, suspect, due)   # positional: fastest


@dataclass
class WorkerState:
    worker_id: str
    block_size: int
    num_blocks: int
    max_batch: int
    jobs: dict[str, None] = field(default_factory=dict)  # placed here and not yet back (ordered: deterministic)
    parking: set[str] = field(default_factory=set)       # sent here to be prefilled and parked, not yet back
    parked: set[str] = field(default_factory=set)        # waiting at the scheduler with their KV parked here
    preempting: set[str] = field(default_factory=set)    # preempt sent, not yet acknowledged
    # ... and preempted by the worker for room meanwhile (counted then): the order crossed that report
    counted_preempting: set[str] = field(default_factory=set)
    used_blocks: int = 0           # as of the worker's last load report
    reserved_blocks: int = 0       # promised to jobs placed since that report
    draining: bool = False
    admit_limit: int = 0           # sequences the policy may place here (the throughput knee); 0 = max_batch
    max_model_len: int = 0         # the longest context it runs (0: no bound but its KV)
    early_rows: int = 0            # jobs it runs on their way to park at once (0: no bound of its own)
    speed: WorkerSpeed = field(default_factory=WorkerSpeed)

    def __post_init__(self) -> None:
        self.admit_limit = self.admit_limit or self.max_batch

    @property
    def free_blocks(self) -> int:
        return self.num_blocks - self.used_blocks - self.reserved_blocks


@dataclass
class _Job(Generic[R]):
    facts: JobFacts
    payload: R | None
    generated: int = 0
    kv_on: str = ""                # the worker that keeps its KV while it waits...
    parked: bool = False           # ... on its GPU (else swapped out to its host memory)
    preemptions: int = 0
    suspect_until: int = 0         # a suspect until it has generated this many tokens (see LiveState.blame)
    due: bool = False              # has waited due_after_s since it came (see LiveState.become_due)
    views: list = field(default_factory=lambda: [None, None])   # last views built (waiting, running)

    @property
    def suspect(self) -> bool:
        return self.generated < self.suspect_until


class _FreshJobs:
    """Jobs waiting for their first token: the higher priority class first, then in the order they came. Kept by
    class so that a high-priority job behind hundreds of older low-priority ones is still among the first a
    snapshot shows (prefill-early sees only the first `fresh_limit`)."""

    def __init__(self) -> None:
        self._by_class: dict[int, dict[str, float]] = {}      # priority -> job id -> arrival, in arrival order

    def add(self, facts: JobFacts) -> None:
        jobs = self._by_class.setdefault(facts.priority, {})
        if facts.job_id in jobs:
            return
        late = bool(jobs) and facts.created < next(reversed(jobs.values()))
        jobs[facts.job_id] = facts.created
        if late:        # back without a first token (rare): at its arrival's place, the class's order rebuilt
            self._by_class[facts.priority] = dict(sorted(jobs.items(), key=lambda kv: kv[1]))

    def discard(self, facts: JobFacts) -> None:
        if (jobs := self._by_class.get(facts.priority)) is not None:
            jobs.pop(facts.job_id, None)
            if not jobs:
                del self._by_class[facts.priority]

    def first(self, n: int) -> Iterable[str]:
        for priority in sorted(self._by_class, reverse=True):
            for job_id in self._by_class[priority]:
                if n <= 0:
                    return
                n -= 1
                yield job_id


class LiveState(Generic[R]):
    def __init__(self, knee_share: float = 0.0, due_after_s: float = 0.0) -> None:
        self._jobs: dict[str, _Job[R]] = {}
        # a job that has waited this long since it came is due: ranked by arrival ahead of the rest of its class
        # (policies/base.due_score); 0 = never. Jobs by arrival (a heap: recovered jobs come out of order) until then
        self.due_after_s = due_after_s
        self._not_due: list[tuple[float, str]] = []
        self._recovered: set[str] = set()      # queued jobs known only by id and arrival (expect_queued)
        self._fresh = _FreshJobs()     # jobs waiting for their first token (what prefill-early serves first)
        self.workers: dict[str, WorkerState] = {}
        self.knee_share = knee_share   # admission by the throughput knee (worker_speed.py); 0 = up to max_batch
        self._slots_given = 0          # placements to run (not to park) so far: the queue's departures
        self._departures: deque[tuple[float, int]] = deque()   # (snapshot time, _slots_given then), last WAIT_WINDOW_S

    # -- jobs ------------------------------------------------------------------------------------
    def track(self, facts: JobFacts, payload: R | None = None, generated: int = 0, preemptions: int = 0) -> None:
        """Start tracking a job; a job read back from Redis (another scheduler placed it before this one started)
        comes with what it has generated and how often it was preempted (the policies bound that count)."""
        self._jobs[facts.job_id] = _Job(facts, payload, generated, preemptions=preemptions)
        if generated == 0:
            self._fresh.add(facts)
        self._expect_due(facts.job_id, facts.created)

    # -- due-ness: a job that has waited due_after_s goes by arrival (policies/base.due_score) --------------
    def expect_queued(self, job_id: str, created: float) -> None:
        """A job in Redis's queue that this scheduler has not read (a predecessor queued it): it becomes due like
        the rest, although the queue's head, where jobs are read, may not reach it for a long time."""
        if self.due_after_s > 0 and job_id not in self._jobs:
            self._recovered.add(job_id)
            self._expect_due(job_id, created)

    def _expect_due(self, job_id: str, created: float) -> None:
        if self.due_after_s > 0:
            heapq.heappush(self._not_due, (created, job_id))

    def become_due(self, now: float) -> list[str]:
        """Marks due the jobs that have waited due_after_s since they came, and returns those waiting at the scheduler:
        the caller re-scores each in the queue and hands back those it could not (`not_due_yet`, which unmarks
        them). A job a predecessor queued that was never read here is returned unmarked: the caller reads it in
        and marks it (`mark_due`). A job placed on a worker now needs no new score: a requeue scores its view."""
        out = []
        while self._not_due and self._not_due[0][0] <= now - self.due_after_s:
            came, job_id = heapq.heappop(self._not_due)
            if (job := self._jobs.get(job_id)) is None:
                if job_id in self._recovered:         # queued by a predecessor, never read here: the caller reads it
                    self._recovered.discard(job_id)
                    out.append(job_id)
                continue                              # else it ended meanwhile
            if job.due or job.facts.created > came:   # an ended job's entry, its id taken since by a newer request
                continue
            job.due = True
            if not any(job_id in w.jobs or job_id in w.parking for w in self.workers.values()):
                out.append(job_id)
        return out

    def mark_due(self, job_id: str) -> None:
        if (job := self._jobs.get(job_id)) is not None:
            job.due = True

    def is_due(self, job_id: str) -> bool:
        return (job := self._jobs.get(job_id)) is not None and job.due

    def not_due_yet(self, job_ids: Iterable[str], now: float) -> None:
        """Jobs `become_due` named whose new score did not reach the queue (Redis failed): named again next time."""
        for job_id in job_ids:
            if (job := self._jobs.get(job_id)) is not None:
                job.due = False
            else:
                self._recovered.add(job_id)
            self._expect_due(job_id, now - self.due_after_s)

    def forget(self, job_id: str) -> R | None:
        """The job ended: drop it everywhere; returns its payload."""
        job = self._jobs.pop(job_id, None)
        if job is not None:
            self._fresh.discard(job.facts)
        for w in self.workers.values():
            w.jobs.pop(job_id, None)
            w.parking.discard(job_id)
            w.parked.discard(job_id)
            w.preempting.discard(job_id)
            w.counted_preempting.discard(job_id)      # an id may come back with a new request
        return job.payload if job else None

    def knows(self, job_id: str) -> bool:
        return job_id in self._jobs

    def payload(self, job_id: str) -> R | None:
        job = self._jobs.get(job_id)
        return job.payload if job else None

    def usable_estimate(self, job_id: str, output_tokens: float) -> float | None:
        """A worker's estimate of a job's whole output as the policies would use it (bounded by max_tokens), or
        None for a job not tracked here or a value no length can have (NaN, infinite, <= 0)."""
        if (job := self._jobs.get(job_id)) is None or not 0 < output_tokens < float("inf"):
            return None
        return min(output_tokens, job.facts.max_tokens)

    def repredict(self, job_id: str, output_tokens: float) -> None:
        """The job is ranked by this estimate of its whole output from now on (see usable_estimate)."""
        if (job := self._jobs.get(job_id)) is not None:
            job.facts = job.facts.repredicted(output_tokens)
            job.views = [None, None]

    def set_generated(self, job_id: str, count: int) -> None:
        if (job := self._jobs.get(job_id)) is not None:
            job.generated = count
            if count:
                self._fresh.discard(job.facts)

    def view(self, job_id: str, running: bool = False) -> JobView:
        # A waiting job's view stays valid across ticks (its tokens do not change while it waits): reuse it.
        job = self._jobs[job_id]
        v = job.views[running]
        if (v is None or v.generated != job.generated or v.kv_on != job.kv_on or v.preemptions != job.preemptions
                or v.parked != job.parked or v.suspect != job.suspect or v.due != job.due):
            v = job.views[running] = job_view(job.facts, job.generated, running, job.kv_on, job.preemptions, job.parked,
                                              job.suspect, job.due)
        return v

    def blame(self, charged: Iterable[str], in_step: Iterable[str] = ()) -> set[str]:
        """Which jobs a failed step is charged to here, from those its worker charged (the jobs new to its batch,
        else all in the step) and those that were in the step (`in_step`; jobs only waiting there were in none).
        A worker cannot tell a request that breaks every step it decodes in from the jobs that shared those steps,
        so a failure shared by several jobs, none of them suspect, charges none: they become suspects, which run
        with no other suspect (Placement) until each has decoded SUSPECT_CLEAR_TOKENS past this point. A failure
        with a suspect in the step is charged to that suspect, even when the worker charged newcomers
        (a suspect decoding beside them is not new): those newcomers become suspects, in case one of them was
        the cause. (A failure that comes from no one job charges one suspect at a time, so it still ends.)"""
        named = {j: job for j in charged if (job := self._jobs.get(j)) is not None}
        suspects = {j for j in {*named, *in_step} if (job := self._jobs.get(j)) is not None and job.suspect}
        if suspects:
            if not suspects & named.keys():          # the worker charged newcomers, beside a suspect
                self._suspect(named.values())
            return suspects
        if len(named) <= 1:
            return set(named)
        self._suspect(named.values())
        return set()

    @staticmethod
    def _suspect(jobs: Iterable[_Job]) -> None:
        for job in jobs:
            job.suspect_until = job.generated + SUSPECT_CLEAR_TOKENS     # view() sees the change: no reset needed

    # -- workers ---------------------------------------------------------------------------------
    def add_worker(self, worker: WorkerState) -> None:
        if worker.worker_id in self.workers:
            raise ValueError(f"worker {worker.worker_id!r} is already tracked")
        self.workers[worker.worker_id] = worker

    def remove_worker(self, worker_id: str) -> list[str]:
        """The worker is gone: the KV it kept for waiting jobs is gone with it; returns the jobs it held."""
        worker = self.workers.pop(worker_id, None)
        for job in self._jobs.values():
            if job.kv_on == worker_id:
                job.kv_on, job.parked = "", False
        return [*worker.jobs, *worker.parking] if worker else []

    def load_report(self, worker_id: str, used_blocks: int, draining: bool, steps: list[StepSums] = (),
                    mean_context: float = 0.0) -> None:
        """What the worker reported: KV in use, draining, and the steps it ran since its last report, which refit
        its speed and so its admission limit (at the knee for the running jobs' mean context)."""
        if (w := self.workers.get(worker_id)) is None:
            return
        w.used_blocks, w.reserved_blocks, w.draining = used_blocks, 0, draining
        for row in steps:
            w.speed.observe(row)
        if self.knee_share > 0:
            model = w.speed.model()            # none while the reports cannot tell its constants apart
            w.admit_limit = (model.knee(w.max_batch, mean_context, self.knee_share, w.speed.mixed_share()) if model
                             else w.max_batch)

    # -- placement ---------------------------------------------------------------------------------
    def placed(self, job_id: str, worker_id: str, park: bool = False, early_tokens: int = 0) -> str:
        """The job now runs on the worker (with `park`: is prefilled there, decodes `early_tokens`, then parks);
        returns another worker still holding a stale copy of its KV, if any."""
        job, worker = self._jobs[job_id], self.workers[worker_id]
        # placed only once it left every worker: a preemption order that was never answered is void
        worker.preempting.discard(job_id)
        worker.counted_preempting.discard(job_id)
        resumes_parked = job.parked and job.kv_on == worker_id
        holder = job.kv_on
        self._drop_kept(job)
        self._fresh.discard(job.facts)
        if park:
            worker.parking.add(job_id)
        else:
            worker.jobs[job_id] = None
            self._slots_given += 1
        if not resumes_parked:                           # a parked job's blocks are already in use there
            # until the worker's next load report; a job to park holds its early tokens too (the policy's check)
            worker.reserved_blocks += kv_blocks(worker.block_size, job.facts.prompt_len, job.generated,
                                                job.facts.max_tokens, early_tokens if park else 1)
        return holder if holder != worker_id and holder in self.workers else ""

    def placed_on(self, worker_id: str) -> set[str]:
        """The jobs placed on the worker (to run, or to be prefilled and parked) and not yet back."""
        w = self.workers.get(worker_id)
        return {*w.jobs, *w.parking} if w is not None else set()

    def parking_on(self, job_id: str, worker_id: str) -> bool:
        """The job was sent to the worker to be prefilled and parked (its parking is not a preemption)."""
        return (w := self.workers.get(worker_id)) is not None and job_id in w.parking

    def preempt_sent(self, job_id: str, worker_id: str) -> None:
        self.workers[worker_id].preempting.add(job_id)

    def left_worker(self, job_id: str, worker_id: str) -> None:
        """The job no longer runs on the worker (preempted, finished, failed, aborted, requeued), and the
        worker keeps none of its KV (see kept_kv)."""
        if (w := self.workers.get(worker_id)) is not None:
            w.jobs.pop(job_id, None)
            w.parking.discard(job_id)
            w.preempting.discard(job_id)
            w.counted_preempting.discard(job_id)
        if (job := self._jobs.get(job_id)) is not None:
            if job.kv_on == worker_id:
                self._drop_kept(job)
            if job.generated == 0:                  # back without a first token (lost worker...)
                self._fresh.add(job.facts)

    def kv_dropped(self, job_id: str, worker_id: str) -> None:
        """The worker gave up the KV it kept for the waiting job (a late report about an older copy changes nothing)."""
        if (job := self._jobs.get(job_id)) is not None and job.kv_on == worker_id:
            self._drop_kept(job)

    def _drop_kept(self, job: _Job) -> None:
        if (w := self.workers.get(job.kv_on)) is not None:
            w.parked.discard(job.facts.job_id)
        job.kv_on, job.parked = "", False

    def recomputed(self, job_id: str, worker_id: str) -> None:
        """Its worker preempted the job on its own for room and keeps it, to recompute there (the job runs there
        still): counted against its bound all the same. If a preemption order is on its way, the job's loss is
        counted now, once: the order's answer moves it without counting it again (see loss_counted)."""
        if (job := self._jobs.get(job_id)) is not None:
            job.preemptions += 1
        if (w := self.workers.get(worker_id)) is not None and job_id in w.preempting:
            w.counted_preempting.add(job_id)

    def loss_counted(self, job_id: str, worker_id: str) -> bool:
        """The job, ordered off the worker, was preempted there for room before the order arrived, and that was
        counted: the order's answer is the same loss."""
        return (w := self.workers.get(worker_id)) is not None and job_id in w.counted_preempting

    def preemptions(self, job_id: str) -> int:
        """How many times the job has been preempted (what its bound counts)."""
        return job.preemptions if (job := self._jobs.get(job_id)) is not None else 0

    def preempted(self, job_id: str, worker_id: str, mode: PreemptMode, counted: bool = True) -> None:
        """The worker gave the job back as `mode` says; `counted`: it was a preemption, which counts against the
        job's bound (not a park after its early tokens as asked: see parking_on, asked before left_worker)."""
        self.left_worker(job_id, worker_id)
        if (job := self._jobs.get(job_id)) is not None and counted:
            job.preemptions += 1
        if mode.keeps_kv:
            self.kept_kv(job_id, worker_id, parked=mode is PreemptMode.PARK)

    def requeued_view(self, job_id: str, worker_id: str, mode: PreemptMode | None, counted: bool) -> JobView:
        """The view the job will have once back in the queue from the worker (given back as `mode` says, counted
        as a preemption or not; None: dropped there with its KV), for its queue score before the move is
        recorded (preempted() records it once Redis has it)."""
        return requeued_view(self.view(job_id), worker_id, mode, counted)

    def kept_kv(self, job_id: str, worker_id: str, parked: bool) -> None:
        """The worker keeps the job's KV (on its GPU when `parked`, else in host memory): placing it there again
        resumes without recompute."""
        if (job := self._jobs.get(job_id)) is not None and (w := self.workers.get(worker_id)) is not None:
            self._drop_kept(job)
            job.kv_on, job.parked = worker_id, parked
            if parked:
                w.parked.add(job_id)

    def running(self) -> int:
        return sum(len(w.jobs) for w in self.workers.values())

    def waiting(self) -> int:
        """Jobs waiting at the scheduler for a decode slot (parked ones included)."""
        return len(self._jobs) - sum(len(w.jobs) + len(w.parking) for w in self.workers.values())

    def _mean_wait(self, now: float) -> float:
        """How long a job waits in the queue now, on average, by Little's law: jobs waiting / the rate at which
        they get decode slots, over the last WAIT_WINDOW_S. 0 until a second of history exists; with no slot
        given in that time, the window itself times the jobs waiting (a bound that grows while nothing moves)."""
        marks = self._departures
        if marks and not 0 <= now - marks[-1][0] <= WAIT_WINDOW_S:
            # no snapshot for a whole window (or the clock went back): what the marks saw is no longer recent
            marks.clear()
            if now >= WAIT_WINDOW_S:
                marks.append((now - WAIT_WINDOW_S, self._slots_given))
        if not marks or now - marks[-1][0] >= WAIT_MARK_S:
            marks.append((now, self._slots_given))
        while len(marks) > 2 and now - marks[1][0] >= WAIT_WINDOW_S:
            marks.popleft()
        span, given = now - marks[0][0], self._slots_given - marks[0][1]
        if span < 1.0:
            return 0.0
        return self.waiting() * span / max(given, 1)

    def _parked_blocks(self, w: WorkerState) -> int:
        return sum(kv_blocks(w.block_size, job.facts.prompt_len, job.generated, job.facts.max_tokens)
                   for j in w.parked if (job := self._jobs.get(j)))

    # -- what a policy sees ------------------------------------------------------------------------
    def snapshot(self, now: float, queued_ids: Iterable[str], fresh_limit: int = 256) -> Snapshot:
        """The queue's head (`queued_ids`, in queue order) and, for prefill-early, up to `fresh_limit` waiting jobs
        without a first token, by priority class and then in the order they came (a job the queue ranks low is
        still among them)."""
        queued = tuple(self.view(j) for j in queued_ids if j in self._jobs)
        fresh = tuple(self.view(j) for j in self._fresh.first(fresh_limit))
        workers = tuple(
            WorkerView(worker_id=w.worker_id, max_batch=w.admit_limit, free_blocks=w.free_blocks,
                       block_size=w.block_size, draining=w.draining, preempting=bool(w.preempting),
                       num_blocks=w.num_blocks, parking=len(w.parking), parked_blocks=self._parked_blocks(w),
                       max_model_len=w.max_model_len, early_rows=w.early_rows,
                       running=tuple(self.view(j, running=True) for j in w.jobs if j in self._jobs))
            for w in self.workers.values())
        return Snapshot(now=now, queued=queued, workers=workers, fresh=fresh, mean_wait_s=self._mean_wait(now))
