"""The worker's engine: jobs in, one batched model step at a time, token deltas and finishes out.

`step()` is: plan the batch, launch the model and the sampler on the device, then account for the new
tokens. With `overlap` (on a GPU) the accounting is one step behind: step N+1 is planned and launched
while step N still runs, and only then does the host wait for step N's sampled ids (one non-blocking
copy) and turn them into deltas, so the GPU never waits for Python. A decode whose last token is still
on the device takes it from there (Sequence.num_pending). Commands from the scheduler (add / abort /
preempt) are plain method calls made from the engine thread between steps, so no lock is needed here;
abort and preempt first settle the step in flight (`flush`), so they act on fully known sequences.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from services.common.attention_pairs import prefill_pairs
from services.worker.block_manager import BlockManager
from services.worker.length_probe import LengthProbe
from services.common.batch_limits import DEFAULT_EARLY_ROWS
from services.common.preempt_mode import PreemptMode
from services.common.sampling_limits import sampling_problem
from services.worker.detokenizer import IncrementalDetokenizer
from services.worker.model_runner import SeqChunk
from services.worker.sampler import sample
from services.worker.sequence import Finish, Sampling, Sequence, SeqStatus
from services.worker.step_scheduler import StepScheduler

log = logging.getLogger("alise.worker")


def _timing_event():
    """A CUDA event recorded now on the current stream, with timing (a few microseconds a step: two a step)."""
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def _prompt_key(prompt_ids) -> int:
    """Tells one prompt from another within this process (a preempted job's kept features go to it alone)."""
    return hash(tuple(prompt_ids))



PREEMPTED_FEATURES_KEPT = 4096


@dataclass
class TokenDelta:
    job_id: str
    token_ids: list[int]
    text: str


@dataclass(frozen=True)
class LengthEstimate:
    """The length probe's estimate of a job's whole output, made when its prompt was computed."""
    job_id: str
    output_tokens: float


@dataclass
class StepOutput:
    deltas: list[TokenDelta] = field(default_factory=list)
    finished: list[tuple[str, Finish]] = field(default_factory=list)
    estimates: list[LengthEstimate] = field(default_factory=list)
    parked: list[str] = field(default_factory=list)       # jobs parked after their early tokens (or stopped short)
    kv_dropped: list[str] = field(default_factory=list)   # parked jobs whose KV was given up for room
    recomputed: list[str] = field(default_factory=list)   # running jobs preempted here for room, to recompute here
    seconds: float = 0.0
    shape: "StepShape | None" = None      # what this call launched (None: nothing)
    # on a GPU, the step collected here: how long the device ran it (from its inputs on the device to its sampled ids'
    # copy; on the mixed path, launches the device outpaces count in), and how long the device sat idle before it
    # after the step before it ended, waiting for the host: host time the overlap of two steps did not hide
    device_s: float = 0.0             # (its kind, decode-only or mixed, is `shape`'s)
    device_wait_s: float = 0.0
    # seconds each job assigned here waited in the worker's line before this step took it in (its first step here)
    waited_in_line: list[float] = field(default_factory=list)
    # nothing planned, launched or collected: what waits cannot run until a command (an unpark, an abort, a new
    # job, a finish elsewhere) changes something, so the loop waits for one instead of stepping again at once
    stalled: bool = False


@dataclass(frozen=True)
class StepShape:
    """The make-up of one launched step: what its time depends on (the scheduler fits a speed model to it)."""
    seqs: int
    prefill_tokens: int
    context_tokens: int
    mixed: bool               # ran the mixed (eager) path: prefill chunks, or a prompt the length probe read
    # query-key pairs of the prefill chunks' attention: a chunk of n tokens after s cached (a chat turn's history)
    # costs n * s + n * (n + 1) / 2 of them, which neither its tokens nor its context (s + n) tell apart
    prefill_pairs: int = 0

    @classmethod
    def of(cls, chunks: list[SeqChunk]) -> "StepShape":
        """The runner's chunks of a step, told apart as it runs them (SeqChunk.decodes); a chunk the length probe
        reads runs the mixed path too."""
        tokens = pairs = context = 0
        probed = False
        for c in chunks:              # one pass: this runs every step, over up to max-batch chunks
            n = len(c.token_ids)
            context += c.start + n
            probed |= c.probe
            if not c.decodes:
                tokens += n
                pairs += prefill_pairs(c.start, n)
        return cls(len(chunks), tokens, context, tokens > 0 or probed, pairs)


@dataclass
class LaunchedStep:
    """A step whose sampled ids may still be on their way from the device."""
    seqs: list[Sequence]          # the sequences that sampled a token, in row order
    sampled: torch.Tensor         # [S] ids on the device: the next step's inputs for these sequences
    host: torch.Tensor            # [S] host copy, complete once `ready` has fired
    ready: object | None          # a torch.cuda.Event (None on CPU: already complete)
    shape: StepShape | None = None
    probed: list[Sequence] = field(default_factory=list)   # sequences whose prompt the length probe read...
    probe_host: torch.Tensor | None = None                  # ...and its [P, dims] features, on the host
    began: object | None = None   # a timing torch.cuda.Event where its model work began (ModelRunner.inputs_ready)
    chained: bool = False         # launched while the step before it was in flight: the device had it queued

    def token_ids(self) -> list[int]:
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.tolist()


@dataclass(frozen=True)
class EngineLoad:
    running: int
    waiting: int
    swapped: int
    parked: int
    used_blocks: int
    total_blocks: int
    swapped_blocks: int
    running_tokens: int
    waiting_tokens: int
    num_preemptions: int
    promised_blocks: int = 0           # blocks its sequences still need for the tokens they have (not yet taken)
    prefix_queried_tokens: int = 0     # tokens of sequences admitted from scratch, since start
    prefix_hit_tokens: int = 0         # of which found in the prefix cache


class Engine:
    def __init__(self, runner, blocks: BlockManager, tokenizer, *, eos_ids: set[int],
                 max_batch: int, token_budget: int, max_model_len: int, overlap: bool = False,
                 probe: LengthProbe | None = None, early_rows: int = DEFAULT_EARLY_ROWS,
                 group_prefix_rows: bool = False):
        self.runner = runner
        self.probe = probe                           # learns from finished jobs; each forward that needs it gets it
        self.blocks = blocks
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.max_model_len = max_model_len
        self.vocab_size = runner.hf.config.vocab_size
        self.overlap = overlap
        self.sched = StepScheduler(blocks, max_batch=max_batch, token_budget=token_budget,
                                   max_model_len=max_model_len, early_rows=early_rows,
                                   group_prefix_rows=group_prefix_rows)
        self.seqs: dict[str, Sequence] = {}          # every job this worker holds, in any state
        self.probe_features: dict[str, object] = {}  # job -> its length-probe features (numpy), until it finishes
        # features of jobs preempted by recompute, for when they come back (long jobs are preempted most: without
        # this they would never teach the probe); the oldest are forgotten first
        self._preempted_features: OrderedDict[str, tuple[int, object]] = OrderedDict()   # id -> (prompt digest, features)
        self.detok: dict[str, IncrementalDetokenizer] = {}
        self.num_preemptions = 0
        self._parks_ordered: set[str] = set()        # jobs the scheduler preempted by parking, until they park
        self._in_flight: LaunchedStep | None = None
        self._settled = StepOutput()                 # outputs of a step settled by a command, not yet returned
        self._last_ready: object | None = None       # the last collected step's end on the device (its timing event)

    # -- commands ------------------------------------------------------------------------------
    def add(self, job_id: str, prompt_ids: list[int], sampling: Sampling,
            output_ids: list[int] = (), output_text: str = "", park_after_first_token: bool = False,
            preemptions_left: int | None = None, early_tokens: int = 1) -> None:
        """Start a job, or resume one this worker swapped out or parked earlier. With `park_after_first_token` the
        job is parked (KV kept, no decoding) as soon as it has sampled `early_tokens` tokens (at least one), until it
        is added again.
        `preemptions_left`: how many more times it may be preempted here for room (None: no bound)."""
        seq = self.seqs.get(job_id)
        if seq is not None and seq.status in (SeqStatus.SWAPPED, SeqStatus.PARKED):
            seq.preemptions_left = preemptions_left          # the scheduler's count is the one that holds
            if seq.status is SeqStatus.SWAPPED:
                self._resume_swapped(seq)
            else:
                self.sched.unpark(seq)
            return
        if seq is not None:
            raise ValueError(f"job {job_id} is already on this worker")
        # the scheduler validated these; checked again here so one bad value fails its own job, not a batch
        # (an id outside the vocabulary would fail the step's embedding, on a GPU as a fatal device assert)
        if problem := sampling_problem(sampling.temperature, sampling.top_p, sampling.top_k):
            raise ValueError(f"job {job_id}: sampling.{problem[0]} {problem[1]}")
        tokens = len(prompt_ids) + len(output_ids) - (1 if output_ids else 0)     # a resumed job may be at the end
        if not prompt_ids or tokens >= self.max_model_len or sampling.max_tokens < 1:
            raise ValueError(f"job {job_id}: needs 1 to {self.max_model_len - 1} tokens and max_tokens >= 1")
        if not all(0 <= t < self.vocab_size for t in (*prompt_ids, *output_ids)):
            raise ValueError(f"job {job_id}: token ids must be in [0, {self.vocab_size})")
        seq = Sequence(job_id, list(prompt_ids), sampling, output_ids=list(output_ids),
                       park_on_sample=park_after_first_token, preemptions_left=preemptions_left,
                       park_at_output=len(output_ids) + max(1, early_tokens) if park_after_first_token else 0,
                       arrived_at=time.perf_counter())
        self.seqs[job_id] = seq
        kept = self._preempted_features.pop(job_id, None)
        if kept is not None and output_ids and kept[0] == _prompt_key(prompt_ids):    # this job resumed, not a new one
            self.probe_features[job_id] = kept[1]
        self.detok[job_id] = IncrementalDetokenizer(self.tokenizer, sampling.stop, seq.output_ids, output_text)
        if output_ids and (finish := self._finish_reason(seq, seq.output_ids[-1], self.detok[job_id])) is not None:
            # its recorded tokens already end it (its end was lost between the record of its last tokens and the
            # record of its finish, and the scheduler sent it out again): it ends now, without another token
            self._settled.deltas.append(TokenDelta(job_id, [], self.detok[job_id].release(final=True)))
            self._settled.finished.append((job_id, finish))
            self._drop(seq)
            return
        self.sched.add(seq)

    def abort(self, job_id: str) -> bool:
        self._settle()
        seq = self.seqs.get(job_id)
        if seq is None:
            return False
        self._drop(seq)
        return True

    def park_when_sampled(self, job_id: str) -> bool:
        """Park a running job once the token now in flight for it is collected, without waiting for the step in
        flight: the next step is planned without it and the collect that appends its token parks it (reported in
        StepOutput.parked, after its tokens, as an early prefill's park is). False when no token of it is in
        flight (not running, or steps are not overlapped): then `preempt` does it at once."""
        seq = self.seqs.get(job_id)
        early_prefill = seq is not None and seq.park_on_sample      # on its way to be parked already: not preempted
        if seq is None or not self.sched.park_after_sample(seq):
            return False
        if not early_prefill:
            self._parks_ordered.add(job_id)     # counted as a preemption when it parks (its token may finish it)
        return True

    def preempt(self, job_id: str, mode: PreemptMode) -> PreemptMode | None:
        """Stop running a job but remember it; returns what was done (park, swap or recompute)."""
        self._settle()
        seq = self.seqs.get(job_id)
        if seq is None or seq.status in (SeqStatus.SWAPPED, SeqStatus.PARKED):
            return None
        self.num_preemptions += 1
        if mode is PreemptMode.PARK and self.sched.park(seq):
            return PreemptMode.PARK
        if mode is PreemptMode.SWAP and (moves := self.sched.swap_out(seq)) is not None:
            try:
                self.runner.cache.copy_out(moves)
                return PreemptMode.SWAP
            except Exception:  # noqa: BLE001 - e.g. the gather's temporary out of device memory: recompute it instead
                # (before, the job stayed SWAPPED with a copy never made, unreported: the scheduler waited for good)
                log.exception("swapping job %s out failed: it is preempted for recompute instead", job_id)
        # Recompute: the scheduler re-sends the job (prompt + output so far) when it resumes it.
        self._forget_for_recompute(seq)
        return PreemptMode.RECOMPUTE

    def _forget_for_recompute(self, seq: Sequence) -> None:
        """The job leaves this worker to be recomputed later (here or elsewhere): its probe features are kept."""
        if (kept := self.probe_features.get(seq.job_id)) is not None:
            # with its prompt's digest: a new request may reuse the id once this job ended elsewhere
            self._preempted_features[seq.job_id] = (_prompt_key(seq.prompt_ids), kept)
            while len(self._preempted_features) > PREEMPTED_FEATURES_KEPT:
                self._preempted_features.popitem(last=False)
        self._drop(seq)

    def reset(self) -> None:
        """Drop every job and whatever the device was computing for them (the session ended, or a step
        failed and the scheduler requeues them): nothing in flight is waited for."""
        self._in_flight, self._settled, self._last_ready = None, StepOutput(), None
        self._parks_ordered.clear()
        for seq in list(self.seqs.values()):
            self._drop(seq)
        self.sched.forget_cached()

    def _resume_swapped(self, seq: Sequence) -> None:
        if (moves := self.sched.swap_in(seq)) is None:          # no room: it is recomputed instead
            return
        try:
            self.runner.cache.copy_in(moves)
        except Exception:  # noqa: BLE001 - its kept KV is lost, its tokens are not: computed again, here
            log.exception("swapping job %s back in failed: it is recomputed instead", seq.job_id)
            self.sched.recompute(seq)

    def _drop(self, seq: Sequence) -> None:
        self._parks_ordered.discard(seq.job_id)
        self.sched.drop(seq)
        self.runner.release(seq.job_id)
        self.seqs.pop(seq.job_id, None)
        self.detok.pop(seq.job_id, None)
        self.probe_features.pop(seq.job_id, None)

    # -- the step --------------------------------------------------------------------------------
    @property
    def has_work(self) -> bool:
        return bool(self.sched.running or self.sched.waiting or self._in_flight
                     or self._settled.deltas or self._settled.finished)

    def step(self) -> StepOutput:
        started = time.perf_counter()
        plan = self.sched.schedule()
        self.num_preemptions += len(plan.preempted)
        # Everything below lands in self._settled until the step is done: if it raises half-way, what it had
        # settled (tokens, finishes, parks, parked KV given up, preemptions) is real, and salvage() hands it out.
        out = self._settled
        out.recomputed.extend(seq.job_id for seq in plan.preempted)   # each counts against the job's bound
        for seq in plan.admitted:
            if seq.arrived_at:                          # its first step here (not a recompute's return)
                out.waited_in_line.append(started - seq.arrived_at)
                seq.arrived_at = 0.0
        for seq in plan.parked:                         # early jobs stopped short by a full pool
            self._parked(seq, out)
        for seq in plan.evicted:                        # parked KV given up for room: the scheduler recomputes them
            self._forget_for_recompute(seq)
            out.kv_dropped.append(seq.job_id)
        launched = self._launch(plan) if not plan.empty else None
        collected = self._in_flight
        if collected is not None:                       # overlap: step N+1 is on the device, collect step N
            self._collect(collected, out)
        self._in_flight = launched
        if launched is not None and not self.overlap:
            self._collect(launched, out)
            self._in_flight, collected = None, launched
        self._settled = StepOutput()
        out.stalled = plan.empty and collected is None and not plan.preempted and not plan.evicted
        out.seconds = time.perf_counter() - started
        # this call's time is mostly the wait for the step it collected: report that step's make-up with it
        out.shape = collected.shape if collected is not None else None
        return out

    def device_answers(self) -> bool:
        """Whether the device still runs work (after a failed step): a CUDA error such as an illegal address or an Xid
        leaves the context broken for good, so every later step would fail; one out of memory does not."""
        device = self.runner.device
        if device.type != "cuda":
            return True
        try:
            torch.ones(1, device=device).add_(1)
            torch.cuda.synchronize(device)      # a broken context raises here (sticky error)
            return True
        except Exception:  # noqa: BLE001 - any error here means the context cannot be used
            log.exception("the device does not answer after a failed step")
            return False

    def salvage(self) -> StepOutput:
        """After a step raised: what it had settled before (returned once), leaving the step in flight alone (the
        device may be what failed)."""
        out, self._settled = self._settled, StepOutput()
        return out

    def flush(self) -> StepOutput:
        """Collect the step in flight, launching nothing; returns everything not yet returned."""
        self._settle()
        out, self._settled = self._settled, StepOutput()
        return out

    def _settle(self) -> None:
        if self._in_flight is not None:
            launched, self._in_flight = self._in_flight, None
            self._collect(launched, self._settled)

    def _launch(self, plan) -> LaunchedStep:
        prev = self._in_flight.sampled if self._in_flight is not None else None
        chunks, sampled, probed = [], [], []
        for c in plan.chunks:
            seq = c.seq
            chunk = self._chunk(seq, c.start, c.num_tokens)
            chunks.append(chunk)
            if chunk.wants_logits:
                sampled.append(seq)
            if chunk.probe:
                probed.append(seq)
        logits = self.runner.forward(chunks, prev, self.probe if probed else None)
        features = self.runner.take_probed() if probed else None
        tokens = sample(logits, [s.sampling for s in sampled], [len(s.output_ids) + s.num_pending for s in sampled])
        host = ready = None
        if tokens.is_cuda:            # the ids' copy is queued now, and its end marked, before more host work
            host = tokens.to("cpu", non_blocking=True)      # pinned destination: the copy does not block
            features = features.to("cpu", non_blocking=True) if features is not None else None
            ready = _timing_event()
        for c in plan.chunks:         # the step is launched: its full blocks whose tokens the host knows join
            self.sched.record_computed(c.seq)   # the prefix cache (not before: a launch that raised wrote no KV)
        for row, seq in enumerate(sampled):
            seq.num_pending += 1
            seq.sample_row = row
        shape = StepShape.of(chunks)
        probed = probed if features is not None else []
        if ready is not None:
            return LaunchedStep(sampled, tokens, host, ready, shape, probed, features, self.runner.inputs_ready,
                                chained=prev is not None)
        return LaunchedStep(sampled, tokens, tokens, None, shape, probed, features)

    def _chunk(self, seq: Sequence, start: int, n: int) -> SeqChunk:
        wants_logits = start + n == seq.num_tokens
        if seq.num_pending:           # its one uncomputed token was sampled by the step still in flight
            assert n == 1 and wants_logits
            return SeqChunk([0], start, self.blocks.rows.row(seq.job_id), True, seq.job_id, prev_row=seq.sample_row)
        # a fresh prompt's last chunk (not a resumed job's: its estimate was made when it first ran)
        probe = self.probe is not None and wants_logits and not seq.output_ids
        return SeqChunk(seq.token_slice(start, start + n), start, self.blocks.rows.row(seq.job_id), wants_logits,
                        seq.job_id, probe=probe)

    def _collect(self, launched: LaunchedStep, out: StepOutput) -> None:
        tokens = launched.token_ids()                   # waits for the step: its probe features are in too
        self._time_on_device(launched, out)
        if launched.probed:
            self._read_probe(launched.probed, launched.probe_host.numpy(), out)
        for seq, token in zip(launched.seqs, tokens):
            seq.num_pending -= 1
            if self.seqs.get(seq.job_id) is seq:        # else aborted or finished since it was launched
                self._append_token(seq, token, out)

    def _time_on_device(self, launched: LaunchedStep, out: StepOutput) -> None:
        """The collected step's device time, and the device's wait for it since the step before it ended (only when
        it was launched behind that step: otherwise the engine had nothing to run, or had flushed, meanwhile)."""
        if launched.began is None:                      # on CPU, or a runner that does not time its steps
            return
        out.device_s += launched.began.elapsed_time(launched.ready) / 1e3
        if launched.chained and self._last_ready is not None:
            out.device_wait_s += max(0.0, self._last_ready.elapsed_time(launched.began) / 1e3)
        self._last_ready = launched.ready

    def _read_probe(self, seqs: list[Sequence], features, out: StepOutput) -> None:
        for seq, x in zip(seqs, features):
            if self.seqs.get(seq.job_id) is not seq:
                continue
            self.probe_features[seq.job_id] = x.copy()     # not a view pinning the step's whole buffer
            if (est := self.probe.estimate(x)) is not None:
                out.estimates.append(LengthEstimate(seq.job_id, est))

    def _append_token(self, seq: Sequence, token: int, out: StepOutput) -> None:
        seq.output_ids.append(token)
        seq.sampled_here = True
        detok = self.detok[seq.job_id]
        detok.add(token)
        finish = self._finish_reason(seq, token, detok)
        out.deltas.append(TokenDelta(seq.job_id, [token], detok.release(final=finish is not None)))
        if finish is not None:
            if finish is Finish.STOP and not seq.sampling.ignore_eos and seq.job_id in self.probe_features:
                self.probe.observe(self.probe_features[seq.job_id], len(seq.output_ids))   # an uncensored length
            self.sched.finish(seq, finish)
            self._drop(seq)
            out.finished.append((seq.job_id, finish))
        elif seq.park_on_sample and len(seq.output_ids) >= seq.park_at_output and self.sched.park(seq):
            self._parked(seq, out)

    def _parked(self, seq: Sequence, out: StepOutput) -> None:
        out.parked.append(seq.job_id)
        if seq.job_id in self._parks_ordered:
            self._parks_ordered.discard(seq.job_id)
            self.num_preemptions += 1

    def _finish_reason(self, seq: Sequence, token: int, detok: IncrementalDetokenizer) -> Finish | None:
        if detok.stopped:
            return Finish.STOP_STRING
        if token in self.eos_ids and not seq.sampling.ignore_eos:
            return Finish.STOP
        if (len(seq.output_ids) >= seq.sampling.max_tokens
                or len(seq.prompt_ids) + len(seq.output_ids) >= self.max_model_len):
            return Finish.LENGTH
        return None

    def _promised_blocks(self, running, waiting) -> int:
        """Blocks the running and waiting sequences still need to hold their tokens and the next one (what the
        scheduler promised them when it placed them): a prompt takes its blocks chunk by chunk, a job in the line
        none yet, so `used_blocks` alone shows room that is already spoken for. (A job in the line whose prompt
        the prefix cache holds is counted whole until it is admitted: room shown too small for a while, not too
        large.) A job sent to be prefilled early needs room for its early tokens. Parked and swapped sequences are in
        neither list."""
        return sum(self.blocks.extra_blocks(s.job_id, s.tokens_to_hold) for seqs in (running, waiting) for s in seqs)

    def load(self) -> EngineLoad:
        running, waiting = self.sched.running, self.sched.waiting
        return EngineLoad(
            running=len(running),
            waiting=len(waiting),
            swapped=sum(1 for s in self.seqs.values() if s.status is SeqStatus.SWAPPED),
            parked=len(self.sched.parked),
            used_blocks=self.blocks.num_used,
            total_blocks=self.blocks.num_total,
            swapped_blocks=self.blocks.num_swapped,
            running_tokens=sum(s.num_tokens for s in running),
            waiting_tokens=sum(s.num_tokens for s in waiting),
            num_preemptions=self.num_preemptions,
            promised_blocks=self._promised_blocks(running, waiting),
            prefix_queried_tokens=self.sched.admitted_tokens,
            prefix_hit_tokens=self.sched.cached_tokens,
        )
