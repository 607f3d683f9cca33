"""Runs the engine on its own thread: applies scheduler commands between steps, emits reports.

The model step is blocking compute, so it lives off the asyncio loop; commands arrive through a
thread-safe queue and messages go back via `loop.call_soon_threadsafe` into the current session's outbox.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from alise.v1 import generate_pb2 as pb
from alise.v1 import worker_pb2 as wpb

from services.worker import metrics
from services.worker.metrics import EngineActivity
from services.common.preempt_mode import PreemptMode
from services.worker.engine import Engine, StepOutput
from services.worker.sequence import Finish, Sampling, SeqStatus
from services.worker.token_batcher import TokenBatcher

log = logging.getLogger("alise.worker.loop")
STEP_SAMPLES = 64    # steps sent per load report: single steps, whose sizes vary, tell the step model's terms apart
RESET = "reset"     # the session ended: drop every job (the scheduler requeues them)
# Failed steps in a row, none succeeding in between, after which the device is taken for broken and the worker stops
# serving. A device that stopped answering is caught at its first failure (Engine.device_answers): this bound is the
# backstop, well above what requests that break steps can chain on a healthy worker (each breaks at most the
# scheduler's --max-step-failures, 2, before it fails: a dozen such requests in a row would be needed).
FATAL_FAILED_STEPS = 32


@dataclass(frozen=True)
class Received:
    """An assignment as it reached this worker, and when (time.monotonic): its wait for the engine thread is
    measured when the thread takes it (alise:assignment_wait_seconds, stage "delivery")."""
    command: wpb.SchedulerCommand
    at: float


@dataclass(frozen=True)
class Attach:
    """A new session's outbox. Applied on the engine thread, in command order, so after the RESET of the session
    before it: what the engine produced for that session's jobs meanwhile (the rest of a step, their finishes) is
    dropped, never sent on the new session as if it belonged there."""
    loop: asyncio.AbstractEventLoop
    outbox: asyncio.Queue


FINISH_CODES = {Finish.STOP: pb.FINISH_REASON_STOP, Finish.STOP_STRING: pb.FINISH_REASON_STOP,
                Finish.LENGTH: pb.FINISH_REASON_LENGTH,
                Finish.ABORTED: pb.FINISH_REASON_ABORTED}


def sampling_from_proto(sp: pb.SamplingParams) -> Sampling:
    return Sampling(temperature=sp.temperature, top_p=sp.top_p or 1.0, top_k=sp.top_k,
                    max_tokens=sp.max_tokens, stop=tuple(sp.stop),
                    seed=sp.seed if sp.HasField("seed") else None, ignore_eos=sp.ignore_eos)


def token_events(deltas) -> wpb.WorkerMessage:
    return wpb.WorkerMessage(tokens=wpb.TokenEvents(deltas=[
        wpb.TokenDelta(job_id=d.job_id, token_ids=d.token_ids, text=d.text) for d in deltas]))


def outgoing_message(item) -> wpb.WorkerMessage:
    """An outbox item as the stream takes it: (a message, or a function that builds one (token events: hundreds of
    deltas at large batches, so they are turned into protobuf off the engine thread); when the engine produced it),
    stamped with that time and now."""
    what, produced_at = item
    msg = what() if callable(what) else what
    msg.produced_unix_s, msg.left_outbox_unix_s = produced_at, time.time()
    return msg


def describe(cmd) -> str:
    """A command as the log may show it: its kind and job, no prompt or output text."""
    if not hasattr(cmd, "WhichOneof"):
        return str(cmd)
    kind = cmd.WhichOneof("kind")
    return f"{kind} {getattr(getattr(cmd, kind), 'job_id', '')}".strip()


class EngineLoop(threading.Thread):
    def __init__(self, engine: Engine, report_interval_s: float, stream_updates_per_step: int = 0,
                 heartbeat_s: float = 5.0, on_fatal: Callable[[str], None] | None = None):
        """on_fatal(reason): called once, from this thread, when the device is taken for broken (_device_fault): the
        worker must stop serving so that it is restarted (server.py)."""
        super().__init__(name="engine", daemon=True)
        self.engine = engine
        self.on_fatal = on_fatal
        self.failed_in_a_row = 0           # failed steps since the last one that ran on the device and succeeded
        self.fatal = ""                    # why the device was taken for broken ("": it was not)
        self.batcher = TokenBatcher(stream_updates_per_step)
        self.report_interval_s = report_interval_s
        self.heartbeat_s = heartbeat_s     # an unchanged load is sent again after this long: the scheduler's liveness
        self.commands: queue.Queue = queue.Queue()
        self.stopped = threading.Event()
        self.draining = False
        self._sink: tuple[asyncio.AbstractEventLoop, asyncio.Queue] | None = None
        self._last_report: tuple | None = None
        self._last_report_at = 0.0
        self._step_seconds = 0.0
        self._steps: deque[wpb.StepTotals] = deque(maxlen=STEP_SAMPLES)   # recent steps, for the next load report
        self.clock = metrics.ActivityClock()

    # -- called from the asyncio side --------------------------------------------------------------
    def attach(self, loop: asyncio.AbstractEventLoop, outbox: asyncio.Queue) -> None:
        self.commands.put(Attach(loop, outbox))

    def detach(self) -> None:
        self._sink = None                  # from now on nothing goes out until the next session's Attach
        self.commands.put(RESET)

    def unsent(self) -> int:
        """Messages waiting in the current session's outbox (0 without a session)."""
        sink = self._sink
        return sink[1].qsize() if sink is not None else 0

    def submit(self, command) -> None:
        assigned = isinstance(command, wpb.SchedulerCommand) and command.WhichOneof("kind") == "assign"
        self.commands.put(Received(command, time.monotonic()) if assigned else command)

    def stop(self) -> None:
        self.stopped.set()
        self.commands.put(None)

    # -- the thread ------------------------------------------------------------------------------
    def run(self) -> None:
        stalled = False
        while not self.stopped.is_set():
            # with no work, or work that cannot run (a job waiting for room that parked KV holds), wait for a
            # command rather than turn at full speed (it spun a core while a parked job held the pool)
            self._apply_commands(block=not self.engine.has_work or stalled)
            stalled = False
            if self.engine.has_work:
                try:
                    out = self.engine.step()
                    stalled = out.stalled
                    if out.shape is not None:  # it ran something on the device
                        self.failed_in_a_row = 0
                    self.clock.charge(EngineActivity.STEP)
                    self._emit_step(out)
                    self.clock.charge(EngineActivity.EMIT)
                except Exception as e:  # noqa: BLE001 - a failed step must not kill the worker silently
                    log.exception("engine step failed; dropping all jobs and telling the scheduler")
                    self._step_failed(e)
                    self.clock.charge(EngineActivity.STEP)
            if not self.engine.has_work or stalled:
                self._send_held()          # nothing runs: nothing may wait for a later step
            self._report()
            self.clock.charge(EngineActivity.REPORT)

    def _apply_commands(self, block: bool) -> None:
        try:
            if block:
                try:
                    cmd = self.commands.get(timeout=self.report_interval_s)
                finally:
                    self.clock.charge(EngineActivity.IDLE)
            else:
                cmd = self.commands.get_nowait()
        except queue.Empty:
            return
        while cmd is not None:
            if isinstance(cmd, Received):
                metrics.ASSIGNMENT_WAIT.labels(stage="delivery").observe(time.monotonic() - cmd.at)
                cmd = cmd.command
            try:
                self._apply(cmd)
                self.clock.charge(EngineActivity.COMMANDS)
            except Exception as e:  # noqa: BLE001 - a bad command is logged, the worker keeps serving
                log.exception("command failed: %s", describe(cmd))   # never the prompt or output itself
                if isinstance(cmd, wpb.SchedulerCommand) and cmd.WhichOneof("kind") == "assign":
                    self._refused(cmd.assign.job_id, e)
            try:
                cmd = self.commands.get_nowait()
            except queue.Empty:
                return

    def _apply(self, cmd) -> None:
        if cmd == RESET:
            self._reset()
            return
        if isinstance(cmd, Attach):
            self._sink, self._last_report = (cmd.loop, cmd.outbox), None
            return
        kind = cmd.WhichOneof("kind")
        if kind == "assign":
            a = cmd.assign
            self.engine.add(a.job_id, list(a.prompt_token_ids), sampling_from_proto(a.sampling),
                            list(a.output_token_ids), a.output_text, a.park_after_first_token,
                            a.preemptions_left if a.HasField("preemptions_left") else None, a.early_tokens)
        elif kind == "preempt":
            self._or_drop_all(partial(self._preempt, cmd.preempt), "preempting a job")
        elif kind == "abort":
            self._abort(cmd.abort.job_id)
        elif kind == "drain":
            self._send_held()
            self.draining = True
            self._last_report = None

    def _refused(self, job_id: str, error: Exception) -> None:
        """A job this worker could not take must not stay "running" here in the scheduler's eyes."""
        def refuse():
            self._flush()
            self.engine.abort(job_id)
            self._report_failed([job_id], error)
        self._or_drop_all(refuse, "refusing a job")

    def _abort(self, job_id: str) -> None:
        """Drop the job, then acknowledge (also for a job not held here): the scheduler takes what follows about
        this id for a new job's, which may reuse it, so nothing of the aborted job may follow the acknowledgement.
        It is sent whatever happens: without it the scheduler would set the id aside for good."""
        def abort():
            self._flush()
            self.batcher.forget(job_id)
            self.engine.abort(job_id)
        try:
            self._or_drop_all(abort, "aborting a job")
        finally:
            self._send(wpb.WorkerMessage(finished=wpb.JobFinished(job_id=job_id,
                                                                  finish_reason=pb.FINISH_REASON_ABORTED)))

    def _or_drop_all(self, work, doing: str) -> None:
        """`work`, which flushes the step in flight: if that step fails, every job is dropped and reported as for any
        failed step (the engine thread must not die of it)."""
        try:
            work()
        except Exception as e:  # noqa: BLE001 - a failed step must not kill the worker silently
            log.exception("engine step failed while %s; dropping all jobs and telling the scheduler", doing)
            self._step_failed(e)

    def _preempt(self, p: wpb.PreemptJob) -> None:
        asked = PreemptMode.from_wire(p.mode)
        if asked is PreemptMode.PARK and self.engine.park_when_sampled(p.job_id):
            # No flush: waiting for the step in flight would leave the GPU idle while the next step is prepared
            # (a step's host planning and launch, 5-8 ms on an H200, per preemption). The job parks when its token
            # in flight is collected, and its `preempted` message follows that token (_emit_step, out.parked).
            return
        self._flush()
        self.batcher.forget(p.job_id)
        if (done := self.engine.preempt(p.job_id, asked)) is not None:
            self._send(wpb.WorkerMessage(preempted=wpb.JobPreempted(job_id=p.job_id, mode=done.wire)))

    def _flush(self) -> None:
        """The step in flight first: its tokens (and any held back) must reach the scheduler before a job is
        preempted, aborted or refused."""
        self.clock.charge(EngineActivity.COMMANDS)
        self._emit_step(self.engine.flush())
        self._send_held()
        self.clock.charge(EngineActivity.FLUSH)

    def _step_failed(self, error: Exception) -> None:
        """Every job the engine held is dropped; the scheduler decides what happens to each of them. Swapped
        out and parked jobs are already back in the scheduler's queue (it may even be assigning one here again):
        they are reported as having lost their kept KV, so the scheduler stops counting on it (placement and
        preemption costs), and resume by recompute."""
        self._emit_step(self.engine.salvage())   # what the step settled before it raised (tokens, parks, ...)
        kept = (SeqStatus.SWAPPED, SeqStatus.PARKED)
        job_ids = [j for j, seq in self.engine.seqs.items() if seq.status not in kept]
        kv_lost = [j for j, seq in self.engine.seqs.items() if seq.status in kept]
        # charged with the failure: the jobs new to the batch, if any (a request that breaks a step breaks its first);
        # else every job that was in the step. Jobs that were only waiting here were in no step: never charged.
        in_step = [j for j, seq in self.engine.seqs.items() if seq.status is SeqStatus.RUNNING]
        charged = [j for j in in_step if not self.engine.seqs[j].sampled_here] or in_step
        self._send_held()                  # the tokens they made are real: the scheduler resumes after them
        self._reset()
        self.failed_in_a_row += 1
        if not self.fatal and (reason := self._device_fault()):
            self._declare_fatal(reason)
        if self.fatal:                     # the device's fault, not the jobs': none is charged with it
            charged = []
        self._report_failed(job_ids, error, charged, in_step)
        self._report_kv_dropped(kv_lost)

    def _device_fault(self) -> str:
        """Why the device is to be taken for broken after a failed step ("": it is not): it no longer answers, or
        FATAL_FAILED_STEPS steps failed in a row with none that ran on it succeeding. Such a worker would otherwise
        stay registered and look idle, drawing jobs and failing every one of them."""
        if not self.engine.device_answers():
            return "the device does not answer after a failed step"
        if self.failed_in_a_row >= FATAL_FAILED_STEPS:
            return f"{FATAL_FAILED_STEPS} engine steps failed in a row"
        return ""

    def _declare_fatal(self, reason: str) -> None:
        """Once: the worker is to stop serving (on_fatal, server.py) so that it is restarted on a fresh device."""
        self.fatal = reason
        log.critical("worker stops serving: %s", reason)
        if self.on_fatal is not None:
            try:
                self.on_fatal(reason)
            except Exception:  # noqa: BLE001 - e.g. the event loop already closed at shutdown: the report goes on
                log.exception("could not stop the worker")

    def _report_kv_dropped(self, job_ids: list[str]) -> None:
        if job_ids:
            metrics.KEPT_KV_DROPPED.inc(len(job_ids))
            self._send(wpb.WorkerMessage(kept_kv_dropped=wpb.KeptKvDropped(job_ids=job_ids)))

    def _report_failed(self, job_ids: list[str], error: Exception, charged: list[str] | None = None,
                       in_step: list[str] | None = None) -> None:
        self._send(wpb.WorkerMessage(step_failed=wpb.StepFailed(
            job_ids=job_ids, error=repr(error)[:500], charged_job_ids=job_ids if charged is None else charged,
            charges_named=True, in_step_job_ids=job_ids if in_step is None else in_step, names_in_step=True)))

    def _reset(self) -> None:
        self.engine.reset()
        self.batcher.clear()

    def _emit_step(self, out: StepOutput) -> None:
        for waited in out.waited_in_line:
            metrics.ASSIGNMENT_WAIT.labels(stage="waiting_line").observe(waited)
        if out.seconds:                    # a flush (before a preempt or abort) ran no step of its own
            self._step_seconds = 0.8 * self._step_seconds + 0.2 * out.seconds if self._step_seconds else out.seconds
            metrics.STEP.observe(out.seconds)
            if out.shape is not None:
                self._steps.append(wpb.StepTotals(steps=1, seconds=out.seconds, seqs=out.shape.seqs,
                                                  prefill_tokens=out.shape.prefill_tokens,
                                                  context_tokens=out.shape.context_tokens,
                                                  mixed_steps=int(out.shape.mixed), device_seconds=out.device_s,
                                                  prefill_pairs=out.shape.prefill_pairs))
                metrics.STEP_ROWS.inc(out.shape.seqs)
                metrics.PREFILL_TOKENS.inc(out.shape.prefill_tokens)
                metrics.CONTEXT_TOKENS.inc(out.shape.context_tokens)
                metrics.PREFILL_PAIRS.inc(out.shape.prefill_pairs)
                if not out.shape.mixed:
                    metrics.DECODE_STEPS.inc()
                    metrics.DECODE_ROWS.inc(out.shape.seqs)
                    metrics.DECODE_CONTEXT.inc(out.shape.context_tokens)
                # on a GPU, the collected step's device time, counted with its shape (a step a flush collects before a
                # preempt or abort is in neither: the two stay comparable)
                if out.device_s:
                    metrics.DEVICE_STEP.labels(step="mixed" if out.shape.mixed else "decode").inc(out.device_s)
                    metrics.DEVICE_WAITED.inc(out.device_wait_s)
        metrics.GENERATED.inc(sum(len(d.token_ids) for d in out.deltas))
        if out.estimates:               # before the tokens: the scheduler re-ranks the job as its first token arrives
            self._send(wpb.WorkerMessage(estimates=wpb.LengthEstimates(estimates=[
                wpb.LengthEstimate(job_id=e.job_id, output_tokens=e.output_tokens) for e in out.estimates])))
        if out.recomputed:              # before the finishes: the scheduler counts it only on a job still running here
            self._send(wpb.WorkerMessage(recomputed=wpb.JobsRecomputed(job_ids=out.recomputed)))
        # a finished or parked job's tokens go out now, before the message that says it left the batch
        leaving = {j for j, _ in out.finished} | set(out.parked)
        self._send_tokens(self.batcher.step(out.deltas, leaving, len(self.engine.sched.running)))
        for job_id, finish in out.finished:
            self._send(wpb.WorkerMessage(finished=wpb.JobFinished(job_id=job_id, finish_reason=FINISH_CODES[finish],
                                                                  stop_string=finish is Finish.STOP_STRING)))
        for job_id in out.parked:
            self._send(wpb.WorkerMessage(preempted=wpb.JobPreempted(job_id=job_id, mode=PreemptMode.PARK.wire)))
        self._report_kv_dropped(out.kv_dropped)

    def _send_held(self) -> None:
        self._send_tokens(self.batcher.take_all())

    def _send_tokens(self, deltas) -> None:
        if deltas:
            # built by the asyncio thread (outgoing_message), which runs while this thread waits for the GPU
            self._send(partial(token_events, deltas))

    def _report(self) -> None:
        now = time.monotonic()
        if self.engine.has_work and now - self._last_report_at < self.report_interval_s:
            return                         # rate-limited while busy: skip even computing the load
        load = self.engine.load()
        key = (load, self.draining)
        if key == self._last_report and now - self._last_report_at < self.heartbeat_s:
            return
        self._last_report, self._last_report_at = key, now
        metrics.observe_load(load)
        steps = list(self._steps)
        self._steps.clear()
        self._send(wpb.WorkerMessage(load=wpb.LoadReport(
            running=load.running, waiting=load.waiting, used_blocks=load.used_blocks,
            total_blocks=load.total_blocks, swapped_blocks=load.swapped_blocks,
            running_tokens=load.running_tokens, waiting_tokens=load.waiting_tokens,
            iteration_seconds=self._step_seconds, num_preemptions=load.num_preemptions, draining=self.draining,
            steps=steps, promised_blocks=load.promised_blocks)))

    def _send(self, msg: wpb.WorkerMessage) -> None:
        sink = self._sink
        if sink is not None:
            loop, outbox = sink
            loop.call_soon_threadsafe(outbox.put_nowait, (msg, time.time()))
