"""TLS on every link and mTLS between services, through the live stack (issue 8): clients reach the scheduler
only over TLS, and the worker gateway and the predictor accept only callers with a certificate from the
cluster's CA, on top of the service token."""
from __future__ import annotations

import time

import grpc
import pytest
from alise.v1 import generate_pb2 as pb
from alise.v1 import predictor_pb2 as ppb
from alise.v1 import predictor_pb2_grpc as ppb_grpc
from alise.v1 import worker_pb2 as wpb
from alise.v1 import worker_pb2_grpc as wpb_grpc

from services.common.auth import bearer_metadata, with_bearer
from services.common.local_stack import CERT_NAMES, wait_healthy
from services.common.tls import TlsFiles, dev_pki
from services.common.tls import channel as tls_channel
from tests.helpers import generate, request, stub_for


@pytest.fixture(scope="module")
def stack(stack_factory):
    return stack_factory(tls=True, mtls=True)


def test_generation_over_tls_with_mtls_between_services(stack):
    stub = stub_for(stack)
    tokens, _, final = generate(stub, request("Hello", max_tokens=4, ignore_eos=True))
    assert len(tokens) == 4 and final.finish_reason == pb.FINISH_REASON_LENGTH
    load = stub.GetLoad(pb.LoadRequest())
    assert [w.worker_id for w in load.workers] == ["worker-0"]         # the worker joined over mTLS
    # the scheduler reached the predictor over mTLS. On a busy machine the first Predict (a new mTLS channel, the
    # predictor's first encode) can outlast the scheduler's 0.5 s predictor timeout, so a few more requests may be
    # needed; with mTLS broken none would ever get through
    deadline = time.monotonic() + 120
    while not load.predictor_available and time.monotonic() < deadline:
        generate(stub, request("Hello again", max_tokens=1))
        load = stub.GetLoad(pb.LoadRequest())
    assert load.predictor_available
    for service in ("scheduler", "gateway", "predictor"):               # probes still work, on plain ports
        wait_healthy(stack.health_address(service), 10)


def refused(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


def test_no_plaintext_and_no_unknown_ca(stack, tmp_path):
    plain = pb_grpc_stub(grpc.insecure_channel(stack.address), stack.api_key)
    assert refused(lambda: plain.GetLoad(pb.LoadRequest(), timeout=10)) == grpc.StatusCode.UNAVAILABLE
    stranger = dev_pki(tmp_path / "other-ca")                            # a server cert from another CA is not trusted
    wrong_ca = pb_grpc_stub(tls_channel(stack.address, TlsFiles(ca=stranger.ca)), stack.api_key)
    assert refused(lambda: wrong_ca.GetLoad(pb.LoadRequest(), timeout=10)) == grpc.StatusCode.UNAVAILABLE


def test_services_need_a_certificate_from_the_cluster_ca(stack, tmp_path):
    token = bearer_metadata(stack.service_token)
    register = wpb.WorkerMessage(register=wpb.WorkerRegister(
        worker_id="no-cert", model="SmolLM2-135M-Instruct", block_size=16, num_blocks=64, max_batch=4,
        max_model_len=2048))
    stranger = dev_pki(tmp_path / "other-ca")
    for tls in (TlsFiles(ca=stack.tls_files.ca),                                          # no client certificate
                TlsFiles(ca=stack.tls_files.ca, cert=stranger.cert, key=stranger.key)):   # one from another CA
        gateway = wpb_grpc.WorkerGatewayStub(tls_channel(stack.gateway_address, tls))
        assert refused(lambda: next(iter(gateway.Connect(iter([register]), metadata=token, timeout=10)))) \
            == grpc.StatusCode.UNAVAILABLE
        predictor = ppb_grpc.PredictorStub(tls_channel(f"127.0.0.1:{stack.predictor_port}", tls))
        assert refused(lambda: predictor.Predict(ppb.PredictRequest(prompts=["hi"]), metadata=token,
                                                 timeout=10)) == grpc.StatusCode.UNAVAILABLE
    assert [w.worker_id for w in stub_for(stack).GetLoad(pb.LoadRequest()).workers] == ["worker-0"]


def test_a_service_accepts_only_the_certificates_of_the_services_that_call_it(stack):
    """Every service's certificate comes from the one cluster CA, so the CA alone let a worker's certificate and key
    (taken from its pod) call the predictor, and any service's join the worker gateway (review, session 22: mTLS
    authenticated by CA only). Now each service has its own certificate, named for it, and the gateway accepts only
    the workers', the predictor only the scheduler's; the service token alone does not open them."""
    token = bearer_metadata(stack.service_token)
    register = wpb.WorkerMessage(register=wpb.WorkerRegister(
        worker_id="not-a-worker", model="SmolLM2-135M-Instruct", block_size=16, num_blocks=64, max_batch=4,
        max_model_len=2048))
    for service in ("predictor", "scheduler"):
        gateway = wpb_grpc.WorkerGatewayStub(tls_channel(stack.gateway_address, stack.service_tls[service]))
        assert refused(lambda: next(iter(gateway.Connect(iter([register]), metadata=token, timeout=10)))) \
            == grpc.StatusCode.PERMISSION_DENIED
    for service in ("worker", "predictor"):
        predictor = ppb_grpc.PredictorStub(tls_channel(f"127.0.0.1:{stack.predictor_port}", stack.service_tls[service]))
        with pytest.raises(grpc.RpcError) as err:
            predictor.Predict(ppb.PredictRequest(prompts=["hi"]), metadata=token, timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and CERT_NAMES["scheduler"] in err.value.details()
    as_scheduler = ppb_grpc.PredictorStub(tls_channel(f"127.0.0.1:{stack.predictor_port}", stack.service_tls["scheduler"]))
    assert len(as_scheduler.Predict(ppb.PredictRequest(prompts=["hi"]), metadata=token, timeout=60).predictions) == 1
    assert [w.worker_id for w in stub_for(stack).GetLoad(pb.LoadRequest()).workers] == ["worker-0"]


def pb_grpc_stub(channel: grpc.Channel, key: str):
    from alise.v1 import generate_pb2_grpc as pb_grpc

    return pb_grpc.AliseStub(with_bearer(channel, key))
