"""The OpenAI-compatible HTTP API, through the whole stack (real processes), with the official openai client."""
from __future__ import annotations

import json
import uuid

import httpx2 as httpx           # the HTTP client the openai package uses
import openai
import pytest
from alise.v1 import generate_pb2 as pb

from client.cli import main as cli_main
from services.common.local_stack import free_port
from tests.helpers import generate, job_status, request, stub_for, wait_until

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def stack(stack_factory):
    port = free_port()
    s = stack_factory(scheduler_args=["--http-listen", f"127.0.0.1:{port}"])
    s.http_base = f"http://127.0.0.1:{port}/v1"
    return s


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=stack.http_base, api_key=stack.api_key, timeout=120, max_retries=0)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def stub(stack):
    return stub_for(stack)


def test_models_and_health(stack, client, model):
    assert [m.id for m in client.models.list().data] == [model]
    assert httpx.get(stack.http_base.removesuffix("/v1") + "/health", timeout=30).status_code == 200


def test_completion_equals_the_grpc_api(client, model, stub):
    tokens, text, final = generate(stub, request(PROMPT, max_tokens=12, ignore_eos=True))
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].text == text
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 12 == len(tokens)
    assert out.usage.prompt_tokens == final.usage.prompt_tokens
    assert out.usage.total_tokens == out.usage.prompt_tokens + 12


def test_chat_completion_stream_equals_the_whole_answer(client, model):
    whole = client.chat.completions.create(model=model, messages=CHAT, max_tokens=24, temperature=0)
    answer = whole.choices[0].message
    assert answer.role == "assistant" and "Paris" in answer.content
    assert whole.id.startswith("chatcmpl-") and whole.object == "chat.completion"
    chunks = list(client.chat.completions.create(model=model, messages=CHAT, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer.content
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert finish[0].usage is None and all(c.usage is None for c in chunks[:-1])      # usage only at the end


def test_stop_string_and_seeded_sampling(client, model):
    out = client.completions.create(model=model, prompt="Count: 1, 2, 3,", max_tokens=24, temperature=0, stop=[" 6"])
    assert " 6" not in out.choices[0].text and out.choices[0].finish_reason == "stop"
    runs = [client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=7,
                                      extra_body={"ignore_eos": True}).choices[0].text for _ in range(2)]
    assert runs[0] == runs[1]


@pytest.mark.parametrize("kwargs, status, param", [
    (dict(max_tokens="ten"), 400, "max_tokens"),
    (dict(max_tokens=-1), 400, "max_tokens"),
    (dict(n=2), 400, "n"),
    (dict(temperature=-1), 400, "temperature"),
    (dict(stop=[1, 2]), 400, "stop"),
    (dict(prompt="word " * 20000), 400, "prompt"),
    (dict(model="no-such-model"), 404, "model"),
    (dict(max_tokens=1 << 40), 400, "max_tokens"),                 # beyond the gRPC field's int32
    (dict(temperature=float("nan")), 400, "temperature"),          # JSON's NaN / Infinity never reach a worker
    (dict(top_p=float("inf")), 400, "top_p"),
    (dict(seed=-1), 400, "seed"),
    (dict(priority=1 << 33), 400, "priority"),
])
def test_bad_requests_get_openai_errors_naming_the_parameter(stack, model, kwargs, status, param):
    body = {"model": model, "prompt": PROMPT, "max_tokens": 4} | kwargs
    r = httpx.post(stack.http_base + "/completions", content=json.dumps(body), timeout=60,   # NaN as JSON allows
                   headers={"authorization": f"Bearer {stack.api_key}"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"]


def test_not_json_and_bad_messages(stack, model):
    auth = {"authorization": f"Bearer {stack.api_key}"}
    r = httpx.post(stack.http_base + "/chat/completions", content=b"{not json", headers=auth, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "body"
    r = httpx.post(stack.http_base + "/completions", content=b'{"prompt": "\xff\xfe"}', headers=auth, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "body"           # not UTF-8
    r = httpx.post(stack.http_base + "/completions", content=b"[" * 100_000 + b"]" * 100_000, headers=auth, timeout=60)
    assert r.status_code == 400                                                     # nested too deep
    r = httpx.post(stack.http_base + "/completions", content=b" " * (5 << 20), headers=auth, timeout=60)
    assert r.status_code == 413
    r = httpx.post(stack.http_base + "/completions", content=b" " * (5 << 20), timeout=60)
    assert r.status_code == 401                                                     # no key: refused before the body
    r = httpx.post(stack.http_base + "/chat/completions", json={"model": model, "messages": []}, headers=auth,
                   timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(stack.http_base + "/chat/completions", headers=auth, timeout=60,
                   json={"model": model, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content"


def test_no_or_wrong_api_key_is_refused(stack, model):
    for key in ("", "not-a-key"):
        c = openai.OpenAI(base_url=stack.http_base, api_key=key or "x", max_retries=0, timeout=60,
                          default_headers={"authorization": f"Bearer {key}"} if key else {"authorization": ""})
        with pytest.raises(openai.AuthenticationError):
            c.completions.create(model=model, prompt=PROMPT, max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            c.models.list()


def test_a_client_that_disconnects_aborts_its_job(stack, model, stub):
    request_id = "http-" + uuid.uuid4().hex[:8]
    headers = {"authorization": f"Bearer {stack.api_key}", "x-request-id": request_id}
    body = {"model": model, "prompt": PROMPT, "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", stack.http_base + "/completions", json=body, headers=headers, timeout=120) as r:
        assert r.status_code == 200 and r.headers["x-request-id"] == request_id
        for line in r.iter_lines():
            if line.startswith("data: "):
                assert json.loads(line[6:])["choices"][0]["text"] is not None
                break                           # one token seen; leaving the block closes the connection
    wait_until(lambda: job_status(stub, request_id) == pb.JOB_STATUS_ABORTED, timeout=120)


def test_same_request_id_reattaches_instead_of_generating_twice(stack, model):
    headers = {"authorization": f"Bearer {stack.api_key}", "x-request-id": "http-same-" + uuid.uuid4().hex[:6]}
    body = {"model": model, "prompt": PROMPT, "max_tokens": 6, "temperature": 0}
    first = httpx.post(stack.http_base + "/completions", json=body, headers=headers, timeout=120).json()
    again = httpx.post(stack.http_base + "/completions", json=body, headers=headers, timeout=120).json()
    assert again["choices"][0]["text"] == first["choices"][0]["text"]
    assert again["id"] == first["id"]


def test_bench_serve_runs_a_workload_through_the_http_api(stack, tmp_path):
    out = tmp_path / "http.json"
    code = cli_main(["--api-key", stack.api_key, "bench", "serve", "--backend", "openai", "--base-url", stack.http_base,
                     "--dataset-name", "synthetic", "--num-prompts", "4", "--input-len", "16", "--output-len", "6",
                     "--ignore-eos", "--request-rate", "inf", "--label", "http", "--save-result", str(out)])
    assert code == 0
    summary = json.loads(out.read_text())
    assert summary["backend"] == "openai" and summary["completed"] == 4 and summary["failed"] == 0
    assert summary["total_output_tokens"] == 24                 # ignore_eos: exactly 6 each, from the usage
    assert 0 < summary["ttft_s"]["mean"] <= summary["e2e_s"]["mean"]
    chat = tmp_path / "chat.json"                                # through /v1/chat/completions, one cap for all
    code = cli_main(["--api-key", stack.api_key, "bench", "serve", "--backend", "openai", "--base-url", stack.http_base,
                     "--dataset-name", "synthetic", "--num-prompts", "2", "--input-len", "16", "--output-len", "6",
                     "--chat", "--max-tokens", "4", "--label", "http-chat", "--save-result", str(chat)])
    summary = json.loads(chat.read_text())
    assert code == 0 and summary["completed"] == 2 and 2 <= summary["total_output_tokens"] <= 8
    assert summary["total_input_tokens"] > 2 * 16                # the chat template's own tokens


def test_a_non_streaming_client_that_gives_up_aborts_its_job(stack, model, stub):
    request_id = "http-whole-" + uuid.uuid4().hex[:8]
    headers = {"authorization": f"Bearer {stack.api_key}", "x-request-id": request_id}
    body = {"model": model, "prompt": PROMPT, "max_tokens": 2000, "ignore_eos": True}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(stack.http_base + "/completions", json=body, headers=headers, timeout=3)
    wait_until(lambda: job_status(stub, request_id) == pb.JOB_STATUS_ABORTED, timeout=120)
