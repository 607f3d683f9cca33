"""Small client-side helpers for the end-to-end tests."""
from __future__ import annotations

import threading
import time

import grpc
from alise.v1 import generate_pb2 as pb
from alise.v1 import generate_pb2_grpc as pb_grpc

from services.common.auth import with_bearer
from services.common.local_stack import LOCAL_TENANT


def stub_for(stack, tenant: str = LOCAL_TENANT, api_key: str | None = None) -> pb_grpc.AliseStub:
    """A client of the stack's scheduler, authenticated as `tenant` (or with an explicit api_key)."""
    key = api_key if api_key is not None else stack.api_keys[tenant]
    return pb_grpc.AliseStub(with_bearer(stack.client_channel(), key))


def predictor_stub(address: str, token: str | None = None):
    """A client of a predictor, presenting the internal service token (the tests' own by default)."""
    import os

    from alise.v1 import predictor_pb2_grpc as ppb_grpc

    token = token if token is not None else os.environ["ALISE_SERVICE_TOKEN"]
    return ppb_grpc.PredictorStub(with_bearer(grpc.insecure_channel(address), token))


def request(prompt: str, request_id: str = "", max_tokens: int = 16, **sampling) -> pb.GenerateRequest:
    return pb.GenerateRequest(request_id=request_id, prompt=prompt,
                              sampling=pb.SamplingParams(max_tokens=max_tokens, **sampling))


def generate(stub, req: pb.GenerateRequest, timeout: float = 120) -> tuple[list[int], str, pb.GenerateComplete]:
    """Run a streamed generation; returns (streamed token ids, streamed text, final message)."""
    tokens, text, final = [], "", None
    for resp in stub.Generate(req, timeout=timeout):
        if resp.HasField("chunk"):
            tokens += list(resp.chunk.token_ids)
            text += resp.chunk.text
        else:
            final = resp.complete
    return tokens, text, final


def first_then_others(stub, first: tuple[str, pb.GenerateRequest], others: list[tuple[str, pb.GenerateRequest]],
                      timeout: float = 300) -> tuple[list[str], dict[str, tuple]]:
    """Start `first`, wait until it decodes, then send `others` at once; returns the names in the order their
    generations completed and each one's (token ids, text, final message)."""
    order: list[str] = []
    results: dict[str, tuple] = {}
    lock = threading.Lock()

    def one(name: str, req: pb.GenerateRequest) -> None:
        out = generate(stub, req, timeout=timeout)
        with lock:
            order.append(name)
            results[name] = out

    threads = [threading.Thread(target=one, args=first)]
    threads[0].start()
    first_id = first[1].request_id
    wait_until(lambda: job_status(stub, first_id) == pb.JOB_STATUS_RUNNING, 60, 0.02)
    wait_until(lambda: len(stub.GetJob(pb.GetJobRequest(request_id=first_id)).token_ids) > 0, 120, 0.05)
    for named in others:
        threads.append(threading.Thread(target=one, args=named))
        threads[-1].start()
    for t in threads:
        t.join(timeout)
    return order, results


def wait_until(predicate, timeout: float = 30, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError("condition not met")


def kv_idle(stub) -> bool:
    load = stub.GetLoad(pb.LoadRequest())
    return all(w.used_blocks == 0 and w.running == 0 for w in load.workers) and load.running == 0


def job_status(stub, request_id: str):
    """The job's status, or None while the scheduler has not created it yet."""
    try:
        return stub.GetJob(pb.GetJobRequest(request_id=request_id)).status
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.NOT_FOUND:
            return None
        raise


def hf_greedy(hf_model, tokenizer, prompt: str, n: int) -> list[int]:
    """Reference: transformers' own forward with its KV cache, greedy, n tokens, EOS not special
    (like ignore_eos; `generate(min_new_tokens=...)` would instead forbid EOS and change the argmax)."""
    return hf_greedy_ids(hf_model, tokenizer.encode(prompt, add_special_tokens=False), n)


def hf_greedy_ids(hf_model, prompt_ids: list[int], n: int) -> list[int]:
    import torch

    ids = torch.tensor([prompt_ids])
    out, past = [], None
    with torch.inference_mode():
        for _ in range(n):
            res = hf_model(input_ids=ids, past_key_values=past, use_cache=True)
            past = res.past_key_values
            nxt = int(res.logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.tensor([[nxt]])
    return out


def assert_greedy_equal(hf_model, prompt_ids: list[int], got: list[int], ref: list[int], tie: float = 1e-3) -> None:
    """`got` is greedy output that must equal the reference `ref`, except that float rounding (a recompute
    after preemption runs the generated tokens as one prefill, not one by one) may flip an exact near-tie:
    a first difference is allowed only where the reference's own logits for the two tokens are within `tie`."""
    import torch

    if got == ref:
        return
    assert len(got) == len(ref), (len(got), len(ref))
    i = next(k for k, (a, b) in enumerate(zip(got, ref)) if a != b)
    with torch.inference_mode():
        logits = hf_model(input_ids=torch.tensor([prompt_ids + ref[:i]])).logits[0, -1]
    gap = float(logits[ref[i]] - logits[got[i]])
    assert gap <= tie, f"greedy output differs at token {i} ({got[i]} vs {ref[i]}) with a logit gap of {gap}"


def generate_in_background(stub, req: pb.GenerateRequest, timeout: float = 300):
    """Start a streamed generation on a thread; returns (thread, result dict that gets key "out")."""
    import threading

    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(out=generate(stub, req, timeout=timeout)))
    thread.start()
    return thread, result


def valid_request(request_id: str, max_tokens: int = 8):
    """A request as validation hands it to the dispatcher (for tests that drive the dispatcher directly)."""
    from services.scheduler.validation import PredictorInputs, ValidRequest

    return ValidRequest(request_id=request_id, predictor=PredictorInputs("hi"), prompt_ids=[1, 2, 3], priority=0,
                        fingerprint=request_id,
                        sampling=job_sampling(max_tokens, ignore_eos=True))


def job_sampling(max_tokens: int = 8, ignore_eos: bool = False):
    """Greedy sampling as validation normalises it."""
    from services.scheduler.job_sampling import JobSampling

    return JobSampling(temperature=0.0, top_p=1.0, top_k=0, max_tokens=max_tokens, stop=(), seed=None,
                       ignore_eos=ignore_eos)
