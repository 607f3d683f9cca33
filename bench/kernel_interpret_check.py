"""The paged attention kernels (decode and prefill), the rotary + KV-write kernel and the skinny GEMM's split-K
checked on CPU under Triton's interpreter against their torch references, on small shapes: a way to test a kernel
change before a GPU is at hand. Needs `triton` importable (pip install triton into any directory and put it on
PYTHONPATH); the interpreter must be on before it is imported:

    TRITON_INTERPRET=1 python -m bench.kernel_interpret_check
"""
from __future__ import annotations

import os

import torch

from bench.paged_prefill_bench import BLOCK, make_case
from services.worker.attention import paged_decode_reference, paged_decode_rope, paged_decode_triton
from services.worker.fused_ops import rope_, rope_and_cache_
from services.worker.prefill_attention import paged_prefill_reference, paged_prefill_triton
from services.worker.skinny_gemm import Epilogue, TileConfig, skinny_counts, skinny_linear

TOLERANCE = 1e-5


def check_decode_rope(heads: int, kv: int, dim: int = 32) -> float:
    """paged_decode_rope (rotary, KV write, attention and split merge in one kernel) against rope_, a cache write
    and the reference, with 1, 2 and 4 context splits, on random caches and contexts of 200, 128 (a whole number of
    64-token chunks), 65 and 1 tokens, so that several non-empty slices are merged and a later slice holds the new
    token; the caches must match bit for bit, the counters stay zero."""
    gen = torch.Generator().manual_seed(heads + 1000)
    lens = torch.tensor([200, 128, 65, 1], dtype=torch.int32)
    bsz = lens.shape[0]
    tables = torch.randperm(60, generator=gen)[: bsz * 13].view(bsz, 13).int()
    kc, vc = (torch.randn(60 * BLOCK, kv, dim, generator=gen) for _ in range(2))
    qkv = torch.randn(bsz, (heads + 2 * kv) * dim, generator=gen)
    angles = (lens - 1).float()[:, None] / 10000 ** (torch.arange(0, dim, 2).float() / dim)[None, :]
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    slots = torch.stack([tables[b, (n - 1) // BLOCK] * BLOCK + (n - 1) % BLOCK for b, n in enumerate(lens.tolist())])
    q, k, v = qkv.split([heads * dim, kv * dim, kv * dim], dim=1)
    k_ref, v_ref = kc.clone(), vc.clone()
    k_ref[slots], v_ref[slots] = rope_(k.view(bsz, kv, dim), cos, sin), v.view(bsz, kv, dim)
    ref = paged_decode_reference(rope_(q.view(bsz, heads, dim), cos, sin), k_ref, v_ref, tables, lens, BLOCK, 0.2)
    worst = 0.0
    for splits in (1, 2, 4):
        counts = torch.zeros(bsz * kv, dtype=torch.int32)
        k_out, v_out = kc.clone(), vc.clone()
        out = paged_decode_rope(qkv, heads, cos, sin, slots, k_out, v_out, tables, lens, BLOCK, 0.2, counts, splits=splits)
        assert torch.equal(k_out, k_ref) and torch.equal(v_out, v_ref), "the KV write differs from rope_ + write"
        assert not counts.any(), "arrival counters not left at zero"
        err = (out - ref).abs().max().item()
        print(f"decode + rotary + KV write, group {heads // kv}, {splits} splits: max abs err {err:.1e}")
        worst = max(worst, err)
    return worst


def check_rope_cache(dtype: torch.dtype, heads: int = 8, kv: int = 2, dim: int = 32, rows: int = 5) -> None:
    """rope_and_cache_ against rope_ and a cache write: the same bits (both round through rotary_mix's steps).
    fp16, not bf16: the interpreter's bf16 arithmetic is not the GPU's."""
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(rows, (heads + 2 * kv) * dim, generator=gen).to(dtype)
    angles = torch.rand(rows, 1, generator=gen) * 900 / 10000 ** (torch.arange(0, dim, 2).float() / dim)[None, :]
    cos, sin = (f(torch.cat((angles, angles), -1)).to(dtype) for f in (torch.cos, torch.sin))
    q, k, v = qkv.split([heads * dim, kv * dim, kv * dim], dim=1)
    ref_q, ref_k = rope_(q.reshape(rows, heads, dim), cos, sin), rope_(k.reshape(rows, kv, dim), cos, sin)
    kc, vc = (torch.full((rows + 3, kv, dim), float("nan"), dtype=dtype) for _ in range(2))
    slots = torch.tensor([4, 0, 7, 2, 1][:rows])
    fused = qkv.clone()
    rope_and_cache_(fused, heads, kv, dim, cos, sin, kc, vc, slots)
    assert torch.equal(fused[:, :heads * dim].view(rows, heads, dim), ref_q), f"{dtype}: q differs from rope_"
    assert torch.equal(kc[slots], ref_k) and torch.equal(vc[slots], v.reshape(rows, kv, dim)), f"{dtype}: K / V differ"
    print(f"rotary + KV write, {dtype}: the same bits as rope_ and a cache write")


def check_skinny_split(m: int = 5, n: int = 100, k: int = 256) -> float:
    """skinny_linear with K split in 2 and 4 against the unsplit kernel, for each epilogue with the norm prologue,
    over launches sharing the counters (each tile's last program must reset its counter), with a partial last
    column tile (N = 100, or 50 for SiLU-and-mul, in tiles of 32); fp32 here, so the split's other order of
    additions differs only by rounding. The interpreter runs the programs one by one, so the slices arrive in
    order here: the arrival race itself is exercised on the GPU (bench.skinny_gemm_bench's check)."""
    gen = torch.Generator().manual_seed(m)
    rnd = lambda *s: torch.randn(*s, generator=gen)        # noqa: E731
    x, w, w2, r, nw = rnd(m, k), rnd(n, k) * 0.05, rnd(2 * n, k) * 0.05, rnd(m, n), rnd(k) * 0.1 + 1
    sumsq = x.pow(2).sum(1)
    counts = skinny_counts(torch.device("cpu"))
    worst = 0.0
    for split in (1, 2, 4):
        cfg = TileConfig(16, 32, 32, 4, 2, split)
        norm = dict(sumsq_in=sumsq, norm_w=nw, eps=1e-5, config=cfg, counts=counts)
        acc = torch.zeros(m)
        got = {"store": skinny_linear(x, w, **norm),
               "silu_mul": skinny_linear(x, w2, epilogue=Epilogue.SILU_MUL, **norm),
               "residual": skinny_linear(x, w, epilogue=Epilogue.RESIDUAL, residual=r, sumsq_out=acc, **norm)}
        got["residual_sumsq"] = acc
        if split == 1:
            ref = got
        err = max((got[key] - ref[key]).abs().max().item() / ref[key].abs().max().item() for key in ref)
        assert not counts.any(), "a split launch left its arrival counters set"
        print(f"skinny split-K {split}, {m} rows: max relative err {err:.1e} against no split")
        worst = max(worst, err)
    return worst


def main() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1 (see the docstring)"
    worst = 0.0
    for heads, kv in ((8, 8), (24, 8), (32, 8)):           # GQA groups 1, 3 (not a power of two), 4
        for specs in ([(0, 37), (0, 2), (0, 16)], [(40, 20), (3, 17)]):   # fresh prompts; chunks after context
            q, kc, vc, chunks, out = make_case(specs, heads, kv, 32, torch.float32, torch.device("cpu"))
            ref = paged_prefill_reference(q, kc, vc, chunks, BLOCK, 0.17, out.clone())
            err = (paged_prefill_triton(q, kc, vc, chunks, BLOCK, 0.17, out.clone()) - ref).abs().max().item()
            print(f"prefill group {heads // kv} {specs}: max abs err {err:.1e}")
            worst = max(worst, err)
        gen = torch.Generator().manual_seed(heads)
        tables = torch.tensor([[5, 2, 7, 0], [1, 3, 0, 0], [4, 6, 8, 9]], dtype=torch.int32)
        lens = torch.tensor([40, 17, 64], dtype=torch.int32)
        kc, vc = (torch.randn(10 * BLOCK, kv, 32, generator=gen) for _ in range(2))
        q = torch.randn(3, heads, 32, generator=gen)
        ref = paged_decode_reference(q, kc, vc, tables, lens, BLOCK, 0.2)
        err = (paged_decode_triton(q, kc, vc, tables, lens, BLOCK, 0.2) - ref).abs().max().item()
        print(f"decode group {heads // kv}: max abs err {err:.1e}")
        worst = max(worst, err)
        worst = max(worst, check_decode_rope(heads, kv))
    for dtype in (torch.float32, torch.float16):
        check_rope_cache(dtype)
    for m in (1, 5, 16):
        worst = max(worst, check_skinny_split(m))
    assert worst < TOLERANCE, f"a kernel disagrees with its reference: {worst:.1e}"
    print("all agree")


if __name__ == "__main__":
    main()
