"""Per-request state inside a worker: tokens, progress and finish condition. No torch, no grpc."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field


class SeqStatus(enum.Enum):
    WAITING = "waiting"      # assigned, not (or no longer) holding KV
    RUNNING = "running"      # holds KV blocks, scheduled every step
    SWAPPED = "swapped"      # KV copied out to host memory, paused until the scheduler resumes it
    PARKED = "parked"        # holds KV blocks but is not scheduled, until the scheduler resumes it
    FINISHED = "finished"


class Finish(enum.Enum):
    STOP = "stop"            # EOS: the model ended it, a natural length the predictor and the probe learn from
    STOP_STRING = "stop_string"   # a client's stop string: reported as "stop", but the length is the client's cut
    LENGTH = "length"        # max_tokens
    ABORTED = "aborted"


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 64
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass(eq=False)      # compared by identity: the step scheduler keeps sequences in sets and dicts
class Sequence:
    """A job on this worker. Scheduling is token-centric: `num_computed` catches up to `num_tokens`.

    A fresh job, a job resumed after recompute-preemption and a job recovered from a lost worker are
    the same thing: prompt + output tokens of which nothing is computed yet.

    With overlapped steps, a token sampled on the GPU is known to the host only a step later:
    `num_pending` counts such tokens (0 or 1 when a step is planned); the next step feeds the pending
    token to the model straight from the GPU (`sample_row`: its row in the last step's sampled ids).
    """

    job_id: str
    prompt_ids: list[int]
    sampling: Sampling
    output_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    num_computed: int = 0                  # tokens whose KV is in the cache
    finish: Finish | None = None
    num_preemptions: int = 0
    num_pending: int = 0                   # sampled on the device, not yet appended to output_ids
    sample_row: int = -1                   # row of the latest pending token in its step's sampled ids
    park_on_sample: bool = False           # park (keep the KV, stop decoding) once a token is sampled...
    park_at_output: int = 0                # ... that brings its output to this many tokens (0: the next one)
    sampled_here: bool = False             # a token of it was sampled on this worker (it has run a whole step)
    # how many more times this worker may preempt it for room: the scheduler's bound less the job's preemptions so
    # far (AssignJob.preemptions_left); None: no bound
    preemptions_left: int | None = None
    arrived_at: float = 0.0                # when an assignment brought it here (time.perf_counter); 0 once it ran

    @property
    def parks_on_pending(self) -> bool:
        """Its token in flight, once collected, parks it: it is planned no further until resumed."""
        return self.park_on_sample and len(self.output_ids) + self.num_pending >= self.park_at_output

    @property
    def tokens_to_hold(self) -> int:
        """The tokens its KV must have room for: those it has and the next one, and for a job sent to be prefilled
        early, its early tokens (what the scheduler promised it when it placed it)."""
        if self.park_on_sample and self.park_at_output:     # (a job that ends first holds no more than its end)
            early_end = min(self.park_at_output, self.sampling.max_tokens)
            return max(self.num_tokens + 1, self.num_tokens - len(self.output_ids) + early_end)
        return self.num_tokens + 1

    @property
    def may_be_preempted(self) -> bool:
        return self.preemptions_left is None or self.preemptions_left > 0

    @property
    def cache_salt(self) -> bytes:
        """Prefix-cache namespace: the tenant, the part of the job id before '/' (scheduler's keys.job_id);
        none for a job id without one (benchmarks and tests drive the engine directly)."""
        tenant, sep, _ = self.job_id.partition("/")
        return tenant.encode() if sep else b""

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids) + self.num_pending

    def reaches_length(self, max_model_len: int) -> bool:
        """Its pending tokens already end it by length: no further step for it."""
        return (len(self.output_ids) + self.num_pending >= self.sampling.max_tokens
                or self.num_tokens >= max_model_len)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    def token_slice(self, start: int, stop: int) -> list[int]:
        n_prompt = len(self.prompt_ids)
        if start >= n_prompt:                      # decode: only output tokens (no list concatenation)
            return self.output_ids[start - n_prompt:stop - n_prompt]
        if stop <= n_prompt:
            return self.prompt_ids[start:stop]
        return self.prompt_ids[start:] + self.output_ids[:stop - n_prompt]

    def reset_for_recompute(self) -> None:
        self.num_computed = 0
        self.status = SeqStatus.WAITING
        self.num_preemptions += 1
