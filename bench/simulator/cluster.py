"""Discrete-event simulation of an ALISE cluster: arrivals, the scheduler's queue and policy, and workers that
run iteration by iteration (continuous batching, chunked prefill, KV blocks), with preemption by recompute or swap.

The scheduling is the live scheduler's own code: the same Policy objects, the same LiveState (placements,
reserved blocks, swapped KV, preemptions in flight) and its Snapshot builder, the same ExecTimeModel. What the
simulation replaces is I/O and the engine: Redis's queue is a sorted list, gRPC messages arrive at once, the
predictor is bench/simulator/predictions.py and an engine iteration takes IterationCost.step() seconds.

Engine model (the worker's step scheduler, simplified): each iteration runs every decoding sequence once, then
prefill chunks in admission order until the token budget is spent; a sequence whose last token's KV is written
samples a new one at the end of the iteration. Preemptions the scheduler asks for take effect between
iterations. When decode growth would overflow the KV pool the worker first drops the KV of its most recently
parked job (the scheduler, which holds it in its queue, recomputes it wherever it resumes it), then preempts its
newest sequence (recompute). A job sent to be prefilled early is parked once it has its early tokens. Blocks a
job computed stay cached after it leaves and are handed out, least recently freed first, once no free block is
left (prefix_cache.py); a chat turn finds its history's leading blocks there and computes only the rest.
"""
from __future__ import annotations

import bisect
import heapq
from dataclasses import dataclass, field
from enum import IntEnum

from bench.serve_metrics import RequestResult
from bench.simulator.cost import IterationCost
from bench.simulator.predictions import PredictorKind, SimPredictor
from bench.simulator.prefix_cache import PrefixCache
from services.common.attention_pairs import prefill_pairs
from services.common.preempt_mode import PreemptMode
from services.scheduler.config import SchedulerConfig
from services.scheduler.exec_time import ExecTimeModel
from services.scheduler.live_state import JobFacts, LiveState, WorkerState
from services.scheduler.policies import POLICIES, make_policy, policy_options
from services.scheduler.worker_speed import StepSums
from services.worker.config import WorkerConfig

QUEUE_LOOKAHEAD = 256                 # as the live dispatcher: the policy sees the queue's head
STEP_SAMPLES = 64                     # steps per load report, as a worker sends them (worker/engine_loop.py)
ORACLE = "oracle"                     # alise with true lengths for predictions: the ceiling
SIM_POLICIES = (*POLICIES, ORACLE)


@dataclass(frozen=True)
class SimRequest:
    arrival_s: float
    prompt_len: int
    output_len: int                   # true length: the job stops there (EOS) unless max_tokens comes first
    priority: int = 0
    # one key per full KV block of the prompt, naming the prompt up to that block's end: blocks an earlier prompt
    # left in a worker's prefix cache need no prefill there (() = shares nothing)
    prefix_keys: tuple[int, ...] = ()
    recorded_pred: float = 0.0        # a live run's prediction for this request (replay predictor; 0 = none)

    def __post_init__(self) -> None:
        if self.prompt_len < 1 or self.output_len < 1:
            raise ValueError(f"a request needs a prompt and an output of at least one token, got {self}")


@dataclass(frozen=True)
class WorkerSpec:
    max_batch: int = 128
    num_blocks: int = 55_000          # an H200's ~885k-token KV pool for Llama-3-8B, in blocks of 16
    block_size: int = 16
    token_budget: int = 8192          # tokens per iteration (prefill chunks + decodes)
    early_rows: int = WorkerConfig.early_rows   # jobs on their way to park decoding at once (the policy sends no more)


@dataclass
class SimConfig:
    policy: str
    cost: IterationCost
    workers: int = 1
    worker: WorkerSpec = field(default_factory=WorkerSpec)
    preempt_mode: PreemptMode = SchedulerConfig.preempt_mode
    max_tokens: int = 4096            # every request's max_tokens (what a client would send)
    predictor: SimPredictor = field(default_factory=lambda: SimPredictor(PredictorKind.NOISY, sigma=1.0))
    # the worker's length probe (worker/length_probe.py): a second estimate once the prompt is computed; None = off
    reestimate: SimPredictor | None = None
    reconsider_s: float = 0.1         # with jobs waiting, the scheduler decides at least this often (load reports)
    tick_s: float = 0.0               # 0: decide at every event; > 0: at most once per tick (faster, coarser)
    knee_share: float = SchedulerConfig.knee_share       # admission by the throughput knee, as live; 0 = off
    due_after_s: float = SchedulerConfig.due_after_s     # a job waiting this long goes by arrival, as live; 0 = off
    max_preemptions: int = SchedulerConfig.max_preemptions
    aging_s: float = SchedulerConfig.aging_s
    park_kv_share: float = SchedulerConfig.park_kv_share   # alise: prefill early and park (0 = off)
    park_after_s: float = SchedulerConfig.park_after_s     # ... only jobs that have waited this long
    park_wait_factor: float = SchedulerConfig.park_wait_factor   # ... and this many times the queue's mean wait
    max_parking: int = SchedulerConfig.max_parking         # ... at most this many in flight to a worker at once
    early_tokens: int = SchedulerConfig.early_tokens       # ... each generating this many tokens before it parks
    # the scheduler's admission (validate, tokenize, predict, write Redis): a request reaches the queue admit_s after
    # it arrives, and at most admit_per_s requests a second get through, in arrival order (0: no bound). Live on the
    # H200: ~25-40 ms, and about 200 a second (docs/BENCHMARKS.md)
    admit_s: float = 0.0
    admit_per_s: float = 0.0
    # messages between the scheduler and the workers: what a worker did (a job finished, parked, preempted, KV given
    # up) reaches the scheduler report_lag_s later, and what the scheduler decided (an assignment, a preemption)
    # reaches the worker command_lag_s later, applied at its next step. Live, a worker learns its step's tokens only
    # when it collects them behind the next step's launch (overlapped steps), so report_lag_s is about one step; 0:
    # at once, as before
    report_lag_s: float = 0.0
    command_lag_s: float = 0.0
    # keep every job's inter-token gaps (one float a token: off for very large runs, where only ITL is lost)
    record_itl: bool = True
    exec_model: ExecTimeModel = field(default_factory=ExecTimeModel)   # what the scheduler ranks jobs by

    def __post_init__(self) -> None:
        if self.policy not in SIM_POLICIES:
            raise ValueError(f"policy {self.policy!r}: choose one of {', '.join(SIM_POLICIES)}")
        self.preempt_mode = PreemptMode(self.preempt_mode)     # its value ("swap") is accepted too
        for name in ("admit_s", "admit_per_s", "report_lag_s", "command_lag_s"):
            if not 0 <= getattr(self, name) < float("inf"):
                raise ValueError(f"{name} must be >= 0 and finite")


class _Event(IntEnum):                # at equal times: arrivals first, then iteration ends, messages, decisions
    ARRIVE = 0
    STEP_END = 1
    MESSAGE = 2                       # a message between the scheduler and a worker arrives (report or command lag)
    DECIDE = 3


@dataclass
class _Commands:
    """One decision's message to a worker: jobs to take into its next step, jobs to preempt between its steps."""
    take: list[tuple[str, bool, int]] = field(default_factory=list)   # (job id, park after early tokens, KV blocks)
    preempt: list[str] = field(default_factory=list)


@dataclass(eq=False, slots=True)      # slots: the step loop reads these fields for every token simulated
class _Job:
    index: int
    job_id: str
    req: SimRequest
    prompt_len: int
    stop_at: int                      # min(true length, max_tokens)
    pred_len: float
    predicted: bool
    repred_len: float = 0.0           # the worker's re-estimate (0: none)
    generated: int = 0
    computed: int = 0                 # tokens whose KV is on the GPU of the worker running it
    held: int = 0                     # of its prompt's block keys, how many lead its table there (_Worker.hold)
    lookup_due: bool = False          # placed with a fresh prompt: look up the prefix cache again at its first chunk
    first_token_s: float | None = None
    first_placed_s: float | None = None
    preemptions: int = 0
    admitted_s: float = 0.0           # when the scheduler accepted it (arrival + admission)
    last_token_s: float = 0.0
    itl: list[float] = field(default_factory=list)   # gaps between its tokens (SimConfig.record_itl)

    def blocks(self, block_size: int) -> int:
        return -(-(self.prompt_len + self.generated + 1) // block_size)


@dataclass
class StepTotals:
    """What a worker's steps held over a run, summed: the same quantities a live run records from the worker's
    counters (bench/step_times.py, `step_times.<worker>.made_of`), so a simulated run's work can be set beside a
    live one's: where the two disagree on the work a policy makes, the simulator's verdict on it is suspect."""
    steps: int = 0
    seconds: float = 0.0
    rows: int = 0
    prefill_tokens: int = 0
    context_tokens: int = 0
    prefill_pairs: int = 0
    kept_kv_dropped: int = 0
    decode_steps: int = 0             # of which with no prefill, and what those held
    decode_rows: int = 0
    decode_context_tokens: int = 0
    over_batch_steps: int = 0         # decode-only steps with more rows than the batch (IterationCost.over_batch_step_s)

    def add(self, step: StepSums, over_batch: bool = False) -> None:
        self.steps += step.steps
        self.seconds += step.seconds
        self.rows += step.seqs
        self.prefill_tokens += step.prefill_tokens
        self.context_tokens += step.context_tokens
        self.prefill_pairs += step.prefill_pairs
        if not step.mixed_steps:
            self.decode_steps += step.steps
            self.decode_rows += step.seqs
            self.decode_context_tokens += step.context_tokens
            self.over_batch_steps += over_batch

    def summary(self) -> dict:
        """In a live run's shape: steps, their mean, and what they held."""
        made_of = {"rows": self.rows, "prefill_tokens": self.prefill_tokens, "context_tokens": self.context_tokens,
                   "prefill_pairs": self.prefill_pairs, "kept_kv_dropped": self.kept_kv_dropped,
                   "decode_steps": self.decode_steps, "decode_rows": self.decode_rows,
                   "decode_context_tokens": self.decode_context_tokens}
        return {"steps": self.steps, "mean_s": self.seconds / self.steps if self.steps else 0.0, "made_of": made_of,
                "over_batch_steps": self.over_batch_steps}


@dataclass(eq=False)
class _Worker:
    wid: str
    spec: WorkerSpec
    running: list[_Job] = field(default_factory=list)
    waiting: list[_Job] = field(default_factory=list)      # put back by the engine itself when KV ran out
    to_preempt: set[str] = field(default_factory=set)     # asked by the scheduler, applied between iterations
    host_kv: dict[str, int] = field(default_factory=dict)  # swapped-out jobs: tokens of KV held in host memory
    parked: dict[str, _Job] = field(default_factory=dict)  # parked jobs: their KV blocks stay in used_blocks
    park_after: dict[str, int] = field(default_factory=dict)   # jobs to park once they have generated this many
    decodes: list[_Job] = field(default_factory=list)               # this iteration: one token each
    prefills: list[tuple[_Job, int]] = field(default_factory=list)  # this iteration: (job, chunk of tokens)
    busy: bool = False
    extra_s: float = 0.0              # swap time to add to the next iteration
    used_blocks: int = 0              # KV blocks of the running jobs (prompt + generated + the next token), per job
    incoming_blocks: int = 0          # ... and of the jobs sent here and not yet taken (command_lag_s): reported too
    steps: list[StepSums] = field(default_factory=list)   # recent steps for the next load report, as a worker sends
    totals: StepTotals = field(default_factory=StepTotals)   # every step of the run, summed
    prefix_cache: PrefixCache = field(default_factory=PrefixCache)

    def report(self) -> list[StepSums]:
        steps, self.steps = self.steps[-STEP_SAMPLES:], []
        return steps

    @property
    def pool_used(self) -> int:
        """Blocks taken from the pool: a cached prefix block that several jobs hold is one block (the worker's
        block manager counts references; before session 43 the simulator counted it once per job)."""
        return self.used_blocks - self.prefix_cache.shared

    def admit(self, job: _Job) -> None:
        """The job runs here with `computed` tokens of KV (found cached, kept from before, or none)."""
        self.running.append(job)
        self.used_blocks += job.blocks(self.spec.block_size)
        self.hold(job)
        self.evict_cached()

    def cached_tokens(self, job: _Job) -> int:
        """Tokens of the job's context found in this worker's prefix cache (at least one is always computed)."""
        hits = self.prefix_cache.hits(job.req.prefix_keys)
        return min(hits * self.spec.block_size, job.prompt_len + job.generated - 1)

    def hold(self, job: _Job) -> None:
        """The job's table holds the blocks of its prompt computed so far: found cached, or joining the cache."""
        keys = job.req.prefix_keys
        if (now := min(min(job.computed, job.prompt_len) // self.spec.block_size, len(keys))) > job.held:
            self.prefix_cache.hold(keys, job.held, now)
            job.held = now

    def let_go(self, job: _Job) -> None:
        """The job's blocks here are freed: its full ones stay cached, evictable."""
        full = job.computed // self.spec.block_size
        self.prefix_cache.release(job.req.prefix_keys[:job.held], max(0, full - job.held))
        job.held = 0

    def evict_cached(self) -> None:
        """Cached blocks nobody holds are handed out once the free ones run out (used + evictable > the pool)."""
        if (over := self.pool_used + self.prefix_cache.evictable - self.spec.num_blocks) > 0:
            self.prefix_cache.evict(over)

    def release(self, job: _Job) -> None:
        self.running.remove(job)
        self.used_blocks -= job.blocks(self.spec.block_size)
        self.let_go(job)

    def drop_parked(self, job_id: str) -> None:
        """A parked job's KV is given back (for room, or the job resumes elsewhere)."""
        if (job := self.parked.pop(job_id, None)) is not None:
            self.used_blocks -= job.blocks(self.spec.block_size)
            self.let_go(job)
            job.computed = 0

    def room_for(self, blocks: int, only_if_enough: bool = False) -> list[str]:
        """Drops parked KV (most recently parked first) while `blocks` more do not fit; returns the jobs dropped.
        With `only_if_enough` (admitting a waiting job), none is dropped unless dropping all of it makes the room,
        as the worker's step scheduler does (_evict_for): KV given up for a job that still cannot start is lost
        for nothing. Decode growth (blocks=0) drops what it can: the alternative is preempting a running job."""
        parked = sum(j.blocks(self.spec.block_size) for j in self.parked.values()) if only_if_enough else 0
        if only_if_enough and self.pool_used + blocks - parked > self.spec.num_blocks:
            return []
        dropped = []
        while self.pool_used + blocks > self.spec.num_blocks and self.parked:
            dropped.append(job_id := next(reversed(self.parked)))
            self.drop_parked(job_id)
        return dropped

    def fits(self, blocks: int) -> bool:
        return self.pool_used + blocks <= self.spec.num_blocks


class Simulation:
    def __init__(self, cfg: SimConfig, requests: list[SimRequest]):
        self.cfg = cfg
        self.policy = make_policy("alise" if cfg.policy == ORACLE else cfg.policy, **policy_options(cfg))
        self.predictor = SimPredictor(PredictorKind.ORACLE) if cfg.policy == ORACLE else cfg.predictor
        self.exec_model = cfg.exec_model
        self.state: LiveState[None] = LiveState(knee_share=cfg.knee_share, due_after_s=cfg.due_after_s)
        self.workers = {f"w{i}": _Worker(f"w{i}", cfg.worker) for i in range(cfg.workers)}
        for w in self.workers.values():
            self.state.add_worker(WorkerState(w.wid, cfg.worker.block_size, cfg.worker.num_blocks, cfg.worker.max_batch,
                                              early_rows=cfg.worker.early_rows))
        self.jobs: dict[str, _Job] = {}
        self.queue: list[tuple[float, int, str]] = []     # (score, tie-break, job id), lowest first: Redis's ZSET
        self.queued: dict[str, tuple[float, int, str]] = {}
        self.results: list[RequestResult] = []
        self.events: list[tuple[float, int, int, object]] = []
        self.now = 0.0
        self._seq = 0
        self._dirty = False
        self._decide_at: float | None = None      # when the pending decision is due
        self._decide_token = 0                    # DECIDE events carrying an older token were superseded
        self._last_decision = -float("inf")
        self.decisions = 0
        admitted, gap = -float("inf"), 1.0 / cfg.admit_per_s if cfg.admit_per_s else 0.0
        for i, r in sorted(enumerate(requests), key=lambda ir: ir[1].arrival_s):
            admitted = max(r.arrival_s + cfg.admit_s, admitted + gap)
            self._push(admitted, _Event.ARRIVE, (i, r))

    # -- the event loop ------------------------------------------------------------------------------
    def run(self) -> tuple[list[RequestResult], float]:
        while self.events:
            t, kind, _, obj = heapq.heappop(self.events)
            self.now = t
            if kind == _Event.ARRIVE:
                self._arrive(*obj)
            elif kind == _Event.STEP_END:
                self._step_end(obj)
            elif kind == _Event.MESSAGE:
                obj()
            elif obj == self._decide_token:
                self._decide_at = None
                self._decide()
            if self._dirty:
                self._schedule_decision()
        self.results.sort(key=lambda r: r.index)
        return self.results, max((r.start_s + r.e2e_s for r in self.results), default=0.0)

    def _push(self, t: float, kind: _Event, obj: object) -> None:
        self._seq += 1
        heapq.heappush(self.events, (t, kind, self._seq, obj))

    def _after(self, delay: float, deliver) -> None:
        """`deliver()` now, or as a message `delay` later (messages sent with one lag keep their order)."""
        if delay > 0:
            self._push(self.now + delay, _Event.MESSAGE, deliver)
        else:
            deliver()

    def _schedule_decision(self) -> None:
        """Events at the same instant are decided on together; with tick_s, at most once per tick."""
        self._decide_no_later_than(max(self.now, self._last_decision + self.cfg.tick_s))

    def _decide_no_later_than(self, at: float) -> None:
        if self._decide_at is None or at < self._decide_at:
            self._decide_at = at
            self._decide_token += 1
            self._push(at, _Event.DECIDE, self._decide_token)

    # -- the scheduler -------------------------------------------------------------------------------
    def _arrive(self, index: int, req: SimRequest) -> None:
        job_id = f"sim/{index:07d}"
        pred = self.predictor.predict(req.output_len, req.recorded_pred)
        facts = JobFacts(job_id=job_id, priority=req.priority, created=self.now, prompt_len=req.prompt_len,
                         max_tokens=self.cfg.max_tokens, pred_len=pred.mean, pred_p90=pred.p90,
                         predicted=pred.predicted, pred_deciles=pred.deciles)
        job = _Job(index, job_id, req, req.prompt_len, min(req.output_len, self.cfg.max_tokens), pred.mean,
                   pred.predicted, admitted_s=self.now)
        self.jobs[job_id] = job
        self.state.track(facts)
        self._enqueue(job)

    def _enqueue(self, job: _Job) -> None:
        self._seq += 1
        entry = (self.policy.queue_score(self.state.view(job.job_id), self.exec_model), self._seq, job.job_id)
        bisect.insort(self.queue, entry)
        self.queued[job.job_id] = entry
        self._dirty = True

    def _dequeue(self, job_id: str) -> None:
        entry = self.queued.pop(job_id)
        del self.queue[bisect.bisect_left(self.queue, entry)]

    def _decide(self) -> None:
        """One scheduler tick: what the workers reported, the policy's plan, its commands."""
        self._dirty = False
        self._last_decision = self.now
        self.decisions += 1
        set_generated = self.state.set_generated
        for w in self.workers.values():
            total = 0
            for job in w.running:
                set_generated(job.job_id, job.generated)
                total += job.prompt_len + job.generated
            # as a live worker's report counts the KV it promised, this one counts what is on its way to it: else each
            # decision within the command lag would see that room as free again
            self.state.load_report(w.wid, w.pool_used + w.incoming_blocks, False, w.report(),
                                   total / len(w.running) if w.running else 0.0)
        for job_id in self.state.become_due(self.now):   # as the live dispatcher does: a new score, by arrival
            if job_id in self.queued:
                self._dequeue(job_id)
                self._enqueue(self.jobs[job_id])
        snap = self.state.snapshot(self.now, [e[2] for e in self.queue[:QUEUE_LOOKAHEAD]])
        plan = self.policy.plan(snap, self.exec_model)
        # worker id -> what this decision tells it: one message. Workers in the order of the plan's placements (an idle
        # one starts its step as its message arrives: with no lag, in that order, as before messages had a lag)
        commands: dict[str, _Commands] = {}
        for job_id, wid in plan.assign:
            commands.setdefault(wid, _Commands()).take.append(self._assign(self.jobs[job_id], self.workers[wid]))
        for job_id, wid in plan.prefill_early:
            commands.setdefault(wid, _Commands()).take.append(self._assign(self.jobs[job_id], self.workers[wid], True))
        for job_id, wid in plan.preempt:
            self.state.preempt_sent(job_id, wid)
            commands.setdefault(wid, _Commands()).preempt.append(job_id)
        for wid, sent in commands.items():
            self._after(self.cfg.command_lag_s, lambda w=self.workers[wid], sent=sent: self._commands(w, sent))
        if self.queue and self.cfg.reconsider_s > 0:
            self._decide_no_later_than(self.now + self.cfg.reconsider_s)

    def _assign(self, job: _Job, w: _Worker, park: bool = False) -> tuple[str, bool, int]:
        """The scheduler places the job on `w`: (job id, park, the KV blocks it will take there) to send."""
        self._dequeue(job.job_id)
        if holder := self.state.placed(job.job_id, w.wid, park, self.cfg.early_tokens):
            self.workers[holder].host_kv.pop(job.job_id, None)     # the stale copy of its KV is dropped
            self.workers[holder].drop_parked(job.job_id)
        if job.first_placed_s is None:
            job.first_placed_s = self.now
        blocks = 0 if job.job_id in w.parked else job.blocks(w.spec.block_size)   # parked KV is counted already
        w.incoming_blocks += blocks
        return job.job_id, park, blocks

    def _commands(self, w: _Worker, sent: _Commands) -> None:
        """A worker gets one decision's commands; an idle one given jobs starts a step."""
        w.to_preempt.update(sent.preempt)
        for job_id, park, blocks in sent.take:
            w.incoming_blocks -= blocks
            self._take(self.jobs[job_id], w, park)
        if sent.take and not w.busy:
            self._start_step(w)

    def _take(self, job: _Job, w: _Worker, park: bool) -> None:
        # a placement voids a preemption order for the job that was never answered (it left the batch by itself
        # meanwhile, a park the scheduler heard of before it placed the job again), as the live worker, taking its
        # commands in order, would have found nothing to preempt
        w.to_preempt.discard(job.job_id)
        if park:
            w.park_after[job.job_id] = job.generated + self.cfg.early_tokens
        if job.job_id in w.parked:                                 # resumed where it was parked: KV in place
            del w.parked[job.job_id]
            w.running.append(job)
            return
        if job.job_id in w.host_kv:                                # resumed where its KV was swapped out
            job.computed = w.host_kv.pop(job.job_id)
            w.extra_s += self.cfg.cost.swap_per_token_s * job.computed
        else:
            job.computed, job.lookup_due = w.cached_tokens(job), True
        w.admit(job)

    # -- the workers -------------------------------------------------------------------------------
    def _start_step(self, w: _Worker) -> None:
        if w.to_preempt:
            for job in [j for j in w.running + w.waiting if j.job_id in w.to_preempt]:
                self._preempt(w, job, self.cfg.preempt_mode)
            w.to_preempt.clear()
        w.evict_cached()      # the last step's decode growth took free blocks, then cached ones, before any lookup here
        # Out of KV, the engine itself puts a job back in its own waiting line (recompute), as vLLM does: the newest
        # with preemptions left under the bound, as the live worker does (step_scheduler._victim); the scheduler
        # counts it (the job still runs there in its eyes). They rejoin when blocks free up.
        while w.waiting:
            self._kv_dropped(w, w.room_for(need := w.waiting[0].blocks(w.spec.block_size), only_if_enough=True))
            if not w.fits(need):
                break
            job = w.waiting.pop(0)
            job.computed = w.cached_tokens(job)    # as live, its prompt is looked up in the prefix cache again
            job.lookup_due = True
            w.admit(job)
        self._kv_dropped(w, w.room_for(0))       # decode growth past the pool: parked KV goes first
        while len(w.running) > 1 and w.pool_used > w.spec.num_blocks:
            job = next((j for j in reversed(w.running) if self.state.preemptions(j.job_id) < self.cfg.max_preemptions),
                       w.running[-1])
            w.release(job)
            job.computed = 0
            job.preemptions += 1
            self._report(lambda j=job.job_id: self.state.recomputed(j, w.wid))
            w.waiting.insert(0, job)
        if not w.running:
            w.busy = False
            return
        # decodes first (one token each), then prefill chunks in admission order while the token budget lasts.
        # One pass over the running jobs finds the decodes and their context (this runs once per simulated step)
        decodes, context, budget = [], 0, w.spec.token_budget
        for j in w.running:
            if len(decodes) >= budget:
                break
            if j.prompt_len + j.generated - j.computed == 1:
                decodes.append(j)
                context += j.computed + 1
        budget, prefills, prefill, pairs = budget - len(decodes), [], 0, 0
        if budget > 0 and len(decodes) < len(w.running):
            for job in w.running:
                if job.lookup_due:
                    # the live worker looks a prompt up when it plans its first chunk (step_scheduler._admit), not
                    # when the job reaches it: blocks computed meanwhile (an earlier turn of its conversation,
                    # prefilled in the steps it waited for budget) are hits
                    job.computed, job.lookup_due = max(job.computed, w.cached_tokens(job)), False
                    w.hold(job)
                need = job.prompt_len + job.generated - job.computed
                if need > 1:
                    n = min(need, budget)
                    prefills.append((job, n))
                    prefill += n
                    pairs += prefill_pairs(job.computed, n)     # a chunk that samples nothing: a prefill
                    context += job.computed + n
                    budget -= n
                    if budget <= 0:
                        break
        w.decodes, w.prefills, w.busy = decodes, prefills, True
        mixed = bool(prefills)
        rows = len(decodes) + len(prefills)
        over_batch = rows > self.cfg.worker.max_batch
        duration = self.cfg.cost.step(rows, prefill, context, mixed, over_batch, pairs) + w.extra_s
        w.extra_s = 0.0
        w.steps.append(step := StepSums(1, duration, rows, prefill, context, int(mixed), prefill_pairs=pairs))
        w.totals.add(step, over_batch and not mixed)
        if len(w.steps) > 2 * STEP_SAMPLES:
            del w.steps[:-STEP_SAMPLES]
        self._push(self.now + duration, _Event.STEP_END, w)

    def _token(self, job: _Job) -> None:
        """A job's next token is out now."""
        job.generated += 1
        if job.first_token_s is None:
            job.first_token_s = self.now
        elif self.cfg.record_itl:
            job.itl.append(self.now - job.last_token_s)
        job.last_token_s = self.now

    def _sampled(self, w: _Worker, job: _Job, done: list[_Job]) -> None:
        """`job` samples a token: the first after a fresh prompt is where the probe re-estimates its length (a prompt
        whose last chunk left one token reaches here as a decode: before, it missed the re-estimate)."""
        if job.generated == 0 and self.cfg.reestimate is not None:
            job.repred_len = self.cfg.reestimate.predict(job.req.output_len).median   # the probe's is a median
            self._report(lambda: self.state.repredict(job.job_id, job.repred_len))
        self._token(job)
        if (job.prompt_len + job.generated) % w.spec.block_size == 0:
            w.used_blocks += 1                                          # the next token starts a new block
        if job.generated >= job.stop_at:
            done.append(job)

    def _step_end(self, w: _Worker) -> None:
        done = []
        for job in w.decodes:              # one token to compute: a decode, or a prompt's last token after its chunks
            job.computed += 1
            if job.generated == 0:         # that last token may complete the prompt's last block: it is cached too
                w.hold(job)
            self._sampled(w, job, done)
        for job, n in w.prefills:
            job.computed += n
            w.hold(job)
            if job.computed == job.prompt_len + job.generated:         # its last token's KV is in: sample one
                self._sampled(w, job, done)
        for job in done:
            w.release(job)
            w.to_preempt.discard(job.job_id)
            w.park_after.pop(job.job_id, None)
            self._finish(job)
        if w.park_after:                          # sent to be parked after their first tokens: those that have them
            for job in [j for j in w.running if job_generated_enough(j, w.park_after)]:
                del w.park_after[job.job_id]
                self._park(w, job, counted=False)
        self._start_step(w)

    def _kv_dropped(self, w: _Worker, job_ids: list[str]) -> None:
        w.totals.kept_kv_dropped += len(job_ids)
        for job_id in job_ids:                    # the worker tells the scheduler (KeptKvDropped)
            self._report(lambda j=job_id: self.state.kv_dropped(j, w.wid))

    def _park(self, w: _Worker, job: _Job, counted: bool) -> None:
        """The job stops decoding and keeps its KV on the worker; it waits in the scheduler's queue."""
        w.running.remove(job)
        w.parked[job.job_id] = job
        job.preemptions += counted
        self._report(lambda: self._requeue(job, w, PreemptMode.PARK, counted))

    def _preempt(self, w: _Worker, job: _Job, mode: PreemptMode) -> None:
        if mode is PreemptMode.PARK and job in w.running:
            self._park(w, job, counted=True)
            return
        if job in w.waiting:
            w.waiting.remove(job)          # put back by the engine: holds no blocks
        else:
            w.release(job)
        job.preemptions += 1
        if mode is PreemptMode.SWAP:
            w.host_kv[job.job_id] = job.computed
            w.extra_s += self.cfg.cost.swap_per_token_s * job.computed
        job.computed = 0
        mode = PreemptMode.SWAP if mode is PreemptMode.SWAP else PreemptMode.RECOMPUTE
        self._report(lambda: self._requeue(job, w, mode, True))

    def _requeue(self, job: _Job, w: _Worker, mode: PreemptMode, counted: bool) -> None:
        """The scheduler hears that the job left the worker's batch (parked, swapped out or to recompute)."""
        self.state.preempted(job.job_id, w.wid, mode, counted)
        self.state.set_generated(job.job_id, job.generated)
        self._enqueue(job)

    def _report(self, deliver) -> None:
        """What a worker tells the scheduler reaches it report_lag_s later (in the order it was sent)."""
        self._after(self.cfg.report_lag_s, deliver)

    def _finish(self, job: _Job) -> None:
        self._report(lambda: self._forget(job.job_id))
        del self.jobs[job.job_id]
        r = job.req
        self.results.append(RequestResult(
            index=job.index, expected_output_tokens=r.output_len, start_s=r.arrival_s, ok=True,
            prompt_tokens=r.prompt_len, output_tokens=job.generated, ttft_s=job.first_token_s - r.arrival_s,
            e2e_s=self.now - r.arrival_s, queue_s=job.first_placed_s - job.admitted_s, admit_s=job.admitted_s - r.arrival_s,
            preemptions=job.preemptions, itl_s=job.itl,
            predicted_output_tokens=round(job.pred_len) if job.predicted else 0,
            repredicted_output_tokens=round(job.repred_len),
            finish_reason="stop" if job.generated == r.output_len else "length"))

    def _forget(self, job_id: str) -> None:
        """The scheduler hears that the job finished: its slot is free."""
        self.state.forget(job_id)
        self._dirty = True


def simulate(cfg: SimConfig, requests: list[SimRequest]) -> tuple[list[RequestResult], float, int]:
    """(per-request results, duration, number of scheduler decisions) of one simulated run."""
    sim = Simulation(cfg, requests)
    results, duration = sim.run()
    return results, duration, sim.decisions


def step_totals(sim: Simulation) -> dict[str, dict]:
    """Each worker's step totals of a finished run, keyed as a live run's `step_times` (by worker)."""
    return {w.wid: w.totals.summary() for w in sim.workers.values()}


def job_generated_enough(job: _Job, park_after: dict[str, int]) -> bool:
    """A job sent to be prefilled early has generated the tokens it was to generate before it parks."""
    return (n := park_after.get(job.job_id)) is not None and job.generated >= n
