"""Scheduler settings: one validated dataclass, from flags or environment variables."""
from __future__ import annotations

import math
from dataclasses import dataclass

from services.common.config_args import config_from_args
from services.common.preempt_mode import PreemptMode
from services.common.model_paths import DEFAULT_MODEL_NAME, default_model_dir
from services.common.auth import cert_names
from services.common.tls import TlsFiles
from services.scheduler.policies import POLICIES
from services.scheduler.policies.alise import AlisePolicy


@dataclass(frozen=True)
class SchedulerConfig:
    listen: str = "127.0.0.1:50051"            # client API
    worker_listen: str = "127.0.0.1:50061"     # worker gateway (its own port: never exposed to clients)
    api_keys_file: str = ""                     # tenants and digests of their API keys (tenants.py); required
    service_token_file: str = ""                # internal token workers and the predictor share; else $ALISE_SERVICE_TOKEN
    tls_cert: str = ""                          # serve TLS on both ports (PEM certificate and key)
    tls_key: str = ""
    tls_ca: str = ""                            # verify the predictor with it (and worker certificates, worker_mtls)
    worker_mtls: bool = False                   # the worker gateway accepts only workers with a certificate
    # with worker_mtls: the names (Common Name) a worker's certificate may have, comma-separated; "" = any the CA signed
    worker_cert_names: str = ""
    health_listen: str = ""                     # plaintext health-only port for probes when serving TLS
    metrics_port: int = 0                       # Prometheus /metrics on this port; 0 = off
    http_listen: str = ""                       # OpenAI-compatible HTTP API (host:port, port 0 = free); "" = off
    # a connection to the HTTP front door must send a request's headers within this long (of opening, or of its
    # previous response), else it is closed: idle connections would otherwise hold max_concurrent_rpcs' slots
    http_header_timeout_s: float = 10.0
    redis_url: str = "redis://127.0.0.1:6379/0"
    predictor_address: str = "127.0.0.1:50052"
    predictor_timeout_s: float = 0.5
    model_name: str = DEFAULT_MODEL_NAME
    model_dir: str = str(default_model_dir())   # tokenizer and chat template
    policy: str = "alise"
    preempt_mode: PreemptMode = PreemptMode.PARK  # park: KV kept on the GPU while room lasts, else recomputed
    # a job is preempted at most this many times: by alise and mlfq, and by a worker out of KV where it has a choice
    max_preemptions: int = 2
    aging_s: float = AlisePolicy.aging_s        # alise: waiting this long makes predicted work count e times less
    knee_share: float = 0.99                    # admit up to the batch within this share of max throughput; 0 = off
    # a job that has waited this long since it came is due: it goes first in its class, by arrival (alise and sjf;
    # policies/base.due_score), ahead of every job of its class that is not due, and where it finds no KV room it
    # holds the worker it waits for. The hard bound on unfairness behind aging's relative one; 0 = off
    due_after_s: float = 300.0
    # alise: a job that must wait for a decode slot is prefilled at once and parked on a worker (first tokens now,
    # KV kept) while the worker's KV in use stays under this share of its pool; 0 = off (policies/alise.py)
    park_kv_share: float = 0.8
    park_after_s: float = 0.0                   # alise: ... only jobs that have waited this long (0 = all)
    # alise: ... and this many times the queue's mean wait now (0 = off): the threshold follows the load, so jobs
    # SRPT serves soon are not prefilled ahead of the decodes it favours, while no job's TTFT strays far past FCFS's.
    # Off by default since early tokens (below): every waiting job is prefilled early, and one whose output is short
    # ends there (docs/BENCHMARKS.md, "Early tokens live": better mean, p99 and TTFT p99 on a GPU at 1.2x capacity and
    # on CPU; at 1.4x on a GPU the p99 and mean still gain while TTFT p99 and the shortest half lose a little)
    park_wait_factor: float = 0.0
    # alise: at most this many jobs on their way to be prefilled early on one worker at once: each brings a prompt
    # whose chunks share the worker's steps with its decodes, so a burst of them stretches every running job's step
    max_parking: int = 32
    # alise: ... each generating this many tokens before it parks: a job whose output is that short ends there, so a
    # short job the predictor ranks long (the normalized-latency tail) does not wait for a decode slot
    early_tokens: int = 32
    max_tokens_cap: int = 2048
    # a request's max_tokens bounds its predicted length (it cannot run longer). Off for benchmarks that force
    # each output's length through max_tokens (ignore_eos): there it would tell the scheduler the true length
    predict_within_max_tokens: bool = True
    # benchmarks only: a job run with ignore_eos to its max_tokens teaches the predictor that length. A benchmark
    # with a random-weight model forces each output to the workload's true length that way, and the model never
    # stops by itself, so without this the predictor never learns online there as it does in serving. Off in
    # serving: any client could then teach the predictor lengths of its choosing
    learn_forced_lengths: bool = False
    # benchmarks only: GetLoad(step_sample) answers with each worker's sampled steps (sizes, prefill tokens, times
    # of every tenant's traffic together: finer than a tenant needs to see), which bench.simulator.calibrate fits to
    serve_step_sample: bool = False
    default_max_tokens: int = 0                 # a request without max_tokens; 0: min(256, max_tokens_cap)
    prior_output_tokens: float = 128.0          # used when the predictor is unreachable
    max_queued_jobs: int = 10_000               # queue bound: RESOURCE_EXHAUSTED beyond it
    max_queued_work_s: float = 0.0              # bound on predicted seconds of queued work; 0 = no bound
    max_concurrent_rpcs: int = 4096             # open client calls (streams included); RESOURCE_EXHAUSTED beyond
    finished_ttl_s: int = 3600                  # how long a finished job stays readable (GetJob, re-attach)
    max_step_failures: int = 2                  # failed engine steps a job may be in before it fails
    worker_ttl_s: int = 15
    # a worker that sends nothing for this long (its engine loop sends a load report at least every few seconds,
    # worker heartbeat_s) is taken for hung or cut off: its session ends and its jobs go back to the queue. Above
    # the longest engine step a worker can take (a first step that compiles kernels: tens of seconds)
    worker_silence_s: float = 60.0
    # a job whose last client stream went away (a cancel, a dropped connection, a deadline: the server cannot tell
    # which) waits this long for a retry of the same request to re-attach, then is aborted (its slot and KV freed).
    # An Abort call, which the SDK sends when a stream is cancelled, ends it at once. 0 = abort at once
    reattach_grace_s: float = 5.0
    # streams that may follow one job at once (the first and its re-attached retries): each gets every token, and
    # a client re-sending the same request must not open streams without bound (max_live_jobs bounds the jobs)
    max_streams_per_job: int = 4
    tick_s: float = 0.05
    # passes of the dispatch loop start at least this far apart: admissions and finishes that come faster are
    # decided together. A pass reads the queue's head and plans for every worker (a few ms of the scheduler's one
    # event loop with hundreds of jobs running and waiting); at 64 req/s one pass per event was ~70 a second, on a
    # loop near a full core (session 44). 20 ms is under one engine step of a loaded worker
    dispatch_gap_s: float = 0.02
    # one scheduler acts on a job store at a time: it holds a lease in Redis, renewed every third of this term. A
    # successor waits at most this long after a scheduler that died (one that stops cleanly gives it back)
    leader_lease_s: float = 15.0

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {sorted(POLICIES)}, got {self.policy!r}")
        if not 0 <= self.knee_share < 1:
            raise ValueError("knee_share must be in [0, 1)")
        if not 0 <= self.park_kv_share < 1:
            raise ValueError("park_kv_share must be in [0, 1)")
        # the park thresholds' rule lives with the policy that reads them (the simulator builds it too); checked
        # here as well so that a bad flag fails at start, with the policy's own message
        AlisePolicy(park_after_s=self.park_after_s, park_wait_factor=self.park_wait_factor, max_parking=self.max_parking)
        if not self.aging_s > 0:
            raise ValueError("aging_s must be > 0")
        # more than any output would run every waiting job to its end beside the batch, out of SRPT's order
        if not 1 <= self.early_tokens <= self.max_tokens_cap:
            raise ValueError(f"early_tokens must be in [1, max_tokens_cap={self.max_tokens_cap}] "
                             "(park_kv_share 0 turns prefill-early off)")
        if not 0 <= self.due_after_s < math.inf:
            raise ValueError("due_after_s must be >= 0 and finite (0 = off)")
        if not self.http_header_timeout_s > 0:
            raise ValueError("http_header_timeout_s must be > 0")
        if not self.leader_lease_s > 0:
            raise ValueError("leader_lease_s must be > 0")
        if not self.worker_silence_s > 0:
            raise ValueError("worker_silence_s must be > 0")
        if not self.reattach_grace_s >= 0:
            raise ValueError("reattach_grace_s must be >= 0")
        if not 0 <= self.dispatch_gap_s <= self.tick_s:
            raise ValueError(f"dispatch_gap_s must be in [0, tick_s]: {self.dispatch_gap_s} with tick_s "
                             f"{self.tick_s} (a shorter tick_s needs a dispatch_gap_s as short)")
        if self.max_streams_per_job < 1:
            raise ValueError("max_streams_per_job must be >= 1")
        if self.max_preemptions < 0:
            raise ValueError("max_preemptions must be >= 0")
        object.__setattr__(self, "preempt_mode", PreemptMode(self.preempt_mode))   # its value ("swap") is accepted too
        if self.worker_mtls and not (self.tls_cert and self.tls_ca):
            raise ValueError("worker_mtls needs tls_cert, tls_key and tls_ca")
        if cert_names(self.worker_cert_names) and not self.worker_mtls:
            raise ValueError("worker_cert_names needs worker_mtls (without it, workers present no certificate)")
        if self.default_max_tokens == 0:      # a cap under 256 must not need this flag too (the chart sets only the cap)
            object.__setattr__(self, "default_max_tokens", min(256, self.max_tokens_cap))
        if not 0 < self.default_max_tokens <= self.max_tokens_cap:
            raise ValueError("default_max_tokens must be in (0, max_tokens_cap]")

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> "SchedulerConfig":
        return config_from_args(cls, "ALISE scheduler", "ALISE_SCHEDULER_", argv)

    @property
    def tls(self) -> TlsFiles:
        return TlsFiles(cert=self.tls_cert, key=self.tls_key, ca=self.tls_ca)
