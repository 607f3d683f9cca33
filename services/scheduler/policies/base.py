"""What a scheduling policy sees and decides. Policies are pure functions of a Snapshot, so the live
dispatcher and an offline simulator run the same code."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from services.common.preempt_mode import PreemptMode
from services.scheduler.exec_time import ExecTimeModel, expected_remaining_tokens

# Queue scores are ordered lowest first; a priority class outranks any amount of predicted work.
PRIORITY_CLASS_SPAN = 1.0e12
SCORE_EPOCH = 1.7e9            # keeps arrival times small, so scores stay precise in a float64
# Within a class, a job that is due (has waited the scheduler's due_after_s) outranks every job that is not; due
# jobs go by arrival. Below PRIORITY_CLASS_SPAN, above any score a policy gives a job that is not due.
DUE_SPAN = 1.0e10


def due_score(job: "JobView") -> float:
    """The queue score of a due job: its class, then arrival. Once a job has waited due_after_s it is offered a slot
    before every job of its class that came after it, whatever their predicted work (and where it finds no KV
    room, no later job takes the worker it waits for: Placement)."""
    return -job.priority * PRIORITY_CLASS_SPAN - DUE_SPAN + (job.created - SCORE_EPOCH)


class JobView(NamedTuple):
    """A job as a policy sees it. A NamedTuple, not a frozen dataclass: snapshots build one per queued and running
    job at every decision (thousands in the simulator), and a tuple is several times cheaper to make."""
    job_id: str
    priority: int              # higher = more important
    created: float
    prompt_len: int
    max_tokens: int
    pred_len: float
    pred_p90: float
    predicted: bool
    generated: int = 0
    running: bool = False      # holds KV on its worker right now
    kv_on: str = ""            # worker that still holds its KV while it waits (swapped to host memory, or parked)
    pred_deciles: tuple[float, ...] = ()
    preemptions: int = 0       # times this scheduler has preempted it
    parked: bool = False       # that KV is on kv_on's GPU: resuming there is immediate and needs no new blocks
    suspect: bool = False      # was in a failed step with other jobs and no one to blame: runs with no other suspect
    due: bool = False          # has waited the scheduler's due_after_s since it came: ranked by arrival (due_score)

    @property
    def remaining_tokens(self) -> float:
        return expected_remaining_tokens(self.pred_len, self.pred_p90, self.generated, self.max_tokens,
                                         self.pred_deciles)

    def remaining_seconds(self, cost: ExecTimeModel) -> float:
        # a running or parked job has its context computed; any other needs it prefilled (again)
        return cost.remaining(self.prompt_len + self.generated, self.remaining_tokens, not (self.running or self.parked))


def requeued_view(job: JobView, worker_id: str, mode: PreemptMode | None, counted: bool) -> JobView:
    """A job as it will wait again once back in the queue from `worker_id`: given back as `mode` says (None:
    dropped there with its KV), counted as a preemption or not. What its queue score is computed from."""
    keeps = mode is not None and mode.keeps_kv
    return job._replace(running=False, kv_on=worker_id if keeps else "", parked=mode is PreemptMode.PARK,
                        preemptions=job.preemptions + counted)


def kv_blocks(block_size: int, prompt_len: int, generated: int, max_tokens: int, tokens: int = 1) -> int:
    """KV blocks a job holds once it has computed `tokens` more (the next one by default; a job prefilled early also
    decodes its early tokens before it parks), never past what it may still generate. The one rule for the policy's
    room checks and LiveState's reservations."""
    tokens = max(1, min(tokens, max_tokens - generated))
    return -(-(prompt_len + generated + tokens) // block_size)


@dataclass(frozen=True)
class WorkerView:
    worker_id: str
    max_batch: int
    free_blocks: int
    block_size: int
    running: tuple[JobView, ...] = ()
    draining: bool = False
    preempting: bool = False   # a preemption is in flight: its slot is about to free up
    num_blocks: int = 0        # its whole KV pool
    parking: int = 0           # jobs sent here to be prefilled and parked, not back yet
    parked_blocks: int = 0     # KV of jobs parked here (in use, but the worker gives it up first when short)
    max_model_len: int = 0     # the longest context it runs (0: no bound but its KV)
    early_rows: int = 0        # jobs it runs on their way to park at once; more wait there (0: no bound of its own)

    def holds_context(self, job: JobView) -> bool:
        return not self.max_model_len or job.prompt_len + job.generated < self.max_model_len

    def blocks_needed(self, job: JobView, tokens: int = 1) -> int:
        return kv_blocks(self.block_size, job.prompt_len, job.generated, job.max_tokens, tokens)

    @property
    def holds_suspect(self) -> bool:
        return any(job.suspect for job in self.running)


@dataclass(frozen=True)
class Snapshot:
    now: float
    queued: tuple[JobView, ...]        # in queue order (lowest score first)
    workers: tuple[WorkerView, ...]
    fresh: tuple[JobView, ...] = ()    # waiting jobs without a first token, by class then arrival (prefill-early)
    mean_wait_s: float = 0.0           # how long a job waits for a decode slot now, on average (0: not known yet)


@dataclass(frozen=True)
class Plan:
    assign: tuple[tuple[str, str], ...] = ()     # (job id, worker id)
    preempt: tuple[tuple[str, str], ...] = ()    # (job id, worker id)
    # (job id, worker id): prefill now, send the first (early) tokens, then park with the KV kept until assigned again
    prefill_early: tuple[tuple[str, str], ...] = ()


class Policy(Protocol):
    name: str
    preemptive: bool

    def queue_score(self, job: JobView, cost: ExecTimeModel) -> float: ...

    def plan(self, snap: Snapshot, cost: ExecTimeModel) -> Plan: ...


@dataclass
class _Room:
    slots: int
    blocks: int
    suspect: bool = False      # a suspect runs (or was just placed) here: no second one may join it


@dataclass
class Placement:
    """Greedy placement of queued jobs, in order, on workers with a free slot and enough KV blocks; at most one
    suspect on a worker (LiveState.blame: if a step fails again, the worker's step holds one job to blame). A job
    that waits for KV room holds back the worker with the most room it could run on: no job behind it is placed
    there until it is (what vLLM's queue does at its head), so no stream of smaller jobs can starve it."""
    assign: list[tuple[str, str]] = field(default_factory=list)
    unplaced: list[JobView] = field(default_factory=list)
    held: dict[str, str] = field(default_factory=dict)        # worker id -> the job waiting for its KV room
    blocks_left: dict[str, int] = field(default_factory=dict)  # worker id -> KV room after these placements

    def usable_by(self, job: JobView, workers: list[WorkerView]) -> list[WorkerView]:
        """The workers a slot freed for `job` could go to: not one held for another job."""
        return [w for w in workers if self.held.get(w.worker_id, job.job_id) == job.job_id]

    @classmethod
    def greedy(cls, snap: Snapshot) -> "Placement":
        # parked KV counts as room: the worker gives it up for a job it runs (a parked job placed on its own
        # worker takes its own blocks back out of that room)
        room = {w.worker_id: _Room(w.max_batch - len(w.running), w.free_blocks + w.parked_blocks, w.holds_suspect)
                for w in snap.workers if not w.draining}
        by_id = {w.worker_id: w for w in snap.workers}
        # the longest context a serving worker holds (0 where one has no bound but its KV): computed once a plan
        longest = max((w.max_model_len or math.inf for w in snap.workers if not w.draining), default=0)
        out = cls()
        slots = sum(r.slots for r in room.values() if r.slots > 0)
        for job in snap.queued:
            if slots <= 0:                      # every worker is full: the rest waits
                out.unplaced.append(job)
                continue
            target = _pick_worker(job, room, by_id, longest)
            if target is None:
                out.unplaced.append(job)
                # the jobs behind it must not take the KV it waits for, or a long prompt (or a higher class) waits
                # for good while shorter ones fill every block that frees up: its worker takes no one else now
                if (held := _worker_to_hold(job, room, by_id)) is not None:
                    slots -= room[held].slots
                    room[held].slots = 0
                    out.held[held] = job.job_id
                continue
            room[target].slots -= 1
            slots -= 1
            room[target].blocks -= by_id[target].blocks_needed(job)
            room[target].suspect |= job.suspect
            out.assign.append((job.job_id, target))
        out.blocks_left = {wid: r.blocks for wid, r in room.items()}
        return out


MAX_MISSES = 8      # waiting jobs in a row with no victim before the search for preemptions ends


def preempt_for_waiting(placement: "Placement", workers: list[WorkerView], victim,
                        skip=lambda job: False) -> tuple[tuple[str, str], ...]:
    """(job id, worker id) preemptions for the jobs `placement` left waiting, in queue order: `victim(waiting,
    open_workers)` names a running job and its worker or None; one preemption per worker. Waiting jobs for which
    `skip` holds are passed over; the search ends after `MAX_MISSES` waiting jobs in a row found no victim. (Not at
    the first: with aging a job further down may be much shorter than one ahead of it, which came earlier.)"""
    open_workers = [w for w in workers if not (w.preempting or w.draining)]
    out = []
    misses = 0
    for waiting in placement.unplaced:
        if skip(waiting):
            continue
        # a suspect could not be placed beside another suspect, nor anyone on a worker held for another job: a slot
        # freed there would go to someone else
        found = victim(waiting, [w for w in placement.usable_by(waiting, open_workers)
                                 if not (waiting.suspect and w.holds_suspect)])
        if found is None:
            misses += 1
            if misses >= MAX_MISSES:
                break
            continue
        misses = 0
        job, worker = found
        out.append((job.job_id, worker.worker_id))
        open_workers.remove(worker)
    return tuple(out)


def _may_run(job: JobView, room: _Room, worker: WorkerView) -> bool:
    """A free slot whose worker's context holds the job, and no second suspect beside one."""
    return room.slots > 0 and worker.holds_context(job) and not (job.suspect and room.suspect)


def _worker_to_hold(job: JobView, room: dict[str, _Room], workers: dict[str, WorkerView]) -> str | None:
    """Where a job that found no room waits for KV to free up: the worker with the most KV room where it may run
    and whose whole pool could hold it (a pool of unknown size, 0, is never held)."""
    could = [w for w, r in room.items() if _may_run(job, r, workers[w])
             and workers[w].blocks_needed(job) <= workers[w].num_blocks]
    return max(could, key=lambda w: room[w].blocks) if could else None


def _pick_worker(job: JobView, room: dict[str, _Room], workers: dict[str, WorkerView],
                 longest_context: float) -> str | None:
    # a job longer than some workers' context goes to one that holds it; one longer than every serving worker's
    # (validated while a larger one was connected, or none was) is placed all the same, so that the worker's
    # refusal fails it with an error instead of leaving it queued for good
    if job.prompt_len + job.generated >= longest_context:    # nor its KV, where a pool caps the context
        fits = [w for w, r in room.items() if r.slots > 0]
        return max(fits, key=lambda w: room[w].slots) if fits else None
    fits = [w for w, r in room.items() if _may_run(job, r, workers[w]) and r.blocks >= workers[w].blocks_needed(job)]
    if not fits:
        return None
    if job.kv_on in fits:               # its KV is already there: resume without recompute
        return job.kv_on
    return max(fits, key=lambda w: (room[w].slots, room[w].blocks))
