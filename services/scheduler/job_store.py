"""Job state in Redis: the queue (sorted set) and each job's hash, changed only by atomic Lua scripts.

Status transitions (anything else is refused by the scripts):

    create -> queued --claim--> running --finish--> finished
                ^                  |
                +----requeue-------+      (preempted, or its worker was lost)
    queued | running --abort--> aborted
    running --fail_step--> queued, or failed after too many failed engine steps

A job is never both queued and running, and only the worker that holds it can append tokens or
finish it, so it is never run twice at once.
"""
from __future__ import annotations

import enum
import json
import sys
import time
import uuid
from array import array
from dataclasses import asdict, dataclass, field
from pathlib import Path

import redis.asyncio as aioredis
import redis.exceptions

from services.common.observations import MAX_ENTRIES
from services.common.redis_client import REDIS_UNAVAILABLE, RETRY_SPAN_S
from services.scheduler import keys
from services.scheduler.keys import SCHEDULER_LEASE
from services.scheduler.job_sampling import JobSampling

LUA_DIR = Path(__file__).parent / "lua"
FINAL_STATUSES = {"finished", "aborted", "failed"}


@dataclass
class JobRecord:
    """What the scheduler knows about a job that does not change while it runs."""
    job_id: str                        # keys.job_id(tenant, request_id)
    prompt_ids: list[int]
    prompt_text: str
    sampling: JobSampling              # normalised by validation
    priority: int = 0
    fingerprint: str = ""              # digest of the request: a retry with the same id re-attaches
    previous_reply_tokens: int = 0     # chat: the assistant's previous reply (a predictor feature)
    newest_message_chars: int = 0      # chat: characters of the user's newest message (a predictor feature)
    created: float = field(default_factory=time.time)
    pred_len: float = 0.0              # predicted output tokens (mean)
    pred_p90: float = 0.0
    pred_deciles: list[float] = field(default_factory=list)
    pred_time: float = 0.0             # execution-time model estimate at admission, seconds
    predicted: bool = False            # False when the predictor was unavailable
    repred_len: float = 0.0            # the worker's estimate from the model's hidden state (0: none yet)
    # len(prompt_ids), kept on its own: a job that has ended loses its prompt ids and text (the bulk of its record,
    # up to max_model_len * 32 characters) but is readable for finished_ttl_s, and its usage still counts them
    prompt_tokens: int = 0

    def __post_init__(self):
        self.prompt_tokens = self.prompt_tokens or len(self.prompt_ids)

    def to_fields(self) -> dict[str, str]:
        out = {k: json.dumps(v) if isinstance(v, (list, dict)) else str(v) for k, v in asdict(self).items()}
        out["sampling"] = self.sampling.to_json()
        out["predicted"] = "1" if self.predicted else "0"
        return out

    @classmethod
    def from_fields(cls, f: dict[str, str]) -> "JobRecord":
        return cls(
            job_id=f["job_id"], prompt_ids=json.loads(f.get("prompt_ids", "[]")), prompt_text=f.get("prompt_text", ""),
            sampling=JobSampling.from_json(f["sampling"]), priority=int(f["priority"]), created=float(f["created"]),
            pred_len=float(f["pred_len"]), pred_p90=float(f["pred_p90"]), pred_time=float(f["pred_time"]),
            pred_deciles=json.loads(f.get("pred_deciles", "[]")),
            previous_reply_tokens=int(f.get("previous_reply_tokens", 0)),
            newest_message_chars=int(f.get("newest_message_chars", 0)),
            predicted=f["predicted"] == "1", fingerprint=f.get("fingerprint", ""),
            repred_len=float(f.get("repred_len", 0.0)), prompt_tokens=int(f.get("prompt_tokens", 0)),
        )


@dataclass
class JobState:
    """A job's record plus its live fields, as GetJob and recovery read it."""
    record: JobRecord
    status: str
    worker: str
    swapped_on: str
    finish_reason: str
    num_preemptions: int
    first_scheduled: float | None
    first_token: float | None
    finished: float | None
    token_ids: list[int]
    text: str


class CreateOutcome(enum.IntEnum):
    """What create.lua did (the values are the script's return codes)."""
    CREATED = 1
    SAME_REQUEST = 2        # this request exists already: re-attach to it
    ID_IN_USE = 0           # a different live job of the tenant has this id
    TENANT_FULL = -1        # the tenant's live-job limit is reached
    QUEUE_FULL = -2         # the scheduler's queue bound is reached
    WORK_FULL = -3          # the predicted work already queued is over its bound (decided before create.lua)


class RequeueCause(str, enum.Enum):
    """Why a running job goes back to the queue (requeue.lua reads the value)."""
    PREEMPTED = "preempted"     # the scheduler ordered it: counts against the job's preemption bound
    PARKED = "parked"           # parked after its early tokens as the scheduler asked (prefill early): no count
    RETURNED = "returned"       # its worker was lost or restarted, or left before it started: counted for the
                                # client (num_preemptions), not against the bound
    COUNTED = "counted"         # ordered off a worker that had preempted it for room meanwhile: that loss was
                                # counted already (recomputed.lua), so neither count moves


class StepFailureOutcome(enum.IntEnum):
    """What fail_step.lua did with a job whose engine step failed."""
    NOT_HELD = 0          # not running on that worker (finished, aborted or moved meanwhile)
    REQUEUED = 1
    FAILED = 2


TOKEN_BYTES = 4
assert array("I").itemsize == TOKEN_BYTES, "token ids are stored as 4-byte unsigned ints"


def pack_tokens(token_ids) -> bytes:
    """Token ids as stored in Redis: uint32 little-endian, 4 bytes each (append.lua appends them as is)."""
    packed = array("I", token_ids)
    if sys.byteorder != "little":
        packed.byteswap()
    return packed.tobytes()


def unpack_tokens(packed: bytes | None) -> list[int]:
    tokens = array("I")
    tokens.frombytes((packed or b"")[:len(packed or b"") // TOKEN_BYTES * TOKEN_BYTES])
    if sys.byteorder != "little":
        tokens.byteswap()
    return tokens.tolist()


def _opt_float(v: str | None) -> float | None:
    return float(v) if v else None


# Scripts that must act at most once per call. redis-py sends a command again when its connection fails
# (redis_client.py), and a script whose reply was lost (Redis stalled past the socket timeout, a reset after the
# request arrived) would then run twice: a step's tokens appended twice, a failure or a preemption counted twice, a
# claim, finish or abort refused on the retry as if someone else had made it. Each call of one of these carries a
# fresh id as its last argument; the script's first run keeps its reply under that id for ONCE_WINDOW_S (longer
# than every retry together), and a run with the same id returns that reply without acting again.
# (create and repredict need no guard: create answers a retry as "the same request", repredict sets a value.)
ONCE = ("append", "claim", "requeue", "fail_step", "finish", "abort")
ENDING = ("finish", "abort", "fail_step")     # the scripts that may end a job: they call _ended_job.lua's drop_prompt
# Twice every retry together: a step's reply (a count per job) is kept this long for each busy worker's every step,
# ~40 a second; 300 s kept ~10 MB a worker for retries that end within RETRY_SPAN_S (66 s).
ONCE_WINDOW_S = int(2 * RETRY_SPAN_S)


def run_once(body: str) -> str:
    """A script's text wrapped so that a second run with the same last argument replays the first run's reply."""
    return (f"local once = '{keys.ONCE_PREFIX}' .. ARGV[#ARGV]\n"
            "local done = redis.call('GET', once)\n"
            "if done then return cjson.decode(done) end\n"
            f"local function body()\n{body}\nend\n"
            "local result = body()\n"
            f"redis.call('SET', once, cjson.encode(result), 'EX', {ONCE_WINDOW_S})\n"
            "return result\n")


class _Once:
    """A registered script that gets a fresh call id as its last argument (run_once)."""

    def __init__(self, script):
        self.script = script

    async def __call__(self, keys: list, args: list):
        return await self.script(keys=keys, args=[*args, uuid.uuid4().hex])


# Scripts that only the scheduler holding the lease (leader_lease.py) may run: they place jobs, take them back, fail
# them and forget workers. The lease alone does not stop a scheduler whose term ran out while one of these was on
# its way (redis-py sends a command again for up to RETRY_SPAN_S; a process paused past its term sends what it had
# begun): that scheduler would requeue the jobs of its successor's workers, which then run twice. So each of these
# checks, when it runs, that Redis names its caller as the lease's holder, and refuses otherwise (a fencing token).
# A call carries the lease's key as its last key and the holder as its last argument (before a run_once call id).
FENCED_SCRIPTS = ("claim", "requeue", "fail_step", "forget_worker")
FENCE_ERROR = "ALISE_FENCED"


def with_fence(body: str, after_holder: int) -> str:
    """A script's text that first checks the lease (FENCED_SCRIPTS); `after_holder`: how many arguments follow the
    holder's (1: run_once's call id)."""
    return ("local holder = redis.call('GET', KEYS[#KEYS])\n"
            f"if holder ~= ARGV[#ARGV - {after_holder}] then\n"
            f"  return redis.error_reply('{FENCE_ERROR} the lease of this job store is held by ' .. tostring(holder))\n"
            "end\n" + body)


class StoreFenced(Exception):
    """The job store refused a change: this scheduler does not hold the lease now (FENCED_SCRIPTS); nothing applied."""


# What a caller of the store treats as "cannot act on the store now, try later": Redis away, or not ours to change.
STORE_UNAVAILABLE = (*REDIS_UNAVAILABLE, StoreFenced)


class JobStore:
    def __init__(self, client: aioredis.Redis, finished_ttl_s: int = 3600, leader: str = ""):
        """leader: the lease holder this scheduler is (server.py); the FENCED_SCRIPTS then refuse to run for it once
        Redis names another. "" (tests of the store alone): not fenced."""
        self.r = client
        self.ttl = finished_ttl_s
        self.leader = leader
        ended_job = (LUA_DIR / "_ended_job.lua").read_text()          # shared functions, not a script of its own
        texts = {p.stem: (ended_job if p.stem in ENDING else "") + p.read_text()
                 for p in LUA_DIR.glob("*.lua") if not p.stem.startswith("_")}
        if leader:
            texts = {name: with_fence(text, after_holder=int(name in ONCE)) if name in FENCED_SCRIPTS else text
                     for name, text in texts.items()}
        self._scripts = {name: _Once(client.register_script(run_once(text))) if name in ONCE
                         else client.register_script(text) for name, text in texts.items()}

    async def _run(self, name: str, keys: list, args: list):
        """Run a script; one of FENCED_SCRIPTS with the lease's key and this scheduler's name (StoreFenced: refused)."""
        if self.leader and name in FENCED_SCRIPTS:
            keys, args = [*keys, SCHEDULER_LEASE], [*args, self.leader]
        try:
            return await self._scripts[name](keys=keys, args=args)
        except redis.exceptions.ResponseError as e:
            if str(e).startswith(FENCE_ERROR):
                raise StoreFenced(str(e)) from None
            raise

    async def create(self, rec: JobRecord, score: float, tenant_live_limit: int, queue_limit: int) -> CreateOutcome:
        flat = [x for kv in rec.to_fields().items() for x in kv]
        jid = rec.job_id
        return CreateOutcome(int(await self._scripts["create"](
            keys=[keys.job(jid), keys.QUEUE, keys.job_tokens(jid), keys.job_text(jid), keys.tenant_live(keys.tenant_of(jid))],
            args=[jid, score, rec.fingerprint, tenant_live_limit, queue_limit, *flat])))

    async def claim(self, job_id: str, worker_id: str) -> bool:
        return bool(await self._run(
            "claim", keys=[keys.job(job_id), keys.QUEUE, keys.worker_jobs(worker_id), keys.WORKERS],
            args=[job_id, worker_id, time.time()]))

    async def append_many(self, worker_id: str, deltas: list[tuple[str, list[int], str]]) -> list[int]:
        """Record one engine step's tokens for many jobs in one script call. Per job: its token count after
        the append, or 0 where refused (not running on this worker)."""
        if not deltas:
            return []
        keys_, args = [], [worker_id, time.time()]
        for job_id, token_ids, text in deltas:
            keys_ += [keys.job(job_id), keys.job_tokens(job_id), keys.job_text(job_id)]
            args += [text, pack_tokens(token_ids)]
        return [int(x) for x in await self._scripts["append"](keys=keys_, args=args)]

    async def requeue(self, job_id: str, worker_id: str, score: float, swapped_on: str = "",
                      cause: RequeueCause = RequeueCause.RETURNED) -> bool:
        """Running on `worker_id` -> queued again, its tokens kept, for `cause` (requeue.lua)."""
        return bool(await self._run(
            "requeue", keys=[keys.job(job_id), keys.QUEUE, keys.worker_jobs(worker_id)],
            args=[job_id, worker_id, score, swapped_on, cause.value]))

    async def fail_step(self, job_id: str, worker_id: str, score: float, max_failures: int,
                        charge: bool = True) -> StepFailureOutcome:
        """Its worker's engine step failed: requeue the job, or fail it after `max_failures` charged failures
        (charge=False: requeued, not counted)."""
        res = await self._run(
            "fail_step", keys=[keys.job(job_id), keys.QUEUE, keys.worker_jobs(worker_id), keys.job_tokens(job_id),
                               keys.job_text(job_id), keys.tenant_live(keys.tenant_of(job_id))],
            args=[job_id, worker_id, score, max_failures, time.time(), self.ttl, "1" if charge else "0"])
        return StepFailureOutcome(int(res))

    async def finish(self, job_id: str, worker_id: str, reason: str, stop_string: bool = False,
                     learn_forced: bool = False) -> bool:
        """A true (uncensored) output length also goes to the predictor's stream, atomically (finish.lua); not when
        a client's stop string, not the model, ended a "stop" (JobFinished.stop_string: a cut, not a length to learn).
        `learn_forced` (benchmarks only): a job run with ignore_eos to its max_tokens teaches its length too."""
        return bool(await self._scripts["finish"](
            keys=[keys.job(job_id), keys.worker_jobs(worker_id), keys.job_tokens(job_id), keys.job_text(job_id),
                  keys.OBSERVATIONS, keys.tenant_live(keys.tenant_of(job_id))],
            args=[job_id, worker_id, reason, time.time(), self.ttl, MAX_ENTRIES, "1" if stop_string else "0",
                  "1" if learn_forced else "0"]))

    async def abort(self, job_id: str) -> tuple[bool, str, str, str]:
        """Returns (aborted, previous status, worker, worker holding swapped KV)."""
        res = await self._scripts["abort"](
            keys=[keys.job(job_id), keys.QUEUE, keys.job_tokens(job_id), keys.job_text(job_id),
                  keys.tenant_live(keys.tenant_of(job_id))],
            args=[job_id, time.time(), self.ttl, keys.WORKER_JOBS_PREFIX])
        res = [x.decode() if isinstance(x, bytes) else x for x in res] + ["", "", ""]
        return bool(res[0]), res[1], res[2], res[3]

    # -- reads -----------------------------------------------------------------------------------
    async def rescore(self, job_id: str, score: float) -> None:
        """A new queue score for a job still in the queue (one placed or ended meanwhile is not put back)."""
        await self.r.zadd(keys.QUEUE, {job_id: score}, xx=True)

    async def queued_arrivals(self) -> list[tuple[str, float]]:
        """(job id, arrival time) of every queued job (read once, when a scheduler takes over)."""
        ids = [m.decode() for m in await self.r.zrange(keys.QUEUE, 0, -1)]
        async with self.r.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hget(keys.job(job_id), "created")
            created = await pipe.execute()
        return [(job_id, float(c)) for job_id, c in zip(ids, created) if c is not None]

    async def queue_head(self, n: int) -> list[str]:
        return [m.decode() for m in await self.r.zrange(keys.QUEUE, 0, n - 1)]

    async def queue_length(self) -> int:
        return await self.r.zcard(keys.QUEUE)

    async def progress(self, job_id: str) -> tuple[JobRecord, int, int] | None:
        """The live job's record, tokens generated and preemptions the scheduler ordered, read together (a
        scheduler that starts takes over jobs it has not seen: the count the policies bound must survive it).
        None for an ended job too: a late worker message about it must not bring it back into LiveState."""
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.hgetall(keys.job(job_id))
            pipe.strlen(keys.job_tokens(job_id))
            raw, token_bytes = await pipe.execute()
        f = {k.decode(): v.decode() for k, v in raw.items()}
        if not f or f.get("status") in FINAL_STATUSES:
            return None
        return JobRecord.from_fields(f), token_bytes // TOKEN_BYTES, int(f.get("ordered_preemptions", 0))

    async def output(self, job_id: str) -> tuple[list[int], str]:
        async with self.r.pipeline(transaction=False) as pipe:
            pipe.get(keys.job_tokens(job_id))
            pipe.get(keys.job_text(job_id))
            tokens, text = await pipe.execute()
        return unpack_tokens(tokens), (text or b"").decode("utf-8", errors="replace")

    async def state(self, job_id: str) -> JobState | None:
        # one transaction: record, tokens and text of the same instant (an append can land between reads)
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.hgetall(keys.job(job_id))
            pipe.get(keys.job_tokens(job_id))
            pipe.get(keys.job_text(job_id))
            raw, packed, text_bytes = await pipe.execute()
        f = {k.decode(): v.decode() for k, v in raw.items()}
        if not f:
            return None
        tokens, text = unpack_tokens(packed), (text_bytes or b"").decode("utf-8", errors="replace")
        return JobState(
            record=JobRecord.from_fields(f), status=f["status"], worker=f.get("worker", ""),
            swapped_on=f.get("swapped_on", ""), finish_reason=f.get("finish_reason", ""),
            num_preemptions=int(f.get("num_preemptions", 0)),
            first_scheduled=_opt_float(f.get("first_scheduled")), first_token=_opt_float(f.get("first_token")),
            finished=_opt_float(f.get("finished")), token_ids=tokens, text=text)

    # -- workers ---------------------------------------------------------------------------------
    async def register_worker(self, worker_id: str, info: dict[str, str], ttl_s: int) -> None:
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.sadd(keys.WORKERS, worker_id)
            pipe.hset(keys.worker(worker_id), mapping=info)
            pipe.expire(keys.worker(worker_id), ttl_s)
            await pipe.execute()

    async def repredict(self, worker_id: str, estimates: list[tuple[str, float]]) -> list[tuple[str, float]]:
        """Keep the worker's length estimates on the jobs it still runs; returns those kept."""
        kept = await self._scripts["repredict"](keys=[keys.job(j) for j, _ in estimates],
                                                args=[worker_id, *(repr(float(t)) for _, t in estimates)])
        return [estimates[int(i) - 1] for i in kept]

    async def count_recomputed(self, worker_id: str, job_ids: list[str]) -> list[str]:
        """Count a preemption on each job the worker preempted on its own for room (recomputed.lua), if it still runs
        there; returns those counted."""
        counted = await self._scripts["recomputed"](keys=[keys.job(j) for j in job_ids], args=[worker_id])
        return [job_ids[int(i) - 1] for i in counted]

    async def heartbeat(self, worker_id: str, ttl_s: int) -> None:
        await self.r.expire(keys.worker(worker_id), ttl_s)

    async def known_workers(self) -> list[str]:
        return [w.decode() for w in await self.r.smembers(keys.WORKERS)]

    async def worker_job_ids(self, worker_id: str) -> list[str]:
        return [j.decode() for j in await self.r.smembers(keys.worker_jobs(worker_id))]

    async def drop_entry(self, job_id: str, worker_id: str) -> None:
        """Take the job out of the worker's job set unless it runs there (drop_entry.lua): what is left of an ended
        job, or of one whose record is gone, would keep the worker listed for the orphan sweep for good."""
        await self._run("drop_entry", keys=[keys.job(job_id), keys.worker_jobs(worker_id)], args=[job_id, worker_id])

    async def forget_worker(self, worker_id: str) -> None:
        """Drop the worker from the registry, unless a job is still recorded on it (the sweep goes on finding it)."""
        await self._run("forget_worker", keys=[keys.WORKERS, keys.worker(worker_id), keys.worker_jobs(worker_id)],
                        args=[worker_id])
