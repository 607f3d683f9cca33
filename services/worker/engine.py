"""The worker's engine: jobs in, one batched model step at a time, token deltas and finishes out.

`step()` is: plan the batch, run the model, sample, then account for the new tokens. Commands from the
scheduler (add / abort / preempt) are plain method calls; the gRPC session (server.py) calls them
from the engine thread between steps, so no lock is needed here.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from services.worker.block_manager import BlockManager
from services.common.sampling_limits import sampling_problem
from services.worker.detokenizer import IncrementalDetokenizer
from services.worker.model_runner import SeqChunk
from services.worker.sampler import sample
from services.worker.sequence import Finish, Sampling, Sequence, SeqStatus
from services.worker.step_scheduler import ScheduledChunk, StepScheduler

RECOMPUTE, SWAP = "recompute", "swap"


@dataclass
class TokenDelta:
    job_id: str
    token_ids: list[int]
    text: str


@dataclass
class StepOutput:
    deltas: list[TokenDelta] = field(default_factory=list)
    finished: list[tuple[str, Finish]] = field(default_factory=list)
    seconds: float = 0.0


@dataclass(frozen=True)
class EngineLoad:
    running: int
    waiting: int
    swapped: int
    used_blocks: int
    total_blocks: int
    swapped_blocks: int
    running_tokens: int
    waiting_tokens: int
    num_preemptions: int


class Engine:
    def __init__(self, runner, blocks: BlockManager, tokenizer, *, eos_ids: set[int],
                 max_batch: int, token_budget: int, max_model_len: int):
        self.runner = runner
        self.blocks = blocks
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.max_model_len = max_model_len
        self.sched = StepScheduler(blocks, max_batch=max_batch, token_budget=token_budget)
        self.seqs: dict[str, Sequence] = {}          # every job this worker holds, in any state
        self.detok: dict[str, IncrementalDetokenizer] = {}
        self.num_preemptions = 0

    # -- commands ------------------------------------------------------------------------------
    def add(self, job_id: str, prompt_ids: list[int], sampling: Sampling,
            output_ids: list[int] = (), output_text: str = "") -> None:
        """Start a job, or resume one this worker swapped out earlier."""
        seq = self.seqs.get(job_id)
        if seq is not None and seq.status is SeqStatus.SWAPPED:
            self._resume_swapped(seq)
            return
        if seq is not None:
            raise ValueError(f"job {job_id} is already on this worker")
        # the scheduler validated these; checked again here so one bad value fails its own job, not a batch
        if problem := sampling_problem(sampling.temperature, sampling.top_p, sampling.top_k):
            raise ValueError(f"job {job_id}: sampling.{problem[0]} {problem[1]}")
        seq = Sequence(job_id, list(prompt_ids), sampling, output_ids=list(output_ids))
        self.seqs[job_id] = seq
        self.detok[job_id] = IncrementalDetokenizer(self.tokenizer, sampling.stop, seq.output_ids, output_text)
        self.sched.add(seq)

    def abort(self, job_id: str) -> bool:
        seq = self.seqs.get(job_id)
        if seq is None:
            return False
        self._drop(seq)
        return True

    def preempt(self, job_id: str, mode: str) -> str | None:
        """Stop running a job but remember it; returns what was done (swap or recompute)."""
        seq = self.seqs.get(job_id)
        if seq is None or seq.status is SeqStatus.SWAPPED:
            return None
        self.num_preemptions += 1
        self.sched.remove(seq)
        if mode == SWAP and seq.status is SeqStatus.RUNNING and self.blocks.can_swap_out(job_id):
            self.runner.cache.copy_out(self.blocks.swap_out(job_id))
            seq.status = SeqStatus.SWAPPED
            return SWAP
        # Recompute: the scheduler re-sends the job (prompt + output so far) when it resumes it.
        self._drop(seq)
        return RECOMPUTE

    def _resume_swapped(self, seq: Sequence) -> None:
        if self.blocks.can_swap_in(seq.job_id):
            self.runner.cache.copy_in(self.blocks.swap_in(seq.job_id))
            seq.status = SeqStatus.RUNNING
            self.sched.running.append(seq)
        else:                                   # no room to copy back: recompute instead
            self.blocks.free(seq.job_id)
            seq.reset_for_recompute()
            self.sched.add(seq)

    def _drop(self, seq: Sequence) -> None:
        self.sched.remove(seq)
        self.blocks.free(seq.job_id)
        self.runner.release(seq.job_id)
        self.seqs.pop(seq.job_id, None)
        self.detok.pop(seq.job_id, None)

    # -- the step --------------------------------------------------------------------------------
    @property
    def has_work(self) -> bool:
        return bool(self.sched.running or self.sched.waiting)

    def step(self) -> StepOutput:
        started = time.perf_counter()
        plan = self.sched.schedule()
        self.num_preemptions += len(plan.preempted)
        if plan.empty:
            return StepOutput()
        chunks = [self._chunk(c) for c in plan.chunks]
        logits = self.runner.forward(chunks)
        for c in plan.chunks:
            c.seq.num_computed += c.num_tokens
        sampled = [c.seq for c, chunk in zip(plan.chunks, chunks) if chunk.wants_logits]
        tokens = sample(logits, [s.sampling for s in sampled], [len(s.output_ids) for s in sampled])
        out = StepOutput()
        for seq, token in zip(sampled, tokens):
            self._append_token(seq, token, out)
        out.seconds = time.perf_counter() - started
        return out

    def _chunk(self, c: ScheduledChunk) -> SeqChunk:
        seq, start = c.seq, c.seq.num_computed
        return SeqChunk(
            token_ids=seq.token_slice(start, start + c.num_tokens),
            start=start,
            block_table=self.blocks.table(seq.job_id),
            wants_logits=start + c.num_tokens == seq.num_tokens,
            seq_id=seq.job_id,
        )

    def _append_token(self, seq: Sequence, token: int, out: StepOutput) -> None:
        seq.output_ids.append(token)
        detok = self.detok[seq.job_id]
        detok.add(seq.output_ids)
        finish = self._finish_reason(seq, token, detok)
        out.deltas.append(TokenDelta(seq.job_id, [token], detok.release(final=finish is not None)))
        if finish is not None:
            seq.finish, seq.status = finish, SeqStatus.FINISHED
            self._drop(seq)
            out.finished.append((seq.job_id, finish))

    def _finish_reason(self, seq: Sequence, token: int, detok: IncrementalDetokenizer) -> Finish | None:
        if detok.stopped or (token in self.eos_ids and not seq.sampling.ignore_eos):
            return Finish.STOP
        if len(seq.output_ids) >= seq.sampling.max_tokens or seq.num_tokens >= self.max_model_len:
            return Finish.LENGTH
        return None

    def load(self) -> EngineLoad:
        running, waiting = self.sched.running, self.sched.waiting
        return EngineLoad(
            running=len(running),
            waiting=len(waiting),
            swapped=sum(1 for s in self.seqs.values() if s.status is SeqStatus.SWAPPED),
            used_blocks=self.blocks.num_used,
            total_blocks=self.blocks.num_total,
            swapped_blocks=self.blocks.num_swapped,
            running_tokens=sum(s.num_tokens for s in running),
            waiting_tokens=sum(s.num_tokens for s in waiting),
            num_preemptions=self.num_preemptions,
        )
