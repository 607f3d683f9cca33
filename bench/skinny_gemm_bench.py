"""Skinny-GEMM kernels (services/worker/skinny_gemm.py): check them, tune their tiles, time them against cuBLAS.

For the Llama-3-8B projections (qkv, o, gate_up, down, lm_head) at decode row counts:
- check: each prologue / epilogue against torch (the plain path's own ops) on random data, and with K split in 4
  against no split;
- tune: every tile config in a small grid, timed as the decode layers call it (with its prologue and epilogue),
  inside a CUDA graph over enough weight copies that they cannot sit in L2 (as in a real step, where each
  kernel reads a new weight); the best per (shape, row tile) is written to skinny_gemm_configs.json under this
  device's name (--write) and printed beside the cuBLAS GEMM alone (without the norm / SiLU / residual
  kernels the skinny kernel absorbs). The short projections (SPLIT_SHAPES) also try tiles that split K
  (SPLIT_GRID); --split-only times just those and the tile tuned now (a shorter run).

    python -m bench.skinny_gemm_bench --tune --write --out skinny.json
    python -m bench.skinny_gemm_bench --tune --split-only --shapes qkv o down --rows 1 16 32 --write --out skinny.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from services.worker.fused_ops import rmsnorm_torch
from services.worker import pdl
from services.worker.skinny_gemm import (MAX_ROWS, SHARED_MEMORY_BYTES, TUNED_CONFIGS, Epilogue, TileConfig,
                                        block_m_for, config_for, shared_memory, skinny_counts, skinny_linear)

# output width N (for gate_up: the activation's, half the weight's rows) and K
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (14336, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}
ROWS = (1, 16)
GRID = [(bn, bk, warps, stages, 1) for bn, bk, warps, stages in
        itertools.product((32, 64, 128), (128, 256, 512), (4, 8), (3, 4, 5)) if warps == 4 or bn >= 64]
# projections with too few column tiles to give each of the 132 SMs loads in flight (64-192) also try K split in
# 2 or 4 (each program one slice; the tile's last one adds the partial sums and runs the epilogue)
SPLIT_SHAPES = ("qkv", "o", "down")
SPLIT_GRID = list(itertools.product((32, 64), (128, 256), (4,), (3, 4), (2, 4)))
L2_FLUSH_BYTES = 400 << 20


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-30)).item()


CHECK_TOLERANCE = 1e-2     # relative; bf16 rounding is ~4e-3 (cuBLAS bf16 against fp32: 2.7-3.1e-3)


def check_failures(checks: dict) -> list[str]:
    """The errors over tolerance and the buffers not zeroed / counters not reset, as 'mode m=rows key=value'."""
    failed = []
    for mode, rows in checks.items():
        for m, row in rows.items():
            for key, v in row.items():
                error = isinstance(v, float) and key != "cublas_vs_fp32"      # that one is the scale, not a check
                if v is False or (error and not v <= CHECK_TOLERANCE):
                    failed.append(f"{mode} m={m} {key}={v}")
    return failed


def check(device) -> dict:
    """Max relative error of each variant against the plain torch ops, of cuBLAS bf16 against fp32 (scale), and of
    each variant with K split in 4 against no split (bf16 rounding of other fp32 sums: ~1 bf16 ulp)."""
    gen = torch.Generator(device=device).manual_seed(0)
    counts = skinny_counts(device)
    out = {}
    n, k, eps = 1000, 4096, 1e-5        # 1000: the last column tile is partial (masked stores, partial sums)
    for m in (1, 5, 16, 64):        # 64: the largest tile skinny_linear takes (MAX_TILE_ROWS)
        rnd = lambda *s: torch.randn(*s, generator=gen, device=device, dtype=torch.bfloat16)    # noqa: E731
        w, x, r, nw = rnd(n, k) * 0.02, rnd(m, k), rnd(m, n), rnd(k) * 0.1 + 1
        ref = F.linear(x, w)
        row = {"plain": rel_err(skinny_linear(x, w), ref),
               "cublas_vs_fp32": rel_err(ref, x.float() @ w.float().T)}
        sumsq = x.float().pow(2).sum(1)
        row["norm"] = rel_err(skinny_linear(x, w, sumsq_in=sumsq, norm_w=nw, eps=eps),
                              F.linear(rmsnorm_torch(x, nw, eps)[0], w))
        gate_up = F.linear(x, w)
        row["silu_mul"] = rel_err(skinny_linear(x, w, epilogue=Epilogue.SILU_MUL),
                                  F.silu(gate_up[:, :n // 2]) * gate_up[:, n // 2:])
        acc, zero = torch.zeros(m, device=device), torch.full((m,), 7.0, device=device)
        new = skinny_linear(x, w, epilogue=Epilogue.RESIDUAL, residual=r, sumsq_out=acc, zero=zero)
        ref_new = ref + r
        row["residual"] = rel_err(new, ref_new)
        row["residual_sumsq"] = rel_err(acc, ref_new.float().pow(2).sum(1))
        row["zeroed"] = bool((zero == 0).all())
        # K in 4 slices, in 128-wide chunks (256 overflows shared memory at 64 rows)
        split = dict(config=TileConfig(block_m_for(m), 32, 128, 4, 3, 4), counts=counts)
        row["split_norm"] = rel_err(skinny_linear(x, w, sumsq_in=sumsq, norm_w=nw, eps=eps, **split),
                                    skinny_linear(x, w, sumsq_in=sumsq, norm_w=nw, eps=eps))
        row["split_silu_mul"] = rel_err(skinny_linear(x, w, epilogue=Epilogue.SILU_MUL, **split),
                                        skinny_linear(x, w, epilogue=Epilogue.SILU_MUL))
        acc_split = torch.zeros(m, device=device)
        row["split_residual"] = rel_err(skinny_linear(x, w, epilogue=Epilogue.RESIDUAL, residual=r,
                                                      sumsq_out=acc_split, **split), new)
        row["split_sumsq"] = rel_err(acc_split, acc)
        row["counters_reset"] = not bool(counts.any())
        out[m] = row
        print(f"check m={m}: " + ", ".join(f"{key} {v:.2e}" if isinstance(v, float) else f"{key} {v}"
                                             for key, v in row.items()), flush=True)
    return out


def graph_time_us(fn, copies: int, replays: int = 10) -> float:
    """Median device time of fn(i) for i in range(copies), captured in one CUDA graph, per call."""
    for i in range(copies):
        fn(i)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for i in range(copies):
                fn(i)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / copies)
    return statistics.median(times)


def as_in_a_layer(name: str, m: int, n: int, k: int, device, counts: torch.Tensor):
    """The call the decode layers make for projection `name` (model_runner._layers_skinny) on random data, and
    the cuBLAS GEMM alone that it replaces: (skinny(w, cfg), cublas(w)). For gate_up, w has 2N rows."""
    rnd = lambda *s: torch.randn(*s, device=device, dtype=torch.bfloat16)       # noqa: E731
    x, sumsq, nw, buf = rnd(m, k), torch.rand(m, device=device) * k, rnd(k), torch.zeros(m, device=device)
    # past MAX_ROWS the norm prologue costs more than a norm kernel: those rows are timed without it
    norm = dict(sumsq_in=sumsq, norm_w=nw, eps=1e-5) if m <= MAX_ROWS else {}
    cublas = lambda w: F.linear(x, w)                                              # noqa: E731
    if name == "qkv":
        return lambda w, cfg: skinny_linear(x, w, **norm, zero=buf, config=cfg, counts=counts), cublas
    if name == "gate_up":
        return lambda w, cfg: skinny_linear(x, w, epilogue=Epilogue.SILU_MUL, **norm, zero=buf, config=cfg,
                                            counts=counts), cublas
    if name == "lm_head":
        return lambda w, cfg: skinny_linear(x, w, **norm, out_dtype=torch.float32, config=cfg, counts=counts), cublas
    r = rnd(m, n)       # o, down: the residual epilogue
    return lambda w, cfg: skinny_linear(x, w, epilogue=Epilogue.RESIDUAL, residual=r, sumsq_out=buf, config=cfg,
                                        counts=counts), cublas


def tiles_to_try(name: str, m: int, n: int, k: int, split_only: bool) -> list[tuple]:
    """The tile tuned now, the grid (unless split_only) and, for SPLIT_SHAPES, the split-K grid."""
    now = tuple(config_for(m, n, k, torch.cuda.get_device_name())[1:])
    tiles = [now, (*now[:4], 1), *([] if split_only else GRID), *(SPLIT_GRID if name in SPLIT_SHAPES else [])]
    return list(dict.fromkeys(tiles))


def tune(device, rows_to_time=ROWS, shapes=tuple(SHAPES), split_only: bool = False) -> tuple[dict, list]:
    best: dict[str, dict[str, list]] = {}
    rows = []
    counts = skinny_counts(device)
    for name in shapes:
        n, k = SHAPES[name]
        w_tiles = 2 if name == "gate_up" else 1
        nbytes = w_tiles * n * k * 2
        copies = max(2, -(-L2_FLUSH_BYTES // nbytes))
        weights = [torch.randn(w_tiles * n, k, device=device, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        for m in rows_to_time:
            skinny, cublas_call = as_in_a_layer(name, m, n, k, device, counts)
            cublas = graph_time_us(lambda i: cublas_call(weights[i]), copies)
            timings = []
            for bn, bk, warps, stages, split in tiles_to_try(name, m, n, k, split_only):
                cfg = TileConfig(block_m_for(m), bn, bk, warps, stages, split)
                if (k // split) % bk or shared_memory(cfg, w_tiles) > SHARED_MEMORY_BYTES:
                    continue
                try:
                    us = graph_time_us(lambda i: skinny(weights[i], cfg), copies)
                except Exception as e:      # out of shared memory / registers for this tile: skip it
                    print(f"  {name} m={m} {cfg}: {type(e).__name__}", flush=True)
                    continue
                timings.append((us, cfg))
            us, cfg = min(timings)
            # all ROWS share one row tile (padding rows are masked, not read): the last, fullest one decides
            best.setdefault(f"{n}x{k}", {})[str(cfg.block_m)] = list(cfg[1:])
            unsplit = min((t for t in timings if t[1].split_k == 1), default=(float("nan"), None))
            row = {"shape": name, "n": n, "k": k, "m": m, "skinny_us": us, "config": list(cfg),
                   "best_unsplit_us": unsplit[0], "best_unsplit_config": list(unsplit[1] or []),
                   "skinny_tb_s": nbytes / us / 1e6, "cublas_us": cublas, "cublas_tb_s": nbytes / cublas / 1e6}
            rows.append(row)
            print(f"{name:>8} m={m:<3} skinny {us:8.1f} us {row['skinny_tb_s']:.2f} TB/s {tuple(cfg)}   "
                  f"cublas {cublas:8.1f} us {row['cublas_tb_s']:.2f} TB/s   ratio {us / cublas:.3f}   "
                  f"best unsplit {unsplit[0]:8.1f} us", flush=True)
        del weights
    return best, rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tune", action="store_true")
    p.add_argument("--write", action="store_true", help=f"merge the tuned tiles into {TUNED_CONFIGS.name}")
    p.add_argument("--out", type=Path, default=Path("skinny_gemm_bench.json"))
    p.add_argument("--rows", type=int, nargs="+", default=list(ROWS),
                   help="decode rows to tune and time (rows of one row tile share its config)")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--split-only", action="store_true", help="time only the tile tuned now and the split-K grid")
    a = p.parse_args()
    device = torch.device("cuda")
    # the decode layers launch the skinny kernels with PDL (model_runner.skinny_pdl): checked and timed both ways
    res = {"device": torch.cuda.get_device_name(), "check": {}}
    for on in (False, True):
        with pdl.forced(on):
            res["check"]["pdl" if on else "no-pdl"] = check(device)
    failed = check_failures(res["check"])
    if a.tune:
        with pdl.forced(True):
            res["tuned"], res["rows"] = tune(device, a.rows, a.shapes, a.split_only)
        if a.write and not failed:       # the shapes and row tiles tuned now replace theirs; the rest stays
            table = json.loads(TUNED_CONFIGS.read_text()) if TUNED_CONFIGS.exists() else {}
            for shape, by_rows in res["tuned"].items():
                table.setdefault(res["device"], {}).setdefault(shape, {}).update(by_rows)
            TUNED_CONFIGS.write_text(json.dumps(table, sort_keys=True).replace('}, "', '},\n "') + "\n")
    a.out.write_text(json.dumps(res, indent=2))
    if failed:          # after the JSON is written; a tile table is never written from kernels that failed a check
        raise SystemExit(f"failed checks: {', '.join(failed)}")


if __name__ == "__main__":
    main()
