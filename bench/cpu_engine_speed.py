"""CPU engine speed with the real SmolLM2 (the CPU worker's numbers in docs/BENCHMARKS.md).

    .venv/bin/python -m bench.cpu_engine_speed [LABEL]

Time to first token and tokens/s for one request alone (best of 3) and for 16 at once (best of 2), 64 tokens
each, ignore_eos, after one warm-up request. The dev VM is noisy: compare versions by alternating runs.
"""
from __future__ import annotations

import sys
import time

import torch
from transformers import AutoTokenizer

from services.common.model_paths import default_model_dir
from services.worker.config import WorkerConfig
from services.worker.factory import build_engine
from services.worker.sequence import Sampling

PROMPT = "Write a haiku about Redis, then explain each line of it in one sentence."


def run(engine, prompt_ids: list[int], n: int, tag: str) -> tuple[float, float]:
    """(seconds to the first token, output tokens/s) for n requests added at once."""
    for i in range(n):
        engine.add(f"{tag}{i}", prompt_ids, Sampling(max_tokens=64, ignore_eos=True))
    started, first, produced = time.perf_counter(), None, 0
    while engine.has_work:
        out = engine.step()
        produced += len(out.deltas)
        if first is None and out.deltas:
            first = time.perf_counter() - started
    return first, produced / (time.perf_counter() - started)


def main() -> None:
    torch.set_num_threads(2)
    engine = build_engine(WorkerConfig(max_batch=16, token_budget=512))
    ids = AutoTokenizer.from_pretrained(str(default_model_dir())).encode(PROMPT, add_special_tokens=False)
    run(engine, ids, 1, "warm")
    single = [run(engine, ids, 1, f"a{k}") for k in range(3)]
    batch = [run(engine, ids, 16, f"b{k}") for k in range(2)]
    print(f"{sys.argv[1] if len(sys.argv) > 1 else 'cpu'}: single TTFT {min(t for t, _ in single):.3f} s, "
          f"{max(r for _, r in single):.1f} tok/s | 16 at once {max(r for _, r in batch):.1f} tok/s")


if __name__ == "__main__":
    main()
