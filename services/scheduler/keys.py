"""Every Redis key ALISE uses, built in one place under the `alise:` prefix."""
from __future__ import annotations

from services.common.observations import STREAM

PREFIX = "alise:"
QUEUE = PREFIX + "queue"            # sorted set: job id -> score of the active policy (lowest first)
WORKERS = PREFIX + "workers"        # set of worker ids ever registered (for orphan recovery)
OBSERVATIONS = STREAM               # stream: finished jobs' true lengths, read by the predictor
ONCE_PREFIX = PREFIX + "once:"      # + a script call's id: its reply, for a retried call (job_store.run_once)
SCHEDULER_LEASE = PREFIX + "scheduler:lease"   # string: the scheduler that may act on this store (leader_lease.py)


def job_id(tenant: str, request_id: str) -> str:
    """A job's id inside ALISE: its tenant's name and the client's request id (neither may contain '/'
    or ':'), so two tenants never share an id and no id can name another job's key."""
    return f"{tenant}/{request_id}"


def tenant_of(job_id: str) -> str:
    return job_id.split("/", 1)[0]


def request_id_of(job_id: str) -> str:
    """The client's id, as the client named it (the job id without its tenant)."""
    return job_id.split("/", 1)[-1]


def tenant_live(tenant: str) -> str:  # set: the tenant's queued and running jobs (admission limit)
    return f"{PREFIX}tenant:{tenant}:live"


def job(job_id: str) -> str:        # hash: status, request, predictions, timestamps
    return f"{PREFIX}job:{job_id}"


def job_tokens(job_id: str) -> str:  # string: generated token ids, in order, packed uint32 little-endian
    return f"{PREFIX}job:{job_id}:tok32"         # was a list under ":tokens": a new name, so no WRONGTYPE


def job_text(job_id: str) -> str:    # string: generated text (stop strings cut off)
    return f"{PREFIX}job:{job_id}:text"


def worker(worker_id: str) -> str:   # hash with a TTL: the worker's registration, refreshed by heartbeats
    return f"{PREFIX}worker:{worker_id}"


def worker_jobs(worker_id: str) -> str:  # set: jobs placed on the worker
    return f"{PREFIX}worker:{worker_id}:jobs"


WORKER_JOBS_PREFIX = f"{PREFIX}worker:"   # + id + ":jobs", for Lua scripts that find a job's worker
