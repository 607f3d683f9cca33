"""OpenAI-compatible HTTP front door: /v1/chat/completions, /v1/completions, /v1/models, /health.

Every tool a platform team already runs (the openai SDK, LangChain, `vllm bench serve`, gateways) speaks this.
A request is translated into the gRPC API's GenerateRequest and served by the same AliseServicer.Generate:
the same API keys and tenants, validation, rate and queue limits, idempotent request ids and scheduling. The
servicer reports refusals through `context.abort(code, message)`; here that raises CallAborted, which becomes
an OpenAI-shaped error with the matching HTTP status. Streaming is server-sent events; the usage comes in a last
chunk when `stream_options.include_usage` asks for it, as OpenAI sends it.
A client that disconnects aborts its job, as a cancelled gRPC stream does.

Starlette (a well-kept ASGI toolkit) and uvicorn serve it inside the scheduler's own event loop.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import uvicorn
from alise.v1 import generate_pb2 as pb
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from services.common.auth import HEADER
from services.common.tls import checked_copy
from services.scheduler.api import AliseServicer
from services.scheduler.job_messages import FINISH_NAMES
from services.scheduler.validation import REQUEST_ID

# gRPC status -> (HTTP status, OpenAI error type)
HTTP_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "conflict_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
}
# OpenAI (and vLLM) parameters this server does not implement, each with the values that ask for nothing: any other
# value is refused naming the parameter, rather than served as if it were absent (an answer without the logprobs,
# JSON mode or penalties asked for looks like a good one)
NOT_IMPLEMENTED = {
    "logprobs": [False], "top_logprobs": [0], "echo": [False], "response_format": [{"type": "text"}],
    "tools": [[]], "tool_choice": ["none", "auto"], "functions": [[]], "function_call": ["none", "auto"],
    "presence_penalty": [0, 0.0], "frequency_penalty": [0, 0.0], "logit_bias": [{}], "best_of": [1],
    "suffix": [""], "min_tokens": [0], "repetition_penalty": [1, 1.0], "min_p": [0, 0.0], "use_beam_search": [False],
    "prompt_logprobs": [0], "guided_json": [], "guided_regex": [], "guided_choice": [], "guided_grammar": [],
}
# the role OpenAI's newer clients send for what chat templates call the system message
ROLE_ALIASES = {"developer": "system"}


def openai_param(field: str, max_tokens_param: str = "max_tokens") -> str | None:
    """The OpenAI request's name for a field of the gRPC request that validation named (`chat.messages[2].role`
    -> `messages[2].role`, `sampling.stop[0]` -> `stop`)."""
    if field == "authorization":
        return None
    if field.startswith("chat"):
        return "messages" + field.removeprefix("chat").removeprefix(".messages")
    if field.startswith("sampling."):
        name = field.removeprefix("sampling.").split("[", 1)[0]
        return max_tokens_param if name == "max_tokens" else name
    return field


MAX_BODY_BYTES = 4 << 20          # gRPC's default message limit: the same requests fit through either door
NO_USAGE: dict = {}               # sentinel: a stream chunk's `"usage": null`


class BodyTooLarge(Exception):
    pass


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


async def read_body(request: Request) -> bytes:
    if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
        raise BodyTooLarge
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > MAX_BODY_BYTES:
            raise BodyTooLarge
    return bytes(body)


async def until_disconnect(request: Request, awaitable):
    """awaitable's result, unless the client disconnects first: then it is cancelled and ClientGone raised.
    (Starlette watches the connection only while a StreamingResponse streams.)"""
    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work, watch = asyncio.ensure_future(awaitable), asyncio.ensure_future(gone())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if work.done():
        return work.result()
    work.cancel()
    await asyncio.gather(work, return_exceptions=True)
    raise ClientGone


class CallAborted(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, retry_after_ms: str | None = None):
        super().__init__(message)
        self.code, self.message, self.retry_after_ms = code, message, retry_after_ms


class HttpCallContext:
    """What AliseServicer.Generate needs of a gRPC context, for an HTTP request."""

    def __init__(self, authorization: str | None):
        self._metadata = ((HEADER, authorization),) if authorization else ()

    def invocation_metadata(self):
        return self._metadata

    async def abort(self, code: grpc.StatusCode, details: str, trailing_metadata=()):
        raise CallAborted(code, details, dict(trailing_metadata).get("retry-after-ms"))


@dataclass(frozen=True)
class Completion:
    """What an OpenAI response needs of one request: its id, kind and the served model's name."""
    id: str
    chat: bool
    model: str
    created: int

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def choice(self, text: str, finish_reason: str | None, delta: bool) -> dict:
        if not self.chat:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        if delta:
            return {"index": 0, "delta": {"content": text} if text else {}, "logprobs": None,
                    "finish_reason": finish_reason}
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish_reason}

    def role_chunk(self) -> dict:
        """A chat stream's first chunk, as OpenAI sends it: the assistant role, no content yet."""
        return self.envelope([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                               "finish_reason": None}], chunk=True)

    def envelope(self, choices: list, chunk: bool, usage: dict | None = None) -> dict:
        """usage: None leaves the key out; NO_USAGE writes `"usage": null` (stream chunks before the last)."""
        obj = self.object + (".chunk" if chunk and self.chat else "")
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            out["usage"] = None if usage is NO_USAGE else usage
        return out


def openai_error(status: int, kind: str, message: str, param: str | None = None, headers: dict | None = None):
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                        status_code=status, headers=headers)


def aborted_response(e: CallAborted, request_id: str | None = None, max_tokens_param: str = "max_tokens") -> JSONResponse:
    """The OpenAI error for a refusal of the gRPC API. With the request's id (`x-request-id`), so that a client whose
    job outlived the error (a 503 mid-job) can send the same request again and re-attach instead of starting over."""
    status, kind = HTTP_ERRORS.get(e.code, (500, "internal_error"))
    field = e.message.split(":", 1)[0]
    headers = {"x-request-id": request_id} if request_id else {}
    if e.retry_after_ms:
        headers |= {"retry-after-ms": e.retry_after_ms, "retry-after": str(max(1, -(-int(e.retry_after_ms) // 1000)))}
    if e.code == grpc.StatusCode.INVALID_ARGUMENT and field == "model":
        status, kind = 404, "not_found_error"          # as OpenAI / vLLM answer an unknown model
    return openai_error(status, kind, e.message, openai_param(field, max_tokens_param), headers)


def unanswered_error(done: pb.GenerateComplete) -> tuple[int, str, str] | None:
    """(HTTP status, type, message) for a job that ended without its answer: an error, not a 200 with partial text
    and a finish_reason that is no OpenAI value ("error", "aborted"). None for an answer."""
    made = f"after {done.usage.completion_tokens} tokens; send it with a new request id to start it over"
    if done.finish_reason == pb.FINISH_REASON_ERROR:
        return 500, "server_error", f"request {done.request_id}: the engine failed while serving it, {made}"
    if done.finish_reason == pb.FINISH_REASON_ABORTED:      # gRPC's ABORTED is HTTP's 409 (google.rpc.Code)
        return 409, "conflict_error", (f"request {done.request_id}: aborted (an Abort call, or its client left for "
                                       f"longer than the re-attach grace), {made}")
    return None


class BadField(ValueError):
    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


INT32 = (-(1 << 31), (1 << 31) - 1)


def _typed(body: dict, name: str, types, what: str, bounds: tuple[int, int] = INT32):
    """body[name] if of `types` (an int also within `bounds`: the gRPC field's range), else BadField."""
    value = body.get(name)
    if value is not None and (not isinstance(value, types) or isinstance(value, bool) and bool not in types):
        raise BadField(name, f"must be {what}")
    if isinstance(value, int) and not isinstance(value, bool) and not bounds[0] <= value <= bounds[1]:
        raise BadField(name, f"must be within [{bounds[0]}, {bounds[1]}]")
    return value


def _unicode(text: str, param: str) -> str:
    """text, if protobuf can carry it (JSON may hold lone surrogates, "\\ud800", which UTF-8 cannot)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadField(param, "not valid Unicode text (a lone surrogate)") from None
    return text


def _message_text(content, i: int) -> str:
    """A message's content: a string, or a list of parts of which only text parts are served."""
    param = f"messages[{i}].content"
    if isinstance(content, str):
        return _unicode(content, param)
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in content):
            raise BadField(param, "only text parts are supported")
        return _unicode("".join(p["text"] for p in content), param)
    raise BadField(param, "must be a string or a list of text parts")


def _refuse_not_implemented(body: dict) -> None:
    for name, idle in NOT_IMPLEMENTED.items():
        value = body.get(name)
        if value is not None and not any(type(value) is type(v) and value == v for v in idle):
            raise BadField(name, "not supported by this server")


def max_tokens_name(body: dict) -> str:
    """Which of OpenAI's two names for the output bound the request used (the newer one wins, as at OpenAI)."""
    return "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"


def to_generate_request(body: dict, chat: bool, request_id: str) -> pb.GenerateRequest:
    """The OpenAI request body as the gRPC API's request; type errors name the OpenAI parameter, value checks
    are the gRPC API's own (validation.py)."""
    if not isinstance(body, dict):
        raise BadField("body", "must be a JSON object")
    _refuse_not_implemented(body)
    model = _typed(body, "model", (str,), "a string") or ""
    req = pb.GenerateRequest(request_id=request_id, model=_unicode(model, "model"))
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadField("messages", "must be a non-empty list of {role, content} objects")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise BadField(f"messages[{i}]", "must be an object with a string role")
            role = _unicode(ROLE_ALIASES.get(m["role"], m["role"]), f"messages[{i}].role")
            req.chat.messages.add(role=role, content=_message_text(m.get("content", ""), i))
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise BadField("prompt", "must be a string (one prompt per request)")
        req.prompt = _unicode(prompt, "prompt")
    if _typed(body, "n", (int,), "an integer") not in (None, 1):          # 0 too: no choice is no answer
        raise BadField("n", "only n=1 is supported")
    s = req.sampling
    max_tokens_param = max_tokens_name(body)
    max_tokens = _typed(body, max_tokens_param, (int,), "an integer")
    if max_tokens is not None:
        if max_tokens <= 0:
            raise BadField(max_tokens_param, "must be positive")
        s.max_tokens = max_tokens
    temperature = _typed(body, "temperature", (int, float), "a number")
    s.temperature = 1.0 if temperature is None else temperature         # OpenAI's default is 1, not greedy
    if (top_p := _typed(body, "top_p", (int, float), "a number")) is not None:
        s.top_p = top_p
        if not s.top_p > 0:      # 0 (or what float32 rounds to 0) is the gRPC field's "unset": it would mean 1.0
            raise BadField("top_p", "must be in (0, 1]")
    if (top_k := _typed(body, "top_k", (int,), "an integer")) is not None and top_k > 0:
        s.top_k = top_k
    if (seed := _typed(body, "seed", (int,), "an integer", (0, (1 << 64) - 1))) is not None:
        s.seed = seed
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(x, str) for x in stop)):
        raise BadField("stop", "must be a string or a list of strings")
    s.stop.extend(_unicode(x, "stop") for x in stop or [])
    s.ignore_eos = bool(_typed(body, "ignore_eos", (bool,), "a boolean"))       # vLLM's extension (benchmarks)
    req.priority = _typed(body, "priority", (int,), "an integer") or 0          # ALISE's extension
    return req


@dataclass(frozen=True)
class ParsedRequest:
    grpc: pb.GenerateRequest
    stream: bool
    include_usage: bool
    max_tokens_param: str          # the name the client gave the output bound, for errors about it


def parse_request(raw: bytes, chat: bool, request_id: str) -> ParsedRequest:
    """A request body, parsed; BadField or ValueError when it is not one."""
    body = json.loads(raw)
    req = to_generate_request(body, chat, request_id)
    stream = bool(_typed(body, "stream", (bool,), "a boolean"))
    include_usage = bool(isinstance(body.get("stream_options"), dict) and body["stream_options"].get("include_usage"))
    return ParsedRequest(req, stream, include_usage, max_tokens_name(body))


class OpenAIFrontDoor:
    def __init__(self, servicer: AliseServicer, model_name: str):
        self.api = servicer
        self.model = model_name
        self.app = Starlette(routes=[
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
        ])

    async def health(self, request: Request) -> Response:
        if self.api.closing:
            return Response(status_code=503)
        return Response(status_code=200)

    async def models(self, request: Request) -> Response:
        try:
            await self.api.authenticate(HttpCallContext(request.headers.get(HEADER)))
        except CallAborted as e:
            return aborted_response(e)
        return JSONResponse({"object": "list", "data": [{"id": self.model, "object": "model", "created": 0,
                                                          "owned_by": "alise"}]})

    async def chat_completions(self, request: Request) -> Response:
        return await self._complete(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._complete(request, chat=False)

    async def _complete(self, request: Request, chat: bool) -> Response:
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        if not REQUEST_ID.match(request_id):
            return openai_error(400, "invalid_request_error", "x-request-id: letters, digits, '.', '_', '-', "
                                                               "up to 128 characters", "x-request-id")
        context = HttpCallContext(request.headers.get(HEADER))
        try:
            # authenticated and charged to the tenant's rate allowance before a body is read: parsing and refusing
            # one is work a tenant's flood of bad requests must pay for, as over gRPC
            tenant = await self.api.admit(context)
            # parsed off the event loop, which the gRPC API and the workers' sessions share (4 MiB of JSON can
            # take a good part of a second)
            parsed = await asyncio.to_thread(parse_request, await read_body(request), chat, request_id)
        except CallAborted as e:
            return aborted_response(e)
        except BodyTooLarge:
            return openai_error(413, "invalid_request_error", f"body: larger than {MAX_BODY_BYTES} bytes", "body")
        except BadField as e:
            return openai_error(400, "invalid_request_error", str(e), e.param)
        except (ValueError, RecursionError) as e:   # not JSON, not UTF-8, nested too deep
            return openai_error(400, "invalid_request_error", f"body: not a JSON object ({type(e).__name__})", "body")
        out = Completion(("chatcmpl-" if chat else "cmpl-") + request_id, chat, self.model, int(time.time()))
        events = self.api.generate_for(tenant, parsed.grpc, context)
        job = {"x-request-id": request_id}
        try:
            # admission's refusals come before the first event; a client that leaves while its job waits for
            # its first token aborts it (Generate's cleanup runs when the wait is cancelled)
            first = await until_disconnect(request, anext(events))
        except CallAborted as e:
            await events.aclose()
            return aborted_response(e, request_id, parsed.max_tokens_param)
        except StopAsyncIteration:
            return openai_error(500, "internal_error", "the job ended without a result", headers=job)
        except ClientGone:
            await events.aclose()
            return Response(status_code=499)
        if parsed.stream:
            return StreamingResponse(self._sse(out, first, events, parsed.include_usage),
                                     media_type="text/event-stream", headers=job)
        try:
            return await until_disconnect(request, self._whole(out, first, events, request_id))
        except ClientGone:
            return Response(status_code=499)

    async def _whole(self, out: Completion, first, events, request_id: str) -> Response:
        text, done = [], None
        job = {"x-request-id": request_id}
        try:
            async for response in _chain(first, events):
                if response.HasField("complete"):
                    done = response.complete
                else:
                    text.append(response.chunk.text)
        except CallAborted as e:
            return aborted_response(e, request_id)
        finally:
            await events.aclose()
        if done is None:
            return openai_error(500, "internal_error", "the job ended without a result", headers=job)
        if unanswered := unanswered_error(done):
            return openai_error(*unanswered, headers=job)
        finish = FINISH_NAMES.get(done.finish_reason, "stop")
        return JSONResponse(out.envelope([out.choice(done.text or "".join(text), finish, delta=False)], chunk=False,
                                         usage=_usage(done)), headers={"x-request-id": request_id})

    async def _sse(self, out: Completion, first, events, include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events (usage in a last chunk when stream_options.include_usage asks, as OpenAI sends it);
        cancelled with the client's connection, which closes the Generate stream and so aborts the job."""
        try:
            if out.chat:
                yield _event(out.role_chunk())
            async for response in _chain(first, events):
                if response.HasField("chunk"):
                    if response.chunk.text:
                        yield _event(out.envelope([out.choice(response.chunk.text, None, delta=True)], chunk=True,
                                                  usage=NO_USAGE if include_usage else None))
                    continue
                done = response.complete
                if unanswered := unanswered_error(done):      # an error event, as for a refusal mid-stream
                    status, kind, message = unanswered
                    yield _event({"error": {"message": message, "type": kind, "param": None, "code": status}})
                    return
                finish = FINISH_NAMES.get(done.finish_reason, "stop")
                yield _event(out.envelope([out.choice("", finish, delta=True)], chunk=True,
                                          usage=NO_USAGE if include_usage else None))
                if include_usage:               # as OpenAI: one last chunk with no choices, only the usage
                    yield _event(out.envelope([], chunk=True, usage=_usage(done)))
            yield "data: [DONE]\n\n"
        except CallAborted as e:
            status, kind = HTTP_ERRORS.get(e.code, (500, "internal_error"))
            yield _event({"error": {"message": e.message, "type": kind, "param": None, "code": status}})
        finally:
            await events.aclose()


async def _chain(first, rest) -> AsyncIterator:
    yield first
    async for item in rest:
        yield item


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def _usage(done: pb.GenerateComplete) -> dict:
    p, c = done.usage.prompt_tokens, done.usage.completion_tokens
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


class _H11WithRequestDeadline(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline on each request's headers. uvicorn closes a kept-alive
    connection that goes quiet, but holds a new connection that never sends a request (or dribbles its headers)
    for good, and every held connection counts against `limit_concurrency`: a few idle sockets, no API key needed,
    would turn every later request, /health included, into a 503. Here a connection must complete a request's
    headers within `config.header_timeout_s` of opening or of its previous response, or it is closed (nginx's
    client_header_timeout)."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._expect_request()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._expect_request()

    def _expect_request(self) -> None:
        self.loop.call_later(self.config.header_timeout_s, self._close_unless_new_request, self.cycle)

    def _close_unless_new_request(self, cycle_then) -> None:
        # a request whose headers arrived in time has a cycle of its own
        if self.cycle is cycle_then and not self.transport.is_closing():
            self.transport.close()


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside the scheduler's event loop: the scheduler owns the signals and the shutdown."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


async def start_http(front: OpenAIFrontDoor, listen: str, certfile: str = "", keyfile: str = "",
                     max_connections: int = 4096, header_timeout_s: float = 10.0):
    """Serve on host:port (port 0 = a free one); returns (server, its task, the bound port)."""
    host, port = listen.rsplit(":", 1)
    # a bounded shutdown (jobs of requests cut short stay in Redis, as for gRPC) and bounded concurrency (503 beyond)
    config = uvicorn.Config(front.app, host=host, port=int(port), log_level="warning", lifespan="off",
                            ssl_certfile=certfile or None, ssl_keyfile=keyfile or None, access_log=False,
                            timeout_graceful_shutdown=2, limit_concurrency=max_connections,
                            http=_H11WithRequestDeadline)
    config.header_timeout_s = header_timeout_s
    server = _EmbeddedServer(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()                                 # raises why it could not start (port in use, ...)
            raise RuntimeError(f"HTTP server on {listen} stopped at start")
        await asyncio.sleep(0.05)
    bound = server.servers[0].sockets[0].getsockname()[1]
    return server, task, bound


def reload_certificate(server, certfile: str, keyfile: str) -> None:
    """New connections to the running front door get this certificate (open ones keep theirs): the listening
    socket's TLS context is uvicorn's, loaded again in place from a copy checked first (loading a key that does not
    match into the live context would leave it serving no handshake at all)."""
    with checked_copy(certfile, keyfile) as (cert, key):
        server.config.ssl.load_cert_chain(cert, key)
