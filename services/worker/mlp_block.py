"""A decode layer's o projection and MLP as one persistent kernel (batches of at most 16 rows).

The skinny layers (skinny_gemm.py) run a layer's o, gate_up and down projections as three kernels. Each
kernel's launch, ramp-up (the first weight loads in flight) and tail (the last column tiles draining) leave
HBM idle for a few microseconds, and at batch 1-16 a layer's projections are only 13-60 us long, so those
boundaries are a large share of the distance to the bandwidth floor (docs/BENCHMARKS.md, "Skinny-GEMM decode
layers"). PDL (pdl.py) could not hide them: the next kernel's programs only become resident once the previous
kernel's leave.

Here one program per SM stays resident through the three projections. Between them it waits at a grid-wide
barrier (every program has written its tiles of the previous projection), but it reads the first K chunk of
its next projection's weights *before* arriving: weights do not depend on the barrier, so HBM is busy while
the slowest tiles finish. Same tiles, prologues and epilogues as skinny_gemm (its `_tile`), so results match
the three-kernel path up to the order of the atomic sums of squares.

The barrier counter only ever grows (int64): a program arriving at it as number `old + 1` waits until the
counter reaches the next multiple of the grid size, so it needs no reset between barriers, layers or steps,
and never wraps. Every program must be resident at once, so the grid is at most one program per SM.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from services.worker.skinny_gemm import (MAX_ROWS, Epilogue, TileConfig, config_for, fit, skinny_gemm_on)

try:
    import triton
    import triton.language as tl
    from services.worker.skinny_gemm import _tile, _weight_chunk
except ImportError:
    triton = None


def mlp_block_on(device: torch.device) -> bool:
    return skinny_gemm_on(device)


@lru_cache(maxsize=None)
def sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


if triton is not None:
    @triton.jit
    def _grid_barrier(CTR, nprog, SPIN_LOAD: tl.constexpr):
        """Wait until every program of the grid has arrived. One thread arrives for the program, so the CTA
        barriers around it order the other threads' writes before the release and their reads after the acquire."""
        tl.debug_barrier()
        old = tl.atomic_add(CTR, 1, sem="acq_rel")
        target = (old // nprog + 1) * nprog
        seen = old + 1
        while seen < target:
            if SPIN_LOAD:
                seen = tl.load(CTR, volatile=True)
            else:
                seen = tl.atomic_add(CTR, 0, sem="acquire")
        if SPIN_LOAD:
            tl.atomic_add(CTR, 0, sem="acquire")
        tl.debug_barrier()

    @triton.jit
    def _projection(A, W, OUT, R, SUMSQ_IN, NORM_W, SUMSQ_OUT, w, w_up, pid, nprog, M, N, K,
                    stride_a, stride_w, stride_o, eps,
                    NORM: tl.constexpr, EPILOGUE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
        """This program's column tiles pid, pid + nprog, ...; (w, w_up) is the first one's first K chunk."""
        for tile in range(pid, tl.cdiv(N, BLOCK_N), nprog):
            _tile(A, W, OUT, R, SUMSQ_IN, NORM_W, SUMSQ_OUT, tile, w, w_up, M, N, K, stride_a, stride_w, stride_o,
                  eps, NORM, EPILOGUE, False, BLOCK_M, BLOCK_N, BLOCK_K, STAGES)
            w, w_up = _weight_chunk(W, tile + nprog, N, stride_w, 0, EPILOGUE, BLOCK_N, BLOCK_K)

    @triton.jit
    def _mlp_block_kernel(ATTN, WO, RES_IN, RES_MID, SUMSQ_MID, NORM_W, WGU, ACT, WD, RES_OUT, SUMSQ_OUT, CTR,
                          M, H, I, eps,
                          BLOCK_M: tl.constexpr, BN_O: tl.constexpr, BK_O: tl.constexpr, ST_O: tl.constexpr,
                          BN_GU: tl.constexpr, BK_GU: tl.constexpr, ST_GU: tl.constexpr,
                          BN_D: tl.constexpr, BK_D: tl.constexpr, ST_D: tl.constexpr,
                          SPIN_LOAD: tl.constexpr, PREFETCH: tl.constexpr):
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        # o projection: RES_MID = RES_IN + ATTN @ WO^T, its rows' sums of squares into SUMSQ_MID (zeroed by the
        # qkv projection before, as in the skinny layers)
        w, w_up = _weight_chunk(WO, pid, H, H, 0, 1, BN_O, BK_O)
        _projection(ATTN, WO, RES_MID, RES_IN, SUMSQ_MID, NORM_W, SUMSQ_MID, w, w_up, pid, nprog, M, H, H,
                    H, H, H, eps, False, 1, BLOCK_M, BN_O, BK_O, ST_O)
        if pid == 0:       # read by this layer's qkv projection (done); the down projection accumulates into it
            rm = tl.arange(0, BLOCK_M)
            tl.store(SUMSQ_OUT + rm, tl.zeros((BLOCK_M,), dtype=tl.float32), mask=rm < M)
        if PREFETCH:
            w, w_up = _weight_chunk(WGU, pid, I, H, 0, 2, BN_GU, BK_GU)
        _grid_barrier(CTR, nprog, SPIN_LOAD)
        if not PREFETCH:
            w, w_up = _weight_chunk(WGU, pid, I, H, 0, 2, BN_GU, BK_GU)
        # gate_up: ACT = silu(gate) * up of rmsnorm(RES_MID) * NORM_W
        _projection(RES_MID, WGU, ACT, RES_MID, SUMSQ_MID, NORM_W, SUMSQ_MID, w, w_up, pid, nprog, M, I, H,
                    H, H, I, eps, True, 2, BLOCK_M, BN_GU, BK_GU, ST_GU)
        if PREFETCH:
            w, w_up = _weight_chunk(WD, pid, H, I, 0, 1, BN_D, BK_D)
        _grid_barrier(CTR, nprog, SPIN_LOAD)
        if not PREFETCH:
            w, w_up = _weight_chunk(WD, pid, H, I, 0, 1, BN_D, BK_D)
        # down: RES_OUT = RES_MID + ACT @ WD^T, its sums of squares into SUMSQ_OUT
        _projection(ACT, WD, RES_OUT, RES_MID, SUMSQ_OUT, NORM_W, SUMSQ_OUT, w, w_up, pid, nprog, M, H, I,
                    I, I, H, eps, False, 1, BLOCK_M, BN_D, BK_D, ST_D)


def mlp_block_configs(m: int, h: int, i: int, device: torch.device) -> tuple[TileConfig, TileConfig, TileConfig]:
    """Each projection's tuned skinny tiles, fitted to its K and to shared memory."""
    name = torch.cuda.get_device_name(device)
    return (fit(config_for(m, h, h, name), h), fit(config_for(m, i, h, name), h, w_tiles=2),
            fit(config_for(m, h, i, name), i))


def mlp_block(attn: torch.Tensor, wo: torch.Tensor, residual: torch.Tensor, sumsq_mid: torch.Tensor,
              norm_w: torch.Tensor, eps: float, wgu: torch.Tensor, wd: torch.Tensor, sumsq_out: torch.Tensor,
              counter: torch.Tensor, *, tiles: tuple[TileConfig, TileConfig, TileConfig] | None = None,
              num_warps: int = 4, programs: int | None = None,
              spin_load: bool = False, prefetch: bool = True, uniform_stages: int | None = None) -> torch.Tensor:
    """The rest of a decode layer after attention, for attn [M, H] (M <= 16): returns the residual stream after
    the MLP, whose rows' sums of squares are in sumsq_out [M]. sumsq_mid [M] must be zero (it gets the stream's
    after the o projection); counter: an int64 [1] on the device, zero when first used, shared by every call."""
    m, h = attn.shape
    i = wd.shape[1]
    assert m <= MAX_ROWS and attn.is_contiguous() and residual.is_contiguous() and counter.dtype == torch.int64
    o_cfg, gu_cfg, d_cfg = tiles or mlp_block_configs(m, h, i, attn.device)
    res_mid = torch.empty_like(residual)
    act = torch.empty(m, i, dtype=wgu.dtype, device=attn.device)
    out = torch.empty_like(residual)
    grid = programs or sm_count(attn.device.index or 0)
    _mlp_block_kernel[(grid,)](
        attn, wo, residual, res_mid, sumsq_mid, norm_w, wgu, act, wd, out, sumsq_out, counter, m, h, i, eps,
        BLOCK_M=o_cfg.block_m, BN_O=o_cfg.block_n, BK_O=o_cfg.block_k, ST_O=uniform_stages or o_cfg.num_stages,
        BN_GU=gu_cfg.block_n, BK_GU=gu_cfg.block_k, ST_GU=uniform_stages or gu_cfg.num_stages,
        BN_D=d_cfg.block_n, BK_D=d_cfg.block_k, ST_D=uniform_stages or d_cfg.num_stages,
        SPIN_LOAD=spin_load, PREFETCH=prefetch, num_warps=num_warps, num_stages=uniform_stages or 3)
    return out
