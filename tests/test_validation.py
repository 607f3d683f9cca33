"""Request validation at the scheduler's front door (services/scheduler/validation.py), on the real tokenizer."""
from __future__ import annotations

import pytest
from alise.v1 import generate_pb2 as pb

from services.scheduler.config import SchedulerConfig
from services.scheduler.metrics import metric_field
from services.scheduler.tokenizer import PromptTokenizer
from services.scheduler.validation import InvalidRequest, validate


def test_a_chat_template_that_refuses_the_messages_is_an_invalid_argument_naming_the_field(model_dir):
    """Mistral- and Gemma-style templates raise on roles that do not alternate or on a system message; that error
    used to escape validation (gRPC UNKNOWN, HTTP 500)."""
    tok = PromptTokenizer(str(model_dir))
    tok.tok.chat_template = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    req = pb.GenerateRequest(request_id="r1", chat=pb.ChatConversation(
        messages=[pb.ChatMessage(role="user", content="hi"), pb.ChatMessage(role="user", content="again")]))
    with pytest.raises(InvalidRequest) as refused:
        validate(req, SchedulerConfig(model_dir=str(model_dir)), tok, tok.max_model_len)
    assert refused.value.field == "chat.messages" and "must alternate" in str(refused.value)


def test_refused_fields_become_metric_labels_without_list_indexes():
    """One label value per field, not per message index a client can choose (each a new series for ever)."""
    assert metric_field("chat.messages[5000].content") == "chat.messages[].content"
    assert metric_field("sampling.stop[3]") == "sampling.stop[]" and metric_field("prompt") == "prompt"
