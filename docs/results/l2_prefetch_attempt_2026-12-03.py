"""The L2-prefetch experiment of session 17 (docs/BENCHMARKS.md, "Reading the o projection's weight into L2"), kept
so that the measured variant can be rebuilt: it was services/worker/l2_prefetch.py, called from
ModelRunner._prefetch_o(i) right after layer i's qkv projection in `_layers_skinny` and (decode only) in `_layers`:

    w = self.layers[i].self_attn.o_proj.weight
    if l2_prefetch.prefetch_on(self.device) and l2_prefetch.fits(w):
        l2_prefetch.prefetch(w)

and bench/decode_floor.py's A/B had the variants off / prefetch128 / prefetch32 / load (MODE, STRIDE_BYTES).
Measured 3-5% slower at every batch, so it was not kept. Not imported by anything.
"""
from enum import Enum

import torch
import triton
import triton.language as tl


class PrefetchMode(str, Enum):
    OFF = "off"
    PREFETCH = "prefetch"
    LOAD = "load"


MODE = PrefetchMode.OFF
STRIDE_BYTES = 128           # one prefetch per L2 line
L2_BUDGET_BYTES = 40 << 20   # the most a prefetch may bring in: H100 / H200 have 50 MB of L2
BLOCK = 1024                 # addresses per program


def prefetch_on(device: torch.device) -> bool:
    return MODE != PrefetchMode.OFF and device.type == "cuda"


def fits(t: torch.Tensor) -> bool:
    return t.numel() * t.element_size() <= L2_BUDGET_BYTES


@triton.jit
def _prefetch_kernel(base, n_addr, STEP: tl.constexpr, BLOCK: tl.constexpr):
    """One `prefetch.global.L2::evict_last` per address: base + i * STEP bytes (base is a byte pointer)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ptrs = base + tl.where(i < n_addr, i, 0).to(tl.int64) * STEP
    tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _load_kernel(base, n_addr, sink, BLOCK: tl.constexpr):
    """One 4-byte load per 32-byte sector, kept in L2; a store the compiler cannot rule out keeps the loads.
    (This variant failed to compile on the H200 and has no numbers.)"""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(base + i.to(tl.int64) * 8, mask=i < n_addr, other=0, cache_modifier=".cg", eviction_policy="evict_last")
    total = tl.sum(x & 1, 0)
    if total == -1 - n_addr:
        tl.store(sink, total)


def prefetch(t: torch.Tensor, sink: torch.Tensor | None = None) -> None:
    """Start bringing contiguous tensor `t` into L2 (on the current stream, in stream order)."""
    nbytes = t.numel() * t.element_size()
    if MODE == PrefetchMode.PREFETCH:
        n = nbytes // STRIDE_BYTES
        _prefetch_kernel[(triton.cdiv(n, BLOCK),)](t.view(torch.uint8), n, STEP=STRIDE_BYTES, BLOCK=BLOCK, num_warps=4)
    elif MODE == PrefetchMode.LOAD:
        words = t.view(torch.int32)
        n = words.numel() // 8
        _load_kernel[(triton.cdiv(n, BLOCK),)](words, n, sink, BLOCK=BLOCK, num_warps=4)
