"""Decode-step matmuls (a few rows against a large weight) with their neighbouring elementwise work fused in.

At decode batch sizes each weight byte is read once per step and the step is bound by memory bandwidth.
The plain path runs, per Llama layer, cuBLAS GEMMs (some with a split-K reduction kernel), two RMSNorms
and a SiLU-and-mul: a dozen kernels, and at batch 1-64 their launches, gaps and extra passes cost ~20% of
the step (docs/BENCHMARKS.md, "Decode step vs the memory-bandwidth floor"). Here one Triton kernel per
projection streams the weight once, with no separate split-K reduction kernel, and absorbs the rest:

- a **norm prologue**: the input is the residual stream; each row is RMS-normalised on the fly from its sum
  of squares, which the kernel that wrote the stream accumulated (so no separate norm kernel or pass);
- a **SiLU-and-mul epilogue**: the gate_up projection computes a tile's gate and up columns side by side and
  writes silu(gate) * up, so the down projection reads the activation directly;
- a **residual epilogue**: the output is added to the residual stream, written as the new stream, and each
  row's sum of squares of it is accumulated (atomically, over the column tiles) for the next norm.

The norm prologue serves batches of at most 16 rows (MAX_ROWS): every column tile recomputes the norm of its
input rows, which is free at 16 rows but at 32-64 costs more than the norm kernel it replaces (batches of 17-32
rows, LAYER_ROWS, run the same kernels with a norm kernel before qkv and gate_up) (a SiLU prologue on the down
projection, tried first, was 5x slower than cuBLAS even at one row). A sum-of-squares buffer must be zero before
the epilogue accumulates into it; the kernel two steps earlier zeroes it (`zero=`), which keeps every step one
kernel and graph-capturable. Rounding follows transformers: matmul outputs and residual sums are rounded to the
model dtype, norms are computed in fp32. The sums of squares are added in a varying order, so results can differ
from the plain path in the last fp32 bit of a norm: within bf16 rounding, not bit-identical.
"""
from __future__ import annotations

import json
from enum import IntEnum
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import torch

from services.worker.arrival_counters import arrival_counters, require_counters
from services.worker.pdl import pdl_on

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs never take this path (model_runner checks skinny_gemm_on)
    triton = None


MAX_TILE_ROWS = 64  # rows one program's tile holds (the decode layers use the kernel up to LAYER_ROWS)
MAX_ROWS = 16     # rows with the norm prologue: it is recomputed by every column tile, which is free at 16 rows
                  # and costs more than the norm kernel it saves at 32-64 (docs/BENCHMARKS.md)
LAYER_ROWS = 32   # decode batches up to this many rows run the skinny layers; past MAX_ROWS, with the norms as
                  # kernels of their own (at 64 rows the gate_up tile is slower than cuBLAS: docs/BENCHMARKS.md)


class Epilogue(IntEnum):
    STORE = 0         # the product, in the output's dtype
    RESIDUAL = 1      # residual + product, and its rows' sums of squares accumulated for the next norm
    SILU_MUL = 2      # silu(gate) * up from a [gate; up] weight


class TileConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    split_k: int = 1      # programs per column tile, each over 1/split_k of K (see _skinny_kernel)


def skinny_gemm_on(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


def skinny_gemm_fits(*ks: int) -> bool:
    """Whether inner dimensions `ks` split into chunks of at least 16 (the tensor-core minimum)."""
    return all(k % 16 == 0 for k in ks)


# Tile sizes measured best per device and shape by `python -m bench.skinny_gemm_bench --tune --write` (the way
# vLLM keeps tuned MoE configs): {device name: {"NxK": {block_m: [block_n, block_k, num_warps, num_stages]}}}.
# N is the output width (for SILU_MUL, the activation's: half the weight's rows).
TUNED_CONFIGS = Path(__file__).with_name("skinny_gemm_configs.json")


def block_m_for(m: int) -> int:
    """Rows padded to a tensor-core tile (at least 16)."""
    return max(16, 1 << (m - 1).bit_length())


@lru_cache(maxsize=None)
def _tuned(device_name: str) -> dict:
    if not TUNED_CONFIGS.exists():
        return {}
    return json.loads(TUNED_CONFIGS.read_text()).get(device_name, {})


def tuned_rows(device_name: str, shapes: list[tuple[int, int]]) -> int:
    """Up to how many rows (0, MAX_ROWS or LAYER_ROWS) every projection shape (N, K) has tiles tuned on this device
    (TUNED_CONFIGS). The decode layers use the kernel only that far: the default tiles were never run on other
    devices or shapes, and a tile over the device's shared memory fails at graph capture, which would stop the
    worker at start; untuned batches take the cuBLAS path instead."""
    table = _tuned(device_name)
    rows = 0
    for block_m in (MAX_ROWS, LAYER_ROWS):
        if not all(str(block_m) in table.get(f"{n}x{k}", {}) for n, k in shapes):
            break
        rows = block_m
    return rows


def default_config(m: int, n: int, k: int) -> TileConfig:
    """Enough column tiles to give every SM work, K chunks deep enough to keep loads in flight. Row tiles past
    MAX_ROWS take K chunks of 128 (what the tuner chose there on the H200): 256 overflows shared memory at 64 rows,
    where Triton's pipeline holds one buffer more than `shared_memory` counts."""
    block_m = block_m_for(m)
    return TileConfig(block_m, 32 if n <= 8192 else 64, 256 if block_m <= MAX_ROWS else 128, 4, 4)


def config_for(m: int, n: int, k: int, device_name: str) -> TileConfig:
    """The tuned tiles for this device and shape, else the default."""
    block_m = block_m_for(m)
    tuned = _tuned(device_name).get(f"{n}x{k}", {}).get(str(block_m))
    return TileConfig(block_m, *tuned) if tuned else default_config(m, n, k)


if triton is not None:
    @triton.jit
    def _input_tile(a_ptrs, m_ok, NORM_W, k, rk, inv, NORM: tl.constexpr):
        """One K chunk of the input rows; with NORM, RMS-normalised (inv: 1 / rms per row) times the norm weight,
        rounded as transformers rounds (normalised value, then the product, to the model dtype)."""
        a = tl.load(a_ptrs, mask=m_ok[:, None], other=0.0)
        if NORM:
            nw = tl.load(NORM_W + k + rk).to(tl.float32)
            a = (nw[None, :] * (a.to(tl.float32) * inv[:, None]).to(a.dtype).to(tl.float32)).to(a.dtype)
        return a

    @triton.jit
    def _epilogue(acc, acc_up, OUT, R, SUMSQ_OUT, rm, rn, m_ok, n_ok, stride_o, dtype, EPILOGUE: tl.constexpr):
        """The tile's output from its fp32 sums (acc_up: the up columns of SILU_MUL)."""
        out = acc.to(dtype)                                # rounded like a bf16 GEMM's output
        o_offs = rm[:, None] * stride_o + rn[None, :]
        o_mask = m_ok[:, None] & n_ok[None, :]
        if EPILOGUE == 1:
            r = tl.load(R + o_offs, mask=o_mask, other=0.0)
            s = (out.to(tl.float32) + r.to(tl.float32)).to(r.dtype)
            tl.store(OUT + o_offs, s, mask=o_mask)
            sf = s.to(tl.float32)
            tl.atomic_add(SUMSQ_OUT + rm, tl.sum(sf * sf, 1), mask=m_ok)
        elif EPILOGUE == 2:
            gate = out.to(tl.float32)
            act = (gate / (1.0 + tl.exp(-gate))).to(out.dtype).to(tl.float32)
            up = acc_up.to(out.dtype).to(tl.float32)
            tl.store(OUT + o_offs, (act * up).to(out.dtype), mask=o_mask)
        else:
            tl.store(OUT + o_offs, out.to(OUT.dtype.element_ty), mask=o_mask)

    @triton.jit
    def _skinny_kernel(A, W, OUT, R, SUMSQ_IN, NORM_W, SUMSQ_OUT, ZERO, PART, COUNT,
                       M, N, K, stride_a, stride_w, stride_o, eps,
                       NORM: tl.constexpr, EPILOGUE: tl.constexpr, ZEROES: tl.constexpr, USE_PDL: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr):
        """Program (n, s): the n-th tile of columns of prologue(A) @ W^T over the s-th of SPLIT equal slices of K,
        then the epilogue. SILU_MUL: W is [gate; up] (2N rows); the tile's gate and up columns are both computed
        and combined. SPLIT > 1 (split-K without a reduction kernel): each program writes its fp32 partial sums
        to PART ([1, SPLIT, M, N]; SILU_MUL: [2, ...], gate then up) and counts itself in at COUNT[n]; the tile's
        last program to arrive adds the partials in slice order (the same sums whatever the arrival order), runs
        the epilogue and resets the counter. It gives short projections (o, qkv: 64-128 column tiles on 132 SMs)
        more programs, so that every SM has loads in flight."""
        pid = tl.program_id(0)
        split = tl.program_id(1)
        k_len = K // SPLIT
        k0 = split * k_len
        rm = tl.arange(0, BLOCK_M)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        m_ok = rm < M
        n_ok = rn < N
        a_ptrs = A + rm[:, None] * stride_a + k0 + rk[None, :]
        w_ptrs = W + rn[:, None] * stride_w + k0 + rk[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # the first K chunk of the weights is read before waiting on the previous kernel (weights never
        # depend on it): with PDL, that overlaps the previous kernel's tail
        w_mask = n_ok[:, None]
        w = tl.load(w_ptrs, mask=w_mask, other=0.0)
        if EPILOGUE == 2:
            w_up = tl.load(w_ptrs + N * stride_w, mask=w_mask, other=0.0)
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
        inv = tl.zeros((BLOCK_M,), dtype=tl.float32)
        if NORM:
            inv = 1.0 / tl.sqrt(tl.load(SUMSQ_IN + rm, mask=m_ok, other=0.0) / K + eps)
        a = _input_tile(a_ptrs, m_ok, NORM_W, k0, rk, inv, NORM)
        acc += tl.dot(a, tl.trans(w))
        if EPILOGUE == 2:
            acc_up += tl.dot(a, tl.trans(w_up))
        for k in range(BLOCK_K, k_len, BLOCK_K):
            a = _input_tile(a_ptrs + k, m_ok, NORM_W, k0 + k, rk, inv, NORM)
            acc += tl.dot(a, tl.trans(tl.load(w_ptrs + k, mask=w_mask, other=0.0)))
            if EPILOGUE == 2:
                acc_up += tl.dot(a, tl.trans(tl.load(w_ptrs + k + N * stride_w, mask=w_mask, other=0.0)))
        if USE_PDL:
            tl.extra.cuda.gdc_launch_dependents()
        if SPLIT == 1:
            _epilogue(acc, acc_up, OUT, R, SUMSQ_OUT, rm, rn, m_ok, n_ok, stride_o, W.dtype.element_ty, EPILOGUE)
        else:
            p_mask = m_ok[:, None] & n_ok[None, :]
            p_offs = rm[:, None] * N + rn[None, :]
            tl.store(PART + split * M * N + p_offs, acc, mask=p_mask)
            if EPILOGUE == 2:
                tl.store(PART + (SPLIT + split) * M * N + p_offs, acc_up, mask=p_mask)
            # one thread arrives for the program: the CTA barriers order its other threads' partial writes before
            # the release, and their reads of the other slices' after the acquire (as attention's split merge)
            tl.debug_barrier()
            arrived = tl.atomic_add(COUNT + pid, 1, sem="acq_rel")
            if arrived == SPLIT - 1:
                tl.debug_barrier()
                total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                total_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for s in tl.static_range(SPLIT):
                    total += tl.load(PART + s * M * N + p_offs, mask=p_mask, other=0.0, cache_modifier=".cg")
                    if EPILOGUE == 2:
                        total_up += tl.load(PART + (SPLIT + s) * M * N + p_offs, mask=p_mask, other=0.0,
                                            cache_modifier=".cg")
                _epilogue(total, total_up, OUT, R, SUMSQ_OUT, rm, rn, m_ok, n_ok, stride_o, W.dtype.element_ty,
                          EPILOGUE)
                tl.store(COUNT + pid, 0)
        if ZEROES:
            if (pid == 0) & (split == 0):
                tl.store(ZERO + rm, tl.zeros((BLOCK_M,), dtype=tl.float32), mask=m_ok)


SHARED_MEMORY_BYTES = 232448      # per block on Hopper (H100 / H200)


def shared_memory(cfg: TileConfig, w_tiles: int = 1, elem: int = 2) -> int:
    """Bytes of the software pipeline's buffers (num_stages - 1 K chunks of A and W in flight); SiLU-and-mul
    loads two W tiles (gate and up)."""
    return (cfg.num_stages - 1) * (cfg.block_m + w_tiles * cfg.block_n) * cfg.block_k * elem


def fit(cfg: TileConfig, k: int, w_tiles: int = 1) -> TileConfig:
    """cfg with K slices of whole 16-wide chunks (skinny_gemm_fits checks K), K chunks that divide a slice, and
    buffers within shared memory."""
    while cfg.split_k > 1 and (k % cfg.split_k or (k // cfg.split_k) % 16):
        cfg = cfg._replace(split_k=cfg.split_k // 2)
    while (k // cfg.split_k) % cfg.block_k or (shared_memory(cfg, w_tiles) > SHARED_MEMORY_BYTES and cfg.block_k > 16):
        cfg = cfg._replace(block_k=cfg.block_k // 2)
    return cfg


SPLIT_COUNTERS = 4096     # column tiles a split-K launch may have (o / qkv: 64-192; lm_head is never split)


def skinny_counts(device: torch.device) -> torch.Tensor:
    """The split-K arrival counters (zero between launches: each tile's last program resets its own). Launches that
    share them must not touch them at the same time: the decode layers run their projections one after another on
    one stream, and under PDL, where the next launch starts early, it reaches PART and COUNT only after `gdc_wait`
    (the previous launch has ended): nothing that touches them may move above it."""
    return arrival_counters(SPLIT_COUNTERS, device)


def skinny_linear(x: torch.Tensor, w: torch.Tensor, *, epilogue: Epilogue = Epilogue.STORE,
                  sumsq_in: torch.Tensor | None = None, norm_w: torch.Tensor | None = None, eps: float = 0.0,
                  residual: torch.Tensor | None = None, sumsq_out: torch.Tensor | None = None,
                  zero: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                  config: TileConfig | None = None, counts: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T for x [M, K], w [N, K] row-major (M <= MAX_TILE_ROWS), with:

    norm prologue when sumsq_in [M] is given: x is the residual stream, sumsq_in its rows' sums of squares,
    and rmsnorm(x) * norm_w [K] is what multiplies w;
    epilogue RESIDUAL: returns residual [M, N] + product (the new stream) and adds its rows' sums of squares to
    sumsq_out [M], which must be zero; SILU_MUL: w is [gate; up] ([2N, K]) and the result silu(gate) * up;
    zero [M]: a buffer the kernel sets to zero (for a later epilogue);
    counts: skinny_counts' counters, for tiles that split K (without them K is not split)."""
    silu = epilogue == Epilogue.SILU_MUL
    m, n, k = x.shape[0], w.shape[0] // (2 if silu else 1), w.shape[1]
    assert x.stride(1) == 1 and w.stride(1) == 1 and x.shape[1] == k and m <= MAX_TILE_ROWS
    cfg = config or config_for(m, n, k, torch.cuda.get_device_name(x.device))
    cfg = fit(cfg if counts is not None else cfg._replace(split_k=1), k, w_tiles=2 if silu else 1)
    out = torch.empty(m, n, dtype=out_dtype or w.dtype, device=x.device)
    if epilogue == Epilogue.RESIDUAL:
        assert residual is not None and residual.is_contiguous() and residual.shape == (m, n) and sumsq_out is not None
    dummy = out
    tiles = triton.cdiv(n, cfg.block_n)
    part = dummy
    if cfg.split_k > 1:
        require_counters(counts, tiles, "column tiles (skinny_counts)")
        part = torch.empty(2 if silu else 1, cfg.split_k, m, n, dtype=torch.float32, device=x.device)
    pdl = pdl_on(x.device)
    _skinny_kernel[(tiles, cfg.split_k)](
        x, w, out, residual if residual is not None else dummy,
        sumsq_in if sumsq_in is not None else dummy, norm_w if norm_w is not None else dummy,
        sumsq_out if sumsq_out is not None else dummy, zero if zero is not None else dummy,
        part, counts if counts is not None else dummy,
        m, n, k, x.stride(0), w.stride(0), out.stride(0), eps,
        NORM=sumsq_in is not None, EPILOGUE=int(epilogue), ZEROES=zero is not None, USE_PDL=pdl,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT=cfg.split_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, launch_pdl=pdl)
    return out
