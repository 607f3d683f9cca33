"""The client-facing gRPC API (alise.v1.Alise): Generate, Abort, GetJob, GetServerInfo, GetLoad.

Every call needs a client API key (`authorization: Bearer <key>`), which names the caller's tenant; a
tenant sees and changes only its own jobs (job ids are scoped by tenant in keys.job_id). Generate admits
within the tenant's rate and live-job limits and the scheduler's queue bound (RESOURCE_EXHAUSTED with a
`retry-after-ms` hint beyond them). A retried Generate with the same request_id and the same request
re-attaches to its job, whether it is queued, running or already done: the stream continues where the
job is (after a disconnect, or a scheduler restart) and nothing is generated twice.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator

import grpc
from alise.v1 import generate_pb2 as pb
from alise.v1 import generate_pb2_grpc as pb_grpc

from services.common.auth import presented_secret
from services.common.redis_client import REDIS_UNAVAILABLE
from services.common.lenient import BadMessage, add_lenient_service, reject_bad
from services.scheduler import keys, metrics
from services.scheduler.metrics import metric_field
from services.scheduler.dispatcher import Dispatcher
from services.scheduler.job_events import coalesce
from services.scheduler.job_messages import complete_message, recorded_since
from services.scheduler.job_store import FINAL_STATUSES, CreateOutcome, JobStore
from services.scheduler.tenants import Tenant, TenantRegistry, TokenBucket
from services.scheduler.tokenizer import PromptTokenizer
from services.scheduler.validation import REQUEST_ID, REQUEST_ID_RULE, InvalidRequest, ValidRequest, clip, validate

log = logging.getLogger("alise.scheduler.api")
STATUSES = {"queued": pb.JOB_STATUS_QUEUED, "running": pb.JOB_STATUS_RUNNING, "finished": pb.JOB_STATUS_FINISHED,
            "aborted": pb.JOB_STATUS_ABORTED, "failed": pb.JOB_STATUS_FAILED}
VERSION = "0.2.0"
LIVENESS_S = 15.0          # a stream with no event this long checks its job in Redis (never waits forever)
RETRY_ABORT_MAX_S = 10.0   # the longest wait between tries to abort a left job while Redis is unavailable


class JobLost(Exception):
    """A followed job's record vanished or now belongs to another request."""


class AliseServicer(pb_grpc.AliseServicer):
    def __init__(self, dispatcher: Dispatcher, store: JobStore, tokenizer: PromptTokenizer, max_model_len: int,
                 tenants: TenantRegistry):
        self.d = dispatcher
        self.store = store
        self.tok = tokenizer
        self.max_model_len = max_model_len
        self.tenants = tenants
        self.buckets: dict[str, TokenBucket] = {}
        self.closing = False       # set on shutdown: streams cut by it leave their jobs alone
        # jobs left by their last stream: job id -> the task that aborts it after the grace (one per job; a retry
        # that re-attaches cancels it)
        self._pending_aborts: dict[str, asyncio.Task] = {}
    # -- checks shared by every call ---------------------------------------------------------------
    async def _tenant(self, request, context) -> Tenant:
        tenant = self.tenants.find(presented_secret(context))
        if tenant is None:
            metrics.REJECTED.labels(field="authorization").inc()
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "authorization: a valid API key is required "
                                                                 "(metadata 'authorization: Bearer <key>')")
        await self._refuse_malformed(request, context)
        return tenant

    @staticmethod
    async def _refuse_malformed(request, context) -> None:
        """A request the lenient decoder could not read is refused, naming its field (lenient.py)."""
        if isinstance(request, BadMessage):
            metrics.REJECTED.labels(field=metric_field(request.field)).inc()
        await reject_bad(request, context)

    async def authenticate(self, context) -> Tenant:
        """The caller's tenant (for front doors that carry no gRPC request, as the HTTP one's /v1/models)."""
        return await self._tenant(None, context)

    async def admit(self, context) -> Tenant:
        """The caller's tenant, its rate allowance charged: what a generation request pays before anything in it
        is looked at. Parsing, tokenizing and refusing a request are the costly part, so a tenant's flood of bad or
        oversized requests spends its own allowance, not everyone's CPU (the HTTP front door calls this before it
        reads a body)."""
        tenant = await self.authenticate(context)
        await self._rate_limit(tenant, context)
        return tenant

    async def _request_id(self, request, context) -> str:
        if not REQUEST_ID.match(request.request_id):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request_id: {REQUEST_ID_RULE}")
        return request.request_id

    async def _validate(self, request, tenant: Tenant, context) -> ValidRequest:
        started = time.monotonic()
        try:
            # tokenizing (and rendering a chat template) is CPU work: keep the event loop free for others
            v = await asyncio.to_thread(validate, request, self.d.cfg, self.tok,
                                       self.d.context_limit(self.max_model_len))
        except InvalidRequest as e:
            metrics.REJECTED.labels(field=metric_field(e.field)).inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        metrics.ADMISSION.labels(stage=metrics.AdmissionStage.VALIDATE.value).observe(time.monotonic() - started)
        if v.priority > tenant.max_priority:
            metrics.REJECTED.labels(field="priority").inc()
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"priority: at most {tenant.max_priority} for tenant {tenant.name}")
        return v

    async def _rate_limit(self, tenant: Tenant, context) -> None:
        bucket = self.buckets.get(tenant.name)
        if bucket is None or (bucket.rate, bucket.burst) != (tenant.requests_per_s, tenant.burst):   # new limits
            bucket = self.buckets[tenant.name] = TokenBucket(tenant.requests_per_s, tenant.burst)
        wait_s = bucket.take()
        if wait_s > 0:
            await self._exhausted(context, "rate", f"tenant {tenant.name} may start {tenant.requests_per_s:g} "
                                                   f"requests/s (burst {tenant.burst})", wait_s)

    async def _exhausted(self, context, field: str, why: str, retry_s: float) -> None:
        metrics.REJECTED.labels(field=field).inc()
        ms = max(1, math.ceil(retry_s * 1000))
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{field}: {why}; retry in {ms} ms",
                            trailing_metadata=(("retry-after-ms", str(ms)),))

    # -- Generate ------------------------------------------------------------------------------------
    async def Generate(self, request, context):
        tenant = await self.admit(context)
        await self._refuse_malformed(request, context)
        async for response in self.generate_for(tenant, request, context):
            yield response

    async def generate_for(self, tenant: Tenant, request, context) -> AsyncIterator:
        """Generate for a tenant already admitted (`admit`): validation, the job, its stream."""
        v = await self._validate(request, tenant, context)
        job_id = keys.job_id(tenant.name, v.request_id)
        events = self.d.hub.subscribe(job_id)      # before anything is read, so no event is missed
        owner, done = False, False
        client_left = True                         # false when the stream ends by our doing (an error status)
        try:
            # create.lua decides in one round trip: a new job, the same request again (re-attach), or a refusal
            outcome = await self._submit(v, tenant, job_id)
            await self._refuse(outcome, v, tenant, context)
            if outcome is CreateOutcome.SAME_REQUEST and self.d.hub.watchers(job_id) > self.d.cfg.max_streams_per_job:
                await self._exhausted(context, "streams", f"{self.d.cfg.max_streams_per_job} streams already follow "
                                                          f"request {v.request_id!r}", 1.0)
            # this stream follows the job from here, before the pending abort it takes over is cancelled: leaving
            # at any await below starts the grace again (before, leaving during the read of the job's state left
            # the job running with no stream and no abort pending)
            owner = True
            if outcome is CreateOutcome.SAME_REQUEST and (pending := self._pending_aborts.pop(job_id, None)):
                pending.cancel()                   # re-attached within the grace: the job goes on
            state = await self.store.state(job_id) if outcome is CreateOutcome.SAME_REQUEST else None
            seen, chars = 0, 0
            if state is not None:                  # re-attach: what the job has so far, then the rest
                if so_far := recorded_since(state, 0, 0):
                    yield so_far
                seen, chars = len(state.token_ids), len(state.text)
                if state.status in FINAL_STATUSES:
                    done = True
                    yield pb.GenerateResponse(complete=complete_message(state))
                    return
            async for response in self._follow(job_id, v.fingerprint, events, seen, chars):
                done = response.HasField("complete")
                yield response
        except JobLost:
            client_left = False
            await context.abort(grpc.StatusCode.DATA_LOSS, "job: its record is gone from the job store (or was "
                                                           "replaced by another request with this id)")
        except REDIS_UNAVAILABLE as e:
            client_left = False                    # the client is told to retry: its job must still be there
            await store_unavailable(context, e)
        finally:
            self.d.hub.unsubscribe(job_id, events)
            if owner and not done and client_left:    # the client went away (cancel, disconnect, deadline)
                self._left(job_id, v.fingerprint)

    async def _submit(self, v: ValidRequest, tenant: Tenant, job_id: str) -> CreateOutcome:
        """The job's creation, which a client leaving cannot cut short: if it leaves while Redis creates the job,
        the job is still left to the re-attach grace once it exists, as when a stream leaves later (before, it ran
        to its end with no stream and no abort pending)."""
        creating = asyncio.ensure_future(self.d.submit(v, tenant))
        try:
            return await asyncio.shield(creating)
        except asyncio.CancelledError:
            def left(done: asyncio.Future) -> None:
                if not done.cancelled() and done.exception() is None \
                        and done.result() in (CreateOutcome.CREATED, CreateOutcome.SAME_REQUEST):
                    self._left(job_id, v.fingerprint)
            creating.add_done_callback(left)
            raise

    async def _refuse(self, outcome: CreateOutcome, v: ValidRequest, tenant: Tenant, context) -> None:
        if outcome is CreateOutcome.ID_IN_USE:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS,
                                f"request_id: {v.request_id!r} is in use by another live request")
        if outcome is CreateOutcome.TENANT_FULL:
            await self._exhausted(context, "max_live_jobs", f"tenant {tenant.name} has {tenant.max_live_jobs} "
                                                            f"queued or running jobs", 1.0)
        if outcome is CreateOutcome.QUEUE_FULL:
            await self._exhausted(context, "queue", f"{self.d.cfg.max_queued_jobs} jobs are waiting", 1.0)
        if outcome is CreateOutcome.WORK_FULL:
            excess = self.d.queued_work_s - self.d.cfg.max_queued_work_s
            await self._exhausted(context, "queue", f"{self.d.queued_work_s:.0f} s of predicted work is waiting "
                                                    f"(bound {self.d.cfg.max_queued_work_s:g} s)", max(1.0, excess))

    async def _follow(self, job_id: str, fingerprint: str, events: asyncio.Queue, seen: int,
                      chars: int) -> AsyncIterator:
        """The job's events from token `seen` (text character `chars`) on, until its completion. Checks Redis
        whenever the stream has been quiet for LIVENESS_S, so a completion this scheduler never saw (or
        tokens recorded while it was not watching) still reach the client."""
        held = None                                # a completion read while coalescing chunks
        while True:
            if held is not None:
                event, held = held, None
            else:
                try:
                    event = await asyncio.wait_for(events.get(), LIVENESS_S)
                except asyncio.TimeoutError:
                    state = await self._state_of(job_id, fingerprint)
                    if state.status in FINAL_STATUSES:
                        if gap := recorded_since(state, seen, chars):
                            yield gap
                        yield pb.GenerateResponse(complete=complete_message(state))
                        return
                    continue
            if event.fingerprint and event.fingerprint != fingerprint:
                continue                           # another request that reused this id after ours ended
            if event.first_token < 0:
                yield event.response
                return
            if event.first_token > seen:
                # tokens Redis recorded whose chunk was never published: a worker lost between its step's append
                # and the publish (the job resumed elsewhere with them). Read them before going on, so the stream
                # never skips text the job has
                state = await self._state_of(job_id, fingerprint)
                if gap := recorded_since(state, seen, chars):
                    yield gap
                seen, chars = len(state.token_ids), len(state.text)
                continue                           # Redis had this chunk before it was published: the read sent it
            if event.first_token < seen:           # a re-attached stream already has these tokens
                continue
            response, held = coalesce(event, events, fingerprint)
            seen = event.first_token + len(response.chunk.token_ids)
            chars += len(response.chunk.text)
            yield response

    async def _state_of(self, job_id: str, fingerprint: str):
        """The job's state in Redis, or JobLost when it is gone or the id now names another request."""
        state = await self.store.state(job_id)
        if state is None or state.record.fingerprint != fingerprint:
            raise JobLost(job_id)
        return state

    def _left(self, job_id: str, fingerprint: str) -> None:
        """A client's stream left its job: free the job's slot and KV blocks after the re-attach grace, unless
        another stream still follows it (a retry re-attached), or this scheduler is shutting down (the job lives
        on in Redis and the client re-attaches)."""
        if not self.closing and not self.d.hub.watched(job_id):
            self._abort_unless_reattached(job_id, fingerprint)

    def _abort_unless_reattached(self, job_id: str, fingerprint: str) -> None:
        """Abort the job once it has gone reattach_grace_s without a stream: a client whose connection dropped
        retries the same request and re-attaches (README), and must not find its job aborted by the drop. The
        grace runs from the job's last stream leaving (a re-attach cancels it), and only this request's job is
        aborted (its id may be taken by a new request once it has ended)."""
        async def later():
            try:
                await asyncio.sleep(self.d.cfg.reattach_grace_s)
                await self._abort_left_job(job_id, fingerprint)
            finally:
                if self._pending_aborts.get(job_id) is task:
                    del self._pending_aborts[job_id]

        if (earlier := self._pending_aborts.pop(job_id, None)) is not None:
            earlier.cancel()                       # the grace runs from the last stream's leaving
        task = asyncio.create_task(later())
        self._pending_aborts[job_id] = task        # held: a task nobody references may be collected; a re-attach
                                                   # cancels it, during the grace or the retries below

    async def _abort_left_job(self, job_id: str, fingerprint: str) -> None:
        """Abort this request's job unless it has ended or a stream follows it again. While Redis is unavailable
        it tries again, backing off up to RETRY_ABORT_MAX_S (before, the abort was dropped: nothing else aborts a
        job left running, which ran to max_tokens holding its tenant's live-job slot)."""
        delay = 0.5
        while not self.closing and not self.d.hub.watched(job_id):
            try:
                state = await self.store.state(job_id)
                if state is not None and state.record.fingerprint == fingerprint and state.status not in FINAL_STATUSES:
                    await self.d.abort(job_id)
                return
            except REDIS_UNAVAILABLE as e:
                log.warning("could not abort %s, left by its client: job store unavailable (%s); again in %.1f s",
                            job_id, e, delay)
                await asyncio.sleep(delay)
                delay = min(2 * delay, RETRY_ABORT_MAX_S)

    # -- the other calls -----------------------------------------------------------------------------
    async def Abort(self, request, context):
        tenant = await self._tenant(request, context)
        request_id = await self._request_id(request, context)
        try:
            ok, previous = await self.d.abort(keys.job_id(tenant.name, request_id))
        except REDIS_UNAVAILABLE as e:
            await store_unavailable(context, e)
        if previous == "missing":
            await context.abort(grpc.StatusCode.NOT_FOUND, f"request_id: no job {clip(request_id)!r}")
        return pb.AbortResponse(aborted=ok, previous_status=previous)

    async def GetJob(self, request, context):
        tenant = await self._tenant(request, context)
        request_id = await self._request_id(request, context)
        try:
            state = await self.store.state(keys.job_id(tenant.name, request_id))
        except REDIS_UNAVAILABLE as e:
            await store_unavailable(context, e)
        if state is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"request_id: no job {clip(request_id)!r}")
        done = complete_message(state)
        return pb.Job(request_id=request_id, status=STATUSES.get(state.status, pb.JOB_STATUS_UNSPECIFIED),
                      worker_id=state.worker, priority=state.record.priority, usage=done.usage,
                      timings=done.timings, finish_reason=done.finish_reason, text=state.text,
                      token_ids=state.token_ids)

    async def GetServerInfo(self, request, context):
        await self._tenant(request, context)
        return pb.ServerInfo(model=self.d.cfg.model_name, max_model_len=self.d.context_limit(self.max_model_len),
                             max_tokens_cap=self.d.cfg.max_tokens_cap, policy=self.d.cfg.policy, version=VERSION)

    def _worker_view(self, s, step_sample: bool = False) -> pb.WorkerLoadView:
        view = pb.WorkerLoadView(worker_id=s.worker_id, running=s.load.running, waiting=s.load.waiting,
                                 used_blocks=s.load.used_blocks, total_blocks=s.num_blocks,
                                 swapped_blocks=s.load.swapped_blocks, max_batch=s.max_batch, draining=s.load.draining,
                                 early_rows=s.early_rows)
        if (w := self.d.state.workers.get(s.worker_id)) is not None:
            view.admit_limit = w.admit_limit
            if (m := w.speed.model()) is not None:
                view.step_model.CopyFrom(pb.StepModelView(base_s=m.base_s, per_seq_s=m.per_seq_s,
                                                          per_prefill_token_s=m.per_prefill_token_s,
                                                          per_context_token_s=m.per_context_token_s,
                                                          per_mixed_step_s=m.per_mixed_step_s))
            if step_sample:
                view.step_sample.extend(pb.StepView(steps=r.steps, seconds=r.seconds, seqs=r.seqs,
                                                    prefill_tokens=r.prefill_tokens, context_tokens=r.context_tokens,
                                                    mixed_steps=r.mixed_steps, device_seconds=r.device_seconds,
                                                    prefill_pairs=r.prefill_pairs)
                                      for r in w.speed.sample())
        return view

    async def GetLoad(self, request, context):
        await self._tenant(request, context)
        if request.step_sample and not self.d.cfg.serve_step_sample:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                "step_sample: this scheduler shows no client its step samples (--serve-step-sample, "
                                "for benchmarks)")
        workers = [self._worker_view(s, request.step_sample) for s in self.d.sessions.values()]
        try:
            queued = await self.store.queue_length()
        except REDIS_UNAVAILABLE as e:
            await store_unavailable(context, e)
        return pb.LoadResponse(queued=queued, running=self.d.state.running(),
                               workers=workers, predictor_available=self.d.predictor.available)


async def store_unavailable(context, error: Exception) -> None:
    await context.abort(grpc.StatusCode.UNAVAILABLE, f"job store unavailable ({type(error).__name__}); retry")


def add_to_server(servicer: AliseServicer, server: grpc.aio.Server) -> None:
    add_lenient_service(server, servicer, pb, "Alise")
