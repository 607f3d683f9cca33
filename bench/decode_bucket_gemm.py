"""Why do decode steps of 417-448 rows cost ~3.5 ms more than the linear step model says, when those of 401-416 rows
cost 1.5 ms less (docs/BENCHMARKS.md, session 32)? Such steps run the 448-row CUDA graph (max batch 416 + 32 early
rows), and padding cannot explain it (417 rows pay what 448 pay). Past the skinny kernel's 32 rows the decode
layers' projections are cuBLAS GEMMs, whose algorithm is chosen by M: this times each projection of the Llama-3-8B
shape at the decode graphs' bucket sizes, every copy on its own weights (as 32 layers are: nothing is read from
L2 twice), in a CUDA graph, microseconds per GEMM.

    python -m bench.decode_bucket_gemm --rows 384 416 448 480 512 --out decode_bucket_gemm.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bench.skinny_gemm_bench import graph_time_us

# (name, N, K) of one decode layer's projections and the head, Llama-3-8B shape
SHAPES = (("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336),
          ("lm_head", 128256, 4096))
COPIES = 8


def time_shape(n: int, k: int, rows: list[int], replays: int) -> dict[int, float]:
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(COPIES)]
    out = {}
    for m in rows:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        out[m] = round(graph_time_us(lambda i: x @ weights[i].T, COPIES, replays), 2)
    del weights
    torch.cuda.empty_cache()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[384, 400, 416, 417, 432, 448, 480, 512])
    p.add_argument("--replays", type=int, default=20)
    p.add_argument("--out", default="decode_bucket_gemm.json")
    a = p.parse_args()
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "us_per_gemm": {}}
    for name, n, k in SHAPES:
        results["us_per_gemm"][name] = timed = time_shape(n, k, a.rows, a.replays)
        print(name, json.dumps(timed), flush=True)
    # one decode step's projections: 32 layers of the four, and the head once
    per_step = {m: round((32 * sum(results["us_per_gemm"][s][m] for s in ("qkv", "o", "gate_up", "down"))
                          + results["us_per_gemm"]["lm_head"][m]) / 1e3, 3) for m in a.rows}
    results["ms_per_step"] = per_step
    print("ms per step", json.dumps(per_step), flush=True)
    Path(a.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
