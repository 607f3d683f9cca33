"""One bidirectional session per connected worker: its registration, its last load report and its command
stream (the jobs placed on it are tracked by the dispatcher's LiveState).

The worker dials in and registers; from then on the scheduler sends commands through `send` and the
worker's reports are handed to the dispatcher. When the stream ends, for whatever reason, every job
placed on that worker goes back to the queue (they continue from the tokens already recorded). A worker
that goes silent for `worker_silence_s` (hung, stopped, or cut off behind a connection that stays open) is
ended the same way: its engine loop reports at least every few seconds, so silence means it is not serving.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
from alise.v1 import generate_pb2 as pb
from alise.v1 import worker_pb2 as wpb
from alise.v1 import worker_pb2_grpc as wpb_grpc

from services.common.batch_limits import MAX_STEP_ROWS
from services.common.lenient import BadMessage, reject_bad
from services.scheduler import metrics
from services.scheduler.job_store import STORE_UNAVAILABLE

if TYPE_CHECKING:
    from services.common.auth import ServiceTokenCheck
    from services.scheduler.dispatcher import Dispatcher

log = logging.getLogger("alise.scheduler.sessions")
_CLOSE = object()


class CommandOutbox:
    """A worker's commands in the order sent, each timed from its send to its stream taking it
    (alise:worker_command_wait_seconds)."""

    def __init__(self):
        self._queue: asyncio.Queue = asyncio.Queue()

    def put_nowait(self, command) -> None:
        self._queue.put_nowait((time.monotonic(), command))

    async def get(self):
        return self._taken(*await self._queue.get())

    def get_nowait(self):
        return self._taken(*self._queue.get_nowait())

    def empty(self) -> bool:
        return self._queue.empty()

    @staticmethod
    def _taken(sent_at: float, command):
        if isinstance(command, wpb.SchedulerCommand):
            metrics.COMMAND_WAIT.labels(command=command.WhichOneof("kind")).observe(time.monotonic() - sent_at)
        return command


# the lists of job ids (or of entries with a job_id) in each message that names several jobs; the first says
# whether anything is left of it once aborted jobs are taken out
_JOB_LISTS = {"tokens": ("deltas",), "estimates": ("estimates",), "kept_kv_dropped": ("job_ids",),
              "recomputed": ("job_ids",),
              "step_failed": ("job_ids", "charged_job_ids", "in_step_job_ids")}


@dataclass
class WorkerSession:
    worker_id: str
    model: str
    block_size: int
    num_blocks: int
    max_batch: int
    max_model_len: int
    outbox: CommandOutbox = field(default_factory=CommandOutbox)
    load: wpb.LoadReport = field(default_factory=wpb.LoadReport)   # the worker's last report, as sent
    error: str = ""                # why the scheduler ended the session (sent to the worker as its status)
    error_code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT
    last_heard: float = field(default_factory=time.monotonic)     # when its last message arrived
    acks_aborts: bool = False      # the worker acknowledges aborts (an older build does not: nothing is awaited)
    early_rows: int = 0            # jobs it runs on their way to park at once (0: an older build, no bound said)
    # job ids this session was told to abort, not yet acknowledged (a count: an id may be aborted twice)
    unacked_aborts: Counter = field(default_factory=Counter)

    def send(self, **command) -> None:
        self.outbox.put_nowait(wpb.SchedulerCommand(**command))

    def abort(self, job_id: str) -> None:
        """Tell the worker to drop the job. Until it acknowledges (a JobFinished ABORTED, which it sends after every
        message about that job), what it says about this id is about the aborted job, not about a new request that
        may take the id meanwhile and even be placed here again (before, such late tokens or a late finish were
        recorded on the new job)."""
        if self.acks_aborts:
            self.unacked_aborts[job_id] += 1
        self.send(abort=wpb.AbortJob(job_id=job_id))

    def current(self, msg: wpb.WorkerMessage) -> wpb.WorkerMessage | None:
        """The message without what it says about aborted jobs (None if nothing is left); an acknowledgement is
        taken in here and never passed on."""
        kind = msg.WhichOneof("kind")
        gone = self.unacked_aborts
        if kind == "finished" and msg.finished.finish_reason == pb.FINISH_REASON_ABORTED:
            if gone[job_id := msg.finished.job_id] > 1:
                gone[job_id] -= 1
            else:
                gone.pop(job_id, None)
            return None
        if not gone:
            return msg
        if kind in ("finished", "preempted"):
            return None if getattr(msg, kind).job_id in gone else msg
        if kind not in _JOB_LISTS:
            return msg
        out = wpb.WorkerMessage()
        out.CopyFrom(msg)
        body = getattr(out, kind)
        for name in _JOB_LISTS[kind]:
            items = getattr(body, name)
            kept = [x for x in items if (x if isinstance(x, str) else x.job_id) not in gone]
            del items[:]
            items.extend(kept)
        return out if getattr(body, _JOB_LISTS[kind][0]) else None

    def close(self) -> None:
        self.outbox.put_nowait(_CLOSE)


MAX_BATCH_BOUND = MAX_STEP_ROWS   # a larger claim is refused
MAX_BLOCKS_BOUND = 1 << 26        # 2^26 blocks of 16 tokens: a billion tokens of KV


class WorkerGateway(wpb_grpc.WorkerGatewayServicer):
    """Serves only workers presenting the internal service token (and, under mTLS with names, a worker's certificate:
    `auth`), on a port of its own."""

    def __init__(self, dispatcher: "Dispatcher", auth: "ServiceTokenCheck"):
        self.d = dispatcher
        self.auth = auth

    async def Connect(self, request_iterator, context: grpc.aio.ServicerContext):
        await self.auth.require(context)
        first = await anext(aiter(request_iterator), None)
        await reject_bad(first, context)
        if first is None or not first.HasField("register"):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "register: the first message must register")
        session = self._open(first.register)
        if isinstance(session, str):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, session)
        reader = watchdog = None
        try:
            # inside the try: if registering fails (Redis away), the session is dropped again, never left
            # behind as a ghost that keeps the real worker out
            if await self._join(session):
                reader = asyncio.create_task(self._read(session, request_iterator))
                watchdog = asyncio.create_task(self._watch(session, self.d.cfg.worker_silence_s))
                while (cmd := await session.outbox.get()) is not _CLOSE:
                    yield cmd
        finally:
            for task in (reader, watchdog):
                if task is not None:
                    task.cancel()
            await self.d.worker_lost(session)
        if session.error:
            await context.abort(session.error_code, session.error)

    async def _join(self, session: WorkerSession) -> bool:
        """Whether the session joined; if not, session.error says why (the worker is told, and retries)."""
        try:
            if await self.d.worker_joined(session):
                return True
            session.error = f"register.worker_id: {session.worker_id!r} is already connected"
        except STORE_UNAVAILABLE as e:      # before, the worker got UNKNOWN and the scheduler logged a traceback
            session.error = f"job store unavailable ({type(e).__name__}): retry"
            session.error_code = grpc.StatusCode.UNAVAILABLE
        return False

    def _open(self, reg: wpb.WorkerRegister) -> WorkerSession | str:
        if not reg.worker_id:
            return "register.worker_id: must not be empty"
        if reg.model != self.d.cfg.model_name:
            return f"register.model: scheduler serves {self.d.cfg.model_name!r}, worker has {reg.model!r}"
        if reg.worker_id in self.d.sessions:
            return f"register.worker_id: {reg.worker_id!r} is already connected"
        if min(reg.block_size, reg.num_blocks, reg.max_batch, reg.max_model_len) <= 0:
            return "register: block_size, num_blocks, max_batch and max_model_len must be > 0"
        if reg.early_rows < 0:
            return "register.early_rows: must be >= 0"
        if reg.max_batch > MAX_BATCH_BOUND or reg.num_blocks > MAX_BLOCKS_BOUND or reg.block_size > 1024:
            return (f"register: max_batch <= {MAX_BATCH_BOUND}, num_blocks <= {MAX_BLOCKS_BOUND} and "
                    f"block_size <= 1024")
        return WorkerSession(reg.worker_id, reg.model, reg.block_size, reg.num_blocks, reg.max_batch,
                             reg.max_model_len, acks_aborts=reg.acks_aborts, early_rows=reg.early_rows)

    @staticmethod
    async def _watch(session: WorkerSession, limit_s: float) -> None:
        """End the session once the worker has sent nothing for limit_s."""
        while (silent := time.monotonic() - session.last_heard) <= limit_s:
            await asyncio.sleep(min(limit_s - silent, limit_s / 4) + 0.01)
        session.error = f"worker sent nothing for {silent:.0f} s (limit {limit_s:g} s): its jobs went back to the queue"
        session.error_code = grpc.StatusCode.UNAVAILABLE
        log.warning("worker %s: %s", session.worker_id, session.error)
        session.close()

    async def _read(self, session: WorkerSession, request_iterator) -> None:
        try:
            waited_from = time.monotonic()
            async for msg in request_iterator:
                session.last_heard = time.monotonic()
                metrics.WORKER_READER_WAIT.observe(session.last_heard - waited_from)
                if isinstance(msg, BadMessage):
                    session.error = f"{msg.field}: {msg.problem}"
                    log.warning("worker %s sent a bad message (%s): session ended", session.worker_id, session.error)
                    return
                received = time.time()
                await self.d.on_worker_message(session, msg)
                metrics.observe_worker_message(msg, received, time.time())
                waited_from = time.monotonic()
        except Exception as e:  # noqa: BLE001 - any failure of the stream ends the session
            if not isinstance(e, asyncio.CancelledError):
                log.warning("worker %s stream failed: %r", session.worker_id, e)
        finally:
            session.close()
