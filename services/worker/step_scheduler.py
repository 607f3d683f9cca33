"""Iteration-level batching inside one worker: which sequences run this step and with how many tokens.

Token-centric: each running sequence gets its uncomputed tokens (1 for decode, a chunk for a prompt),
decodes first, then prefill chunks under the token budget, so a long prompt never stalls running
decodes. When the KV pool cannot grow, parked sequences (holding KV while the scheduler keeps them waiting)
lose their KV first, newest first; then the most recently admitted sequence not yet planned this step is
preempted by recompute (its blocks freed; it waits at the front) until the others fit. Pure Python over the BlockManager.

One owner: this module is the only writer of a sequence's status and the only one that changes the
BlockManager (grow, free, swap, prefix cache); the engine asks it to (`swap_out`, `swap_in`, `finish`, `drop`,
`record_computed`, `forget_cached`) and only moves the KV bytes the answers name.

`running` is an insertion-ordered dict used as an ordered set: membership and removal are O(1) (a list
made every step O(batch^2), most of the host time at batch 128). A sequence whose pending token already
ends it by length is skipped (the step that sampled that token finishes it); one with a pending token is
never admitted from the waiting queue, since its tokens must all be known to prefill them. A sequence to be
parked once its pending token arrives is skipped the same way, so it never samples a second one. A job sent to be
prefilled early decodes its early tokens (Sequence.park_at_output) and never takes KV from others: blocked by a
full pool once it has a token out, it parks where it stands, its KV then the first given up for room.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from services.common.batch_limits import DEFAULT_EARLY_ROWS
from services.worker.block_manager import BlockManager
from services.worker.sequence import Finish, Sequence, SeqStatus


@dataclass(frozen=True)
class ScheduledChunk:
    """`num_tokens` of `seq`'s tokens from `start` go into this step. Planning a chunk advances the sequence's
    `num_computed` (this module is its only writer): a step that then fails drops every job it held."""
    seq: Sequence
    start: int
    num_tokens: int


@dataclass(frozen=True)
class StepPlan:
    chunks: list[ScheduledChunk]
    preempted: list[Sequence]          # sequences that lost their KV this step (recompute later)
    evicted: list[Sequence] = ()       # parked sequences whose KV was dropped for room (the engine forgets them)
    parked: list[Sequence] = ()        # early jobs a full pool stopped short of their early tokens: parked now
    admitted: list[Sequence] = ()      # waiting sequences this step runs (their first chunk, or again after recompute)

    @property
    def empty(self) -> bool:
        return not self.chunks


class StepScheduler:
    def __init__(self, blocks: BlockManager, max_batch: int, token_budget: int, max_model_len: int,
                 early_rows: int = DEFAULT_EARLY_ROWS, group_prefix_rows: bool = False):
        self.blocks = blocks
        self.group_prefix_rows = group_prefix_rows
        self.max_batch = max_batch
        self.early_rows = early_rows             # sequences decoding early tokens beside the batch, at most
        # the most rows a step plans, whatever the scheduler resumed: what the decode graphs are captured for
        self.max_rows = max_batch + early_rows
        self.token_budget = token_budget
        self.max_model_len = max_model_len
        self.running: dict[Sequence, None] = {}  # admission order: the last one is preempted first
        self.parked: dict[Sequence, None] = {}   # holding KV, not scheduled; the last parked loses its KV first
        self.waiting: deque[Sequence] = deque()
        self.admitted_tokens = 0                 # tokens of admitted sequences to be computed from scratch
        self.cached_tokens = 0                   # of which found in the prefix cache (no prefill)

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def resume(self, seq: Sequence) -> None:
        """A sequence whose KV is back in place (swapped in) runs again from the next step."""
        seq.status = SeqStatus.RUNNING
        self.running[seq] = None

    def park(self, seq: Sequence) -> bool:
        """Stop scheduling a running sequence but keep its KV (the scheduler resumes it with `unpark`); False if
        it is not running (then nothing changes)."""
        if seq.status is not SeqStatus.RUNNING:
            return False
        del self.running[seq]
        seq.status, seq.park_on_sample, seq.park_at_output = SeqStatus.PARKED, False, 0
        self.parked[seq] = None
        return True

    def park_after_sample(self, seq: Sequence) -> bool:
        """Park a running sequence once its token in flight is collected (planned without it until then); False if
        it has no token in flight or is not running (then nothing changes)."""
        if seq.status is not SeqStatus.RUNNING or not seq.num_pending:
            return False
        seq.park_on_sample, seq.park_at_output = True, 0
        return True

    def unpark(self, seq: Sequence) -> None:
        del self.parked[seq]
        self.resume(seq)

    def remove(self, seq: Sequence) -> None:
        if seq in self.running:
            del self.running[seq]
        elif seq in self.parked:
            del self.parked[seq]
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def drop(self, seq: Sequence) -> None:
        """The sequence leaves this worker (finished, aborted, preempted by recompute): its blocks go back."""
        self.remove(seq)
        self.blocks.free(seq.job_id)

    def finish(self, seq: Sequence, finish: Finish) -> None:
        """It ended (the engine then drops it)."""
        seq.finish, seq.status = finish, SeqStatus.FINISHED

    def swap_out(self, seq: Sequence) -> list[tuple[int, int]] | None:
        """Preempt a running sequence keeping its KV in host memory: the (device, host) block pairs to copy out,
        or None when it cannot be swapped (not running, or no host room); it then stays as it was."""
        if seq.status is not SeqStatus.RUNNING or not self.blocks.can_swap_out(seq.job_id):
            return None
        self.remove(seq)
        seq.status = SeqStatus.SWAPPED
        return self.blocks.swap_out(seq.job_id)

    def swap_in(self, seq: Sequence) -> list[tuple[int, int]] | None:
        """Resume a swapped sequence: the (host, device) block pairs to copy back, after which it runs from the
        next step; or None when there is no device room: its copy is dropped and it is recomputed instead."""
        if self.blocks.can_swap_in(seq.job_id):
            moves = self.blocks.swap_in(seq.job_id)
            self.resume(seq)
            return moves
        self.recompute(seq)
        return None

    def recompute(self, seq: Sequence) -> None:
        """Its kept KV is gone (no device room to swap it back, or the copy back failed): its blocks go back and it
        computes its tokens again, from the next step it is planned in."""
        self.remove(seq)
        self.blocks.free(seq.job_id)
        seq.reset_for_recompute()
        self.add(seq)

    def record_computed(self, seq: Sequence) -> None:
        """A launched step wrote this sequence's KV: its full blocks whose tokens are known join the prefix cache."""
        self.blocks.register_computed(seq.job_id, min(seq.num_computed, seq.num_tokens - seq.num_pending),
                                      seq.token_slice, seq.cache_salt)

    def forget_cached(self) -> None:
        """A failed step may have left blocks registered in the prefix cache but never written."""
        self.blocks.forget_cached()

    def schedule(self) -> StepPlan:
        budget = self.token_budget
        chunks: list[ScheduledChunk] = []
        preempted: list[Sequence] = []
        evicted: list[Sequence] = []
        parked: list[Sequence] = []
        waited = False                           # a sequence waits for room: no new one may take what frees up
        freeing_soon = None                      # found on the first need: nothing below changes it
        for seq in self._in_rows():
            if seq not in self.running:          # preempted by an earlier iteration of this loop
                continue
            n = min(seq.num_uncomputed, budget)
            if n == 0 or not self._wants_row(seq):
                continue
            if seq.park_on_sample and not self.blocks.can_grow(seq.job_id, seq.num_computed + n):
                # on its way to be parked: it never takes KV from others. With a token out already (its first
                # early token, at least) it parks now, its KV the first given up for room: early jobs alone in a
                # full pool would otherwise wait on each other for good
                if seq.output_ids and not seq.num_pending and self.park(seq):
                    parked.append(seq)
                continue
            waits = False
            while not self.blocks.can_grow(seq.job_id, seq.num_computed + n):
                if self.parked:
                    evicted.append(self._evict_parked())
                    continue
                if freeing_soon is None:
                    freeing_soon = self._freeing_soon()
                if freeing_soon:
                    # one parks or ends as its token in flight is collected: its KV becomes parked KV (given up
                    # first) or free, next step; recomputing it (or this one) now would throw away work a one-step
                    # wait saves, and a new sequence admitted now would take that room (found by review: both were
                    # done, the waiting prompt recomputed and a job ending anyway charged a preemption)
                    waits = waited = True
                    break
                victim = self._victim(seq, {c.seq for c in chunks}, budget)   # only here: preemption is rare
                if victim is None:
                    waits = waited = True        # it keeps its KV, unplanned this step, while the planned ones run
                    break
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq in self.running and not waits:
                self.blocks.grow(seq.job_id, seq.num_computed + n)
                chunks.append(self._plan_chunk(seq, n))
                budget -= n
        if not (preempted or waited):            # a step that had to preempt (or make one wait) admits nobody new
            admitted = self._admit(budget, evicted, self.max_rows - len(chunks))
            chunks += admitted
        else:
            admitted = []
        assert sum(c.num_tokens for c in chunks) <= self.token_budget
        if self.group_prefix_rows:
            chunks = self._prefix_grouped(chunks)
        return StepPlan(chunks, preempted, evicted, parked, [c.seq for c in admitted])

    def _prefix_grouped(self, chunks: list[ScheduledChunk]) -> list[ScheduledChunk]:
        """The one-token rows (decodes, and the rare prompt with one token left to compute) reordered so that those
        sharing leading KV blocks are next to each other, the other chunks after them as planned (the runner lays a
        mixed step out by chunk size, not by place). The decode kernel runs one program per (row, KV head) in row
        order: a prefix two rows share is read by programs running about at once, the second read likely from L2.
        Admission order keeps a conversation's turns together only when they were admitted together (fcfs), not when
        a policy orders them by predicted length or a parked job resumes (bench/decode_batch_order.py)."""
        decodes = [c for c in chunks if c.num_tokens == 1]
        if len(decodes) < 2:
            return chunks
        order = self.blocks.prefix_order([c.seq.job_id for c in decodes])
        return [decodes[i] for i in order] + [c for c in chunks if c.num_tokens != 1]

    def _victim(self, seq: Sequence, planned: set[Sequence], budget: int) -> Sequence | None:
        """Whom to preempt for `seq`'s room: the newest running sequence not planned this step (decodes go first, so
        a resumed decode at the end of `running` may already be in the plan: preempting it would free blocks its chunk
        is about to write) that has preemptions left under the scheduler's bound; at worst `seq` itself, which then
        waits. When none has any left: None while some sequence is planned or can be (`seq` waits, keeping its KV;
        the others run, and whichever of them needs room next finds it among the candidates), else the newest all
        the same (the scheduler sees the job's count pass its bound): a step that can plan nothing must make room.
        (Found by review: "can be" was missing, so a sequence first in the step's order preempted one past its
        bound that a later turn of the loop would have planned without a new block.)"""
        candidates = [s for s in reversed(self.running) if s not in planned]
        if (victim := next((s for s in candidates if s.may_be_preempted), None)) is not None:
            return victim
        if planned or any(self._fits_as_it_is(s, budget) for s in self._in_rows() if s is not seq):
            return None
        return candidates[0]

    def _fits_as_it_is(self, seq: Sequence, budget: int) -> bool:
        """It can be planned this step in the blocks it holds (or the free ones)."""
        return self._wants_row(seq) and self.blocks.can_grow(seq.job_id,
                                                             seq.num_computed + min(seq.num_uncomputed, budget))

    def _wants_row(self, seq: Sequence) -> bool:
        """It has tokens to compute this step (one whose token in flight parks or ends it has not)."""
        return seq.num_uncomputed > 0 and not self._leaves_with_pending(seq)

    def _leaves_with_pending(self, seq: Sequence) -> bool:
        """Its token in flight, once collected, parks it or ends it by length: it is planned no further."""
        return bool(seq.num_pending) and (seq.parks_on_pending or seq.reaches_length(self.max_model_len))

    def _in_rows(self) -> list[Sequence]:
        """The running sequences this step may plan, decodes first. A step runs at most `max_rows` rows (what the
        decode graphs are captured for). More can be running: the scheduler resumes jobs by its own count, which lags
        the worker's. Then the earliest admitted of those with tokens to compute take the rows, so a resumed job
        waits for a row, keeping its KV, rather than taking one from a prompt still being prefilled."""
        order = self._decodes_first()
        if len(self.running) <= self.max_rows:
            return order
        first = set([s for s in self.running if self._wants_row(s)][:self.max_rows])
        return [s for s in order if s in first]

    def _decodes_first(self) -> list[Sequence]:
        """The running sequences, those with one token to compute (decodes) first, each group in admission order: a
        sequence resumed (unparked, swapped in) joins the end of `running`, and behind a long prompt still being
        prefilled it would otherwise get no budget until that prompt is done."""
        chunks = [seq for seq in self.running if seq.num_uncomputed > 1]
        if not chunks:                           # the common case at large batch: every one decodes
            return list(self.running)
        return [seq for seq in self.running if seq.num_uncomputed <= 1] + chunks

    def _admit(self, budget: int, evicted: list[Sequence], rows: int) -> list[ScheduledChunk]:
        """Waiting sequences, in order, while the budget and the batch last. One to be parked after its early
        tokens does not count against the batch (it leaves it after its prefill and those few decodes): at most
        `early_rows` of them ride beside a full batch, so a step never has more than max_batch + early_rows rows
        (what the decode graphs are captured for). It takes no parked KV, and is passed over while it does not fit
        or those rows are taken; the others keep their order (once one of them must wait, the rest do). At most
        `rows` are admitted: those left in the step."""
        admitted: list[ScheduledChunk] = []
        deferred: list[Sequence] = []
        parking = sum(1 for s in self.running if s.park_on_sample)
        normal_blocked = False
        while self.waiting and budget > 0 and len(admitted) < rows:
            seq = self.waiting.popleft()
            if seq.num_pending:                  # preempted while its last token was in flight: next step
                self.waiting.appendleft(seq)
                break
            if not seq.park_on_sample and (normal_blocked or len(self.running) - parking >= self.max_batch):
                normal_blocked = True
                deferred.append(seq)
                continue
            if seq.park_on_sample and parking >= self.early_rows:
                deferred.append(seq)
                continue
            fresh = seq.num_computed == 0 and not self.blocks.num_blocks_of(seq.job_id)
            if fresh:
                seq.num_computed = self.blocks.match_prefix(seq.job_id, seq.token_slice(0, seq.num_tokens),
                                                            seq.cache_salt)
            n = min(seq.num_uncomputed, budget)
            if not seq.park_on_sample:
                self._evict_for(seq, seq.num_computed + n, evicted)
            if not self.blocks.can_grow(seq.job_id, seq.num_computed + n):
                if fresh:                        # give the cached prefix back while it waits
                    self.blocks.free(seq.job_id)
                    seq.num_computed = 0
                normal_blocked = normal_blocked or not seq.park_on_sample
                deferred.append(seq)
                continue
            if fresh:
                self.admitted_tokens += seq.num_tokens
                self.cached_tokens += seq.num_computed
            parking += seq.park_on_sample
            self.blocks.grow(seq.job_id, seq.num_computed + n)
            seq.status = SeqStatus.RUNNING
            self.running[seq] = None
            admitted.append(self._plan_chunk(seq, n))
            budget -= n
        self.waiting.extendleft(reversed(deferred))
        return admitted

    def _evict_for(self, seq: Sequence, tokens: int, evicted: list[Sequence]) -> None:
        """Parked KV is given up (newest first) to admit `seq`, but only when giving all of it up makes room."""
        need = -(-tokens // self.blocks.block_size) - self.blocks.num_blocks_of(seq.job_id) - self.blocks.num_free
        if need <= 0 or need > sum(self.blocks.num_blocks_of(p.job_id) for p in self.parked):
            return
        while self.parked and not self.blocks.can_grow(seq.job_id, tokens):
            evicted.append(self._evict_parked())

    @staticmethod
    def _plan_chunk(seq: Sequence, n: int) -> ScheduledChunk:
        chunk = ScheduledChunk(seq, seq.num_computed, n)
        seq.num_computed += n
        return chunk

    def _evict_parked(self) -> Sequence:
        """The most recently parked sequence gives its KV back; the engine forgets it (the scheduler, which
        holds it in its queue, recomputes it wherever it resumes it)."""
        seq = next(reversed(self.parked))
        del self.parked[seq]
        self.blocks.free(seq.job_id)
        seq.reset_for_recompute()
        return seq

    def _freeing_soon(self) -> bool:
        """A running sequence will park (ordered to, or after its early tokens) or end by length when the step in
        flight is collected."""
        return any(self._leaves_with_pending(s) for s in self.running)

    def _preempt(self, seq: Sequence) -> None:
        if seq.preemptions_left:
            seq.preemptions_left -= 1
        del self.running[seq]
        self.blocks.free(seq.job_id)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
