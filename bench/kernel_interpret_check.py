"""The paged attention kernels (decode and prefill) checked on CPU under Triton's interpreter against their torch
references, on small shapes: a way to test a kernel change before a GPU is at hand. Needs `triton` importable
(pip install triton into any directory and put it on PYTHONPATH); the interpreter must be on before it is imported:

    TRITON_INTERPRET=1 python -m bench.kernel_interpret_check
"""
from __future__ import annotations

import os

import torch

from bench.paged_prefill_bench import BLOCK, make_case
from services.worker.attention import paged_decode_reference, paged_decode_triton
from services.worker.prefill_attention import paged_prefill_reference, paged_prefill_triton

TOLERANCE = 1e-5


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
    assert worst < TOLERANCE, f"a kernel disagrees with its reference: {worst:.1e}"
    print("all agree")


if __name__ == "__main__":
    main()
