"""Does the order of a decode step's rows change its attention time? The decode kernel runs one program per
(sequence, KV head), launched in row order; a program's time grows with its context. With a batch of mixed
contexts, long ones launched last finish after the rest (a tail the GPU spends partly idle), long ones launched
first overlap the short ones (longest-processing-time-first).

Contexts come from a live run's per-request CSV (prompt tokens plus a uniform share of the output, as a batch
caught mid-flight holds them), `--batch` of them; the same contexts are timed in the order drawn, shortest first and
longest first: the decode kernel alone (attention.paged_decode_rope), a chain of `LAYERS` launches on separate cache
layers captured in a CUDA graph, device time per layer. Outputs are checked equal row by row across the orders.

    python -m bench.decode_row_order --runs docs/results/h100_chat_2026-12-06_s30/L48/alise-r48.csv.xz --out order.json
"""
from __future__ import annotations

import argparse
import csv
import json
import lzma
import random
from pathlib import Path

import torch

from bench.skinny_gemm_bench import graph_time_us
from services.worker.attention import paged_decode_rope

# 4 cache layers of ~1 GB: no layer's reads are served from L2 by the layer before (a block two rows share is
# read twice within a layer: that is what bench/decode_batch_order.py measures)
LAYERS, HEADS, KV, DIM, BLOCK = 4, 32, 8, 128, 16


def run_rows(path: str) -> list[dict]:
    """A live run's per-request CSV (.csv or .csv.xz): the rows of requests served."""
    opener = lzma.open if path.endswith(".xz") else open
    with opener(path, "rt") as f:
        return [r for r in csv.DictReader(f) if r["ok"] == "True"]


def contexts_from_run(path: str, batch: int, seed: int) -> list[int]:
    """`batch` contexts of requests of a run: prompt + a uniform share of the output (at least one token)."""
    rows = [(int(r["prompt_tokens"]), int(r["output_tokens"])) for r in run_rows(path)]
    rng = random.Random(seed)
    return [p + rng.randint(1, max(1, o)) for p, o in rng.sample(rows, batch)]


class Batch:
    """Random caches for sequences of the given contexts (the new token last), shuffled blocks, every layer.
    shares[row] = (parent, n): the row's first n blocks are the parent row's (a prefix-cache hit, parent < row,
    n below the row's own last block, which its new token is written to); (-1, 0) for none."""

    def __init__(self, ctx: list[int], seed: int = 0, shares: list[tuple[int, int]] | None = None):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        shares = shares or [(-1, 0)] * len(ctx)
        widths = [-(-c // BLOCK) for c in ctx]
        own = [w - n for w, (_, n) in zip(widths, shares)]
        blocks, width = sum(own), max(widths)
        self.k = torch.randn(LAYERS, blocks * BLOCK, KV, DIM, generator=gen, device="cuda").to(torch.bfloat16)
        self.v = torch.randn(LAYERS, blocks * BLOCK, KV, DIM, generator=gen, device="cuda").to(torch.bfloat16)
        perm = torch.randperm(blocks, generator=gen, device="cuda").int()
        self.tables = torch.zeros(len(ctx), width, dtype=torch.int32, device="cuda")
        at = 0
        for row, (w, (parent, n)) in enumerate(zip(widths, shares)):
            assert n < w and (n == 0 or 0 <= parent < row), (row, parent, n, w)
            if n:
                self.tables[row, :n] = self.tables[parent, :n]
            self.tables[row, n:w] = perm[at:at + w - n]
            at += w - n
        rows = (HEADS + 2 * KV) * DIM
        self.qkv = torch.randn(LAYERS, len(ctx), rows, generator=gen, device="cuda").to(torch.bfloat16)
        self.ctx = ctx


class Ordered:
    """The batch with its rows launched in the order `rows` (a permutation of its row ids)."""

    def __init__(self, batch: Batch, rows: list[int]):
        idx = torch.tensor(rows, device="cuda")
        self.b, self.idx = batch, idx
        self.tables = batch.tables[idx].contiguous()
        self.lens = torch.tensor([batch.ctx[r] for r in rows], dtype=torch.int32, device="cuda")
        last = self.lens.long() - 1
        self.slots = self.tables.gather(1, (last // BLOCK)[:, None])[:, 0].long() * BLOCK + last % BLOCK
        pos = last.float()
        inv = 1.0 / 500000 ** (torch.arange(0, DIM, 2, device="cuda").float() / DIM)
        ang = torch.cat((pos[:, None] * inv, pos[:, None] * inv), -1)
        self.cos, self.sin = ang.cos().to(torch.bfloat16), ang.sin().to(torch.bfloat16)
        self.qkv = batch.qkv[:, idx].contiguous()
        self.counts = torch.zeros(len(rows) * KV, dtype=torch.int32, device="cuda")

    def layer(self, i: int) -> torch.Tensor:
        return paged_decode_rope(self.qkv[i], HEADS, self.cos, self.sin, self.slots, self.b.k[i], self.b.v[i],
                                 self.tables, self.lens, BLOCK, DIM ** -0.5, self.counts)

    def time_us(self, replays: int) -> float:
        return graph_time_us(self.layer, LAYERS, replays)

    def output_by_row(self) -> torch.Tensor:
        """Layer 0's output, rows put back in the batch's own order."""
        out = self.layer(0)
        back = torch.empty_like(out)
        back[self.idx] = out
        return back


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, help="live runs' per-request CSVs (.csv or .csv.xz)")
    p.add_argument("--batch", type=int, nargs="+", default=[256, 416])
    p.add_argument("--replays", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="decode_row_order.json")
    a = p.parse_args()
    results = []
    for path in a.runs:
        for batch in a.batch:
            ctx = contexts_from_run(path, batch, a.seed)
            b = Batch(ctx, a.seed)
            drawn = list(range(batch))
            orders = {"drawn": drawn, "shortest_first": sorted(drawn, key=ctx.__getitem__),
                      "longest_first": sorted(drawn, key=lambda r: -ctx[r])}
            timed, ref = {}, None
            for name, rows in orders.items():
                o = Ordered(b, rows)
                out = o.output_by_row()
                if ref is None:
                    ref = out
                else:      # the same rows, launched in another order: the same numbers (the KV written again is equal)
                    torch.testing.assert_close(out, ref, rtol=0, atol=0)
                timed[name] = o.time_us(a.replays)
            row = {"run": path, "batch": batch, "context_mean": sum(ctx) / batch, "context_max": max(ctx),
                   "us_per_layer": timed}
            print(json.dumps(row), flush=True)
            results.append(row)
            del b
            torch.cuda.empty_cache()
    Path(a.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
