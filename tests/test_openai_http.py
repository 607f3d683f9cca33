"""The OpenAI-compatible HTTP API, through the whole stack (real processes), with the official openai client."""
from __future__ import annotations

import json
import socket
import uuid

import grpc
import redis

import httpx2 as httpx           # the HTTP client the openai package uses
import openai
import pytest
from alise.v1 import generate_pb2 as pb

from client.cli import main as cli_main
from services.common.local_stack import DEFAULT_TENANTS, free_port
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
    (dict(n=0), 400, "n"),                  # review of session 30: taken as 1
    (dict(temperature=-1), 400, "temperature"),
    (dict(stop=[1, 2]), 400, "stop"),
    (dict(prompt="word " * 20000), 400, "prompt"),
    (dict(model="no-such-model"), 404, "model"),
    (dict(max_tokens=1 << 40), 400, "max_tokens"),                 # beyond the gRPC field's int32
    (dict(temperature=float("nan")), 400, "temperature"),          # JSON's NaN / Infinity never reach a worker
    (dict(top_p=float("inf")), 400, "top_p"),
    (dict(seed=-1), 400, "seed"),
    (dict(priority=1 << 33), 400, "priority"),
    # found by review: the parameter's OpenAI name, not the gRPC field's or "body"
    (dict(max_completion_tokens=0), 400, "max_completion_tokens"),
    (dict(max_tokens=None, max_completion_tokens=1 << 20), 400, "max_completion_tokens"),
    (dict(stop=[""]), 400, "stop"),
    (dict(prompt="\ud800"), 400, "prompt"),                       # a lone surrogate: JSON carries it, UTF-8 cannot
    # found by review: parameters that change the answer were served as if absent
    (dict(logprobs=2), 400, "logprobs"),
    (dict(echo=True), 400, "echo"),
    (dict(presence_penalty=0.5), 400, "presence_penalty"),
    (dict(response_format={"type": "json_object"}), 400, "response_format"),
    (dict(logit_bias={"42": 100}), 400, "logit_bias"),
    # found by review: the gRPC field's "unset" (0) was served as top_p 1, the whole distribution
    (dict(top_p=0), 400, "top_p"),
    (dict(top_p=1e-50), 400, "top_p"),
])
def test_bad_requests_get_openai_errors_naming_the_parameter(stack, model, kwargs, status, param):
    body = {"model": model, "prompt": PROMPT, "max_tokens": 4} | kwargs
    r = httpx.post(stack.http_base + "/completions", content=json.dumps(body), timeout=60,   # NaN as JSON allows
                   headers={"authorization": f"Bearer {stack.api_key}"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"]


def test_parameters_at_values_that_ask_for_nothing_are_accepted(client, model):
    """What the openai client and others send by default (zero penalties, no logprobs, plain text) is served; the
    role newer OpenAI clients give system messages ("developer") is the system role."""
    out = client.chat.completions.create(
        model=model, max_tokens=4, temperature=0, presence_penalty=0, frequency_penalty=0.0, logprobs=False,
        logit_bias={}, response_format={"type": "text"},
        messages=[{"role": "developer", "content": "Answer in one word."}] + CHAT)
    assert out.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, max_tokens=4, messages=[{"role": "robot", "content": "Hi"}])
    assert err.value.body["param"] == "messages[0].role"


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


FLOODER = "http-flooder"


@pytest.fixture(scope="module")
def tight(stack_factory):
    """A stack of its own whose front door allows 8 connections and 1 s for a request's headers, with a tenant
    allowed two requests and then one per 100 s."""
    port = free_port()
    s = stack_factory(scheduler_args=["--http-listen", f"127.0.0.1:{port}", "--max-concurrent-rpcs", "8",
                                      "--http-header-timeout-s", "1"],
                      tenants={**DEFAULT_TENANTS, FLOODER: {"requests_per_s": 0.01, "burst": 2}})
    s.http_base = f"http://127.0.0.1:{port}/v1"
    return s


def test_bad_bodies_spend_the_tenants_rate_allowance_too(tight):
    """Parsing a body is work: before, a body that failed to parse (or to convert) was refused before the tenant's
    allowance was charged, so a tenant could send them without limit (found by review; gRPC had this mended)."""
    auth = {"authorization": f"Bearer {tight.api_keys[FLOODER]}"}
    for _ in range(2):
        assert httpx.post(tight.http_base + "/completions", json={"prompt": 5}, headers=auth, timeout=60).status_code == 400
    r = httpx.post(tight.http_base + "/completions", json={"prompt": PROMPT, "max_tokens": 2}, headers=auth, timeout=60)
    assert r.status_code == 429 and r.json()["error"]["param"] == "rate" and int(r.headers["retry-after"]) >= 1


def test_idle_connections_cannot_hold_the_front_doors_slots(tight):
    """Connections that never send a request used to be held for good, and each counted against the connection
    limit: eight idle sockets, no API key needed, made every later request a 503, /health included (found by
    review). Now a connection must send a request's headers within --http-header-timeout-s."""
    health = tight.http_base.removesuffix("/v1") + "/health"
    host, port = tight.http_base.split("//")[1].split("/")[0].split(":")
    idle = [socket.create_connection((host, int(port)), timeout=30) for _ in range(8)]
    try:
        idle[0].sendall(b"GET /health HTTP/1.1\r\n")          # and one that starts its headers but never ends them
        wait_until(lambda: httpx.get(health, timeout=30).status_code == 200, 60, 0.5)
        assert all(s.recv(1) == b"" for s in idle)              # each was closed by the server
    finally:
        for s in idle:
            s.close()


def test_a_job_store_that_refuses_writes_is_unavailable_not_an_internal_error(tight, model):
    """Redis at maxmemory with no eviction (or a replica after a failover) refuses writes with an error that is not
    a connection error: it escaped as UNKNOWN over gRPC and as a plain-text 500 over HTTP (found by review). Both
    now say UNAVAILABLE (503), which clients retry."""
    store = redis.Redis.from_url(tight.redis_url)
    policy = store.config_get("maxmemory-policy")["maxmemory-policy"]
    store.config_set("maxmemory-policy", "noeviction")
    store.config_set("maxmemory", 1)
    try:
        r = httpx.post(tight.http_base + "/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 2},
                       headers={"authorization": f"Bearer {tight.api_key}"}, timeout=60)
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable", r.text
        with pytest.raises(grpc.RpcError) as err:
            generate(stub_for(tight), request(PROMPT, max_tokens=2))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
    finally:
        store.config_set("maxmemory", 0)
        store.config_set("maxmemory-policy", policy)
        store.close()
    generate(stub_for(tight), request(PROMPT, max_tokens=2))     # and served again once Redis takes writes
