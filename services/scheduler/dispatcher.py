"""The scheduler's core: admits jobs, asks the policy what to run where, and applies worker reports.

Every state change of a job goes through JobStore (Redis, atomic). What the scheduler remembers between
ticks (records, token counts, placements) is owned by LiveState, which also builds the policy's Snapshot;
this class does the I/O: Redis, the predictor, and commands to the worker sessions.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from alise.v1 import generate_pb2 as pb
from alise.v1 import worker_pb2 as wpb

from services.scheduler import metrics
from services.scheduler.config import SchedulerConfig
from services.scheduler.exec_time import P90_OVER_GUESS, ExecTimeModel
from services.common.preempt_mode import PreemptMode
from services.scheduler import keys
from services.scheduler.job_events import JobEvent, JobEventHub
from services.scheduler.job_messages import FINISH_NAMES, complete_message
from services.scheduler.job_store import (FINAL_STATUSES, STORE_UNAVAILABLE, CreateOutcome, JobRecord, JobStore,
                                         RequeueCause, StepFailureOutcome, StoreFenced)
from services.scheduler.keyed_locks import KeyedLocks
from services.scheduler.live_state import JobFacts, LiveState, WorkerState, job_view
from services.scheduler.policies import make_policy, policy_options
from services.scheduler.policies.base import Snapshot
from services.scheduler.predictor_client import PredictorClient
from services.scheduler.tenants import Tenant
from services.scheduler.validation import ValidRequest
from services.scheduler.worker_sessions import WorkerSession
from services.scheduler.worker_speed import StepSums

log = logging.getLogger("alise.scheduler")
QUEUE_LOOKAHEAD = 256
ORPHAN_SWEEP_S = 10.0


def record_finished(done: pb.GenerateComplete) -> None:
    """A finished request's series (vLLM's request-level metrics)."""
    t = done.timings
    metrics.SUCCESS.labels(finished_reason=FINISH_NAMES.get(done.finish_reason, "error")).inc()
    metrics.PROMPT_TOKENS.inc(done.usage.prompt_tokens)
    metrics.E2E.observe(t.e2e_seconds)
    if t.queue_seconds:
        metrics.QUEUE_TIME.observe(t.queue_seconds)
    if t.ttft_seconds:
        metrics.TTFT.observe(t.ttft_seconds)
        if done.usage.completion_tokens > 1:
            metrics.TPOT.observe((t.e2e_seconds - t.ttft_seconds) / (done.usage.completion_tokens - 1))


class Dispatcher:
    def __init__(self, cfg: SchedulerConfig, store: JobStore, predictor: PredictorClient, hub: JobEventHub,
                 may_act: Callable[[], bool] = lambda: True):
        self.cfg = cfg
        self.store = store
        self.predictor = predictor
        self.hub = hub
        self.policy = make_policy(cfg.policy, **policy_options(cfg))
        self.cost = ExecTimeModel()
        self.sessions: dict[str, WorkerSession] = {}
        self._worker_turns = KeyedLocks()            # a worker id's sessions join, leave and are swept one at a time
        self._strays: dict[str, set[str]] = {}       # worker id -> strays the last sweep found there
        self.may_act = may_act                       # whether it may act on the store now (the server's lease)
        self.state: LiveState[JobRecord] = LiveState(knee_share=cfg.knee_share, due_after_s=cfg.due_after_s)
        self.queued_work_s = 0.0                     # predicted seconds of queued work, as of the last tick
        self._wake = asyncio.Event()

    # -- admission -------------------------------------------------------------------------------
    async def submit(self, v: ValidRequest, tenant: Tenant) -> CreateOutcome:
        """Predict, score and queue a validated request, within the tenant's and the queue's limits."""
        if self.cfg.max_queued_work_s and self.queued_work_s > self.cfg.max_queued_work_s:
            return CreateOutcome.WORK_FULL
        bound = self._prediction_bound(v.sampling.max_tokens)
        started = time.monotonic()
        pred = await self.predictor.predict(v.predictor, bound)
        predicted = time.monotonic()
        metrics.ADMISSION.labels(stage=metrics.AdmissionStage.PREDICT.value).observe(predicted - started)
        mean = pred.mean if pred else self.cfg.prior_output_tokens
        rec = JobRecord(job_id=keys.job_id(tenant.name, v.request_id), fingerprint=v.fingerprint,
                        prompt_ids=v.prompt_ids, prompt_text=v.predictor.text, sampling=v.sampling,
                        priority=v.priority, pred_len=mean,
                        pred_p90=pred.p90 if pred else P90_OVER_GUESS * mean, predicted=pred is not None,
                        pred_deciles=list(pred.deciles) if pred else [],
                        previous_reply_tokens=v.predictor.previous_reply_tokens,
                        newest_message_chars=v.predictor.newest_message_chars)
        rec.pred_time = self.cost.total(len(rec.prompt_ids), min(mean, bound))
        score = self.policy.queue_score(job_view(self._facts(rec)), self.cost)
        outcome = await self.store.create(rec, score, tenant.max_live_jobs, self.cfg.max_queued_jobs)
        metrics.ADMISSION.labels(stage=metrics.AdmissionStage.STORE.value).observe(time.monotonic() - predicted)
        if outcome is CreateOutcome.CREATED:
            self.state.track(self._facts(rec), rec)
            self.wake()
        return outcome

    def context_limit(self, model_limit: int) -> int:
        """The longest context a request may ask for now: the model's, within the largest that a connected worker
        runs (a worker's is capped by its KV pool). Before, a longer prompt was accepted and waited for good for a
        worker that could hold it. With no worker connected, the model's (requests wait for workers to come)."""
        return min(model_limit, max((s.max_model_len for s in self.sessions.values()), default=model_limit))

    def _prediction_bound(self, max_tokens: int) -> int:
        return max_tokens if self.cfg.predict_within_max_tokens else self.cfg.max_tokens_cap

    def _facts(self, rec: JobRecord) -> JobFacts:
        """What the policies see of a job: its max_tokens only as far as predictions may use it."""
        return job_facts(rec, self._prediction_bound(rec.sampling.max_tokens))

    async def _record(self, job_id: str) -> JobRecord | None:
        """The job's record, read from Redis into LiveState when this scheduler has not seen it yet."""
        if (rec := self.state.payload(job_id)) is None and (found := await self.store.progress(job_id)) is not None:
            rec, generated, preemptions = found
            self.state.track(self._facts(rec), rec, generated, preemptions)
        return rec

    # -- the dispatch loop -----------------------------------------------------------------------
    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        last_sweep = time.monotonic()
        paused = fenced = False
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.cfg.tick_s * 10)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            if not self.may_act():
                if not paused:
                    log.error("dispatching paused: this scheduler's lease is not renewed (another may hold it)")
                paused = True
                continue
            if paused:
                paused = False
                log.warning("dispatching again: the lease is renewed")
            try:
                started = time.monotonic()
                await self.tick()
                metrics.DISPATCH_TICK.observe(time.monotonic() - started)
                # what wakes the loop meanwhile is decided by the next pass, after the gap
                await asyncio.sleep(self.cfg.dispatch_gap_s - (time.monotonic() - started))
                if time.monotonic() - last_sweep > ORPHAN_SWEEP_S:   # defence in depth, see recover_orphans
                    last_sweep = time.monotonic()
                    if n := await self.recover_orphans():
                        log.warning("requeued %d jobs left on workers that are gone", n)
                if fenced:
                    fenced = False
                    log.warning("dispatching again: the job store accepts this scheduler's changes")
            except StoreFenced as e:
                # Redis does not name this scheduler as the lease's holder: another does (leader_lease.keep() then
                # stops this one), or the key is gone (a Redis that lost it: keep() takes it again within a third
                # of the term). Either way nothing was applied; the next tick tries again.
                if not fenced:
                    log.error("dispatching refused by the job store: %s", e)
                fenced = True
                await asyncio.sleep(self.cfg.tick_s)
            except Exception:  # noqa: BLE001 - one bad tick must not stop scheduling
                log.exception("dispatch tick failed")
                await asyncio.sleep(self.cfg.tick_s)

    async def tick(self) -> None:
        snap = await self.snapshot()
        plan = self.policy.plan(snap, self.cost)
        for job_id, worker_id in plan.preempt:
            if (s := self.sessions.get(worker_id)) is not None:     # it may have left since the snapshot
                self._preempt(job_id, s)
        for job_id, worker_id in plan.assign:
            if (s := self.sessions.get(worker_id)) is not None:
                await self._assign(job_id, s)
        for job_id, worker_id in plan.prefill_early:
            if (s := self.sessions.get(worker_id)) is not None:
                await self._assign(job_id, s, park=True)
        # The queue's head (QUEUE_LOOKAHEAD jobs) holds what will run next: its predicted work, spread over the
        # workers, is a lower bound on how long a new job would wait, and what admission bounds.
        queued_work = sum(j.remaining_seconds(self.cost) for j in snap.queued)
        self.queued_work_s = queued_work / max(1, len(snap.workers))
        metrics.QUEUED.set(len(snap.queued))
        metrics.QUEUED_WORK.set(queued_work)
        metrics.WORKERS.set(len(snap.workers))
        metrics.PLACED.set(self.state.running())

    async def snapshot(self) -> Snapshot:
        now = time.time()
        await self._rescore_due(now)
        queued = [job_id for job_id in await self.store.queue_head(QUEUE_LOOKAHEAD)
                  if await self._record(job_id) is not None]
        return self.state.snapshot(now, queued)

    async def _rescore_due(self, now: float) -> None:
        """Jobs that have waited due_after_s go by arrival from now on: their scores in the queue change. One whose
        new score did not land (Redis failed) is named again next tick."""
        due = self.state.become_due(now)
        done = 0
        try:
            for job_id in due:
                if await self._record(job_id) is not None:      # a job a predecessor queued is read in here,
                    self.state.mark_due(job_id)                  # and marked (the rest are already)
                    await self.store.rescore(job_id, self.policy.queue_score(self.state.view(job_id), self.cost))
                done += 1
        finally:
            if done < len(due):
                self.state.not_due_yet(due[done:], now)

    async def _rescore_if_due_since(self, job_id: str, scored_due: bool) -> None:
        """A job scored for the queue, then put there after an await: if it became due meanwhile, `_rescore_due`
        found it not yet back in the queue, so its new score is set here."""
        if self.state.is_due(job_id) and not scored_due:
            await self.store.rescore(job_id, self.policy.queue_score(self.state.view(job_id), self.cost))

    async def recover_arrivals(self) -> int:
        """Every job a predecessor left in the queue becomes due in time, however deep it waits: its arrival is
        read now (the queue's head, where jobs are read in, may not reach it for a long while)."""
        arrivals = await self.store.queued_arrivals() if self.cfg.due_after_s > 0 else []
        for job_id, created in arrivals:
            self.state.expect_queued(job_id, created)
        return len(arrivals)

    async def _assign(self, job_id: str, s: WorkerSession, park: bool = False) -> None:
        """Send the job to the worker; with `park`, to be prefilled there and parked after its early tokens."""
        if not await self.store.claim(job_id, s.worker_id):
            return                                       # aborted or taken meanwhile
        try:
            await self._send_claimed(job_id, s, park)
        except Exception:
            # claimed in Redis, never sent: it goes back to the queue (before, it stayed "running" on a worker that
            # never had it, for good). If Redis fails here too, the sweep of strays does it (_requeue_strays).
            with contextlib.suppress(Exception):
                await self._requeue(job_id, s.worker_id)
            raise

    async def _send_claimed(self, job_id: str, s: WorkerSession, park: bool) -> None:
        tokens, text = await self.store.output(job_id)
        if (rec := self.state.payload(job_id)) is None:
            return                                       # aborted while we awaited Redis: abort() told the worker
        self.state.set_generated(job_id, len(tokens))
        if self.sessions.get(s.worker_id) is not s:      # the worker left while we awaited Redis
            await self._requeue(job_id, s.worker_id)
            return
        # no await from here on: worker_lost() either ran before (caught above) or will see this job
        if holder := self.state.placed(job_id, s.worker_id, park, self.cfg.early_tokens):
            self.sessions[holder].abort(job_id)          # drop the stale copy of its KV
        s.send(assign=wpb.AssignJob(
            job_id=job_id, prompt_token_ids=rec.prompt_ids, output_token_ids=tokens, output_text=text,
            sampling=rec.sampling.to_proto(), park_after_first_token=park,
            early_tokens=self.cfg.early_tokens if park else 0,
            preemptions_left=max(0, self.cfg.max_preemptions - self.state.preemptions(job_id))))

    def _preempt(self, job_id: str, s: WorkerSession) -> None:
        self.state.preempt_sent(job_id, s.worker_id)
        metrics.PREEMPTIONS.inc()
        s.send(preempt=wpb.PreemptJob(job_id=job_id, mode=self.cfg.preempt_mode.wire))

    async def _requeue(self, job_id: str, worker_id: str, preempted: PreemptMode | None = None) -> bool:
        """Back to the queue from the worker: given back as `preempted` says (parked after its early tokens as asked,
        or preempted), or (None) dropped there with its KV. Whether it went back (not when it had ended)."""
        early = preempted is not None and self.state.parking_on(job_id, worker_id)   # parked as asked, not preempted
        already = preempted is not None and self.state.loss_counted(job_id, worker_id)   # counted when reported
        counted = preempted is not None and not early and not already
        self.state.left_worker(job_id, worker_id)
        if preempted is not None and not self.state.knows(job_id):
            return False           # it ended (aborted) after we asked for the preemption: nothing to requeue
        if await self._record(job_id) is None:
            await self.store.drop_entry(job_id, worker_id)      # it ended, or its record is gone
            return False
        view = self.state.requeued_view(job_id, worker_id, preempted, counted)   # kv_on: who keeps its KV, if any
        cause = (RequeueCause.PARKED if early else RequeueCause.COUNTED if already
                 else RequeueCause.PREEMPTED if counted else RequeueCause.RETURNED)
        if not await self.store.requeue(job_id, worker_id, self.policy.queue_score(view, self.cost), view.kv_on, cause):
            if (st := await self.store.state(job_id)) is None or st.status in FINAL_STATUSES:
                self.state.forget(job_id)        # it ended meanwhile: nothing left to remember
            return False
        if preempted is not None:
            self.state.preempted(job_id, worker_id, preempted, counted)   # its kept KV remembered
        await self._rescore_if_due_since(job_id, view.due)
        return True

    # -- worker sessions -------------------------------------------------------------------------
    async def worker_joined(self, s: WorkerSession) -> bool:
        """Register the session; False if another session holds its worker id. A worker id's sessions join and
        leave one at a time (`_worker_turns`): a worker that redials at once waits for its lost session's jobs to
        be requeued (before, the lost session's requeue went on over the new session's jobs, which the next tick
        had placed on the same id: they were pulled from under the worker that ran them)."""
        async with self._worker_turns.hold(s.worker_id):
            return await self._join(s)

    async def _join(self, s: WorkerSession) -> bool:
        if s.worker_id in self.sessions:
            return False
        # A (re)connecting worker holds no jobs: whatever Redis still records on its id (a session lost
        # while Redis was away) goes back to the queue before the new session can take work.
        for job_id in await self.store.worker_job_ids(s.worker_id):
            await self._requeue(job_id, s.worker_id)
        await self.store.register_worker(s.worker_id, {"model": s.model, "num_blocks": str(s.num_blocks),
                                                       "max_batch": str(s.max_batch)}, self.cfg.worker_ttl_s)
        self.sessions[s.worker_id] = s
        self.state.add_worker(WorkerState(s.worker_id, s.block_size, s.num_blocks, s.max_batch,
                                          max_model_len=s.max_model_len, early_rows=s.early_rows))
        log.info("worker %s joined (%d blocks of %d, batch %d)", s.worker_id, s.num_blocks, s.block_size, s.max_batch)
        self.wake()
        return True

    async def worker_lost(self, s: WorkerSession) -> None:
        async with self._worker_turns.hold(s.worker_id):
            await self._leave(s)

    async def _leave(self, s: WorkerSession) -> None:
        if self.sessions.get(s.worker_id) is not s:
            return                                           # never joined (registration failed)
        del self.sessions[s.worker_id]
        self._strays.pop(s.worker_id, None)
        held = self.state.remove_worker(s.worker_id)
        try:
            for job_id in held:
                metrics.REQUEUED_LOST.inc()
                await self._requeue(job_id, s.worker_id)
            await self.store.forget_worker(s.worker_id)      # only once its jobs are safely back in the queue
            log.warning("worker %s left; %d jobs requeued", s.worker_id, len(held))
        except STORE_UNAVAILABLE as e:
            log.warning("worker %s left while the job store is unavailable (%s): the orphan sweep requeues its jobs",
                        s.worker_id, e)
        self.wake()

    async def recover_orphans(self) -> int:
        """Jobs recorded as running on workers that are not connected go back to the queue: at startup
        (workers of a previous scheduler) and periodically (anything a lost session left behind); so do the strays
        of connected workers (_requeue_strays)."""
        n = 0
        for worker_id in list(self.sessions):
            async with self._worker_turns.hold(worker_id):
                if worker_id in self.sessions:
                    n += await self._requeue_strays(worker_id)
        for worker_id in await self.store.known_workers():
            async with self._worker_turns.hold(worker_id):   # not while a session of it joins or leaves
                if worker_id in self.sessions:
                    continue
                for job_id in await self.store.worker_job_ids(worker_id):
                    n += await self._requeue(job_id, worker_id)
                await self.store.forget_worker(worker_id)
        return n

    async def _requeue_strays(self, worker_id: str) -> int:
        """Jobs Redis records as running on a connected worker that this scheduler has not placed there: a claim
        whose job was never sent (Redis failed in between), or a report whose Redis update failed after LiveState
        had already let the job go. Nothing else would ever move them. A stray is requeued when two sweeps in a row
        find it (a message handler between its two updates is not one), and the worker is told to drop any copy."""
        placed = self.state.placed_on(worker_id)
        strays = {j for j in await self.store.worker_job_ids(worker_id) if j not in placed}
        seen_before, self._strays[worker_id] = self._strays.get(worker_id, set()), strays
        confirmed = strays & seen_before
        n = 0
        for job_id in confirmed:
            log.warning("job %s was recorded as running on worker %s, which was never sent it: requeued",
                        job_id, worker_id)
            if (s := self.sessions.get(worker_id)) is not None:
                s.abort(job_id)
            n += await self._requeue(job_id, worker_id)
        self._strays[worker_id] -= confirmed
        return n

    async def on_worker_message(self, s: WorkerSession, msg: wpb.WorkerMessage) -> None:
        if (msg := s.current(msg)) is None:
            return                                           # about jobs aborted there, or an abort's acknowledgement
        kind = msg.WhichOneof("kind")
        if kind == "tokens":
            # No tick per engine step: token counts only refine remaining-time estimates, which the
            # periodic tick picks up; placement changes come with the messages below.
            await self._on_tokens(s, msg.tokens)
            return
        if kind == "finished":
            await self._on_finished(s, msg.finished)
        elif kind == "preempted":
            await self._requeue(msg.preempted.job_id, s.worker_id, PreemptMode.from_wire(msg.preempted.mode))
        elif kind == "step_failed":
            await self._on_step_failed(s, msg.step_failed)
        elif kind == "estimates":
            await self._on_estimates(s.worker_id, msg.estimates)
        elif kind == "kept_kv_dropped":
            for job_id in msg.kept_kv_dropped.job_ids:      # recomputed wherever it resumes
                self.state.kv_dropped(job_id, s.worker_id)
        elif kind == "recomputed":                           # preempted there for room: counted against its bound
            for job_id in await self.store.count_recomputed(s.worker_id, list(msg.recomputed.job_ids)):
                self.state.recomputed(job_id, s.worker_id)
        elif kind == "load":
            s.load = ld = msg.load
            # blocks promised to its sequences are as good as used: else the scheduler would place more there
            steps = [StepSums(t.steps, t.seconds, t.seqs, t.prefill_tokens, t.context_tokens, t.mixed_steps,
                              t.device_seconds, t.prefill_pairs) for t in ld.steps]
            self.state.load_report(s.worker_id, ld.used_blocks + ld.promised_blocks, ld.draining, steps,
                                   ld.running_tokens / ld.running if ld.running else 0.0)
            await self.store.heartbeat(s.worker_id, self.cfg.worker_ttl_s)
        self.wake()

    async def _on_estimates(self, worker_id: str, ev: wpb.LengthEstimates) -> None:
        """The worker re-estimated jobs' lengths from the model's hidden state: the policy ranks them by it from
        now on, and the job keeps it in Redis (timings; a scheduler taking over ranks by it too). Only values a
        length can have are kept, bounded as any prediction, and only on jobs the worker still runs."""
        usable = [(e.job_id, t) for e in ev.estimates
                  if (t := self.state.usable_estimate(e.job_id, e.output_tokens)) is not None]
        if usable:
            for job_id, tokens in await self.store.repredict(worker_id, usable):
                self.state.repredict(job_id, tokens)

    async def _on_tokens(self, s: WorkerSession, ev: wpb.TokenEvents) -> None:
        deltas = [(d.job_id, list(d.token_ids), d.text) for d in ev.deltas]
        counts = await self.store.append_many(s.worker_id, deltas)
        for (job_id, token_ids, text), count in zip(deltas, counts):
            if count:
                self.state.set_generated(job_id, count)
                rec = self.state.payload(job_id)
                self.hub.publish(job_id, JobEvent(pb.GenerateResponse(chunk=pb.GenerateChunk(
                    text=text, token_ids=token_ids)), first_token=count - len(token_ids),
                    fingerprint=rec.fingerprint if rec else ""))

    async def _on_finished(self, s: WorkerSession, ev: wpb.JobFinished) -> None:
        self.state.left_worker(ev.job_id, s.worker_id)   # also if it finished before our preempt arrived
        if await self.store.finish(ev.job_id, s.worker_id, FINISH_NAMES[ev.finish_reason], stop_string=ev.stop_string,
                                   learn_forced=self.cfg.learn_forced_lengths):
            await self._complete(ev.job_id)

    async def _on_step_failed(self, s: WorkerSession, ev: wpb.StepFailed) -> None:
        """The worker dropped these jobs. Each goes back to the queue (it keeps its tokens); a job charged with the
        failure fails with a clear status once it has been charged --max-step-failures times, which points at the
        job itself. The worker names whom to charge (those new to the batch, else all in the step) and LiveState.blame
        narrows that down: one request that breaks every step it is in must not fail the jobs that shared its steps."""
        log.error("worker %s: engine step failed with %d jobs: %s", s.worker_id, len(ev.job_ids), ev.error)
        known = []
        for job_id in ev.job_ids:
            self.state.left_worker(job_id, s.worker_id)    # the worker dropped any host copy too
            if await self._record(job_id) is not None:
                known.append(job_id)
        named = list(ev.charged_job_ids if ev.charges_named else ev.job_ids)
        # the suspects that may be blamed: those in the step (an older worker does not say: those it charged)
        charged = self.state.blame(named, ev.in_step_job_ids if ev.names_in_step else named)
        if len(named) > 1 and not charged:
            metrics.SUSPECTED.inc(len(named))
            log.warning("worker %s: no one job to blame for the failed step: its %d jobs are suspects and run apart "
                        "until one breaks a step alone", s.worker_id, len(named))
        for job_id in known:
            view = self.state.view(job_id)
            outcome = await self.store.fail_step(job_id, s.worker_id, self.policy.queue_score(view, self.cost),
                                                 self.cfg.max_step_failures, charge=job_id in charged)
            if outcome is StepFailureOutcome.FAILED:
                metrics.FAILED.inc()
                await self._complete(job_id)
            else:
                await self._rescore_if_due_since(job_id, view.due)

    async def _complete(self, job_id: str) -> None:
        rec = self.state.forget(job_id)
        state = await self.store.state(job_id)
        # Between the final transition and this read, a new request may have taken the (now free) id:
        # then this is its state, not the ended job's, and must not reach anyone as a completion.
        if state is None or state.status not in FINAL_STATUSES or (rec and state.record.fingerprint != rec.fingerprint):
            return
        done = complete_message(state)
        record_finished(done)
        self.hub.publish(job_id, JobEvent(pb.GenerateResponse(complete=done), fingerprint=state.record.fingerprint))

    async def abort(self, job_id: str) -> tuple[bool, str]:
        ok, previous, worker, holder = await self.store.abort(job_id)
        if not ok:
            return False, previous
        for w in {worker, holder} - {""}:
            self.state.left_worker(job_id, w)
            if (s := self.sessions.get(w)) is not None:
                s.abort(job_id)
        await self._complete(job_id)
        self.wake()
        return True, previous


def job_facts(rec: JobRecord, max_tokens: int) -> JobFacts:
    facts = JobFacts(job_id=rec.job_id, priority=rec.priority, created=rec.created, prompt_len=len(rec.prompt_ids),
                     max_tokens=max_tokens, pred_len=rec.pred_len, pred_p90=rec.pred_p90,
                     predicted=rec.predicted, pred_deciles=tuple(rec.pred_deciles))
    return facts.repredicted(rec.repred_len) if rec.repred_len > 0 else facts
