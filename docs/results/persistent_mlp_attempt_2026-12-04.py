"""Attempt, 2026-12-04 (session 19): a decode layer's o projection and MLP as one persistent Triton kernel with grid
barriers. Measured 9-16% slower than the three skinny kernels it would replace (docs/BENCHMARKS.md, "One persistent
kernel for the o projection and the MLP"), so not kept in the worker. It ran at commit bc75ddd, where it was
services/worker/mlp_block.py (below, first) and bench/mlp_block_bench.py (second), with skinny_gemm.py's tile body
split into `_weight_chunk` and `_tile` (that commit's skinny_gemm.py) so both kernels shared it:

    git checkout bc75ddd && python -m bench.mlp_block_bench --out mlp_block.json       # lent H200, carry ["alise/v1"]
"""

# ---- services/worker/mlp_block.py at bc75ddd ----
# """A decode layer's o projection and MLP as one persistent kernel (batches of at most 16 rows).
# 
# The skinny layers (skinny_gemm.py) run a layer's o, gate_up and down projections as three kernels. Each
# kernel's launch, ramp-up (the first weight loads in flight) and tail (the last column tiles draining) leave
# HBM idle for a few microseconds, and at batch 1-16 a layer's projections are only 13-60 us long, so those
# boundaries are a large share of the distance to the bandwidth floor (docs/BENCHMARKS.md, "Skinny-GEMM decode
# layers"). PDL (pdl.py) could not hide them: the next kernel's programs only become resident once the previous
# kernel's leave.
# 
# Here one program per SM stays resident through the three projections. Between them it waits at a grid-wide
# barrier (every program has written its tiles of the previous projection), but it reads the first K chunk of
# its next projection's weights *before* arriving: weights do not depend on the barrier, so HBM is busy while
# the slowest tiles finish. Same tiles, prologues and epilogues as skinny_gemm (its `_tile`), so results match
# the three-kernel path up to the order of the atomic sums of squares.
# 
# The barrier counter only ever grows (int64): a program arriving at it as number `old + 1` waits until the
# counter reaches the next multiple of the grid size, so it needs no reset between barriers, layers or steps,
# and never wraps. Every program must be resident at once, so the grid is at most one program per SM.
# """
# from __future__ import annotations
# 
# from functools import lru_cache
# 
# import torch
# 
# from services.worker.skinny_gemm import (MAX_ROWS, Epilogue, TileConfig, config_for, fit, skinny_gemm_on)
# 
# try:
#     import triton
#     import triton.language as tl
#     from services.worker.skinny_gemm import _tile, _weight_chunk
# except ImportError:
#     triton = None
# 
# 
# def mlp_block_on(device: torch.device) -> bool:
#     return skinny_gemm_on(device)
# 
# 
# @lru_cache(maxsize=None)
# def sm_count(index: int) -> int:
#     return torch.cuda.get_device_properties(index).multi_processor_count
# 
# 
# if triton is not None:
#     @triton.jit
#     def _grid_barrier(CTR, nprog, SPIN_LOAD: tl.constexpr):
#         """Wait until every program of the grid has arrived. One thread arrives for the program, so the CTA
#         barriers around it order the other threads' writes before the release and their reads after the acquire."""
#         tl.debug_barrier()
#         old = tl.atomic_add(CTR, 1, sem="acq_rel")
#         target = (old // nprog + 1) * nprog
#         seen = old + 1
#         while seen < target:
#             if SPIN_LOAD:
#                 seen = tl.load(CTR, volatile=True)
#             else:
#                 seen = tl.atomic_add(CTR, 0, sem="acquire")
#         if SPIN_LOAD:
#             tl.atomic_add(CTR, 0, sem="acquire")
#         tl.debug_barrier()
# 
#     @triton.jit
#     def _projection(A, W, OUT, R, SUMSQ_IN, NORM_W, SUMSQ_OUT, w, w_up, pid, nprog, M, N, K,
#                     stride_a, stride_w, stride_o, eps,
#                     NORM: tl.constexpr, EPILOGUE: tl.constexpr,
#                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
#         """This program's column tiles pid, pid + nprog, ...; (w, w_up) is the first one's first K chunk."""
#         for tile in range(pid, tl.cdiv(N, BLOCK_N), nprog):
#             _tile(A, W, OUT, R, SUMSQ_IN, NORM_W, SUMSQ_OUT, tile, w, w_up, M, N, K, stride_a, stride_w, stride_o,
#                   eps, NORM, EPILOGUE, False, BLOCK_M, BLOCK_N, BLOCK_K, STAGES)
#             w, w_up = _weight_chunk(W, tile + nprog, N, stride_w, 0, EPILOGUE, BLOCK_N, BLOCK_K)
# 
#     @triton.jit
#     def _mlp_block_kernel(ATTN, WO, RES_IN, RES_MID, SUMSQ_MID, NORM_W, WGU, ACT, WD, RES_OUT, SUMSQ_OUT, CTR,
#                           M, H, I, eps,
#                           BLOCK_M: tl.constexpr, BN_O: tl.constexpr, BK_O: tl.constexpr, ST_O: tl.constexpr,
#                           BN_GU: tl.constexpr, BK_GU: tl.constexpr, ST_GU: tl.constexpr,
#                           BN_D: tl.constexpr, BK_D: tl.constexpr, ST_D: tl.constexpr,
#                           SPIN_LOAD: tl.constexpr, PREFETCH: tl.constexpr):
#         pid = tl.program_id(0)
#         nprog = tl.num_programs(0)
#         # o projection: RES_MID = RES_IN + ATTN @ WO^T, its rows' sums of squares into SUMSQ_MID (zeroed by the
#         # qkv projection before, as in the skinny layers)
#         w, w_up = _weight_chunk(WO, pid, H, H, 0, 1, BN_O, BK_O)
#         _projection(ATTN, WO, RES_MID, RES_IN, SUMSQ_MID, NORM_W, SUMSQ_MID, w, w_up, pid, nprog, M, H, H,
#                     H, H, H, eps, False, 1, BLOCK_M, BN_O, BK_O, ST_O)
#         if pid == 0:       # read by this layer's qkv projection (done); the down projection accumulates into it
#             rm = tl.arange(0, BLOCK_M)
#             tl.store(SUMSQ_OUT + rm, tl.zeros((BLOCK_M,), dtype=tl.float32), mask=rm < M)
#         if PREFETCH:
#             w, w_up = _weight_chunk(WGU, pid, I, H, 0, 2, BN_GU, BK_GU)
#         _grid_barrier(CTR, nprog, SPIN_LOAD)
#         if not PREFETCH:
#             w, w_up = _weight_chunk(WGU, pid, I, H, 0, 2, BN_GU, BK_GU)
#         # gate_up: ACT = silu(gate) * up of rmsnorm(RES_MID) * NORM_W
#         _projection(RES_MID, WGU, ACT, RES_MID, SUMSQ_MID, NORM_W, SUMSQ_MID, w, w_up, pid, nprog, M, I, H,
#                     H, H, I, eps, True, 2, BLOCK_M, BN_GU, BK_GU, ST_GU)
#         if PREFETCH:
#             w, w_up = _weight_chunk(WD, pid, H, I, 0, 1, BN_D, BK_D)
#         _grid_barrier(CTR, nprog, SPIN_LOAD)
#         if not PREFETCH:
#             w, w_up = _weight_chunk(WD, pid, H, I, 0, 1, BN_D, BK_D)
#         # down: RES_OUT = RES_MID + ACT @ WD^T, its sums of squares into SUMSQ_OUT
#         _projection(ACT, WD, RES_OUT, RES_MID, SUMSQ_OUT, NORM_W, SUMSQ_OUT, w, w_up, pid, nprog, M, H, I,
#                     I, I, H, eps, False, 1, BLOCK_M, BN_D, BK_D, ST_D)
# 
# 
# def mlp_block_configs(m: int, h: int, i: int, device: torch.device) -> tuple[TileConfig, TileConfig, TileConfig]:
#     """Each projection's tuned skinny tiles, fitted to its K and to shared memory."""
#     name = torch.cuda.get_device_name(device)
#     return (fit(config_for(m, h, h, name), h), fit(config_for(m, i, h, name), h, w_tiles=2),
#             fit(config_for(m, h, i, name), i))
# 
# 
# def mlp_block(attn: torch.Tensor, wo: torch.Tensor, residual: torch.Tensor, sumsq_mid: torch.Tensor,
#               norm_w: torch.Tensor, eps: float, wgu: torch.Tensor, wd: torch.Tensor, sumsq_out: torch.Tensor,
#               counter: torch.Tensor, *, tiles: tuple[TileConfig, TileConfig, TileConfig] | None = None,
#               num_warps: int = 4, programs: int | None = None,
#               spin_load: bool = False, prefetch: bool = True, uniform_stages: int | None = None) -> torch.Tensor:
#     """The rest of a decode layer after attention, for attn [M, H] (M <= 16): returns the residual stream after
#     the MLP, whose rows' sums of squares are in sumsq_out [M]. sumsq_mid [M] must be zero (it gets the stream's
#     after the o projection); counter: an int64 [1] on the device, zero when first used, shared by every call."""
#     m, h = attn.shape
#     i = wd.shape[1]
#     assert m <= MAX_ROWS and attn.is_contiguous() and residual.is_contiguous() and counter.dtype == torch.int64
#     o_cfg, gu_cfg, d_cfg = tiles or mlp_block_configs(m, h, i, attn.device)
#     res_mid = torch.empty_like(residual)
#     act = torch.empty(m, i, dtype=wgu.dtype, device=attn.device)
#     out = torch.empty_like(residual)
#     grid = programs or sm_count(attn.device.index or 0)
#     _mlp_block_kernel[(grid,)](
#         attn, wo, residual, res_mid, sumsq_mid, norm_w, wgu, act, wd, out, sumsq_out, counter, m, h, i, eps,
#         BLOCK_M=o_cfg.block_m, BN_O=o_cfg.block_n, BK_O=o_cfg.block_k, ST_O=uniform_stages or o_cfg.num_stages,
#         BN_GU=gu_cfg.block_n, BK_GU=gu_cfg.block_k, ST_GU=uniform_stages or gu_cfg.num_stages,
#         BN_D=d_cfg.block_n, BK_D=d_cfg.block_k, ST_D=uniform_stages or d_cfg.num_stages,
#         SPIN_LOAD=spin_load, PREFETCH=prefetch, num_warps=num_warps, num_stages=uniform_stages or 3)
#     return out

# ---- bench/mlp_block_bench.py at bc75ddd ----
# """The persistent o + MLP kernel (services/worker/mlp_block.py) against the three skinny kernels it replaces.
# 
# A chain of decode layers without attention, on random bf16 weights of the Llama-3-8B shape, captured in one
# CUDA graph: per layer the qkv projection (norm prologue, as the skinny layers run it), then the o projection
# and the MLP either as three skinny kernels ("skinny3") or as one persistent kernel ("persistent", several
# launch settings). Enough layers that the weights cannot stay in L2. For each: the device time per layer, the
# weights' bytes over it (TB/s), and its ratio to the floor (bytes over the measured copy bandwidth); and the
# final residual stream's relative difference from skinny3's (the sums of squares are added atomically in a
# varying order, so not bit-identical).
# 
#     python -m bench.mlp_block_bench --out mlp_block.json
# """
# from __future__ import annotations
# 
# import argparse
# import json
# from pathlib import Path
# 
# import torch
# 
# from bench.engine_bench import device_ceilings
# from bench.skinny_gemm_bench import graph_time_us, rel_err
# from services.worker.mlp_block import mlp_block, mlp_block_configs, sm_count
# from services.worker.skinny_gemm import Epilogue, skinny_linear
# 
# H, I, QKV = 4096, 14336, 6144
# EPS = 1e-5
# 
# 
# def layer_weights(layers: int, device) -> list[dict]:
#     rnd = lambda *s: torch.randn(*s, device=device, dtype=torch.bfloat16) * 0.02      # noqa: E731
#     return [{"qkv": rnd(QKV, H), "o": rnd(H, H), "gate_up": rnd(2 * I, H), "down": rnd(H, I),
#              "n1": 1 + rnd(H), "n2": 1 + rnd(H)} for _ in range(layers)]
# 
# 
# class Chain:
#     """Layers' buffers: attn (the o projection's input, fixed), the residual stream and its sums of squares."""
# 
#     def __init__(self, m: int, device):
#         gen = torch.Generator(device=device).manual_seed(m)      # the same inputs for every variant
#         self.attn = torch.randn(m, H, device=device, dtype=torch.bfloat16, generator=gen)
#         self.h = torch.randn(m, H, device=device, dtype=torch.bfloat16, generator=gen)
#         self.sumsq = torch.zeros(2, m, device=device)
#         self.counter = torch.zeros(1, dtype=torch.int64, device=device)
#         self.out = self.h
# 
#     def start(self):
#         self.sumsq[1] = self.h.float().pow(2).sum(1)
#         self.residual = self.h
# 
#     def qkv(self, w):
#         return skinny_linear(self.residual, w["qkv"], sumsq_in=self.sumsq[1], norm_w=w["n1"], eps=EPS,
#                              zero=self.sumsq[0])
# 
#     def skinny3(self, w):
#         self.qkv(w)
#         s = self.sumsq
#         self.residual = skinny_linear(self.attn, w["o"], epilogue=Epilogue.RESIDUAL, residual=self.residual,
#                                       sumsq_out=s[0])
#         act = skinny_linear(self.residual, w["gate_up"], epilogue=Epilogue.SILU_MUL, sumsq_in=s[0], norm_w=w["n2"],
#                             eps=EPS, zero=s[1])
#         self.residual = skinny_linear(act, w["down"], epilogue=Epilogue.RESIDUAL, residual=self.residual,
#                                       sumsq_out=s[1])
# 
#     def persistent(self, w, **launch):
#         self.qkv(w)
#         self.residual = mlp_block(self.attn, w["o"], self.residual, self.sumsq[0], w["n2"], EPS, w["gate_up"],
#                                   w["down"], self.sumsq[1], self.counter, **launch)
# 
# 
# def time_variant(weights, m, device, step) -> tuple[float, torch.Tensor]:
#     """(us per layer, the final residual of one un-graphed pass)."""
#     chain = Chain(m, device)
#     chain.start()
#     for w in weights:
#         step(chain, w)
#     result = chain.residual.clone()
# 
#     def layer(i):
#         if i == 0:
#             chain.start()
#         step(chain, weights[i])
#     return graph_time_us(layer, len(weights)), result
# 
# 
# def main() -> None:
#     p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
#     p.add_argument("--out", type=Path, default=Path("mlp_block_bench.json"))
#     p.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16])
#     p.add_argument("--layers", type=int, default=8)
#     args = p.parse_args()
#     device = torch.device("cuda")
#     torch.manual_seed(0)
#     ceilings = device_ceilings()
#     weights = layer_weights(args.layers, device)
#     layer_bytes = sum(t.numel() * t.element_size() for k, t in weights[0].items() if k not in ("n1", "n2"))
#     floor_us = layer_bytes / ceilings["copy_bw"] * 1e6
#     sms = sm_count(device.index or 0)
#     print(f"copy bw {ceilings['copy_bw'] / 1e12:.2f} TB/s, {sms} SMs, layer weights {layer_bytes / 1e6:.0f} MB, "
#           f"floor {floor_us:.1f} us/layer", flush=True)
#     rows = []
#     for m in args.rows:
#         base_us, base = time_variant(weights, m, device, Chain.skinny3)
#         rows.append({"m": m, "variant": "skinny3", "us_per_layer": base_us, "ratio_to_floor": base_us / floor_us})
#         print(f"m={m:<3} skinny3                                      {base_us:7.1f} us/layer  {base_us / floor_us:.3f}x floor",
#               flush=True)
#         tiles = mlp_block_configs(m, H, I, device)
#         variants = {"w4 tuned stages": dict(num_warps=4), "w8 tuned stages": dict(num_warps=8),
#                     "w4 tuned stages, load spin": dict(num_warps=4, spin_load=True),
#                     "w4 tuned stages, no prefetch": dict(num_warps=4, prefetch=False),
#                     "w4 4 stages everywhere": dict(num_warps=4, uniform_stages=4)}
#         for label, launch in variants.items():
#             launch = dict(launch, tiles=tiles)
#             name = f"persistent {label}"
#             try:
#                 us, out = time_variant(weights, m, device, lambda c, w: c.persistent(w, **launch))
#             except Exception as e:          # a launch setting over the SM's resources: say so and go on
#                 print(f"m={m:<3} {name:<44} failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
#                 rows.append({"m": m, "variant": name, "error": f"{type(e).__name__}: {e}"[:300]})
#                 continue
#             err = rel_err(out, base)
#             rows.append({"m": m, "variant": name, "us_per_layer": us, "ratio_to_floor": us / floor_us,
#                          "rel_err_vs_skinny3": err})
#             print(f"m={m:<3} {name:<44} {us:7.1f} us/layer  {us / floor_us:.3f}x floor  "
#                   f"({us / base_us:.3f}x skinny3, rel err {err:.1e})", flush=True)
#     args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "ceilings": ceilings,
#                                     "layer_bytes": layer_bytes, "floor_us_per_layer": floor_us, "sms": sms,
#                                     "rows": rows}, indent=1))
# 
# 
# if __name__ == "__main__":
#     main()
