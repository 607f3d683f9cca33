"""The worker's engine loop on the real CPU model: it accounts for its thread's whole wall time by activity
(`alise:engine_thread_seconds`), so a run where the engine steps less than it could shows where the rest went
(live H200: steps covered 97% of the run under fcfs and 85-92% under alise, with no account of the rest); and a
preemption by parking does not wait for the step in flight."""
from __future__ import annotations

import asyncio
import time

from alise.v1 import worker_pb2 as wpb
from prometheus_client import generate_latest

from bench.step_times import parse_step_histogram
from services.common.attention_pairs import prefill_pairs
from services.worker import metrics
from services.worker.config import WorkerConfig
from services.worker.factory import build_engine
from services.worker.metrics import EngineActivity
from services.worker.sequence import SeqStatus
from services.worker.engine_loop import outgoing_message
from tests.test_step_failure import assign, engine_loop_running, next_message


def reading():
    return parse_step_histogram(generate_latest(metrics.REGISTRY).decode()), time.monotonic()


async def test_the_engine_threads_time_is_accounted_for_by_activity(model_dir, tokenizer):
    engine = build_engine(WorkerConfig(model_dir=str(model_dir), num_blocks=64, max_batch=8, token_budget=128))
    async with engine_loop_running(engine) as (loop_thread, outbox):
        await asyncio.sleep(0.3)          # the thread is up and idle: its clock runs from its start
        before, t0 = reading()
        ids = tokenizer.encode("Tell me a story.", add_special_tokens=False)
        loop_thread.submit(assign("a", ids, 0.0, max_tokens=200))
        await next_message(outbox, "tokens")
        loop_thread.submit(wpb.SchedulerCommand(preempt=wpb.PreemptJob(job_id="a", mode=wpb.PREEMPT_MODE_SWAP)))
        await next_message(outbox, "preempted", "a")
        loop_thread.submit(assign("b", ids, 0.0, max_tokens=4))
        await next_message(outbox, "finished", "b")
        await asyncio.sleep(0.5)          # idle again
        after, t1 = reading()
    run = after.minus(before)
    spent = dict(run.thread_s)
    assert set(spent) == {a.value for a in EngineActivity}, spent
    # it stepped, collected the step in flight for the preemption, applied commands, waited with no work
    assert spent["step"] > 0 and spent["flush"] > 0 and spent["commands"] > 0 and spent["idle"] > 0.3, spent
    assert spent["step"] >= run.sum_s * 0.99      # a step's charge covers the step the histogram timed
    # the activities add up to the thread's wall time between the readings (up to one loop turn at either end)
    assert abs(sum(spent.values()) - (t1 - t0)) < 1.0, (spent, t1 - t0)
    assert run.summary()["engine_thread_s"] == spent
    # what the steps held: both prompts prefilled (a swap recomputes nothing), a row for each sequence a step ran
    made_of = run.summary()["made_of"]
    assert made_of["prefill_tokens"] == 2 * len(ids), made_of
    assert made_of["prefill_pairs"] == 2 * prefill_pairs(0, len(ids)), made_of      # each prompt attends to itself
    assert made_of["rows"] >= run.count and made_of["context_tokens"] >= made_of["rows"], made_of
    assert made_of["kept_kv_dropped"] == 0, made_of
    # of those, the decode-only steps: all but the two prompts' (a decodes after its prompt; so does b, for 3 tokens)
    assert 3 <= made_of["decode_steps"] <= run.count - 2, (made_of, run.count)
    assert made_of["decode_steps"] <= made_of["decode_rows"] <= made_of["rows"] - 2, made_of
    assert made_of["decode_rows"] <= made_of["decode_context_tokens"] < made_of["context_tokens"], made_of
    assert "device_s" not in run.summary()        # on CPU there is no device time to tell apart
    # where the placed jobs waited on the worker: the two assignments taken by the engine thread (the preemption is
    # no assignment), and each job once in its line before a step took it in
    waits = run.summary()["assignment_wait_s"]
    assert waits["delivery"]["count"] == 2 and waits["waiting_line"]["count"] == 2, waits
    assert all(0 <= w["mean_s"] < 5 for w in waits.values()), waits


async def collect_until(outbox: asyncio.Queue, kind: str, job_id: str) -> list[wpb.WorkerMessage]:
    """Every message up to and including the first `kind` message about `job_id`."""
    seen = []
    while True:
        msg = outgoing_message(await asyncio.wait_for(outbox.get(), 120))
        seen.append(msg)
        if msg.WhichOneof("kind") == kind == "tokens" and tokens_of([msg], job_id):
            return seen
        if msg.WhichOneof("kind") == kind != "tokens" and getattr(msg, kind).job_id == job_id:
            return seen


def tokens_of(messages, job_id: str) -> list[int]:
    return [t for m in messages if m.WhichOneof("kind") == "tokens"
            for d in m.tokens.deltas if d.job_id == job_id for t in d.token_ids]


async def test_a_preemption_by_parking_follows_the_jobs_token_in_flight_without_a_flush(model_dir, tokenizer):
    engine = build_engine(WorkerConfig(model_dir=str(model_dir), num_blocks=64, max_batch=8, token_budget=128))
    engine.overlap = True                 # as on a GPU: step N+1 is launched before step N is collected
    ids = tokenizer.encode("Tell me a story.", add_special_tokens=False)
    async with engine_loop_running(engine) as (loop_thread, outbox):
        # long enough that `a` cannot finish before the preemption reaches it on a busy machine
        loop_thread.submit(assign("ref", ids, 0.0, max_tokens=160))           # the output with no preemption
        reference = tokens_of(await collect_until(outbox, "finished", "ref"), "ref")
        loop_thread.submit(assign("a", ids, 0.0, max_tokens=160))
        loop_thread.submit(assign("b", ids, 0.0, max_tokens=400))
        seen = await collect_until(outbox, "tokens", "a")
        flushed, _ = reading()
        loop_thread.submit(wpb.SchedulerCommand(preempt=wpb.PreemptJob(job_id="a", mode=wpb.PREEMPT_MODE_PARK)))
        seen += await collect_until(outbox, "preempted", "a")
        assert seen[-1].preempted.mode == wpb.PREEMPT_MODE_PARK
        after, _ = reading()
        assert dict(after.minus(flushed).thread_s).get("flush", 0.0) == 0.0      # it did not wait for the step
        assert engine.seqs["a"].status is SeqStatus.PARKED and engine.seqs["b"].status is SeqStatus.RUNNING
        first = tokens_of(seen, "a")          # every token it made came before the message saying it left
        assert 0 < len(first) < 160 and first == engine.seqs["a"].output_ids
        # resumed as the scheduler does (the job again, with its tokens so far): the same output as uninterrupted
        loop_thread.submit(wpb.SchedulerCommand(assign=wpb.AssignJob(
            job_id="a", prompt_token_ids=ids, output_token_ids=first, sampling=assign("a", ids, 0.0, 160).assign.sampling)))
        rest = tokens_of(await collect_until(outbox, "finished", "a"), "a")
        assert first + rest == reference


async def test_the_worker_keeps_dialling_after_a_session_failure_that_is_no_grpc_status(model_dir, monkeypatch):
    """Any failure while (re)connecting, not only a gRPC status (here a TLS file missing mid-rotation), is logged
    and retried with backoff: it used to end the session task for good while health went on answering SERVING."""
    from services.worker import server
    from services.worker.engine_loop import EngineLoop

    cfg = WorkerConfig(model_dir=str(model_dir), num_blocks=16, max_batch=2, token_budget=64, scheduler="127.0.0.1:9")
    loop_thread = EngineLoop(build_engine(cfg), 0.05)
    loop_thread.start()
    dialled = []

    def missing_ca_file(address, tls):
        dialled.append(address)
        raise FileNotFoundError("ca.pem")

    monkeypatch.setattr(server, "aio_channel", missing_ca_file)
    stop = asyncio.Event()
    session = asyncio.create_task(server.hold_session(cfg, loop_thread, wpb.WorkerMessage(), stop, "token"))
    try:
        deadline = time.monotonic() + 60
        while len(dialled) < 3 and not session.done() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert len(dialled) >= 3 and not session.done()
    finally:
        stop.set()
        await asyncio.wait_for(session, 30)
        loop_thread.stop()


async def test_output_of_a_dropped_session_never_reaches_the_next_one(model_dir, tokenizer):
    """The session ends while a step runs, and the worker dials again at once: the rest of that step (the old
    session's jobs' tokens) used to go out on the new session, before the engine dropped those jobs, as if they
    belonged there; the scheduler, which had requeued them and may have placed them here again, took them."""
    from services.worker.engine_loop import EngineLoop

    engine = build_engine(WorkerConfig(model_dir=str(model_dir), num_blocks=64, max_batch=8, token_budget=128))
    real_step = engine.step

    def slow_step():                                # long steps: the session ends in the middle of one
        time.sleep(0.4)
        return real_step()

    engine.step = slow_step
    loop_thread = EngineLoop(engine, report_interval_s=0.05)
    ids = tokenizer.encode("Tell me a story.", add_special_tokens=False)
    first: asyncio.Queue = asyncio.Queue()
    loop_thread.attach(asyncio.get_running_loop(), first)
    loop_thread.start()
    try:
        loop_thread.submit(assign("old", ids, 0.0, max_tokens=200))
        await next_message(first, "tokens")
        loop_thread.detach()
        second: asyncio.Queue = asyncio.Queue()
        loop_thread.attach(asyncio.get_running_loop(), second)
        loop_thread.submit(assign("new", ids, 0.0, max_tokens=2))
        seen = await collect_until(second, "finished", "new")
    finally:
        loop_thread.stop()
        loop_thread.join(30)
    assert not tokens_of(seen, "old") and tokens_of(seen, "new")
    assert all(getattr(m, m.WhichOneof("kind")).job_id != "old" for m in seen
               if m.WhichOneof("kind") in ("finished", "preempted", "failed"))


async def test_an_idle_worker_reports_its_load_every_heartbeat(model_dir):
    """The scheduler takes a worker silent for --worker-silence-s for hung or cut off; an idle worker whose load does
    not change must still say so every heartbeat_s (before, it sent a load report only when the load changed)."""
    from services.worker.engine_loop import EngineLoop

    loop_thread = EngineLoop(build_engine(WorkerConfig(model_dir=str(model_dir), num_blocks=16, max_batch=2,
                                                       token_budget=64)), 0.05, heartbeat_s=0.3)
    outbox: asyncio.Queue = asyncio.Queue()
    loop_thread.attach(asyncio.get_running_loop(), outbox)
    loop_thread.start()
    try:
        reports = [await next_message(outbox, "load") for _ in range(4)]     # the first, then three unchanged ones
    finally:
        loop_thread.stop()
        loop_thread.join(30)
    assert len({r.SerializeToString() for r in reports}) == 1              # nothing changed between them


async def test_work_that_cannot_run_waits_for_a_command_instead_of_spinning(model_dir, tokenizer):
    """A job to be parked after its first token takes no parked KV: while a parked job's KV holds the room it needs
    and nothing else runs, nothing can change until a command comes. The engine thread stepped at full speed
    meanwhile (thousands of empty steps a second: a core spent; found by review). It now waits for a command, and
    the one that frees the room (an abort) lets the waiting job run at once."""
    engine = build_engine(WorkerConfig(model_dir=str(model_dir), num_blocks=8, max_batch=8, token_budget=128))
    steps = 0
    real_step = engine.step

    def counted_step():
        nonlocal steps
        steps += 1
        return real_step()

    engine.step = counted_step
    holder = tokenizer.encode("one two three four five six seven eight nine ten " * 7, add_special_tokens=False)
    waiter = tokenizer.encode("alpha beta gamma delta epsilon " * 12, add_special_tokens=False)
    blocks = lambda tokens: -(-tokens // engine.blocks.block_size)         # noqa: E731
    # the parked holder (prompt and first token) leaves too little room for the waiter's prompt, which alone fits
    assert blocks(len(holder) + 1) + blocks(len(waiter)) > engine.blocks.num_total >= blocks(len(waiter))
    async with engine_loop_running(engine) as (loop_thread, outbox):
        for job_id, ids in (("holder", holder), ("waiter", waiter)):
            early = assign(job_id, ids, 0.0, max_tokens=8)
            early.assign.park_after_first_token = True
            loop_thread.submit(early)
            if job_id == "holder":
                await next_message(outbox, "preempted", "holder")     # parked after its first token, KV kept
        await asyncio.sleep(0.5)                      # the waiter is taken, and waits for room
        before = steps
        await asyncio.sleep(1.0)
        empty_steps = steps - before
        waited = []
        while not outbox.empty():
            waited.append(outgoing_message(outbox.get_nowait()))
        loop_thread.submit(wpb.SchedulerCommand(abort=wpb.AbortJob(job_id="holder")))
        await next_message(outbox, "preempted", "waiter")      # its first token, then parked
    assert not tokens_of(waited, "waiter"), "the waiter ran before the room was freed: the test tests nothing"
    # one empty step per command wait (report_interval_s = 0.1 s): ~10 a second, not thousands
    assert empty_steps <= 30, empty_steps


async def test_a_job_preempted_for_room_is_one_with_preemptions_left_and_the_scheduler_is_told(model_dir, tokenizer):
    """Two jobs outgrow a small pool. Out of room, the worker preempted the newest whatever its count (the bound the
    scheduler keeps was unknown to it) and told no one. Now each assignment says how many preemptions the job has
    left: the worker takes the newest with some left, and names each job it preempted for room."""
    engine = build_engine(WorkerConfig(model_dir=str(model_dir), num_blocks=5, max_batch=8, token_budget=128))
    ids = tokenizer.encode("one two three four five six seven eight nine ten eleven twelve", add_special_tokens=False)
    per_job = -(-(len(ids) + 40) // engine.blocks.block_size)
    assert 2 * per_job > engine.blocks.num_total >= per_job        # each fits alone, not both to their end
    async with engine_loop_running(engine) as (loop_thread, outbox):
        for job_id, left in (("older", 1), ("newer", 0)):
            cmd = assign(job_id, ids, 0.0, max_tokens=40)
            cmd.assign.preemptions_left = left
            loop_thread.submit(cmd)
        first = await next_message(outbox, "recomputed")
        assert list(first.job_ids) == ["older"]                     # the newest, "newer", has none left
        ended = {(await next_message(outbox, "finished")).job_id for _ in range(2)}
        assert ended == {"older", "newer"}
