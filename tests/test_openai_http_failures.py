"""The HTTP front door over the real dispatcher, job store (a real Redis) and API servicer, in one process, with the
worker's side of its session played by the test: what an HTTP client sees when the engine fails its job."""
from __future__ import annotations

import asyncio

import httpx2 as httpx
from alise.v1 import worker_pb2 as wpb

from services.common.auth import digest, new_secret
from services.scheduler import keys
from services.scheduler.api import AliseServicer
from services.scheduler.openai_http import HttpCallContext, OpenAIFrontDoor, to_generate_request
from services.scheduler.tenants import Tenant, TenantRegistry
from services.scheduler.tokenizer import PromptTokenizer
from services.scheduler.worker_sessions import WorkerSession


async def assigned(d, session: WorkerSession, job_id: str, timeout_s: float = 30.0) -> None:
    """Tick the dispatcher until it has sent job_id to the session."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        await d.tick()
        while not session.outbox.empty():
            cmd = session.outbox.get_nowait()
            if cmd.WhichOneof("kind") == "assign" and cmd.assign.job_id == job_id:
                return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{job_id} was never assigned")


async def http_front(d, model_dir) -> tuple[str, OpenAIFrontDoor, WorkerSession]:
    """An API key of tenant "t", the HTTP front door of a servicer over dispatcher `d`, and a worker session joined."""
    key = new_secret()
    tok = PromptTokenizer(str(model_dir))
    api = AliseServicer(d, d.store, tok, tok.max_model_len, TenantRegistry([Tenant("t", digest(key))]))
    session = WorkerSession("w1", d.cfg.model_name, block_size=16, num_blocks=100, max_batch=4, max_model_len=2048)
    await d.worker_joined(session)
    return key, OpenAIFrontDoor(api, d.cfg.model_name), session


def tokens(job_id: str, ids: list[int], text: str) -> wpb.WorkerMessage:
    """A worker's report of a job's next tokens."""
    return wpb.WorkerMessage(tokens=wpb.TokenEvents(deltas=[wpb.TokenDelta(job_id=job_id, token_ids=ids, text=text)]))


async def test_a_job_the_engine_failed_is_an_http_error_not_a_200(dispatcher_factory, model_dir):
    """Before, a job failed by repeated engine failures came back as 200 with the partial text and a finish_reason
    ("error") that is no OpenAI value: clients took it for an answer and never retried (found by review). Now a
    500 with an OpenAI error and the request's id; a stream ends with an error event, not a finish chunk."""
    d = await dispatcher_factory(max_step_failures=1)
    key, front, session = await http_front(d, model_dir)
    auth = {"authorization": f"Bearer {key}"}
    body = {"model": d.cfg.model_name, "prompt": "Hello", "max_tokens": 8}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=front.app), base_url="http://alise") as client:
        for request_id, stream in (("whole", False), ("streamed", True)):
            post = asyncio.create_task(client.post("/v1/completions", json=body | {"stream": stream},
                                                   headers=auth | {"x-request-id": request_id}, timeout=60))
            job_id = keys.job_id("t", request_id)
            await assigned(d, session, job_id)
            await d.on_worker_message(session, tokens(job_id, [7], "x"))
            await d.on_worker_message(session, wpb.WorkerMessage(step_failed=wpb.StepFailed(
                job_ids=[job_id], error="boom", charged_job_ids=[job_id], charges_named=True)))
            r = await asyncio.wait_for(post, 60)
            assert (await d.store.state(job_id)).status == "failed"
            assert_http_error(r, stream, request_id, 500, "server_error", "error")


def assert_http_error(r, stream: bool, request_id: str, status: int, error_type: str, finish_reason: str) -> None:
    """An OpenAI error, not a 200 with a finish_reason OpenAI does not have: as a status and body, or as a stream's
    last event."""
    if not stream:
        assert r.status_code == status, r.text
        assert r.json()["error"]["type"] == error_type and r.headers["x-request-id"] == request_id
    else:
        events = [line for line in r.text.splitlines() if line.startswith("data: ")]
        assert '"error"' in events[-1] and f'"finish_reason":"{finish_reason}"' not in r.text, r.text


async def test_an_aborted_job_is_an_http_error_not_a_200(dispatcher_factory, model_dir):
    """A job aborted (an Abort call) while an HTTP client waited came back as 200 with the partial text and
    finish_reason "aborted", no OpenAI value, and so did the same request sent again, which re-attaches to its job
    (found by review). Now a 409 (a stream: an error event) both times; a new request id runs it anew."""
    d = await dispatcher_factory()
    key, front, session = await http_front(d, model_dir)
    body = {"model": d.cfg.model_name, "prompt": "Hello", "max_tokens": 8}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=front.app), base_url="http://alise") as client:
        for request_id, stream in (("whole", False), ("streamed", True)):
            headers = {"authorization": f"Bearer {key}", "x-request-id": request_id}
            post = asyncio.create_task(client.post("/v1/completions", json=body | {"stream": stream},
                                                   headers=headers, timeout=60))
            job_id = keys.job_id("t", request_id)
            await assigned(d, session, job_id)
            await d.on_worker_message(session, tokens(job_id, [7], "OLD"))
            assert (await d.abort(job_id))[0]
            again = client.post("/v1/completions", json=body | {"stream": stream}, headers=headers, timeout=60)
            for r in (await asyncio.wait_for(post, 60), await again):
                assert_http_error(r, stream, request_id, 409, "conflict_error", "aborted")
            renewed = f"{request_id}-2"
            retry = asyncio.create_task(client.post("/v1/completions", json=body | {"stream": stream},
                                                    headers=headers | {"x-request-id": renewed}, timeout=60))
            await assigned(d, session, keys.job_id("t", renewed))
            await d.on_worker_message(session, tokens(keys.job_id("t", renewed), [8, 9], "yz"))
            await d.on_worker_message(session, wpb.WorkerMessage(finished=wpb.JobFinished(
                job_id=keys.job_id("t", renewed), finish_reason=1)))
            r = await asyncio.wait_for(retry, 60)
            assert r.status_code == 200 and "yz" in r.text and "OLD" not in r.text, r.text


async def test_a_retry_that_leaves_while_re_attaching_still_leaves_its_job_to_be_aborted(dispatcher_factory, model_dir,
                                                                                        monkeypatch):
    """A stream drops (the job's abort is pending), a retry re-attaches (which cancels the pending abort) and leaves
    while it reads the job's state: before, that retry was not yet counted as the job's follower, so its leaving
    started no grace and the job ran on with no stream and no abort pending (found by review)."""
    d = await dispatcher_factory(reattach_grace_s=1.0)
    key = new_secret()
    tok = PromptTokenizer(str(model_dir))
    tenant = Tenant("t", digest(key))
    api = AliseServicer(d, d.store, tok, tok.max_model_len, TenantRegistry([tenant]))
    context = HttpCallContext(f"Bearer {key}")
    req = to_generate_request({"prompt": "Hello", "max_tokens": 8}, chat=False, request_id="r")
    job_id = keys.job_id("t", "r")

    first = asyncio.create_task(anext(api.generate_for(tenant, req, context)))     # queued: no worker
    await wait_for(lambda: d.hub.watched(job_id))
    first.cancel()                                                                  # drop 1: an abort is pending
    await asyncio.gather(first, return_exceptions=True)
    read_state = d.store.state

    async def slow_state(jid):
        await asyncio.sleep(0.5)
        return await read_state(jid)

    monkeypatch.setattr(d.store, "state", slow_state)
    retry = asyncio.create_task(anext(api.generate_for(tenant, req, context)))
    await wait_for(lambda: job_id not in api._pending_aborts)                       # re-attached ...
    retry.cancel()                                                                  # ... and gone while reading
    await asyncio.gather(retry, return_exceptions=True)
    for _ in range(600):                                                            # the grace is 1 s
        if (await read_state(job_id)).status == "aborted":
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the job was left running with no stream and no abort pending")


async def test_a_stream_gets_the_tokens_a_lost_worker_recorded_but_never_published(dispatcher_factory, model_dir):
    """A worker's step reaches Redis (append) and is then published to the job's streams; a worker lost between the
    two (its connection cut while the append's reply was on its way) left tokens the job has but no stream was sent.
    The job resumed on another worker, whose first chunk starts past them, and the stream skipped them: the client
    joined "A" and "C" while the job's text was "ABC" (found by review). Now a chunk past a gap reads the gap."""
    d = await dispatcher_factory()
    key = new_secret()
    tok = PromptTokenizer(str(model_dir))
    tenant = Tenant("t", digest(key))
    api = AliseServicer(d, d.store, tok, tok.max_model_len, TenantRegistry([tenant]))
    req = to_generate_request({"prompt": "Hello", "max_tokens": 8}, chat=False, request_id="g")
    job_id = keys.job_id("t", "g")

    async def follow() -> list:
        return [r async for r in api.generate_for(tenant, req, HttpCallContext(f"Bearer {key}"))]

    stream = asyncio.create_task(follow())
    w1, w2 = (WorkerSession(w, d.cfg.model_name, block_size=16, num_blocks=100, max_batch=4, max_model_len=2048)
              for w in ("w1", "w2"))
    await d.worker_joined(w1)
    await assigned(d, w1, job_id)
    await d.on_worker_message(w1, tokens(job_id, [1], "A"))
    await d.store.append_many("w1", [(job_id, [2], "B")])     # recorded; its chunk was lost with the worker
    await d.worker_lost(w1)
    await d.worker_joined(w2)
    await assigned(d, w2, job_id)
    await d.on_worker_message(w2, tokens(job_id, [3], "C"))
    await d.on_worker_message(w2, wpb.WorkerMessage(finished=wpb.JobFinished(job_id=job_id, finish_reason=1)))
    responses = await asyncio.wait_for(stream, 60)
    chunks = [r.chunk for r in responses if r.HasField("chunk")]
    assert "".join(c.text for c in chunks) == "ABC"
    assert [t for c in chunks for t in c.token_ids] == [1, 2, 3]
    assert responses[-1].complete.text == "ABC"


async def wait_for(condition, timeout_s: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.01)


async def test_a_client_that_leaves_while_its_job_is_created_leaves_it_to_the_grace(dispatcher_factory, model_dir,
                                                                                   monkeypatch):
    """A client that left during the Redis round trip that creates its job left a job nobody followed and nothing
    would abort: it ran to its end, holding a live-job slot of its tenant (found by review). Once created, it is
    left to the re-attach grace like a job whose stream left later."""
    d = await dispatcher_factory(reattach_grace_s=1.0)
    key = new_secret()
    tok = PromptTokenizer(str(model_dir))
    tenant = Tenant("t", digest(key))
    api = AliseServicer(d, d.store, tok, tok.max_model_len, TenantRegistry([tenant]))
    req = to_generate_request({"prompt": "Hello", "max_tokens": 8}, chat=False, request_id="r")
    job_id = keys.job_id("t", "r")
    submit, in_redis = d.submit, asyncio.Event()

    async def slow_submit(v, t):
        outcome = await submit(v, t)                               # created in Redis ...
        in_redis.set()
        await asyncio.sleep(0.5)                                   # ... its reply on the way when the client leaves
        return outcome

    monkeypatch.setattr(d, "submit", slow_submit)
    stream = asyncio.create_task(anext(api.generate_for(tenant, req, HttpCallContext(f"Bearer {key}"))))
    await asyncio.wait_for(in_redis.wait(), 30)
    stream.cancel()
    await asyncio.gather(stream, return_exceptions=True)
    for _ in range(600):
        state = await d.store.state(job_id)
        if state is not None and state.status == "aborted":
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the job was left {state.status if state else 'uncreated'} with nobody to follow or abort it")
