"""Turn a GenerateRequest into a normalised job, or name the field that is wrong."""
from __future__ import annotations

import uuid
from dataclasses import dataclass

from alise.v1 import generate_pb2 as pb

from services.common.predictor_text import predictor_text
from services.scheduler.config import SchedulerConfig
from services.scheduler.tokenizer import PromptTokenizer

MAX_PRIORITY = 1000
CHAT_ROLES = {"system", "user", "assistant", "tool"}


class InvalidRequest(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class ValidRequest:
    request_id: str
    prompt_text: str          # what the predictor embeds: the user's words, without the chat template
    prompt_ids: list[int]
    sampling: dict
    priority: int
    previous_reply_tokens: int = 0    # chat: tokens of the assistant's last reply (predictor feature)


def validate(req: pb.GenerateRequest, cfg: SchedulerConfig, tok: PromptTokenizer,
             max_model_len: int) -> ValidRequest:
    if req.model and req.model != cfg.model_name:
        raise InvalidRequest("model", f"unknown model {req.model!r}; this server serves {cfg.model_name!r}")
    if abs(req.priority) > MAX_PRIORITY:
        raise InvalidRequest("priority", f"must be within [-{MAX_PRIORITY}, {MAX_PRIORITY}]")
    model_text = _model_text(req, tok)
    prompt_ids = tok.encode(model_text)
    if not prompt_ids:
        raise InvalidRequest("prompt", "tokenizes to zero tokens")
    if len(prompt_ids) >= max_model_len:
        raise InvalidRequest("prompt", f"{len(prompt_ids)} tokens; the model's context is {max_model_len}")
    sampling = _sampling(req.sampling, cfg, max_model_len - len(prompt_ids))
    return ValidRequest(req.request_id or uuid.uuid4().hex, _predictor_text(req), prompt_ids, sampling, req.priority,
                        _previous_reply_tokens(req, tok))


def _predictor_text(req: pb.GenerateRequest) -> str:
    if req.WhichOneof("input") == "chat":
        return predictor_text([m.content for m in req.chat.messages])
    return req.prompt


def _previous_reply_tokens(req: pb.GenerateRequest, tok: PromptTokenizer) -> int:
    """Replies in one conversation tend to be alike in length: the last one is a strong predictor hint."""
    if req.WhichOneof("input") != "chat":
        return 0
    replies = [m.content for m in req.chat.messages if m.role == "assistant" and m.content.strip()]
    return len(tok.encode(replies[-1])) if replies else 0


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
        if not any(m.content.strip() for m in messages):
            raise InvalidRequest("chat.messages", "all messages are empty")
        return tok.render_chat([{"role": m.role, "content": m.content} for m in messages])
    raise InvalidRequest("prompt", "set prompt or chat")


def _sampling(sp: pb.SamplingParams, cfg: SchedulerConfig, room: int) -> dict:
    if sp.temperature < 0:
        raise InvalidRequest("sampling.temperature", "must be >= 0")
    top_p = sp.top_p if sp.top_p != 0 else 1.0
    if not 0 < top_p <= 1:
        raise InvalidRequest("sampling.top_p", "must be in (0, 1]")
    if sp.top_k < 0:
        raise InvalidRequest("sampling.top_k", "must be >= 0")
    if sp.max_tokens < 0 or sp.max_tokens > cfg.max_tokens_cap:
        raise InvalidRequest("sampling.max_tokens", f"must be in [1, {cfg.max_tokens_cap}] (0 = default)")
    max_tokens = sp.max_tokens or min(cfg.default_max_tokens, room)
    if max_tokens > room:
        raise InvalidRequest("sampling.max_tokens", f"prompt + max_tokens exceeds the context by {max_tokens - room}")
    if any(not s for s in sp.stop):
        raise InvalidRequest("sampling.stop", "stop strings must not be empty")
    return {"temperature": sp.temperature, "top_p": top_p, "top_k": sp.top_k, "max_tokens": max_tokens,
            "stop": list(sp.stop), "seed": sp.seed if sp.HasField("seed") else None,
            "ignore_eos": sp.ignore_eos}
