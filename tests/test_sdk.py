"""The client SDK (`alise.Client`, `alise.AsyncClient`) against a live stack, and the package as a user installs
it: a wheel built from this checkout, installed into a fresh venv, gives a working `alise` CLI."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path

import pytest

from alise import AliseError, AsyncClient, Client, FinishReason
from tests.helpers import hf_greedy, job_status, stub_for, wait_until

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def stack(stack_factory):
    return stack_factory()


@pytest.fixture(scope="module")
def client(stack):
    with Client(stack.address, api_key=stack.api_key) as c:
        yield c


def test_generate_equals_transformers_greedy(client, hf_model, tokenizer):
    out = client.generate(PROMPT, max_tokens=12, ignore_eos=True)
    assert list(out.token_ids) == hf_greedy(hf_model, tokenizer, PROMPT, 12)
    assert out.finish_reason is FinishReason.LENGTH and out.usage.completion_tokens == 12
    assert out.text == tokenizer.decode(out.token_ids, skip_special_tokens=True)
    assert 0 < out.timings.ttft_s <= out.timings.e2e_s


def test_stream_chunks_add_up_to_the_completion(client):
    stream = client.stream(messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=24)
    chunks = list(stream)
    assert len(chunks) >= 1 and stream.completion is not None
    assert "".join(c.text for c in chunks) == stream.completion.text and "Paris" in stream.completion.text
    assert sum(len(c.token_ids) for c in chunks) == stream.completion.usage.completion_tokens


async def test_async_client_matches_the_sync_one(stack, client):
    sync = client.generate(PROMPT, max_tokens=8)
    async with AsyncClient(stack.address, api_key=stack.api_key) as ac:
        out = await ac.generate(PROMPT, max_tokens=8)
        parts = [c.text async for c in ac.stream(PROMPT, max_tokens=8)]
    assert out.text == sync.text == "".join(parts)


def test_errors_name_the_status_and_the_field(stack, client):
    with pytest.raises(AliseError) as bad:
        client.generate(PROMPT, top_p=1.5)
    assert bad.value.code == "INVALID_ARGUMENT" and bad.value.message.startswith("sampling.top_p")
    with Client(stack.address, api_key="not-a-key") as stranger:
        with pytest.raises(AliseError) as denied:
            stranger.generate(PROMPT, max_tokens=2)
    assert denied.value.code == "UNAUTHENTICATED"
    with pytest.raises(ValueError):
        client.generate()                                # neither prompt nor messages


def test_leaving_a_stream_early_aborts_the_request(stack, client):
    request_id = "sdk-" + uuid.uuid4().hex[:8]
    stream = client.stream(PROMPT, max_tokens=2000, ignore_eos=True, request_id=request_id)
    for _ in stream:
        break                                            # one chunk seen; the generator closes, the call is cancelled
    stub = stub_for(stack)
    from alise.v1 import generate_pb2 as pb
    # at once: the SDK sends Abort (the server would otherwise keep the job a few seconds for a retry)
    assert job_status(stub, request_id) == pb.JOB_STATUS_ABORTED


def test_the_wheel_installs_into_a_fresh_venv_with_a_working_cli(stack, tmp_path):
    """pip install of the built wheel pulls its declared dependencies (grpcio, protobuf) and nothing else is
    needed for the SDK and the CLI; the generated gRPC modules are in the wheel."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(ROOT)], check=True, capture_output=True, timeout=600)
    wheel = next(wheels.glob("alise-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "alise/v1/generate_pb2.py" in names and "alise/client.py" in names
    assert {"services/scheduler/lua/create.lua", "services/scheduler/lua/_ended_job.lua"} <= set(names) and "services/worker/skinny_gemm_configs.json" in names
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    # the dependencies come from the index as for a user; the installed versions must be the ones we test with
    pins = [line for line in (ROOT / "requirements" / "base.txt").read_text().splitlines()
            if line.startswith(("grpcio==", "protobuf=="))]
    install = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", str(wheel),
                              *pins], capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stderr[-3000:]
    cli = venv / "bin" / "alise"
    answer = subprocess.run([str(cli), "--address", stack.address, "--api-key", stack.api_key, "generate", PROMPT,
                             "--max-tokens", "6"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert answer.returncode == 0 and answer.stdout.strip(), answer.stderr[-3000:]
    sdk = subprocess.run([str(venv / "bin" / "python"), "-c",
                          "import sys, alise; c = alise.Client(sys.argv[1], api_key=sys.argv[2]); "
                          "print(c.generate('The capital of France is', max_tokens=4).usage.completion_tokens)",
                          stack.address, stack.api_key], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert sdk.returncode == 0 and sdk.stdout.strip() == "4", sdk.stderr[-3000:]


def test_a_clean_checkout_builds_a_wheel_with_the_generated_modules(tmp_path):
    """No `make protos` before `pip install .`: setup.py generates alise/v1 from protos/."""
    src = tmp_path / "src"
    for part in ("alise", "protos", "services", "client", "bench"):
        generated = ("v1",) if part == "alise" else ()
        shutil.copytree(ROOT / part, src / part, ignore=shutil.ignore_patterns(*generated, "__pycache__", "*.pyc"))
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    assert not (src / "alise" / "v1").exists()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "wheels"), str(src)], check=True, capture_output=True, timeout=600)
    names = zipfile.ZipFile(next((tmp_path / "wheels").glob("alise-*.whl"))).namelist()
    assert {"alise/v1/generate_pb2.py", "alise/v1/generate_pb2_grpc.py", "alise/v1/worker_pb2.py"} <= set(names)


def test_cli_prints_the_request_id_that_job_takes_and_shows_zero_fields(stack):
    cli = [sys.executable, "-m", "client.cli", "--address", stack.address, "--api-key", stack.api_key]
    out = subprocess.run([*cli, "generate", PROMPT, "--max-tokens", "4"], capture_output=True, text=True, timeout=300,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    request_id = out.stderr.split("[request ", 1)[1].split("]", 1)[0]
    job = subprocess.run([*cli, "job", request_id], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert job.returncode == 0 and json.loads(job.stdout)["status"] == "JOB_STATUS_FINISHED"
    wait_until(lambda: json.loads(subprocess.run([*cli, "load"], capture_output=True, text=True, timeout=120,
                                                 cwd=ROOT).stdout)["running"] == 0, timeout=60)
    load = json.loads(subprocess.run([*cli, "load"], capture_output=True, text=True, timeout=120, cwd=ROOT).stdout)
    assert load["queued"] == 0 and load["workers"][0]["running"] == 0        # zeros are shown, not dropped


def test_an_api_key_is_not_sent_in_plaintext_off_loopback():
    with pytest.raises(ValueError, match="plaintext"):
        Client("10.0.0.7:50051", api_key="k")
    Client("10.0.0.7:50051", api_key="k", insecure=True).close()           # said explicitly
    Client("127.0.0.1:50051", api_key="k").close()
    with pytest.raises(ValueError, match="plaintext"):
        Client("127.evil.example:50051", api_key="k")                      # a name, not a loopback address


def test_the_cli_treats_only_loopback_addresses_as_loopback():
    from client.cli import is_loopback

    assert is_loopback("127.0.0.1:50051") and is_loopback("localhost:1") and is_loopback("[::1]:50051")
    assert not is_loopback("127.evil.example:50051") and not is_loopback("10.0.0.1:50051")


def test_ctrl_c_in_the_cli_aborts_the_job_at_once(stack):
    """The server keeps a job whose stream dropped for a few seconds (a retry may re-attach); a Ctrl-C means the
    answer is not wanted: the CLI sends Abort, so the job's slot and KV are free as the CLI exits."""
    import signal

    cli = [sys.executable, "-m", "client.cli", "--address", stack.address, "--api-key", stack.api_key]
    request_id = "cli-" + uuid.uuid4().hex[:8]
    # a shell starts a background job with SIGINT ignored and a child inherits that, so the CLI of a suite run as
    # `make test &` never saw the Ctrl-C (session 26): it gets the disposition a terminal gives it
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen([*cli, "generate", PROMPT, "--max-tokens", "2000", "--ignore-eos", "--request-id",
                                 request_id], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, before if before is not None else signal.SIG_DFL)   # None: set outside Python
    stub = stub_for(stack)
    from alise.v1 import generate_pb2 as pb
    try:
        wait_until(lambda: job_status(stub, request_id) == pb.JOB_STATUS_RUNNING
                   and len(stub.GetJob(pb.GetJobRequest(request_id=request_id)).token_ids) > 0, timeout=120)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 130
    finally:
        proc.kill()
    assert job_status(stub, request_id) == pb.JOB_STATUS_ABORTED


def test_a_request_that_ends_without_its_answer_raises_and_the_cli_exits_non_zero(stack, client):
    """An aborted (or failed) request came back from `generate` as a Completion and from the CLI with exit 0:
    scripts took the partial text for the answer (found by review). Both now fail, with what was made."""
    import threading

    from alise.v1 import generate_pb2 as pb

    stub = stub_for(stack)
    request_id = "sdk-aborted-" + uuid.uuid4().hex[:8]
    outcome: dict = {}

    def run():
        try:
            outcome["completion"] = client.generate(PROMPT, max_tokens=2000, ignore_eos=True, request_id=request_id)
        except AliseError as e:
            outcome["error"] = e

    t = threading.Thread(target=run)
    t.start()
    wait_until(lambda: made_tokens(stub, request_id), timeout=120)
    stub.Abort(pb.AbortRequest(request_id=request_id))                    # as `alise abort` from elsewhere
    t.join(120)
    error = outcome.get("error")
    assert error is not None and error.code == "ABORTED", outcome
    assert error.request_id == request_id and error.completion.finish_reason is FinishReason.ABORTED

    cli = [sys.executable, "-m", "client.cli", "--address", stack.address, "--api-key", stack.api_key]
    request_id = "cli-aborted-" + uuid.uuid4().hex[:8]
    proc = subprocess.Popen([*cli, "generate", PROMPT, "--max-tokens", "2000", "--ignore-eos", "--request-id",
                             request_id], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: made_tokens(stub, request_id), timeout=120)
        stub.Abort(pb.AbortRequest(request_id=request_id))
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 1 and "aborted" in err, err[-2000:]


def made_tokens(stub, request_id: str) -> bool:
    """Whether the request's job exists and has tokens."""
    import grpc
    from alise.v1 import generate_pb2 as pb

    try:
        return len(stub.GetJob(pb.GetJobRequest(request_id=request_id)).token_ids) > 0
    except grpc.RpcError:
        return False                                                  # not created yet


async def test_an_async_stream_left_early_is_aborted_before_the_client_closes(stack):
    """`async for ... break` does not close an async generator at once (asyncio does it later, in a task): the
    client closed its channel first and the Abort never went out, so the job ran on for the grace (found by
    review). Closing the client now aborts the streams left early."""
    from alise.v1 import generate_pb2 as pb

    request_id = "sdk-async-" + uuid.uuid4().hex[:8]
    async with AsyncClient(stack.address, api_key=stack.api_key) as ac:
        async for _ in ac.stream(PROMPT, max_tokens=2000, ignore_eos=True, request_id=request_id):
            break
    assert job_status(stub_for(stack), request_id) == pb.JOB_STATUS_ABORTED


def test_the_cli_sends_the_local_stacks_key_only_to_that_stack(tmp_path, monkeypatch):
    """`make run` writes the local tenant's key for the CLI; any address got it (with --insecure, in clear to a
    remote host; found by review). Only the address `make run` wrote gets it now."""
    from client.cli import resolve_api_key

    monkeypatch.setenv("ALISE_CACHE", str(tmp_path))
    monkeypatch.delenv("ALISE_API_KEY", raising=False)
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "api-key").write_text("local-key")
    (tmp_path / "address").write_text("127.0.0.1:50999")
    assert resolve_api_key(None, "127.0.0.1:50999") == "local-key"
    assert resolve_api_key(None, "10.0.0.7:50051") is None
    assert resolve_api_key("given", "10.0.0.7:50051") == "given"


def test_a_client_stream_ends_when_the_scheduler_stops_answering(stack_factory):
    """A scheduler that stops answering with its connection open (a hung process, a partitioned host): the client's
    stream had no keepalive and waited for its deadline (an hour by default; found by review). HTTP/2 keepalive
    ends it within ~30 s as UNAVAILABLE, with the request id to re-attach with."""
    import os
    import signal
    import time

    quiet = stack_factory(num_workers=1)
    with Client(quiet.address, api_key=quiet.api_key, timeout_s=150) as c:
        stream = c.stream(PROMPT, max_tokens=2000, ignore_eos=True)
        chunks = iter(stream)
        next(chunks)
        pid = quiet.services["scheduler"].proc.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            start = time.monotonic()
            with pytest.raises(AliseError) as err:
                for _ in chunks:
                    pass
            waited = time.monotonic() - start
        finally:
            os.kill(pid, signal.SIGCONT)
    assert err.value.code == "UNAVAILABLE" and err.value.request_id == stream.request_id, (err.value, waited)
