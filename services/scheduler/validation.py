"""Turn a GenerateRequest into a normalised job, or name the field that is wrong."""
from __future__ import annotations

import hashlib
import json
import re
import uuid
from dataclasses import dataclass

from alise.v1 import generate_pb2 as pb
from jinja2.exceptions import TemplateError

from services.common.predictor_text import newest_message_chars, predictor_text
from services.common.sampling_limits import sampling_problem
from services.scheduler.job_sampling import JobSampling
from services.scheduler.config import SchedulerConfig
from services.scheduler.tokenizer import PromptTokenizer

MAX_PRIORITY = 1000
CHAT_ROLES = {"system", "user", "assistant", "tool"}
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_MESSAGES = 1024
CHARS_PER_TOKEN_BOUND = 32
# Request ids become part of Redis keys: no ':' or '/' (they separate key parts), bounded length.
REQUEST_ID = re.compile(r"^[A-Za-z0-9._~@+=-]{1,128}$")
REQUEST_ID_RULE = "1 to 128 characters from A-Z a-z 0-9 . _ ~ @ + = -"


class InvalidRequest(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class PredictorInputs:
    """What the length predictor is told about a request (also what bench/online_learning_replay.py replays)."""
    text: str                         # services/common/predictor_text.py: the user's words, without the chat template
    previous_reply_tokens: int = 0    # chat: tokens of the assistant's last reply (0: none)
    newest_message_chars: int = 0     # chat: characters of the user's newest message (0: none or unknown)


@dataclass(frozen=True)
class ValidRequest:
    request_id: str
    predictor: PredictorInputs
    prompt_ids: list[int]
    sampling: JobSampling
    priority: int
    fingerprint: str = ""             # identity of the request: a retry with the same id and fingerprint re-attaches


def validate(req: pb.GenerateRequest, cfg: SchedulerConfig, tok: PromptTokenizer,
             max_model_len: int) -> ValidRequest:
    if req.request_id and not REQUEST_ID.match(req.request_id):
        raise InvalidRequest("request_id", REQUEST_ID_RULE)
    if req.model and req.model != cfg.model_name:
        raise InvalidRequest("model", f"unknown model {clip(req.model)!r}; this server serves {cfg.model_name!r}")
    if abs(req.priority) > MAX_PRIORITY:
        raise InvalidRequest("priority", f"must be within [-{MAX_PRIORITY}, {MAX_PRIORITY}]")
    _check_size(req, max_model_len)
    model_text = _model_text(req, tok)
    prompt_ids = tok.encode(model_text)
    if not prompt_ids:
        raise InvalidRequest("prompt", "tokenizes to zero tokens")
    if len(prompt_ids) >= max_model_len:
        raise InvalidRequest("prompt", f"{len(prompt_ids)} tokens; the context served is {max_model_len} tokens")
    sampling = _sampling(req.sampling, cfg, max_model_len - len(prompt_ids))
    fingerprint = hashlib.sha256(json.dumps([prompt_ids, sampling.as_dict(), req.priority]).encode()).hexdigest()[:32]
    return ValidRequest(req.request_id or uuid.uuid4().hex, predictor_inputs(req, tok), prompt_ids, sampling,
                        req.priority, fingerprint)


def predictor_inputs(req: pb.GenerateRequest, tok: PromptTokenizer) -> PredictorInputs:
    return PredictorInputs(_predictor_text(req), _previous_reply_tokens(req, tok), _newest_message_chars(req))


def clip(text: str, limit: int = 64) -> str:
    """A client's string as echoed in an error: bounded, so a huge field cannot overflow the status."""
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _check_size(req: pb.GenerateRequest, max_model_len: int) -> None:
    """Refuse oversized input before tokenizing it: no real token is longer than CHARS_PER_TOKEN_BOUND
    characters, so a longer text cannot fit the context, and tokenizing megabytes would stall the server."""
    limit = max_model_len * CHARS_PER_TOKEN_BOUND
    if req.WhichOneof("input") == "chat":
        if len(req.chat.messages) > MAX_MESSAGES:
            raise InvalidRequest("chat.messages", f"at most {MAX_MESSAGES} messages")
        size, field = sum(len(m.content) for m in req.chat.messages), "chat.messages"
    else:
        size, field = len(req.prompt), "prompt"
    if size > limit:
        raise InvalidRequest(field, f"{size} characters cannot fit the model's context of {max_model_len} tokens")


def _predictor_text(req: pb.GenerateRequest) -> str:
    if req.WhichOneof("input") == "chat":
        return predictor_text([m.content for m in req.chat.messages])
    return predictor_text([req.prompt])


def _previous_reply_tokens(req: pb.GenerateRequest, tok: PromptTokenizer) -> int:
    """Replies in one conversation tend to be alike in length: the last one is a strong predictor hint."""
    if req.WhichOneof("input") != "chat":
        return 0
    replies = [m.content for m in req.chat.messages if m.role == "assistant" and m.content.strip()]
    return len(tok.encode(replies[-1])) if replies else 0


def _newest_message_chars(req: pb.GenerateRequest) -> int:
    """A short message after a long reply ("Thanks!", "go on") asks for a short answer: its length is a hint the
    predictor's conversation line uses, and the predictor reads the message itself from the head of its text. So
    only a chat that ends with the user's message has one (0 for a prompt, or a chat ending with a tool's result or
    an assistant's prefill, whose head is not the user's words: review, session 37)."""
    if req.WhichOneof("input") != "chat" or not req.chat.messages or req.chat.messages[-1].role != "user":
        return 0
    return newest_message_chars(req.chat.messages[-1].content)


def _model_text(req: pb.GenerateRequest, tok: PromptTokenizer) -> str:
    kind = req.WhichOneof("input")
    if kind == "prompt":
        if not req.prompt.strip():
            raise InvalidRequest("prompt", "must not be empty")
        return req.prompt
    if kind == "chat":
        messages = list(req.chat.messages)
        if not messages:
            raise InvalidRequest("chat.messages", "must not be empty")
        for i, m in enumerate(messages):
            if m.role not in CHAT_ROLES:
                raise InvalidRequest(f"chat.messages[{i}].role", f"must be one of {sorted(CHAT_ROLES)}")
            # The template's control tokens in a message would be tokenized as real ones: a user message
            # could forge a system turn. A raw prompt is the client's own template, so it may use them.
            if forged := tok.control_token_in(m.content):
                raise InvalidRequest(f"chat.messages[{i}].content", f"must not contain the control token {forged!r}")
        if not any(m.content.strip() for m in messages):
            raise InvalidRequest("chat.messages", "all messages are empty")
        try:
            return tok.render_chat([{"role": m.role, "content": m.content} for m in messages])
        except TemplateError as e:      # the template's own refusal (raise_exception: roles must alternate...)
            raise InvalidRequest("chat.messages", f"the model's chat template refused them: {e}") from e
    raise InvalidRequest("prompt", "set prompt or chat")


def _sampling(sp: pb.SamplingParams, cfg: SchedulerConfig, room: int) -> JobSampling:
    top_p = sp.top_p if sp.top_p != 0 else 1.0
    if problem := sampling_problem(sp.temperature, top_p, sp.top_k):
        raise InvalidRequest(f"sampling.{problem[0]}", problem[1])
    if sp.max_tokens < 0 or sp.max_tokens > cfg.max_tokens_cap:
        raise InvalidRequest("sampling.max_tokens", f"must be in [1, {cfg.max_tokens_cap}] (0 = default)")
    max_tokens = sp.max_tokens or min(cfg.default_max_tokens, room)
    if max_tokens > room:
        raise InvalidRequest("sampling.max_tokens", f"prompt + max_tokens exceeds the context by {max_tokens - room}")
    if len(sp.stop) > MAX_STOP_STRINGS:
        raise InvalidRequest("sampling.stop", f"at most {MAX_STOP_STRINGS} stop strings")
    for i, s in enumerate(sp.stop):
        if not s or len(s) > MAX_STOP_CHARS:
            raise InvalidRequest(f"sampling.stop[{i}]", f"must have 1 to {MAX_STOP_CHARS} characters")
    return JobSampling(temperature=sp.temperature, top_p=top_p, top_k=sp.top_k, max_tokens=max_tokens,
                       stop=tuple(sp.stop), seed=sp.seed if sp.HasField("seed") else None, ignore_eos=sp.ignore_eos)
