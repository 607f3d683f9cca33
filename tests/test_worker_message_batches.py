"""A worker's messages that piled up while the scheduler handled the ones before are handled in one pass
(Dispatcher.on_worker_messages): each job's token deltas across them joined (one job-store call, one client message
per job), every other message handled in its place once the tokens of the jobs it names are recorded. The
dispatcher runs in-process over a real Redis; the worker's side of the session is played by the test."""
from __future__ import annotations

import asyncio

from alise.v1 import generate_pb2 as pb
from alise.v1 import worker_pb2 as wpb

from services.scheduler.worker_sessions import MessageInbox, named_jobs
from tests.test_scheduler_recovery import assigns, dispatcher, session, submitted  # noqa: F401 - the fixture


def tokens(*deltas: tuple[str, list[int], str]) -> wpb.WorkerMessage:
    return wpb.WorkerMessage(tokens=wpb.TokenEvents(deltas=[wpb.TokenDelta(job_id=j, token_ids=ids, text=text)
                                                            for j, ids, text in deltas]))


def finished(job_id: str) -> wpb.WorkerMessage:
    return wpb.WorkerMessage(finished=wpb.JobFinished(job_id=job_id, finish_reason=pb.FINISH_REASON_LENGTH))


def events(queue: asyncio.Queue) -> list:
    out = []
    while not queue.empty():
        out.append(queue.get_nowait())
    return out


async def test_a_pile_of_messages_records_each_jobs_tokens_once_and_in_order(dispatcher, monkeypatch):
    d = dispatcher
    w = session(d)
    assert await d.worker_joined(w)
    a, b = await submitted(d, "a", "b")
    await d.tick()
    assert sorted(assigns(w)) == sorted([a, b])
    heard = {job: d.hub.subscribe(job) for job in (a, b)}
    calls = []
    append_many = d.store.append_many

    async def counted(worker_id, deltas):
        calls.append([job for job, _, _ in deltas])
        return await append_many(worker_id, deltas)

    monkeypatch.setattr(d.store, "append_many", counted)
    await d.on_worker_messages(w, [tokens((a, [1, 2], "ab"), (b, [5], "x")), tokens((a, [3], "c")), finished(a),
                                   tokens((b, [6], "y")), wpb.WorkerMessage(load=wpb.LoadReport(running=1))])
    # a's tokens recorded (one call) before its finish; b's two steps joined in one call at the end
    assert calls == [[a], [b]]
    state_a, state_b = await d.store.state(a), await d.store.state(b)
    assert (state_a.status, state_a.token_ids, state_a.text) == ("finished", [1, 2, 3], "abc")
    assert (state_b.status, state_b.token_ids, state_b.text) == ("running", [5, 6], "xy")
    # each client is sent its job's tokens of both steps as one chunk, from its first token on
    chunk = [e for e in events(heard[b]) if e.response.HasField("chunk")]
    assert len(chunk) == 1 and list(chunk[0].response.chunk.token_ids) == [5, 6] and chunk[0].first_token == 0
    got_a = events(heard[a])
    assert [list(e.response.chunk.token_ids) for e in got_a if e.response.HasField("chunk")] == [[1, 2, 3]]
    assert got_a[-1].response.HasField("complete")              # and the completion after them
    assert w.load.running == 1


async def test_tokens_held_in_a_pass_never_reach_a_new_job_that_took_the_id_of_theirs_meanwhile(dispatcher,
                                                                                                 monkeypatch):
    """A client's abort can land while a pass awaits Redis for another job, and a retry take the id and be placed
    on the same worker: the aborted job's tokens still held in the pass are what the worker said before it read
    the abort, and are set aside, as one message at a time would have set them aside had they come after it."""
    from dataclasses import replace

    from tests.helpers import valid_request
    from tests.test_scheduler_recovery import TENANT

    d = dispatcher
    w = session(d)
    assert await d.worker_joined(w)
    a, b = await submitted(d, "a", "b")
    await d.tick()
    assigns(w)
    finish = d.store.finish

    async def aborted_meanwhile(job_id, *args, **kwargs):
        assert (await d.abort(a))[0]                   # the client of a cancels while b's finish is recorded,
        assert await d.submit(replace(valid_request("a"), fingerprint="another request"), TENANT)   # then retries
        await d.tick()
        assert assigns(w) == [a]
        return await finish(job_id, *args, **kwargs)

    monkeypatch.setattr(d.store, "finish", aborted_meanwhile)
    await d.on_worker_messages(w, [tokens((a, [1], "a"), (b, [2], "b")), finished(b), tokens((a, [3], "c"))])
    state_a = await d.store.state(a)
    assert (state_a.status, state_a.token_ids, state_a.record.fingerprint) == ("running", [], "another request")
    assert (await d.store.state(b)).token_ids == [2]


def test_the_jobs_a_message_names():
    assert named_jobs(finished("t/a")) == ["t/a"]
    assert named_jobs(wpb.WorkerMessage(step_failed=wpb.StepFailed(job_ids=["t/a"], charged_job_ids=["t/b"]))) \
        == ["t/a", "t/b"]
    assert named_jobs(wpb.WorkerMessage(estimates=wpb.LengthEstimates(
        estimates=[wpb.LengthEstimate(job_id="t/c", output_tokens=3)]))) == ["t/c"]
    assert named_jobs(wpb.WorkerMessage(load=wpb.LoadReport())) == []


async def test_an_inbox_gives_what_piled_up_at_once_holds_a_reader_when_full_and_ends_after_the_rest():
    inbox = MessageInbox(capacity=3)
    for i in range(3):
        await inbox.put(i)
    blocked = asyncio.ensure_future(inbox.put(3))
    await asyncio.sleep(0)
    assert not blocked.done()                         # full: the reader waits (the stream is not read meanwhile)
    assert await inbox.take(2) == [0, 1]
    await asyncio.wait_for(blocked, 30)
    inbox.end()
    assert await inbox.take(10) == [2, 3]
    assert await inbox.take(10) is None
    waiting = asyncio.ensure_future(MessageInbox(1).take(1))
    await asyncio.sleep(0)
    assert not waiting.done()
    waiting.cancel()
