"""`alise bench serve`: a load generator against a live ALISE scheduler, modelled on `vllm bench serve`.

Requests come from a workload (bench/workloads.py), leave at Poisson (or gamma, `--burstiness`) times at
`--request-rate` (or all at once: `inf`), at most `--max-concurrency` in flight, and are streamed back; each
one's TTFT, inter-token latencies, end-to-end and normalized latency (e2e / output tokens, the paper's
metric), queue time, preemptions and predicted length are recorded (the last three through the ALISE gRPC
backend only; `--backend openai` runs the same workload against any OpenAI-compatible server, ALISE's HTTP
API or a vLLM / SGLang one, for a comparison). Prints a summary and writes it as JSON
(`--save-result`) with one CSV row per request beside it.
"""
from __future__ import annotations

import argparse
import asyncio
import csv
import json
import lzma
import math
import random
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from enum import Enum
from itertools import accumulate
from pathlib import Path

from bench.serve_metrics import RequestResult, format_summary, parse_goodput, summarize
from bench.workloads import BenchRequest, Dataset, Limits, load, trace_gaps
from services.common.auth import bearer_metadata


def arrival_offsets(n: int, rate: float, burstiness: float, seed: int, trace: Sequence[float] = ()) -> list[float]:
    """Start times (s from the beginning) of n requests: gaps drawn from a gamma distribution with mean
    1 / rate and shape `burstiness` (1 = Poisson; lower = burstier), or, given a trace's gaps
    (workloads.trace_gaps), its first n - 1 gaps (again from its start when it has fewer) scaled so that their
    mean is 1 / rate: the trace's bursts and lulls at the asked load. rate = inf: everything at 0."""
    if math.isinf(rate):
        return [0.0] * n
    if trace:
        gaps = [trace[i % len(trace)] for i in range(max(n - 1, 0))]
        total = sum(gaps)
        if gaps and total <= 0:
            raise ValueError(f"the trace's first {len(gaps)} gaps are all 0: they cannot be scaled to a rate")
        scale = len(gaps) / (rate * total) if gaps else 0.0
        return [0.0, *accumulate(g * scale for g in gaps)][:n]
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
    return out


class Backend(str, Enum):
    ALISE = "alise"          # the ALISE gRPC API: per-token ids, queue time, preemptions, predicted length
    OPENAI = "openai"        # any OpenAI-compatible HTTP server (ALISE's own, vLLM, SGLang, ...): /v1/completions

    def __str__(self) -> str:
        return self.value


@dataclass
class Target:
    """Where and as whom the requests go. For OPENAI, `address` is the base URL (http(s)://host:port/v1)."""
    address: str
    api_key: str | None
    tls_ca: str = ""
    model: str = ""
    priority: int = 0
    timeout_s: float = 3600.0
    backend: Backend = Backend.ALISE
    chat: bool = False                # send each prompt as one user message (the model's chat template applies)
    max_tokens: int = 0               # every request's cap; 0 = the dataset's output length

    def cap(self, req: "BenchRequest", ignore_eos: bool) -> tuple[int, bool]:
        """(max_tokens, ignore_eos) of a request: the dataset's length as the cap (0 = the server's default),
        forced exactly with ignore_eos; or the same cap for all, where the model stops by itself."""
        if self.max_tokens:
            return self.max_tokens, False
        return req.output_tokens, ignore_eos and req.output_tokens > 0

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return bearer_metadata(self.api_key) if self.api_key else ()


async def one_request(stub, req: BenchRequest, index: int, ignore_eos: bool, target: Target, label: str,
                      started: float) -> RequestResult:
    from alise.v1 import generate_pb2 as pb

    max_tokens, forced = target.cap(req, ignore_eos)
    sampling = pb.SamplingParams(max_tokens=max_tokens, ignore_eos=forced)
    text = (dict(chat=pb.ChatConversation(messages=[pb.ChatMessage(**m) for m in req.messages()]))
            if target.chat or req.as_chat else dict(prompt=req.prompt))
    msg = pb.GenerateRequest(request_id=f"{label}-{index}-{uuid.uuid4().hex[:8]}", model=target.model,
                             sampling=sampling, priority=target.priority, **text)
    res = RequestResult(index=index, expected_output_tokens=req.output_tokens, start_s=time.perf_counter() - started)
    t0 = last = time.perf_counter()
    try:
        async for resp in stub.Generate(msg, timeout=target.timeout_s, metadata=target.metadata):
            now = time.perf_counter()
            if resp.HasField("chunk"):
                n = len(resp.chunk.token_ids)
                if n == 0:
                    continue
                if res.ttft_s is None:
                    res.ttft_s = now - t0
                else:                                  # a chunk of n tokens: n gaps of equal share
                    res.itl_s.extend([(now - last) / n] * n)
                last = now
                res.output_tokens += n
            else:
                _record_complete(res, resp.complete)
        res.e2e_s = time.perf_counter() - t0
        if not res.ok and not res.error:
            res.error = res.finish_reason or "stream ended without a completion"
    except Exception as e:  # noqa: BLE001 - grpc.aio raises AioRpcError; any failure is this request's result
        res.error = f"{getattr(e, 'code', lambda: type(e).__name__)()}: {getattr(e, 'details', lambda: str(e))()}"
    return res


async def one_http_request(http, req: BenchRequest, index: int, ignore_eos: bool, target: Target, label: str,
                           started: float) -> RequestResult:
    """One streamed /v1/completions (or, with chat, /v1/chat/completions) request, timed the way `vllm bench serve`
    times it: TTFT at the first chunk with text, one inter-token gap per later chunk, token counts from the usage
    the server reports last."""
    body = {"model": target.model, "stream": True, "temperature": 0.0, "stream_options": {"include_usage": True}}
    chat = target.chat or req.as_chat
    body.update({"messages": req.messages()} if chat else {"prompt": req.prompt})
    max_tokens, forced = target.cap(req, ignore_eos)
    if max_tokens:
        body.update(max_tokens=max_tokens, ignore_eos=forced)
    if target.priority:
        body["priority"] = target.priority
    headers = {"x-request-id": f"{label}-{index}-{uuid.uuid4().hex[:8]}"}
    res = RequestResult(index=index, expected_output_tokens=req.output_tokens, start_s=time.perf_counter() - started)
    t0 = last = time.perf_counter()
    chunks = 0
    try:
        async with http.stream("POST", "/chat/completions" if chat else "/completions", json=body,
                               headers=headers) as r:
            if r.status_code != 200:
                error = json.loads(await r.aread() or b"{}").get("error", {})
                res.error = f"HTTP {r.status_code}: {error.get('message', '')}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                now = time.perf_counter()
                if "error" in event:
                    res.error = f"stream error: {event['error'].get('message', '')}"
                    break
                if event.get("usage"):
                    res.prompt_tokens = event["usage"]["prompt_tokens"]
                    res.output_tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices") or ():
                    if choice.get("text") or (choice.get("delta") or {}).get("content"):
                        if res.ttft_s is None:
                            res.ttft_s = now - t0
                        else:
                            res.itl_s.append(now - last)
                        last = now
                        chunks += 1
                    if choice.get("finish_reason"):
                        res.finish_reason = choice["finish_reason"]
        res.e2e_s = time.perf_counter() - t0
        res.output_tokens = res.output_tokens or chunks
        res.ok = not res.error and res.finish_reason in ("stop", "length")
        if not res.ok and not res.error:
            res.error = res.finish_reason or "stream ended without a finish reason"
    except Exception as e:  # noqa: BLE001 - any transport failure is this request's result
        res.error = f"{type(e).__name__}: {e}"
    return res


def http_client(target: Target):
    """An asyncio HTTP client for the OpenAI backend, verifying TLS with `tls_ca` when given."""
    import ssl

    import httpx2 as httpx       # the HTTP client the openai package itself uses

    verify = ssl.create_default_context(cafile=target.tls_ca) if target.tls_ca else True
    headers = {"authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    return httpx.AsyncClient(base_url=target.address.rstrip("/"), headers=headers, verify=verify,
                             timeout=target.timeout_s, limits=httpx.Limits(max_connections=None,
                                                                            max_keepalive_connections=None))


STEP_SAMPLE_COLUMNS = ("steps", "seconds", "seqs", "prefill_tokens", "context_tokens", "mixed_steps",  # StepView's
                       "device_seconds", "prefill_pairs")


async def worker_loads(target: Target) -> list[dict]:
    """The stack's workers as the scheduler sees them (GetLoad): KV, admission limit, learned step model, and a
    sample of their steps (`python -m bench.simulator.calibrate --from-runs` fits the simulator's cost to it)."""
    from alise.v1 import generate_pb2 as pb
    from alise.v1 import generate_pb2_grpc as pb_grpc
    from google.protobuf.json_format import MessageToDict

    from services.common.tls import TlsFiles, aio_channel

    async with aio_channel(target.address, TlsFiles(ca=target.tls_ca)) as channel:
        load = await pb_grpc.AliseStub(channel).GetLoad(pb.LoadRequest(step_sample=True), metadata=target.metadata, timeout=30)
    workers = []
    for w in load.workers:
        view = MessageToDict(w, preserving_proto_field_name=True)
        # rows of numbers, not dicts of strings (MessageToDict writes int64 as text): a run's JSON stays small
        view["step_sample"] = [[getattr(r, f) for f in STEP_SAMPLE_COLUMNS] for r in w.step_sample]
        workers.append(view)
    return workers


def _record_complete(res: RequestResult, done) -> None:
    from alise.v1 import generate_pb2 as pb

    res.finish_reason = pb.FinishReason.Name(done.finish_reason)
    # only a job that ran to its end counts as served; a failed or aborted one is this request's error
    res.ok = done.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    res.prompt_tokens = done.usage.prompt_tokens
    res.output_tokens = max(res.output_tokens, done.usage.completion_tokens)
    res.queue_s = done.timings.queue_seconds
    if res.ttft_s is not None and done.timings.ttft_seconds > 0:   # the server counts from when it accepted the job
        res.admit_s = max(0.0, res.ttft_s - done.timings.ttft_seconds)
    res.preemptions = done.timings.num_preemptions
    res.predicted_output_tokens = done.timings.predicted_output_tokens
    res.repredicted_output_tokens = done.timings.repredicted_output_tokens


async def run(requests: list[BenchRequest], target: Target, *, rate: float, burstiness: float, seed: int,
              max_concurrency: int, ignore_eos: bool, label: str, progress: bool = True,
              use_trace_times: bool = False, trace: Sequence[float] = ()) -> tuple[list[RequestResult], float]:
    """Send every request on its schedule; returns per-request results (in request order) and the duration."""
    from alise.v1 import generate_pb2_grpc as pb_grpc

    from services.common.tls import TlsFiles, aio_channel

    offsets = ([r.arrival_s or 0.0 for r in requests] if use_trace_times
               else arrival_offsets(len(requests), rate, burstiness, seed, trace))
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency > 0 else None
    done = 0
    if target.backend is Backend.OPENAI:
        connection = http_client(target)
        one = one_http_request
    else:
        connection = aio_channel(target.address, TlsFiles(ca=target.tls_ca))
        one = one_request
    async with connection as conn:
        client = conn if target.backend is Backend.OPENAI else pb_grpc.AliseStub(conn)
        started = time.perf_counter()

        async def send(i: int) -> RequestResult:
            nonlocal done
            await asyncio.sleep(max(0.0, offsets[i] - (time.perf_counter() - started)))
            if limit is None:
                res = await one(client, requests[i], i, ignore_eos, target, label, started)
            else:
                async with limit:
                    res = await one(client, requests[i], i, ignore_eos, target, label, started)
            done += 1
            return res

        ticker = asyncio.create_task(_progress(lambda: done, len(requests), started)) if progress else None
        results = await asyncio.gather(*(send(i) for i in range(len(requests))))
        duration = time.perf_counter() - started
        if ticker:
            ticker.cancel()
            print(file=sys.stderr)
    return list(results), duration


async def _progress(done, total: int, started: float) -> None:
    while True:
        n = done()
        width = 30
        bar = "#" * (width * n // max(total, 1))
        print(f"\r[{bar:<{width}}] {n}/{total} requests, {time.perf_counter() - started:6.1f} s",
              end="", file=sys.stderr, flush=True)
        await asyncio.sleep(1.0)


def add_dataset_arguments(p: argparse.ArgumentParser) -> None:
    """Which requests: shared by `bench serve`, `sweep` and `simulate`."""
    p.add_argument("--dataset-name", type=Dataset, choices=list(Dataset), default=Dataset.SHAREGPT)
    p.add_argument("--dataset-path", type=Path, help="the dataset file (not needed for synthetic)")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--input-len", type=int, default=256, help="synthetic: prompt tokens")
    p.add_argument("--output-len", type=int, default=128, help="synthetic: output tokens")


def at_least_one(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def add_arrival_arguments(p: argparse.ArgumentParser):
    """How requests arrive at a rate: shared by `bench serve`, `bench sweep` and `bench simulate`. Returns the
    group of arrival flags, which exclude each other (a command adds its own, e.g. --trace-times, to it)."""
    arrivals = p.add_mutually_exclusive_group()
    arrivals.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps (1 = Poisson)")
    arrivals.add_argument("--arrival-trace", type=Path, default=None,
                          help="an Azure LLM trace CSV: requests arrive with its gaps, scaled to the rate (instead "
                               "of Poisson), e.g. ../shared/data/azure_llm_trace_2023/AzureLLMInferenceTrace_code.csv")
    return arrivals


def arrival_trace(a: argparse.Namespace) -> list[float]:
    """The gaps of --arrival-trace, or [] for Poisson / gamma arrivals; a file that is not a trace is a clear exit."""
    if not a.arrival_trace:
        return []
    try:
        return trace_gaps(a.arrival_trace)
    except (OSError, KeyError, ValueError) as e:
        raise SystemExit(f"--arrival-trace {a.arrival_trace}: not a readable Azure LLM trace ({e!r})") from None


def arrival_fields(a: argparse.Namespace) -> dict:
    """How the run's requests arrived, for its summary."""
    return {"burstiness": a.burstiness, "arrival_trace": str(a.arrival_trace or "")}


def add_workload_arguments(p: argparse.ArgumentParser):
    """What is sent and how: shared by `bench serve` and `bench sweep`. Returns the group of arrival flags."""
    add_dataset_arguments(p)
    arrivals = add_arrival_arguments(p)
    p.add_argument("--max-concurrency", type=int, default=0, help="at most this many requests in flight (0 = no cap)")
    lengths = p.add_mutually_exclusive_group()
    lengths.add_argument("--ignore-eos", action="store_true", help="generate exactly the dataset's output length")
    lengths.add_argument("--max-tokens", type=at_least_one, default=0,
                   help="the same max_tokens for every request, the model stopping by itself (instead of the "
                        "dataset's output length as the cap)")
    p.add_argument("--chat", action="store_true", help="send each prompt as one user message of a chat")
    p.add_argument("--percentiles", default="50,90,99")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", help="tokenizer directory for counting lengths (default: the local model)")
    return arrivals


def add_arguments(p: argparse.ArgumentParser) -> None:
    arrivals = add_workload_arguments(p)
    p.add_argument("--request-rate", type=float, default=math.inf, help="requests/s (Poisson); inf = all at once")
    p.add_argument("--backend", type=Backend, choices=list(Backend), default=Backend.ALISE,
                   help="alise: the gRPC API at --address; openai: an OpenAI-compatible server at --base-url")
    p.add_argument("--base-url", help="openai: the server's base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--model", default="", help="openai: the model name to send (default: the server's first)")
    arrivals.add_argument("--trace-times", action="store_true", help="azure: send at the trace's own arrival times")
    p.add_argument("--goodput", nargs="*", default=[], metavar="METRIC:MS",
                   help="SLOs for goodput, e.g. ttft:500 tpot:50 e2el:10000")
    p.add_argument("--warmup", type=int, default=0, help="send this many requests first and discard them")
    p.add_argument("--label", default="bench")
    p.add_argument("--priority", type=int, default=0)
    p.add_argument("--save-result", type=Path, help="write the summary here as JSON, and per-request rows as CSV")


def load_workload(a: argparse.Namespace, tokenizer, extra: int = 0) -> list[BenchRequest]:
    """The workload's requests (`extra` more for a warm-up taken from the front)."""
    if a.dataset_name is not Dataset.SYNTHETIC and a.dataset_path is None:
        raise SystemExit(f"--dataset-path is needed for {a.dataset_name.value}")
    return load(a.dataset_name, a.dataset_path, a.num_prompts + extra, tokenizer, seed=a.seed,
                limits=Limits(), input_len=a.input_len, output_len=a.output_len)


def open_tokenizer(path: str | None):
    from transformers import AutoTokenizer

    from services.common.model_paths import default_model_dir

    return AutoTokenizer.from_pretrained(path or str(default_model_dir()))


async def served_model(target: Target) -> str:
    """The first model an OpenAI-compatible server lists (what `vllm bench serve` sends when none is named)."""
    async with http_client(target) as http:
        r = await http.get("/models")
        r.raise_for_status()
        return r.json()["data"][0]["id"]


def bench_serve(a: argparse.Namespace, target: Target) -> dict:
    trace = arrival_trace(a)           # checked before anything is sent
    if target.backend is Backend.OPENAI and not target.model:
        target.model = asyncio.run(served_model(target))
    workload = load_workload(a, open_tokenizer(a.tokenizer), extra=a.warmup)
    warm, measured = workload[:a.warmup], workload[a.warmup:]
    if warm:
        asyncio.run(run(warm, target, rate=math.inf, burstiness=1.0, seed=a.seed, max_concurrency=a.max_concurrency,
                        ignore_eos=a.ignore_eos, label=f"{a.label}-warmup", progress=False))
    results, duration = asyncio.run(run(measured, target, rate=a.request_rate, burstiness=a.burstiness, seed=a.seed,
                                        max_concurrency=a.max_concurrency, ignore_eos=a.ignore_eos, label=a.label,
                                        use_trace_times=a.trace_times, trace=trace))
    summary = summarize(results, duration, [float(x) for x in a.percentiles.split(",")], parse_goodput(a.goodput))
    summary.update(label=a.label, dataset=a.dataset_name.value, request_rate=a.request_rate,
                   **arrival_fields(a), max_concurrency=a.max_concurrency, address=target.address,
                   backend=target.backend.value)
    print(format_summary(summary))
    if a.save_result:
        save(a.save_result, summary, results)
    return summary


def open_run_csv(path: Path):
    """A run's per-request CSV as `save` wrote it, or that CSV xz-compressed (.csv.xz, as docs/results keeps them),
    open for text."""
    return lzma.open(path, "rt", newline="") if path.suffix == ".xz" else path.open(newline="")


def save(path: Path, summary: dict, results: list[RequestResult]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2))
    rows = [asdict(r) for r in results]
    with open(path.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[k for k in rows[0] if k != "itl_s"] if rows else [])
        w.writeheader()
        for r in rows:
            r.pop("itl_s")
            w.writerow(r)
