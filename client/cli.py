"""`alise`: command-line client for the ALISE scheduler's gRPC API."""
from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys
import uuid
from urllib.parse import urlsplit

import grpc
from alise.client import AliseError, Completion
from alise.v1 import generate_pb2 as pb
from alise.v1 import generate_pb2_grpc as pb_grpc
from google.protobuf.json_format import MessageToDict

from services.common.auth import with_bearer
from services.common.model_paths import cache_root
from services.common.tls import TlsFiles
from services.common.tls import channel as tls_channel

DEFAULT_ADDRESS = "127.0.0.1:50051"


def resolve_address(flag: str | None) -> str:
    """--address, then $ALISE_ADDRESS, then the address `make run` wrote, then the default port."""
    if flag:
        return flag
    if os.environ.get("ALISE_ADDRESS"):
        return os.environ["ALISE_ADDRESS"]
    written = cache_root() / "address"
    return written.read_text().strip() if written.exists() else DEFAULT_ADDRESS


def is_local_stack(address: str) -> bool:
    """Whether `address` is the one `make run` wrote: only then are its CA and API key the ones to use."""
    written = cache_root() / "address"
    return written.exists() and written.read_text().strip() == address


def resolve_tls_ca(flag: str | None, address: str) -> str:
    """--tls-ca, then $ALISE_TLS_CA, then the CA of the stack `make run` started when talking to it; empty
    (plaintext) otherwise."""
    if flag or os.environ.get("ALISE_TLS_CA"):
        return flag or os.environ["ALISE_TLS_CA"]
    local_ca = cache_root() / "local" / "tls" / "ca.crt"
    return str(local_ca) if is_local_stack(address) and local_ca.exists() else ""


def is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:                   # a name such as 127.example.com is not loopback
        return False


def resolve_api_key(flag: str | None, address: str) -> str | None:
    """--api-key, then $ALISE_API_KEY, then the local tenant's key `make run` wrote, only when talking to that
    stack (before, any address got it: `--address remote:50051 --insecure` sent it there in clear)."""
    if flag:
        return flag
    if os.environ.get("ALISE_API_KEY"):
        return os.environ["ALISE_API_KEY"]
    written = cache_root() / "local" / "api-key"
    return written.read_text().strip() if is_local_stack(address) and written.exists() else None


def build_request(a: argparse.Namespace) -> pb.GenerateRequest:
    sampling = pb.SamplingParams(temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                                 max_tokens=a.max_tokens, stop=a.stop or [], ignore_eos=a.ignore_eos)
    if a.seed is not None:
        sampling.seed = a.seed
    req = pb.GenerateRequest(request_id=a.request_id or uuid.uuid4().hex, model=a.model or "",
                             sampling=sampling, priority=a.priority)
    if a.chat:
        req.chat.messages.append(pb.ChatMessage(role="user", content=a.prompt))
    else:
        req.prompt = a.prompt
    return req


def cmd_generate(stub: pb_grpc.AliseStub, a: argparse.Namespace) -> int:
    req = build_request(a)
    # the id `alise job` / `alise abort` take; on stderr, so stdout stays the answer alone
    print(f"[request {req.request_id}]", file=sys.stderr, flush=True)
    call = stub.Generate(req, timeout=a.timeout)
    final = None
    try:
        for resp in call:
            if resp.HasField("chunk"):
                if not a.json:
                    sys.stdout.write(resp.chunk.text)
                    sys.stdout.flush()
            else:
                final = resp.complete
    except KeyboardInterrupt:
        call.cancel()
        try:                    # at once: a stream that merely drops is kept a few seconds for a retry to re-attach
            stub.Abort(pb.AbortRequest(request_id=req.request_id), timeout=10)
        except grpc.RpcError:
            pass                # the scheduler aborts it after its grace anyway
        print("\n[cancelled]", file=sys.stderr)
        return 130
    if a.json and final is not None:
        print(json.dumps(MessageToDict(final, preserving_proto_field_name=True), indent=2))
    elif not a.json:
        print()
    return generate_exit_code(req.request_id, final)


def generate_exit_code(request_id: str, final: pb.GenerateComplete | None) -> int:
    """0 for an answer (stop, length); 1, with why on stderr, for a request that ended without one: scripts must not
    take a failed or aborted job's partial text for the answer."""
    if final is None:
        print(f"error: request {request_id}: the stream ended without a completion", file=sys.stderr)
        return 1
    if (error := AliseError.unanswered(Completion.from_message(final))) is not None:   # the SDK's words
        print(f"error: {error.message}", file=sys.stderr)
        return 1
    return 0


def show(message, indent: int | None = 2) -> None:
    """A response as JSON with every field, zeros included (a 0 running or 0 queued is an answer too)."""
    print(json.dumps(MessageToDict(message, preserving_proto_field_name=True,
                                   always_print_fields_with_no_presence=True), indent=indent))


def cmd_job(stub, a) -> int:
    show(stub.GetJob(pb.GetJobRequest(request_id=a.request_id), timeout=a.timeout))
    return 0


def cmd_abort(stub, a) -> int:
    show(stub.Abort(pb.AbortRequest(request_id=a.request_id), timeout=a.timeout), indent=None)
    return 0


def cmd_load(stub, a) -> int:
    show(stub.GetLoad(pb.LoadRequest(), timeout=a.timeout))
    return 0


def cmd_info(stub, a) -> int:
    show(stub.GetServerInfo(pb.ServerInfoRequest(), timeout=a.timeout))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alise", description=__doc__)
    p.add_argument("--address", help="scheduler host:port (default: $ALISE_ADDRESS or what `make run` wrote)")
    p.add_argument("--api-key", help="client API key (default: $ALISE_API_KEY or the key `make run` wrote)")
    p.add_argument("--insecure", action="store_true", help="allow plaintext to a non-loopback address")
    p.add_argument("--tls-ca", help="connect over TLS, verifying the server with this CA (default: $ALISE_TLS_CA, or "
                        "the CA of the stack `make run` started)")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="stream a completion")
    g.add_argument("prompt")
    g.add_argument("--chat", action="store_true", help="apply the model's chat template (one user message)")
    g.add_argument("--max-tokens", type=int, default=0)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--priority", type=int, default=0, help="higher = more important")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--request-id")
    g.add_argument("--model")
    g.add_argument("--timeout", type=float, default=3600.0, help="seconds before the request is given up (and "
                   "aborted on the server)")
    g.add_argument("--json", action="store_true", help="print the final usage and timings as JSON")
    g.set_defaults(fn=cmd_generate)
    for name, fn, help_ in (("job", cmd_job, "show a job"), ("abort", cmd_abort, "abort a job")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("request_id", help="the id `generate` printed (or gave with --request-id)")
        s.set_defaults(fn=fn, timeout=60.0)
    sub.add_parser("load", help="queue and worker load").set_defaults(fn=cmd_load, timeout=60.0)
    sub.add_parser("info", help="server info").set_defaults(fn=cmd_info, timeout=60.0)
    bench = sub.add_parser("bench", help="benchmarks: live stacks and simulation").add_subparsers(dest="bench", required=True)
    from bench import serve, simulate, sweep

    serve.add_arguments(bench.add_parser("serve", help="load generator: a workload at a request rate against a stack"))
    sweep.add_arguments(bench.add_parser("sweep", help="rates x policies on local stacks started here, with a report"))
    simulate.add_arguments(bench.add_parser("simulate", help="rates x policies on a simulated cluster, with a report"))
    sweep.add_report_arguments(bench.add_parser("report", help="the report of a sweep's saved runs, written again "
                                                "(runs of several calls into one --out)"))
    return p


def plaintext_allowed(address: str, ca: str, insecure: bool) -> bool:
    """An API key goes in plaintext only to a loopback address, or with --insecure."""
    if ca or insecure or is_loopback(address):
        return True
    print(f"error: refusing to send an API key in plaintext to {address}: give --tls-ca (or ALISE_TLS_CA), "
          f"or --insecure", file=sys.stderr)
    return False


def bench_serve_command(a: argparse.Namespace) -> int:
    from bench.serve import Backend, Target, bench_serve

    if a.backend is Backend.OPENAI:      # any OpenAI-compatible server: ALISE's HTTP API, vLLM, SGLang, ...
        if not a.base_url:
            print("error: --backend openai needs --base-url (e.g. http://127.0.0.1:8000/v1)", file=sys.stderr)
            return 2
        url = urlsplit(a.base_url)
        if url.scheme == "http" and not plaintext_allowed(f"{url.hostname}:{url.port or 80}", "", a.insecure):
            return 2
        # another server's key: --api-key or $OPENAI_API_KEY only, never ALISE's own key files
        target = Target(a.base_url, a.api_key or os.environ.get("OPENAI_API_KEY"), a.tls_ca or "", model=a.model,
                        priority=a.priority, backend=Backend.OPENAI, chat=a.chat, max_tokens=a.max_tokens)
    else:
        address = resolve_address(a.address)
        ca = resolve_tls_ca(a.tls_ca, address)
        if not plaintext_allowed(address, ca, a.insecure):
            return 2
        target = Target(address, resolve_api_key(a.api_key, address), ca, priority=a.priority, chat=a.chat,
                        max_tokens=a.max_tokens)
    return 0 if bench_serve(a, target)["failed"] == 0 else 1


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    if a.command == "bench" and a.bench == "sweep":
        from bench.sweep import sweep

        runs = sweep(a)
        return 0 if all(r.summary["failed"] == 0 for r in runs) else 1
    if a.command == "bench" and a.bench == "report":
        from bench.sweep import report_saved

        try:
            report_saved(a)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    if a.command == "bench" and a.bench == "simulate":
        from bench.simulate import simulate_sweep

        simulate_sweep(a)
        return 0
    if a.command == "bench":             # serve
        return bench_serve_command(a)
    address = resolve_address(a.address)
    ca = resolve_tls_ca(a.tls_ca, address)
    if not plaintext_allowed(address, ca, a.insecure):
        return 2
    try:
        channel = tls_channel(address, TlsFiles(ca=ca))
    except OSError as e:                     # a --tls-ca / $ALISE_TLS_CA file that cannot be read
        print(f"error: TLS CA {ca}: {e.strerror or e}", file=sys.stderr)
        return 2
    with channel:
        try:
            return a.fn(pb_grpc.AliseStub(with_bearer(channel, resolve_api_key(a.api_key, address))), a)
        except grpc.RpcError as e:
            print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:            # `generate` handles its own (it aborts its job)
            return 130


if __name__ == "__main__":
    sys.exit(main())
