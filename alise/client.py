"""The ALISE client SDK: typed, streaming, sync (`Client`) and asyncio (`AsyncClient`), over the gRPC API.

Needs only grpcio and protobuf (`pip install alise`). A request is a prompt (tokenized as is) or chat
`messages` (rendered with the served model's chat template); sampling follows the gRPC API's SamplingParams.
Every call carries the API key as `authorization: Bearer <key>`. Failures raise AliseError with the gRPC
status name and the server's message, which names the offending field (`sampling.top_p: must be in (0, 1]`); a
request that ends without its answer (the engine failed on it, or it was aborted) raises too, with what it had.
Leaving a stream early (break, close, Ctrl-C) cancels the request on the server and frees its KV blocks. A stream
that breaks (UNAVAILABLE: the scheduler restarted, the network dropped) leaves its job running on the server for a
while: send the same request again with `request_id=err.request_id` and it re-attaches, replaying what was made.
"""
from __future__ import annotations

import asyncio
import ipaddress
import uuid
import weakref
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import grpc

from alise.v1 import generate_pb2 as pb
from alise.v1 import generate_pb2_grpc as pb_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"
# HTTP/2 keepalive, as between ALISE's own services (services/common/keepalive.py; the SDK needs only grpcio): a
# server that vanished without closing the connection (power loss, a partition) ends the stream within ~30 s
# instead of at the call's deadline
KEEPALIVE = [("grpc.keepalive_time_ms", 20_000), ("grpc.keepalive_timeout_ms", 10_000),
             ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0)]


class FinishReason(str, Enum):
    STOP = "stop"            # EOS or a stop string
    LENGTH = "length"        # max_tokens reached
    ABORTED = "aborted"
    ERROR = "error"


_FINISH = {pb.FINISH_REASON_STOP: FinishReason.STOP, pb.FINISH_REASON_LENGTH: FinishReason.LENGTH,
           pb.FINISH_REASON_ABORTED: FinishReason.ABORTED, pb.FINISH_REASON_ERROR: FinishReason.ERROR}


@dataclass(frozen=True)
class Chunk:
    """What a stream delivers as the model generates: text and token ids since the previous chunk."""
    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Timings:
    queue_s: float              # accepted -> first placed on a worker
    ttft_s: float               # accepted -> first token
    e2e_s: float                # accepted -> finished
    predicted_output_tokens: int
    preemptions: int


@dataclass(frozen=True)
class Completion:
    request_id: str
    text: str                   # the whole output
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    usage: Usage
    timings: Timings

    @classmethod
    def from_message(cls, done: pb.GenerateComplete, token_ids: Sequence[int] = ()) -> "Completion":
        """The completion a stream's last message describes (its token ids come in the chunks before it)."""
        t = done.timings
        return cls(request_id=done.request_id, text=done.text, token_ids=tuple(token_ids),
                   finish_reason=_FINISH.get(done.finish_reason, FinishReason.ERROR),
                   usage=Usage(done.usage.prompt_tokens, done.usage.completion_tokens),
                   timings=Timings(t.queue_seconds, t.ttft_seconds, t.e2e_seconds, t.predicted_output_tokens,
                                   t.num_preemptions))


class AliseError(Exception):
    """A refused or failed call: `code` is the gRPC status name (INVALID_ARGUMENT, UNAUTHENTICATED, ...).
    `request_id`: the request's id where it had one (send the same request with it to re-attach after UNAVAILABLE);
    `completion`: what a request that ended without its answer had made (INTERNAL: the engine failed on it;
    ABORTED: it was aborted)."""

    def __init__(self, code: str, message: str, retry_after_s: float | None = None, request_id: str | None = None,
                 completion: "Completion | None" = None):
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.retry_after_s = code, message, retry_after_s
        self.request_id, self.completion = request_id, completion

    @classmethod
    def from_rpc(cls, e: grpc.RpcError, request_id: str | None = None) -> "AliseError":
        trailers = dict(e.trailing_metadata() or ()) if hasattr(e, "trailing_metadata") else {}
        retry = trailers.get("retry-after-ms")
        return cls(e.code().name, e.details() or "", float(retry) / 1000 if retry else None, request_id)

    @classmethod
    def unanswered(cls, done: "Completion") -> "AliseError | None":
        """The error for a request that ended without its answer; None for one that got it (stop, length)."""
        why = {FinishReason.ERROR: ("INTERNAL", "the engine failed while serving it"),
               FinishReason.ABORTED: ("ABORTED", "it was aborted")}.get(done.finish_reason)
        if why is None:
            return None
        return cls(why[0], f"request {done.request_id}: {why[1]}, after {done.usage.completion_tokens} tokens",
                   request_id=done.request_id, completion=done)


def build_request(prompt: str | None = None, *, messages: Sequence[dict] | None = None, max_tokens: int = 0,
                  temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, stop: Sequence[str] = (),
                  seed: int | None = None, ignore_eos: bool = False, priority: int = 0,
                  request_id: str | None = None, model: str = "") -> pb.GenerateRequest:
    """A GenerateRequest from keyword arguments: exactly one of `prompt` and `messages` ({role, content})."""
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of prompt and messages")
    sampling = pb.SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                 stop=list(stop), ignore_eos=ignore_eos)
    if seed is not None:
        sampling.seed = seed
    req = pb.GenerateRequest(request_id=request_id or uuid.uuid4().hex, model=model, sampling=sampling,
                             priority=priority)
    if messages is not None:
        req.chat.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages)
    else:
        req.prompt = prompt
    return req


def _credentials(address: str, api_key: str | None, tls_ca: str | None, insecure: bool) -> grpc.ChannelCredentials | None:
    """TLS credentials verifying the server with `tls_ca`; None (plaintext) only where a key cannot leak: a
    loopback address, no key, or an explicit insecure=True."""
    if tls_ca:
        return grpc.ssl_channel_credentials(root_certificates=Path(tls_ca).read_bytes())
    if api_key and not insecure and not _is_loopback(address):
        raise ValueError(f"refusing to send an API key in plaintext to {address}: give tls_ca, or insecure=True")
    return None


def _is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Stream:
    """Chunks as they come (iterate it); `completion` once the stream has ended. `cancel()` (or leaving the loop
    and closing the client) aborts the request on the server."""

    def __init__(self, call, request_id: str = "", abort=None):
        self._call = call
        self.request_id = request_id
        self._abort = abort          # ends the job on the server at once (it would wait a few seconds for a retry)
        self._tokens: list[int] = []
        self._cancelled = False
        self.completion: Completion | None = None

    def _take(self, response) -> Chunk | None:
        """A chunk to hand out, or None once the completion is recorded (AliseError if it ended unanswered)."""
        if response.HasField("chunk"):
            self._tokens.extend(response.chunk.token_ids)
            return Chunk(response.chunk.text, tuple(response.chunk.token_ids))
        self.completion = Completion.from_message(response.complete, self._tokens)
        if (error := AliseError.unanswered(self.completion)) is not None:
            raise error
        return None

    def _failed(self, e: grpc.RpcError) -> AliseError | None:
        """The error to raise, or None for the CANCELLED our own cancel() caused."""
        if self._cancelled and e.code() == grpc.StatusCode.CANCELLED:
            return None
        return AliseError.from_rpc(e, self.request_id)

    def __iter__(self) -> Iterator[Chunk]:
        try:
            for response in self._call:
                if (chunk := self._take(response)) is not None:
                    yield chunk
        except grpc.RpcError as e:
            if (error := self._failed(e)) is not None:
                self._abort = None       # the call failed (UNAVAILABLE...): the job stays for a retry to re-attach
                raise error from None
        finally:
            if self.completion is None:
                self.cancel()

    def cancel(self) -> None:
        """Stop the stream and abort the request on the server (a stream that merely drops is kept there for a few
        seconds for a retry to re-attach; a cancel means it is not wanted)."""
        if (abort := self._stop()) is not None:
            try:
                abort()
            except (AliseError, grpc.RpcError, ValueError):   # ValueError: the client was closed first
                pass                     # best effort: the server aborts it after its grace anyway

    def _stop(self):
        """Cancel the call; returns the abort to send now, once: none after the completion, after a failed call,
        or a second time."""
        self._cancelled = True
        self._call.cancel()
        abort, self._abort = self._abort, None
        return abort if self.completion is None else None


class AsyncStream(Stream):
    """As Stream, for asyncio: `async for chunk in stream`. Leaving the loop early awaits the Abort (up to 10 s);
    `cancel()`, a plain method, sends it in the background."""

    def cancel(self) -> None:
        if (abort := self._stop()) is not None:
            self._aborting = asyncio.ensure_future(abort())
            self._aborting.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def _cancel_and_abort(self) -> None:
        if (abort := self._stop()) is not None:
            try:
                await asyncio.wait_for(asyncio.shield(abort()), 10)
            except (AliseError, grpc.RpcError, ValueError, asyncio.TimeoutError):
                pass                     # best effort: the server aborts it after its grace anyway

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        try:
            async for response in self._call:
                if (chunk := self._take(response)) is not None:
                    yield chunk
        except grpc.RpcError as e:
            if (error := self._failed(e)) is not None:
                self._abort = None       # the call failed (UNAVAILABLE...): the job stays for a retry to re-attach
                raise error from None
        finally:
            if self.completion is None:
                await self._cancel_and_abort()


class Client:
    """A connection to an ALISE scheduler. `tls_ca`: verify the server with this CA; without it the connection is
    plaintext, which carries an API key only to a loopback address unless insecure=True."""

    _grpc = grpc            # channel factories: grpc (blocking) or grpc.aio

    def __init__(self, address: str = DEFAULT_ADDRESS, api_key: str | None = None, tls_ca: str | None = None,
                 timeout_s: float = 3600.0, insecure: bool = False):
        creds = _credentials(address, api_key, tls_ca, insecure)
        self._channel = (self._grpc.secure_channel(address, creds, options=KEEPALIVE) if creds
                         else self._grpc.insecure_channel(address, options=KEEPALIVE))
        self._stub = pb_grpc.AliseStub(self._channel)
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.timeout_s = timeout_s

    def stream(self, prompt: str | None = None, **kwargs) -> Stream:
        """Start a request (build_request's arguments); iterate the result for its chunks."""
        req = build_request(prompt, **kwargs)
        return Stream(self._stub.Generate(req, timeout=self.timeout_s, metadata=self._metadata), req.request_id,
                      abort=lambda: self.abort(req.request_id))

    def generate(self, prompt: str | None = None, **kwargs) -> Completion:
        """Run a request to its end and return the whole result."""
        stream = self.stream(prompt, **kwargs)
        for _ in stream:
            pass
        if stream.completion is None:
            raise AliseError("UNKNOWN", "the stream ended without a completion")
        return stream.completion

    def abort(self, request_id: str) -> bool:
        """Cancel a queued or running request of this tenant; False if it had already ended."""
        try:
            return self._stub.Abort(pb.AbortRequest(request_id=request_id), timeout=60,
                                    metadata=self._metadata).aborted
        except grpc.RpcError as e:
            raise AliseError.from_rpc(e, request_id) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient(Client):
    """Client for asyncio: `await client.generate(...)`, `async for chunk in client.stream(...)`."""
    _grpc = grpc.aio

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._streams: weakref.WeakSet[AsyncStream] = weakref.WeakSet()      # for close(): those left early

    def stream(self, prompt: str | None = None, **kwargs) -> AsyncStream:
        req = build_request(prompt, **kwargs)
        stream = AsyncStream(self._stub.Generate(req, timeout=self.timeout_s, metadata=self._metadata),
                             req.request_id, abort=lambda: self.abort(req.request_id))
        self._streams.add(stream)
        return stream

    async def generate(self, prompt: str | None = None, **kwargs) -> Completion:
        stream = self.stream(prompt, **kwargs)
        async for _ in stream:
            pass
        if stream.completion is None:
            raise AliseError("UNKNOWN", "the stream ended without a completion")
        return stream.completion

    async def abort(self, request_id: str) -> bool:
        try:
            return (await self._stub.Abort(pb.AbortRequest(request_id=request_id), timeout=60,
                                           metadata=self._metadata)).aborted
        except grpc.RpcError as e:
            raise AliseError.from_rpc(e, request_id) from None

    async def close(self) -> None:
        """Abort the requests of streams left early, then close. Leaving `async for` early does not run the stream's
        cleanup at once (asyncio closes an abandoned async generator later, in a task of its own): without this, the
        channel was closed first and the Abort never went out."""
        for stream in list(self._streams):
            await stream._cancel_and_abort()
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
