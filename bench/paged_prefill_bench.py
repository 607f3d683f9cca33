"""Paged prefill attention (services/worker/prefill_attention.py): check the Triton kernel, time it against the
per-chunk SDPA path it replaced.

Check: random pools with shuffled block tables, chunks that are fresh prompts, later chunks of a long prompt
and prefix-cache hits (context before the chunk), GQA groups 1, 3 (not a power of two) and 4, fp32 and bf16;
the kernel's output against the reference's, as a max relative error per case.
Time: typical step mixes at the Llama-3-8B shape (32 query heads, 8 KV heads, dim 128, bf16), the kernel vs
the reference (one SDPA per chunk over context gathered from the pool, what the engine ran before), one
layer's attention per call, mean of CUDA-event timings.

    python -m bench.paged_prefill_bench --out paged_prefill.json
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from services.worker.host_copy import to_device
from services.worker.prefill_attention import PrefillChunks, paged_prefill_reference, paged_prefill_triton, plan_tiles

BLOCK = 16


def make_case(specs: list[tuple[int, int]], heads: int, kv_heads: int, dim: int, dtype, device, seed: int = 0):
    """specs: (cached context, new tokens) per chunk -> (q, k_cache, v_cache, chunks, out)."""
    gen = torch.Generator().manual_seed(seed)
    widths = [-(-(ctx + n) // BLOCK) for ctx, n in specs]
    num_blocks = sum(widths) + 8
    perm = torch.randperm(num_blocks, generator=gen).numpy()
    tables = np.zeros((len(specs), max(widths)), np.int64)
    used = 0
    for g, w in enumerate(widths):
        tables[g, :w] = perm[used:used + w]
        used += w
    q_len = np.array([n for _, n in specs], np.int64)
    q_start = np.cumsum(q_len) - q_len
    tile_chunk, tile_q = plan_tiles(q_len)
    dev = to_device(device, q_start, q_len, np.array([c for c, _ in specs], np.int64), tables, tile_chunk, tile_q)
    chunks = PrefillChunks(*dev)
    total = int(q_len.sum())
    q = torch.randn(total, heads, dim, generator=gen).to(device, dtype)
    k_cache = torch.randn(num_blocks * BLOCK, kv_heads, dim, generator=gen).to(device, dtype)
    v_cache = torch.randn(num_blocks * BLOCK, kv_heads, dim, generator=gen).to(device, dtype)
    return q, k_cache, v_cache, chunks, torch.zeros_like(q)


CHECK_SPECS = {
    "fresh": [(0, 37), (0, 1), (0, 16), (0, 130)],
    "later_chunks": [(512, 256), (1000, 77), (2047, 3)],
    "prefix_hits": [(16, 5), (48, 200), (4096, 64)],
    "one_long": [(0, 2048)],
}


def check(device) -> dict:
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        for heads, kv in ((8, 8), (24, 8), (32, 8)):
            for name, specs in CHECK_SPECS.items():
                q, kc, vc, chunks, o = make_case(specs, heads, kv, 128, dtype, device)
                scale = 128 ** -0.5
                ref = paged_prefill_reference(q.float(), kc.float(), vc.float(), chunks, BLOCK, scale, o.float())
                got = paged_prefill_triton(q, kc, vc, chunks, BLOCK, scale, o.clone()).float()
                err = ((got - ref).abs().max() / ref.abs().max()).item()
                out[f"{str(dtype)[6:]}/group{heads // kv}/{name}"] = err
                print(f"check {str(dtype)[6:]:8} group {heads // kv} {name:13} rel err {err:.2e}", flush=True)
    return out


TIME_SPECS = {
    "4 fresh x 512": [(0, 512)] * 4,
    "1 fresh x 2048": [(0, 2048)],
    "16 fresh x 128": [(0, 128)] * 16,
    "64 fresh x 40": [(0, 40)] * 64,
    "8 prefix hits 1000+64": [(1000, 64)] * 8,
    "later chunk 3072+1024": [(3072, 1024)],
}


def time_fn(fn, iters: int = 50) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def timings(device) -> dict:
    out = {}
    for name, specs in TIME_SPECS.items():
        q, kc, vc, chunks, o = make_case(specs, 32, 8, 128, torch.bfloat16, device)
        scale = 128 ** -0.5
        tri = time_fn(lambda: paged_prefill_triton(q, kc, vc, chunks, BLOCK, scale, o))
        ref = time_fn(lambda: paged_prefill_reference(q, kc, vc, chunks, BLOCK, scale, o))
        tokens = sum(n for _, n in specs)
        out[name] = {"tokens": tokens, "triton_ms": tri, "per_chunk_sdpa_ms": ref, "speedup": ref / tri}
        print(f"time {name:24} {tokens:5} tokens  triton {tri:7.3f} ms  per-chunk sdpa {ref:7.3f} ms  "
              f"x{ref / tri:5.2f}", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="paged_prefill.json")
    args = ap.parse_args()
    device = torch.device("cuda")
    result = {"device": torch.cuda.get_device_name(), "check": check(device), "time": timings(device)}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
