"""Fuzzing every service through the live stack (issue 8): random values in every request field and random
wire bytes at each public method. Every input gets a clean status (never UNKNOWN or INTERNAL, never a hang),
no service dies, and a normal request is served afterwards. Each test prints how many cases it tried."""
from __future__ import annotations

from collections import Counter

import grpc
import pytest
from alise.v1 import generate_pb2 as pb
from alise.v1 import predictor_pb2 as ppb
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.common.auth import bearer_metadata
from tests.helpers import generate, predictor_stub, request, stub_for

CLEAN = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
         grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED}
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
INT32 = st.integers(-2**31, 2**31 - 1)
FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=32)
TEXT = st.text(max_size=64) | st.sampled_from(["", " ", "<|im_start|>system", "a:b", "x" * 5000, "\x00", "é" * 10])


@pytest.fixture(scope="module")
def stack(stack_factory):
    return stack_factory(worker_args=["--max-batch", "16"])


@st.composite
def generate_requests(draw) -> pb.GenerateRequest:
    """Half the requests are plausible (valid values, served), half have any value in any field."""
    wild = draw(st.booleans())

    def pick(plausible, anything):
        return draw(st.one_of(plausible, anything) if wild else plausible)

    sampling = pb.SamplingParams(
        temperature=pick(st.sampled_from([0.0, 0.7, 1.5]), FLOATS), top_p=pick(st.sampled_from([0.0, 0.9]), FLOATS),
        top_k=pick(st.sampled_from([0, 40]), INT32), max_tokens=pick(st.integers(1, 4), INT32),
        stop=pick(st.lists(st.text(min_size=1, max_size=8), max_size=3), st.lists(TEXT, max_size=20)),
        ignore_eos=draw(st.booleans()))
    if draw(st.booleans()):
        sampling.seed = draw(st.integers(0, 2**64 - 1))
    req = pb.GenerateRequest(request_id=pick(st.from_regex(r"[a-z0-9-]{0,20}", fullmatch=True), TEXT),
                             model=pick(st.sampled_from(["", "SmolLM2-135M-Instruct"]), st.just("x") | TEXT),
                             sampling=sampling, priority=pick(st.integers(-3, 3), INT32))
    if draw(st.booleans()):
        req.prompt = pick(st.text(min_size=1, max_size=200).filter(str.strip), TEXT)
    else:
        roles = st.sampled_from(["user", "assistant", "system", "tool"])
        for _ in range(pick(st.integers(1, 3), st.integers(0, 4))):
            req.chat.messages.append(pb.ChatMessage(role=pick(roles, st.sampled_from(["", "root"])),
                                                    content=pick(st.text(min_size=1, max_size=100), TEXT)))
    return req


def first_message(call) -> None:
    """Read a streamed call's first message, then cancel it (an accepted job is aborted)."""
    for _ in call:
        call.cancel()
        return


def count_status(seen: Counter, attempt, clean=CLEAN) -> None:
    """Run one fuzz case; its status must be clean (our own cancel counts as OK), and is counted."""
    try:
        attempt()
        status = grpc.StatusCode.OK
    except grpc.RpcError as e:
        status = grpc.StatusCode.OK if e.code() == grpc.StatusCode.CANCELLED else e.code()
        assert status in clean, (status, e.details())
    seen[status.name] += 1


def assert_still_serving(stack) -> None:
    for svc in stack.services.values():
        assert svc.proc.poll() is None, f"{svc.name} died"
    tokens, _, final = generate(stub_for(stack), request("Hello", max_tokens=3, ignore_eos=True))
    assert len(tokens) == 3 and final.finish_reason == pb.FINISH_REASON_LENGTH


def test_fuzz_every_generate_field(stack):
    stub = stub_for(stack)
    seen: Counter = Counter()

    @FUZZ
    @given(generate_requests())
    def one(req):
        count_status(seen, lambda: first_message(stub.Generate(req, timeout=120)))

    one()
    print(f"\n[fuzz Generate fields] {sum(seen.values())} cases: {dict(seen)}")
    assert seen["INVALID_ARGUMENT"] > 0 and seen["OK"] > 0
    assert_still_serving(stack)


def test_fuzz_wire_bytes_at_every_client_method(stack):
    seen: Counter = Counter()
    with grpc.insecure_channel(stack.address) as ch:
        calls = {"Generate": ch.unary_stream("/alise.v1.Alise/Generate"),
                 "GetJob": ch.unary_unary("/alise.v1.Alise/GetJob"),
                 "Abort": ch.unary_unary("/alise.v1.Alise/Abort"),
                 "GetLoad": ch.unary_unary("/alise.v1.Alise/GetLoad")}

        @FUZZ
        @given(st.sampled_from(sorted(calls)), st.binary(max_size=256))
        def one(method, data):
            def attempt():
                call = calls[method](data, metadata=bearer_metadata(stack.api_key), timeout=60)
                if method == "Generate":
                    first_message(call)
            count_status(seen, attempt)

        one()
    print(f"\n[fuzz client wire bytes] {sum(seen.values())} cases: {dict(seen)}")
    assert_still_serving(stack)


def test_fuzz_predictor_requests_and_bytes(stack):
    stub = predictor_stub(f"127.0.0.1:{stack.predictor_port}", stack.service_token)
    seen: Counter = Counter()
    with grpc.insecure_channel(f"127.0.0.1:{stack.predictor_port}") as ch:
        raw = {"Predict": ch.unary_unary("/alise.v1.Predictor/Predict"),
               "Observe": ch.unary_unary("/alise.v1.Predictor/Observe")}

        @FUZZ
        @given(st.lists(TEXT, max_size=4), st.lists(INT32, max_size=4), st.binary(max_size=200),
               st.sampled_from(sorted(raw)))
        def one(prompts, numbers, data, method):
            attempts = [lambda: stub.Predict(ppb.PredictRequest(prompts=prompts, previous_reply_tokens=numbers,
                                                                newest_message_chars=numbers[::-1])),
                        lambda: stub.Observe(ppb.ObserveRequest(observations=[
                            ppb.Observation(prompt=p, output_tokens=n, previous_reply_tokens=n,
                                            newest_message_chars=n & 0x7FFFFFFF)   # >= 0: some are learned
                            for p, n in zip(prompts, numbers)])),
                        lambda: raw[method](data, metadata=bearer_metadata(stack.service_token), timeout=60)]
            for attempt in attempts:
                count_status(seen, attempt)

        one()
    print(f"\n[fuzz predictor] {sum(seen.values())} cases: {dict(seen)}")
    assert_still_serving(stack)


def test_fuzz_worker_gateway_messages(stack):
    """Only a worker with the service token gets this far; whatever it sends still gets a clean status."""
    from alise.v1 import worker_pb2 as wpb

    seen: Counter = Counter()
    gateway_clean = CLEAN | {grpc.StatusCode.FAILED_PRECONDITION}
    with grpc.insecure_channel(stack.gateway_address) as ch:
        connect = ch.stream_stream("/alise.v1.WorkerGateway/Connect")
        cases = iter(range(10**6))

        @FUZZ
        @given(st.booleans(), st.lists(st.binary(max_size=120), min_size=1, max_size=3))
        def one(registered_first, messages):
            register = wpb.WorkerMessage(register=wpb.WorkerRegister(
                worker_id=f"fuzz-{next(cases)}", model="SmolLM2-135M-Instruct", block_size=16, num_blocks=64,
                max_batch=4, max_model_len=2048)).SerializeToString()
            sent = ([register] if registered_first else []) + messages
            # read to the end: the commands sent to the fake worker, if any, then its status
            count_status(seen, lambda: list(connect(iter(sent), metadata=bearer_metadata(stack.service_token),
                                                    timeout=60)), gateway_clean)

        one()
    print(f"\n[fuzz worker gateway] {sum(seen.values())} cases: {dict(seen)}")
    assert seen["INVALID_ARGUMENT"] > 0
    assert_still_serving(stack)
