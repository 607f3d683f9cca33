"""Predictor speed on this machine's CPUs: Predict latency (single) and throughput (batched) through the
real gRPC service, for encoder variants, and a 1M-entry index (memory, query latency).

    .venv/bin/python -m bench.predictor_bench ../shared/data/sharegpt_sample_1000.json
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
from alise.v1 import predictor_pb2 as ppb
from alise.v1 import predictor_pb2_grpc as ppb_grpc

from services.common.local_stack import free_port, wait_healthy
from services.predictor.datasets import load_examples

VARIANTS = {"fp32, 256 tokens": [], "fp32, 128 tokens": ["--max-prompt-tokens", "128"],
            "int8, 128 tokens": ["--max-prompt-tokens", "128", "--quantize"],
            "static, 512 tokens": ["--encoder", "static"]}


def service_numbers(prompts: list[str], flags: list[str]) -> dict:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "services.predictor.server", "--listen", f"127.0.0.1:{port}", *flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(f"127.0.0.1:{port}", 120)
        stub = ppb_grpc.PredictorStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        stub.Observe(ppb.ObserveRequest(observations=[ppb.Observation(prompt=p, output_tokens=100) for p in prompts[:500]]))
        fresh = prompts[500:]                         # never seen: no embedding cache hits
        lat = []
        for p in fresh[:200]:
            t = time.perf_counter()
            stub.Predict(ppb.PredictRequest(prompts=[p]))
            lat.append(time.perf_counter() - t)
        batch = fresh[200:200 + 512]
        t = time.perf_counter()
        stub.Predict(ppb.PredictRequest(prompts=batch))
        batched = len(batch) / (time.perf_counter() - t)
        # the scheduler's pattern: one prompt per call, many calls in flight (the server coalesces them)
        singles = fresh[712:712 + 512]
        t = time.perf_counter()
        for f in [stub.Predict.future(ppb.PredictRequest(prompts=[p])) for p in singles]:
            f.result()
        concurrent = len(singles) / (time.perf_counter() - t)
        return {"single_p50_ms": 1e3 * statistics.median(lat), "single_p90_ms": 1e3 * float(np.quantile(lat, 0.9)),
                "batched_prompts_per_s": batched, "concurrent_single_calls_per_s": concurrent,
                "concurrent_calls": len(singles)}
    finally:
        proc.terminate()
        proc.wait(30)


def index_numbers(n: int = 1_000_000, dim: int = 384) -> dict:
    from services.predictor.knn_index import KnnIndex

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rng = np.random.default_rng(0)
    index = KnnIndex(dim, max_entries=n)
    for start in range(0, n, 100_000):                # clustered random unit vectors, like real prompts
        centers = rng.standard_normal((100, dim)).astype(np.float32)
        v = centers[rng.integers(0, 100, 100_000)] + 0.5 * rng.standard_normal((100_000, dim)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        index.add(v, rng.integers(1, 1000, 100_000), [f"k{start + i}" for i in range(100_000)])
    t = time.perf_counter()
    index.search(v[:1], 16)                            # builds the IVF index
    build_s = time.perf_counter() - t
    lat = []
    for q in v[:200]:
        t = time.perf_counter()
        index.search(q[None], 16)
        lat.append(time.perf_counter() - t)
    rss_gb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20
    t = time.perf_counter()
    index.search(v[200:712], 16)                       # a batched Predict's search
    batch_ms = 1e3 * (time.perf_counter() - t)
    return {"entries": len(index), "build_s": build_s, "query_p50_ms": 1e3 * statistics.median(lat),
            "batch_512_query_ms": batch_ms, "peak_rss_growth_gib": rss_gb}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("dataset", type=Path)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--skip-index", action="store_true")
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    a = p.parse_args()
    prompts = list(dict.fromkeys(e.prompt for e in load_examples(a.dataset)))
    res = {name: service_numbers(prompts, VARIANTS[name]) for name in a.variants}
    if not a.skip_index:
        res["index_1m"] = index_numbers()
    if a.out:
        a.out.write_text(json.dumps(res, indent=2))
    for name in a.variants:
        r = res[name]
        print(f"{name:<18} single p50 {r['single_p50_ms']:.1f} ms (p90 {r['single_p90_ms']:.1f}), "
              f"batched {r['batched_prompts_per_s']:.0f} prompts/s, {r['concurrent_calls']} concurrent one-prompt calls "
              f"{r['concurrent_single_calls_per_s']:.0f}/s")
    if "index_1m" not in res:
        return
    r = res["index_1m"]
    print(f"index {r['entries']} entries: build {r['build_s']:.1f} s, query p50 {r['query_p50_ms']:.2f} ms, "
          f"512 queries at once {r['batch_512_query_ms']:.0f} ms, memory +{r['peak_rss_growth_gib']:.2f} GiB")


if __name__ == "__main__":
    main()
