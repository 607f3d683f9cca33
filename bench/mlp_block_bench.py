"""The persistent o + MLP kernel (services/worker/mlp_block.py) against the three skinny kernels it replaces.

A chain of decode layers without attention, on random bf16 weights of the Llama-3-8B shape, captured in one
CUDA graph: per layer the qkv projection (norm prologue, as the skinny layers run it), then the o projection
and the MLP either as three skinny kernels ("skinny3") or as one persistent kernel ("persistent", several
launch settings). Enough layers that the weights cannot stay in L2. For each: the device time per layer, the
weights' bytes over it (TB/s), and its ratio to the floor (bytes over the measured copy bandwidth); and the
final residual stream's relative difference from skinny3's (the sums of squares are added atomically in a
varying order, so not bit-identical).

    python -m bench.mlp_block_bench --out mlp_block.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bench.engine_bench import device_ceilings
from bench.skinny_gemm_bench import graph_time_us, rel_err
from services.worker.mlp_block import mlp_block, mlp_block_configs, sm_count
from services.worker.skinny_gemm import Epilogue, skinny_linear

H, I, QKV = 4096, 14336, 6144
EPS = 1e-5


def layer_weights(layers: int, device) -> list[dict]:
    rnd = lambda *s: torch.randn(*s, device=device, dtype=torch.bfloat16) * 0.02      # noqa: E731
    return [{"qkv": rnd(QKV, H), "o": rnd(H, H), "gate_up": rnd(2 * I, H), "down": rnd(H, I),
             "n1": 1 + rnd(H), "n2": 1 + rnd(H)} for _ in range(layers)]


class Chain:
    """Layers' buffers: attn (the o projection's input, fixed), the residual stream and its sums of squares."""

    def __init__(self, m: int, device):
        gen = torch.Generator(device=device).manual_seed(m)      # the same inputs for every variant
        self.attn = torch.randn(m, H, device=device, dtype=torch.bfloat16, generator=gen)
        self.h = torch.randn(m, H, device=device, dtype=torch.bfloat16, generator=gen)
        self.sumsq = torch.zeros(2, m, device=device)
        self.counter = torch.zeros(1, dtype=torch.int64, device=device)
        self.out = self.h

    def start(self):
        self.sumsq[1] = self.h.float().pow(2).sum(1)
        self.residual = self.h

    def qkv(self, w):
        return skinny_linear(self.residual, w["qkv"], sumsq_in=self.sumsq[1], norm_w=w["n1"], eps=EPS,
                             zero=self.sumsq[0])

    def skinny3(self, w):
        self.qkv(w)
        s = self.sumsq
        self.residual = skinny_linear(self.attn, w["o"], epilogue=Epilogue.RESIDUAL, residual=self.residual,
                                      sumsq_out=s[0])
        act = skinny_linear(self.residual, w["gate_up"], epilogue=Epilogue.SILU_MUL, sumsq_in=s[0], norm_w=w["n2"],
                            eps=EPS, zero=s[1])
        self.residual = skinny_linear(act, w["down"], epilogue=Epilogue.RESIDUAL, residual=self.residual,
                                      sumsq_out=s[1])

    def persistent(self, w, **launch):
        self.qkv(w)
        self.residual = mlp_block(self.attn, w["o"], self.residual, self.sumsq[0], w["n2"], EPS, w["gate_up"],
                                  w["down"], self.sumsq[1], self.counter, **launch)


def time_variant(weights, m, device, step) -> tuple[float, torch.Tensor]:
    """(us per layer, the final residual of one un-graphed pass)."""
    chain = Chain(m, device)
    chain.start()
    for w in weights:
        step(chain, w)
    result = chain.residual.clone()

    def layer(i):
        if i == 0:
            chain.start()
        step(chain, weights[i])
    return graph_time_us(layer, len(weights)), result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("mlp_block_bench.json"))
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16])
    p.add_argument("--layers", type=int, default=8)
    args = p.parse_args()
    device = torch.device("cuda")
    torch.manual_seed(0)
    ceilings = device_ceilings()
    weights = layer_weights(args.layers, device)
    layer_bytes = sum(t.numel() * t.element_size() for k, t in weights[0].items() if k not in ("n1", "n2"))
    floor_us = layer_bytes / ceilings["copy_bw"] * 1e6
    sms = sm_count(device.index or 0)
    print(f"copy bw {ceilings['copy_bw'] / 1e12:.2f} TB/s, {sms} SMs, layer weights {layer_bytes / 1e6:.0f} MB, "
          f"floor {floor_us:.1f} us/layer", flush=True)
    rows = []
    for m in args.rows:
        base_us, base = time_variant(weights, m, device, Chain.skinny3)
        rows.append({"m": m, "variant": "skinny3", "us_per_layer": base_us, "ratio_to_floor": base_us / floor_us})
        print(f"m={m:<3} skinny3                                      {base_us:7.1f} us/layer  {base_us / floor_us:.3f}x floor",
              flush=True)
        tiles = mlp_block_configs(m, H, I, device)
        variants = {"w4 tuned stages": dict(num_warps=4), "w8 tuned stages": dict(num_warps=8),
                    "w4 tuned stages, load spin": dict(num_warps=4, spin_load=True),
                    "w4 tuned stages, no prefetch": dict(num_warps=4, prefetch=False),
                    "w4 4 stages everywhere": dict(num_warps=4, uniform_stages=4)}
        for label, launch in variants.items():
            launch = dict(launch, tiles=tiles)
            name = f"persistent {label}"
            try:
                us, out = time_variant(weights, m, device, lambda c, w: c.persistent(w, **launch))
            except Exception as e:          # a launch setting over the SM's resources: say so and go on
                print(f"m={m:<3} {name:<44} failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
                rows.append({"m": m, "variant": name, "error": f"{type(e).__name__}: {e}"[:300]})
                continue
            err = rel_err(out, base)
            rows.append({"m": m, "variant": name, "us_per_layer": us, "ratio_to_floor": us / floor_us,
                         "rel_err_vs_skinny3": err})
            print(f"m={m:<3} {name:<44} {us:7.1f} us/layer  {us / floor_us:.3f}x floor  "
                  f"({us / base_us:.3f}x skinny3, rel err {err:.1e})", flush=True)
    args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "ceilings": ceilings,
                                    "layer_bytes": layer_bytes, "floor_us_per_layer": floor_us, "sms": sms,
                                    "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
