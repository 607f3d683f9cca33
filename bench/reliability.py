"""Reliability figures for docs/RELIABILITY.md, against a live local stack (TLS, mTLS, API keys, like `make run`).

    python -m bench.reliability burst    --clients 300          # 300 at once: every one admitted, none UNKNOWN
    python -m bench.reliability overload --factor 3 --seconds 60  # 3x capacity: shed cleanly, p99 of admitted, recovery
    python -m bench.reliability soak     --load 0.8 --minutes 20  # memory and Redis keys over time

Each run measures the stack's capacity first (closed loop, `--max-batch` concurrent requests of `--tokens`
tokens), so load factors are relative to this machine. Prints a JSON summary (and writes it with --out).
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import grpc
import redis
from alise.v1 import generate_pb2 as pb
from alise.v1 import generate_pb2_grpc as pb_grpc

from services.common.auth import with_bearer
from services.common.local_stack import LocalStack

PROMPTS = ["Explain why the sky is blue.", "Write a haiku about rain.", "List three uses of copper.",
           "What is a prime number?", "Describe a bicycle in two sentences.", "Name four planets."]


@dataclass
class Outcome:
    sent: float
    code: str = "OK"
    e2e: float = 0.0
    ttft: float = 0.0
    tokens: int = 0


def one_request(stub, tokens: int, started: float) -> Outcome:
    out = Outcome(sent=time.monotonic() - started)
    t0 = time.monotonic()
    req = pb.GenerateRequest(prompt=random.choice(PROMPTS),
                             sampling=pb.SamplingParams(max_tokens=tokens, ignore_eos=True))
    try:
        for resp in stub.Generate(req, timeout=900):
            if resp.HasField("chunk") and not out.ttft:
                out.ttft = time.monotonic() - t0
            if resp.HasField("complete"):
                out.tokens = resp.complete.usage.completion_tokens
        out.e2e = time.monotonic() - t0
    except grpc.RpcError as e:
        out.code = e.code().name
    return out


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))]


def summary(outcomes: list[Outcome]) -> dict:
    ok = [o for o in outcomes if o.code == "OK"]
    return {"requests": len(outcomes), "codes": dict(Counter(o.code for o in outcomes)),
            "e2e_p50_s": round(percentile([o.e2e for o in ok], 50), 3),
            "e2e_p99_s": round(percentile([o.e2e for o in ok], 99), 3),
            "ttft_p99_s": round(percentile([o.ttft for o in ok], 99), 3),
            "completed_short": sum(o.tokens < TOKENS for o in ok)}      # admitted but cut short: must be 0


def closed_loop(stub, n: int, concurrency: int, tokens: int) -> list[Outcome]:
    outcomes: list[Outcome] = []
    lock, started = threading.Lock(), time.monotonic()
    pending = list(range(n))

    def client():
        while True:
            with lock:
                if not pending:
                    return
                pending.pop()
            o = one_request(stub, tokens, started)
            with lock:
                outcomes.append(o)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def open_loop(stub, rate: float, seconds: float, tokens: int, on_tick=None) -> list[Outcome]:
    """Poisson arrivals at `rate` per second for `seconds`; each request on its own thread."""
    outcomes: list[Outcome] = []
    threads, started = [], time.monotonic()
    next_at = 0.0
    while next_at < seconds:
        time.sleep(max(0.0, next_at - (time.monotonic() - started)))
        t = threading.Thread(target=lambda: outcomes.append(one_request(stub, tokens, started)))
        t.start()
        threads.append(t)
        if on_tick is not None:
            on_tick(time.monotonic() - started)
        next_at += random.expovariate(rate)
    for t in threads:
        t.join()
    return outcomes


def capacity(stub, batch: int, tokens: int) -> float:
    closed_loop(stub, batch, batch, tokens)                       # priming: the first run is slower
    t0 = time.monotonic()
    done = closed_loop(stub, 3 * batch, batch, tokens)
    return sum(o.code == "OK" for o in done) / (time.monotonic() - t0)


def start_stack(a, scheduler_args: list[str]) -> LocalStack:
    stack = LocalStack(log_dir=Path(tempfile.mkdtemp(prefix="alise-reliability-")), tls=True, mtls=True,
                       worker_args=["--max-batch", str(a.max_batch)], scheduler_args=scheduler_args)
    return stack.start()


def client_stub(stack: LocalStack):
    return pb_grpc.AliseStub(with_bearer(stack.client_channel(), stack.api_key))


def run_burst(a) -> dict:
    stack = start_stack(a, [])
    try:
        stub = client_stub(stack)
        outcomes = closed_loop(stub, a.clients, a.clients, TOKENS)          # all at once
        return {"burst_clients": a.clients, **summary(outcomes),
                "services_alive": all(s.proc.poll() is None for s in stack.services.values()),
                "workers_after": len(stub.GetLoad(pb.LoadRequest()).workers)}
    finally:
        stack.stop()


def run_overload(a) -> dict:
    stack = start_stack(a, ["--max-queued-jobs", str(a.queue_bound)])
    try:
        stub = client_stub(stack)
        cap = capacity(stub, a.max_batch, TOKENS)
        idle = statistics.median(o.e2e for o in closed_loop(stub, 5, 1, TOKENS))
        outcomes = open_loop(stub, a.factor * cap, a.seconds, TOKENS)
        t_end = time.monotonic()
        while stub.GetLoad(pb.LoadRequest()).queued or stub.GetLoad(pb.LoadRequest()).running:
            time.sleep(0.2)
        drained = time.monotonic() - t_end
        after = statistics.median(o.e2e for o in closed_loop(stub, 5, 1, TOKENS))
        return {"capacity_req_s": round(cap, 2), "offered_req_s": round(a.factor * cap, 2), "seconds": a.seconds,
                "queue_bound": a.queue_bound, **summary(outcomes),
                "idle_e2e_s": round(idle, 3), "after_e2e_s": round(after, 3), "drain_after_load_s": round(drained, 2)}
    finally:
        stack.stop()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def run_soak(a) -> dict:
    stack = start_stack(a, [])
    try:
        stub = client_stub(stack)
        cap = capacity(stub, a.max_batch, TOKENS)
        r = redis.Redis.from_url(stack.redis_url)
        samples, last, started = [], [-1e9], time.monotonic()

        def sample(now: float, force: bool = False) -> None:
            if now - last[0] < a.sample_s and not force:
                return
            last[0] = now
            procs = {name: svc.proc.pid for name, svc in stack.services.items()}
            procs["redis"] = stack.redis.proc.pid
            samples.append({"t_s": round(now), "rss_mb": {n: rss_mb(p) for n, p in procs.items()},
                            "redis_keys": r.dbsize(), "redis_used_mb": round(r.info("memory")["used_memory"] / 2**20, 1),
                            "live_job_keys": r.scard("alise:tenant:local:live"), "queued": r.zcard("alise:queue")})
        outcomes = open_loop(stub, a.load * cap, a.minutes * 60, TOKENS, on_tick=sample)
        sample(time.monotonic() - started, force=True)              # the end of the run
        first, final = samples[0], samples[-1]
        return {"capacity_req_s": round(cap, 2), "offered_req_s": round(a.load * cap, 2), "minutes": a.minutes,
                **summary(outcomes), "samples": samples,
                "rss_growth_mb": {n: round(final["rss_mb"][n] - first["rss_mb"][n], 1) for n in first["rss_mb"]},
                "redis_keys_growth": final["redis_keys"] - first["redis_keys"],
                "finished_ttl_s": 3600}
    finally:
        stack.stop()


TOKENS = 32


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["burst", "overload", "soak"])
    p.add_argument("--clients", type=int, default=300)
    p.add_argument("--factor", type=float, default=3.0)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--queue-bound", type=int, default=48)
    p.add_argument("--load", type=float, default=0.8)
    p.add_argument("--minutes", type=float, default=20)
    p.add_argument("--sample-s", type=float, default=60)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    random.seed(a.seed)
    result = {"mode": a.mode, "date": time.strftime("%Y-%m-%d"), "tokens_per_request": TOKENS,
              "args": {k: str(v) for k, v in vars(a).items()},
              **{"burst": run_burst, "overload": run_overload, "soak": run_soak}[a.mode](a)}
    text = json.dumps(result, indent=1)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
