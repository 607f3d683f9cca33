"""The decode-attention kernel alone (attention.paged_decode_rope: rotary, KV write, attention, split merge) at the
Llama-3-8B shape, against the bandwidth floor of the KV it reads, for its tuning knobs: context splits, cache blocks
per online-softmax chunk, warps.

A chain of 32 launches (one per layer, each on its own cache layer and qkv rows, as in a decode step, so nothing is
served from L2 that a step would not find there) is captured in a CUDA graph; the replay's device time / 32 is the
time a layer. The floor is the layer's KV bytes (batch x context x KV heads x dim x 2 (K and V) x 2 bytes) over the
copy bandwidth measured in the same run. Each variant's output is checked against the default's (same inputs), and
first a context whose blocks lie past 2^31 elements of a layer's pool against the torch reference (no int32 wrap).

    python -m bench.decode_attention_bench --out decode_attention.json
"""
from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch

from bench.engine_bench import device_ceilings
from bench.skinny_gemm_bench import graph_time_us
from services.worker.attention import chunk_tokens, num_splits, paged_decode_rope

LAYERS, HEADS, KV, DIM, BLOCK = 32, 32, 8, 128, 16


class Case:
    """`batch` sequences of `ctx` tokens (the new one last) with random caches in every layer, shuffled blocks."""

    def __init__(self, batch: int, ctx: int):
        gen = torch.Generator(device="cuda").manual_seed(batch * 7919 + ctx)
        width = -(-ctx // BLOCK)
        blocks = batch * width
        self.k = torch.randn(LAYERS, blocks * BLOCK, KV, DIM, generator=gen, device="cuda").to(torch.bfloat16)
        self.v = torch.randn(LAYERS, blocks * BLOCK, KV, DIM, generator=gen, device="cuda").to(torch.bfloat16)
        self.tables = torch.randperm(blocks, generator=gen, device="cuda").view(batch, width).int()
        self.lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        last = ctx - 1
        self.slots = (self.tables[:, last // BLOCK] * BLOCK + last % BLOCK).long()
        self.qkv = torch.randn(LAYERS, batch, (HEADS + 2 * KV) * DIM, generator=gen, device="cuda").to(torch.bfloat16)
        pos = torch.full((batch,), float(last), device="cuda")
        inv = 1.0 / 500000 ** (torch.arange(0, DIM, 2, device="cuda").float() / DIM)
        ang = torch.cat((pos[:, None] * inv, pos[:, None] * inv), -1)
        self.cos, self.sin = ang.cos().to(torch.bfloat16), ang.sin().to(torch.bfloat16)
        self.counts = torch.zeros(max(batch * KV, 1), dtype=torch.int32, device="cuda")   # splits forced at any batch
        self.batch, self.ctx = batch, ctx

    def layer(self, i: int, **knobs) -> torch.Tensor:
        return paged_decode_rope(self.qkv[i], HEADS, self.cos, self.sin, self.slots, self.k[i], self.v[i], self.tables,
                                 self.lens, BLOCK, DIM ** -0.5, self.counts, **knobs)

    def time_us(self, replays: int = 20, **knobs) -> tuple[float, torch.Tensor]:
        """Per-layer device time of the 32-launch chain, and layer 0's output."""
        us = graph_time_us(lambda i: self.layer(i, **knobs), LAYERS, replays)
        return us, self.layer(0, **knobs).clone()


def check_pool_past_int32() -> dict:
    """A sequence whose blocks lie past 2^31 elements into a layer's pool (a small model given most of a large GPU):
    the kernels' KV offsets must not wrap. Both decode paths against the torch reference, on one 4.3-GB layer."""
    from services.worker.attention import paged_decode_reference, paged_decode_triton

    slots = (1 << 31) // (KV * DIM) + 64 * BLOCK                          # 2^31 elements and 64 blocks more
    gen = torch.Generator(device="cuda").manual_seed(5)
    k, v = (torch.empty(slots, KV, DIM, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    last = slots // BLOCK - 1
    tables = torch.arange(last - 39, last + 1, device="cuda", dtype=torch.int32).flip(0).view(1, 40)   # 640 tokens
    for pool in (k, v):
        pool[tables[0, -1].item() * BLOCK:] = torch.randn(slots - tables[0, -1].item() * BLOCK, KV, DIM,
                                                          generator=gen, device="cuda").to(torch.bfloat16)
    lens = torch.tensor([640], dtype=torch.int32, device="cuda")
    q = torch.randn(1, HEADS, DIM, generator=gen, device="cuda").to(torch.bfloat16)
    ref = paged_decode_reference(q, k, v, tables, lens, BLOCK, DIM ** -0.5).float()
    out = paged_decode_triton(q, k, v, tables, lens, BLOCK, DIM ** -0.5).float()
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    return {"pool_elements": slots * KV * DIM, "rel_err": err, "ok": bool(err < 0.02)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("decode_attention.json"))
    p.add_argument("--batches", type=int, nargs="*", default=[1, 8, 16, 32, 64])
    p.add_argument("--contexts", type=int, nargs="*", default=[512, 2048])
    p.add_argument("--check-only", action="store_true", help="the large-pool check, no timings")
    a = p.parse_args()
    bw = device_ceilings()["copy_bw"]
    res = {"device": torch.cuda.get_device_name(), "copy_bw": bw, "cases": [], "large_pool": check_pool_past_int32()}
    print("a context past 2^31 elements of a layer's pool:", res["large_pool"], flush=True)
    torch.cuda.empty_cache()
    with torch.inference_mode():
        for ctx, batch in itertools.product([] if a.check_only else a.contexts, a.batches):
            case = Case(batch, ctx)
            floor_us = batch * ctx * KV * DIM * 2 * 2 / bw * 1e6
            auto = num_splits(batch, KV)
            base_us, ref = case.time_us()
            row = {"ctx": ctx, "batch": batch, "floor_us": floor_us, "auto_splits": auto, "default_us": base_us,
                   "variants": []}
            for splits, per_iter, warps in itertools.product(sorted({1, 2, 4, 8, 16, auto}), (2, 4, 8), (4, 8)):
                us, out = case.time_us(splits=splits, blocks_per_iter=per_iter, num_warps=warps)
                err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                row["variants"].append({"splits": splits, "blocks_per_iter": per_iter, "num_warps": warps, "us": us,
                                        "rel_err": err})
            best = min(row["variants"], key=lambda v: v["us"])
            res["cases"].append(row)
            print(f"ctx {ctx:5} batch {batch:3}: floor {floor_us:6.2f} us, default ({auto} splits, "
                  f"{chunk_tokens(batch * KV * auto) // BLOCK} blocks, 4 warps) "
                  f"{base_us:6.2f} us ({base_us / floor_us:.2f}x); best {best['us']:6.2f} us ({best['us'] / floor_us:.2f}x) "
                  f"at {best['splits']} splits, {best['blocks_per_iter']} blocks, {best['num_warps']} warps; "
                  f"worst rel err {max(v['rel_err'] for v in row['variants']):.1e}", flush=True)
            del case
            torch.cuda.empty_cache()
    a.out.write_text(json.dumps(res, indent=2))
    if not res["large_pool"]["ok"]:
        raise SystemExit("the decode kernel read the wrong KV past 2^31 elements of the pool")


if __name__ == "__main__":
    main()
