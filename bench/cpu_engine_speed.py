"""CPU engine speed with the real SmolLM2 (the CPU worker's numbers in docs/BENCHMARKS.md).

    .venv/bin/python -m bench.cpu_engine_speed [LABEL]
    .venv/bin/python -m bench.cpu_engine_speed --threads 1 --batches 8 16 32 48 64 96

Time to first token and tokens/s for one request alone (best of 3) and for 16 at once (best of 2), 64 tokens
each, ignore_eos, after one warm-up request. The dev VM is noisy: compare versions by alternating runs.
With --batches: output tokens/s with N requests at once (max batch N, best of 2) for each N, the curve whose knee
the CPU worker's default max batch should sit at (the side-by-side benchmarks give each stack one thread).
"""
from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoTokenizer

from services.common.model_paths import default_model_dir
from services.worker.config import WorkerConfig
from services.worker.factory import build_engine
from services.worker.sequence import Sampling

PROMPT = "Write a haiku about Redis, then explain each line of it in one sentence."


def run(engine, prompt_ids: list[int], n: int, tag: str, max_tokens: int = 64) -> tuple[float, float]:
    """(seconds to the first token, output tokens/s) for n requests added at once."""
    for i in range(n):
        engine.add(f"{tag}{i}", prompt_ids, Sampling(max_tokens=max_tokens, ignore_eos=True))
    started, first, produced = time.perf_counter(), None, 0
    while engine.has_work:
        out = engine.step()
        produced += len(out.deltas)
        if first is None and out.deltas:
            first = time.perf_counter() - started
    return first, produced / (time.perf_counter() - started)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("label", nargs="?", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", type=int, nargs="*", default=[], help="tokens/s at each of these batch sizes")
    p.add_argument("--max-tokens", type=int, default=64, help="each request's output, with --batches")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    ids = AutoTokenizer.from_pretrained(str(default_model_dir())).encode(PROMPT, add_special_tokens=False)
    if a.batches:
        for n in a.batches:
            engine = build_engine(WorkerConfig(max_batch=n, token_budget=max(512, 2 * n * len(ids))))
            run(engine, ids, 1, "warm")
            rate = max(run(engine, ids, n, f"b{k}", a.max_tokens)[1] for k in range(2))
            print(f"{a.label}: {n} at once, {a.max_tokens} tokens each, {a.threads} thread(s): {rate:.1f} output tok/s",
                  flush=True)
        return
    engine = build_engine(WorkerConfig(max_batch=16, token_budget=512))
    run(engine, ids, 1, "warm")
    single = [run(engine, ids, 1, f"a{k}") for k in range(3)]
    batch = [run(engine, ids, 16, f"b{k}") for k in range(2)]
    print(f"{a.label}: single TTFT {min(t for t, _ in single):.3f} s, "
          f"{max(r for _, r in single):.1f} tok/s | 16 at once {max(r for _, r in batch):.1f} tok/s")


if __name__ == "__main__":
    main()
