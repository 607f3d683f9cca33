"""Who may do what, through the live stack (issue 8.1, 8.5, 8.9, 8.13): client API keys name tenants, a
tenant sees only its own jobs, its limits hold, and only a worker with the service token may join."""
from __future__ import annotations

import uuid
from pathlib import Path

import grpc
import pytest
from alise.v1 import generate_pb2 as pb
from alise.v1 import worker_pb2 as wpb
from alise.v1 import worker_pb2_grpc as wpb_grpc

from services.common.auth import bearer_metadata
from services.common.local_stack import DEFAULT_TENANTS
from tests.helpers import generate, generate_in_background, job_status, request, stub_for, wait_until

TENANTS = {**DEFAULT_TENANTS,
           "bursty": {"requests_per_s": 0.01, "burst": 2},       # two at once, then one per 100 s
           "flooder": {"requests_per_s": 0.01, "burst": 2},
           "small": {"max_live_jobs": 1}}


@pytest.fixture(scope="module")
def stack(stack_factory):
    return stack_factory(tenants=TENANTS)


def rid() -> str:
    return f"sec-{uuid.uuid4().hex}"


def test_every_client_call_needs_a_valid_api_key(stack):
    for key in ("", "not-a-key", stack.service_token):           # the service token is no client key either
        stub = stub_for(stack, api_key=key)
        calls = [lambda: generate(stub, request("Hello", max_tokens=2)),
                 lambda: stub.GetJob(pb.GetJobRequest(request_id="x")),
                 lambda: stub.Abort(pb.AbortRequest(request_id="x")),
                 lambda: stub.GetLoad(pb.LoadRequest()),
                 lambda: stub.GetServerInfo(pb.ServerInfoRequest())]
        for call in calls:
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "authorization" in err.value.details()


def test_a_tenant_can_neither_see_nor_touch_another_tenants_job(stack):
    mine, theirs = stub_for(stack, "local"), stub_for(stack, "other")
    shared_id = rid()
    t, result = generate_in_background(mine, request("Count to one thousand:", request_id=shared_id,
                                                     max_tokens=200, ignore_eos=True))
    wait_until(lambda: job_status(mine, shared_id) == pb.JOB_STATUS_RUNNING, 60)
    for call in (lambda: theirs.GetJob(pb.GetJobRequest(request_id=shared_id)),
                 lambda: theirs.Abort(pb.AbortRequest(request_id=shared_id))):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # the same id is free in the other tenant's namespace: its own job, served independently
    tokens, _, final = generate(theirs, request("Hello", request_id=shared_id, max_tokens=3, ignore_eos=True))
    assert len(tokens) == 3 and final.request_id == shared_id
    t.join(300)
    assert result["out"][2].finish_reason == pb.FINISH_REASON_LENGTH and len(result["out"][0]) == 200
    assert len(mine.GetJob(pb.GetJobRequest(request_id=shared_id)).token_ids) == 200


def test_priority_is_capped_per_tenant(stack):
    with pytest.raises(grpc.RpcError) as err:
        generate(stub_for(stack, "other"), pb.GenerateRequest(prompt="hi", priority=5,
                                                              sampling=pb.SamplingParams(max_tokens=2)))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and err.value.details().startswith("priority:")
    _, _, final = generate(stub_for(stack, "local"), pb.GenerateRequest(prompt="hi", priority=5,
                                                                        sampling=pb.SamplingParams(max_tokens=2)))
    assert final.usage.completion_tokens == 2


def test_refused_requests_spend_the_tenants_rate_allowance_too(stack):
    """Validating (tokenizing a prompt up to max_model_len * 32 characters) is the costly part of a request: a
    tenant's flood of requests that are then refused must spend its own allowance, not every tenant's CPU. Before,
    the allowance was charged only after validation, so refused requests were free."""
    flooder = stub_for(stack, "flooder")
    for _ in range(2):
        with pytest.raises(grpc.RpcError) as err:
            generate(flooder, request("Hello", max_tokens=10**6))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        generate(flooder, request("Hello", max_tokens=1))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and err.value.details().startswith("rate:")


def test_one_job_is_followed_by_a_bounded_number_of_streams(stack):
    """Re-sending the same request re-attaches another stream to its job, each one sent every token: a client doing
    it in a loop held streams without bound (all of the server's, in minutes). At most max_streams_per_job (4)."""
    stub = stub_for(stack)
    req = request("Count to one thousand:", request_id=rid(), max_tokens=1000, ignore_eos=True)
    streams = [stub.Generate(req, timeout=300) for _ in range(4)]
    try:
        for s in streams:
            next(s)                                                    # each is attached (its first chunk)
        with pytest.raises(grpc.RpcError) as err:
            next(stub.Generate(req, timeout=60))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and err.value.details().startswith("streams:")
    finally:
        stub.Abort(pb.AbortRequest(request_id=req.request_id))
        for s in streams:
            s.cancel()


def test_rate_and_live_job_limits_answer_resource_exhausted_with_a_retry_hint(stack):
    bursty = stub_for(stack, "bursty")
    for _ in range(2):
        generate(bursty, request("Hello", max_tokens=1))
    with pytest.raises(grpc.RpcError) as err:
        generate(bursty, request("Hello", max_tokens=1))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and err.value.details().startswith("rate:")
    assert int(dict(err.value.trailing_metadata())["retry-after-ms"]) > 1000

    small = stub_for(stack, "small")
    long_id = rid()
    t, _ = generate_in_background(small, request("Count to one thousand:", request_id=long_id, max_tokens=500,
                                                 ignore_eos=True))
    wait_until(lambda: job_status(small, long_id) is not None, 60)
    with pytest.raises(grpc.RpcError) as err:
        generate(small, request("Hello", max_tokens=1))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_live_jobs" in err.value.details()
    assert "retry-after-ms" in dict(err.value.trailing_metadata())
    small.Abort(pb.AbortRequest(request_id=long_id))
    t.join(60)
    assert len(generate(small, request("Hello", max_tokens=1))[0]) == 1        # its slot is free again


def fake_worker(channel: grpc.Channel, metadata=()):
    register = wpb.WorkerMessage(register=wpb.WorkerRegister(
        worker_id="impostor", model="SmolLM2-135M-Instruct", block_size=16, num_blocks=1_000_000, max_batch=64,
        max_model_len=2048))
    call = wpb_grpc.WorkerGatewayStub(channel).Connect(iter([register]), metadata=metadata, timeout=10)
    return next(iter(call))


def test_only_a_worker_with_the_service_token_may_join(stack):
    """Issue 8.1: a fake worker announcing 1,000,000 KV blocks used to be given every client's job."""
    with grpc.insecure_channel(stack.address) as client_port:              # the client port has no gateway
        with pytest.raises(grpc.RpcError) as err:
            fake_worker(client_port)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with grpc.insecure_channel(stack.gateway_address) as gateway:
        for metadata in ((), bearer_metadata("guess"), bearer_metadata(stack.api_key)):
            with pytest.raises(grpc.RpcError) as err:
                fake_worker(gateway, metadata)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    stub = stub_for(stack)
    assert [w.worker_id for w in stub.GetLoad(pb.LoadRequest()).workers] == ["worker-0"]
    tokens, _, final = generate(stub, request("Hello", max_tokens=3, ignore_eos=True))
    assert len(tokens) == 3 and final.finish_reason == pb.FINISH_REASON_LENGTH


def test_health_probes_need_no_key(stack):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    for address in (stack.address, stack.gateway_address):             # Kubernetes probes carry no credentials
        with grpc.insecure_channel(address) as ch:
            assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest()).status == 1


def test_no_secret_is_in_a_process_arguments(stack):
    """A process's arguments are readable by every local user (`ps`, /proc/PID/cmdline): the Redis password was in
    the scheduler's and predictor's `--redis-url` and in redis-server's `--requirepass` (found by review). Secrets
    now travel in the environment or in files only their owner reads."""
    secrets = {"redis password": stack.redis.password, "service token": stack.service_token,
               **{f"API key of {t}": key for t, key in stack.api_keys.items()}}
    procs = {name: svc.proc.pid for name, svc in stack.services.items()} | {"redis": stack.redis.proc.pid}
    for name, pid in procs.items():
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
        leaked = [what for what, secret in secrets.items() if secret in cmdline]
        assert not leaked, f"{name}'s arguments hold the {leaked}"
