"""The client-facing gRPC API (alise.v1.Alise): Generate, Abort, GetJob, GetServerInfo, GetLoad."""
from __future__ import annotations

import asyncio
import logging

import grpc
from alise.v1 import generate_pb2 as pb
from alise.v1 import generate_pb2_grpc as pb_grpc

from services.common.lenient import BadMessage, add_lenient_service, reject_bad
from services.scheduler import metrics
from services.scheduler.dispatcher import Dispatcher
from services.scheduler.job_messages import complete_message
from services.scheduler.job_store import JobStore
from services.scheduler.tokenizer import PromptTokenizer
from services.scheduler.validation import InvalidRequest, validate

log = logging.getLogger("alise.scheduler.api")
STATUSES = {"queued": pb.JOB_STATUS_QUEUED, "running": pb.JOB_STATUS_RUNNING, "finished": pb.JOB_STATUS_FINISHED,
            "aborted": pb.JOB_STATUS_ABORTED, "failed": pb.JOB_STATUS_FAILED}
VERSION = "0.1.0"


class AliseServicer(pb_grpc.AliseServicer):
    def __init__(self, dispatcher: Dispatcher, store: JobStore, tokenizer: PromptTokenizer, max_model_len: int):
        self.d = dispatcher
        self.store = store
        self.tok = tokenizer
        self.max_model_len = max_model_len

    async def _check_decoded(self, request, context) -> None:
        if isinstance(request, BadMessage):
            metrics.REJECTED.labels(field=request.field).inc()
        await reject_bad(request, context)

    async def Generate(self, request, context):
        await self._check_decoded(request, context)
        try:
            v = validate(request, self.d.cfg, self.tok, self.max_model_len)
        except InvalidRequest as e:
            metrics.REJECTED.labels(field=e.field).inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        events = self.d.hub.subscribe(v.request_id)
        done = False
        try:
            if not await self.d.submit(v):
                done = True                               # not ours: never abort someone else's job
                await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"request_id: {v.request_id!r} is already in use")
            while not done:
                event = await events.get()
                done = event.HasField("complete")
                yield event
        finally:
            self.d.hub.unsubscribe(v.request_id, events)
            if not done:
                # The client went away (cancel, disconnect, deadline): free its slot and KV blocks.
                await asyncio.shield(self.d.abort(v.request_id))

    async def Abort(self, request, context):
        await self._check_decoded(request, context)
        if not request.request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id: must not be empty")
        ok, previous = await self.d.abort(request.request_id)
        if previous == "missing":
            await context.abort(grpc.StatusCode.NOT_FOUND, f"request_id: no job {request.request_id!r}")
        return pb.AbortResponse(aborted=ok, previous_status=previous)

    async def GetJob(self, request, context):
        await self._check_decoded(request, context)
        state = await self.store.state(request.request_id) if request.request_id else None
        if state is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"request_id: no job {request.request_id!r}")
        done = complete_message(state)
        return pb.Job(request_id=state.record.job_id, status=STATUSES.get(state.status, pb.JOB_STATUS_UNSPECIFIED),
                      worker_id=state.worker, priority=state.record.priority, usage=done.usage,
                      timings=done.timings, finish_reason=done.finish_reason, text=state.text,
                      token_ids=state.token_ids)

    async def GetServerInfo(self, request, context):
        return pb.ServerInfo(model=self.d.cfg.model_name, max_model_len=self.max_model_len,
                             max_tokens_cap=self.d.cfg.max_tokens_cap, policy=self.d.cfg.policy, version=VERSION)

    async def GetLoad(self, request, context):
        workers = [pb.WorkerLoadView(worker_id=s.worker_id, running=s.load.running, waiting=s.load.waiting,
                                     used_blocks=s.load.used_blocks, total_blocks=s.num_blocks,
                                     swapped_blocks=s.load.swapped_blocks, max_batch=s.max_batch,
                                     draining=s.draining)
                   for s in self.d.sessions.values()]
        return pb.LoadResponse(queued=await self.store.queue_length(),
                               running=sum(len(s.jobs) for s in self.d.sessions.values()),
                               workers=workers, predictor_available=self.d.predictor.available)


def add_to_server(servicer: AliseServicer, server: grpc.aio.Server) -> None:
    add_lenient_service(server, servicer, pb, "Alise")
