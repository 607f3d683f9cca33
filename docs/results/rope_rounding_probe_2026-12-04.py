"""Why the Triton rotary (fused_ops.rotary_mix) and torch's rotary (fused_ops.rope_, transformers' formula) give
different bf16 bits on a GPU, though both are written as: each product rounded to bf16, then the sum rounded.

Runs the helper over random bf16 inputs in a one-line kernel and compares its output with torch and with emulations of
what a compiler could have done instead (an FMA for one of the products, no intermediate rounding at all); prints the
PTX lines that convert or fuse, for the helper as it was and two mends (the selects, now in rotary_mix; integer
rounding, bf16 only). Session 20's experiment, run on a lent H200 (the first mend then tried as a copy of this one):

    python docs/results/rope_rounding_probe_2026-12-04.py
"""
import torch
import triton
import triton.language as tl

from services.worker.fused_ops import rotary_mix


@triton.jit
def _mix_before(x, rot, cos, sin):
    """fused_ops.rotary_mix before session 20's mend (mend 1, the selects, is rotary_mix now)."""
    a = (x.to(tl.float32) * cos.to(tl.float32)).to(x.dtype).to(tl.float32)
    e = (rot.to(tl.float32) * sin.to(tl.float32)).to(x.dtype).to(tl.float32)
    return (a + e).to(x.dtype)


@triton.jit
def _round_bf16(v):
    """fp32 -> the nearest bf16 (ties to even), kept in fp32, by integer arithmetic."""
    u = v.to(tl.uint32, bitcast=True)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.to(tl.float32, bitcast=True)


@triton.jit
def _mix_bits(x, rot, cos, sin):
    """Candidate mend 2 (bf16 only): the products rounded by integer arithmetic."""
    a = _round_bf16(x.to(tl.float32) * cos.to(tl.float32))
    e = _round_bf16(rot.to(tl.float32) * sin.to(tl.float32))
    return (a + e).to(x.dtype)


@triton.jit
def _mix_kernel(X, R, C, S, OUT, N: tl.constexpr, VARIANT: tl.constexpr):
    i = tl.arange(0, N)
    x, r, c, s = tl.load(X + i), tl.load(R + i), tl.load(C + i), tl.load(S + i)
    if VARIANT == 0:
        y = _mix_before(x, r, c, s)
    elif VARIANT == 1:
        y = rotary_mix(x, r, c, s)
    else:
        y = _mix_bits(x, r, c, s)
    tl.store(OUT + i, y)


def rounded(t64: torch.Tensor, dtype) -> torch.Tensor:
    """float64 -> fp32 (one rounding) -> dtype (a second): what a fp32 result stored in dtype gets."""
    return t64.float().to(dtype)


def probe(dtype, variant: int, n: int = 1 << 16) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    x, r = (torch.randn(n, generator=g, device="cuda").mul(4).to(dtype) for _ in range(2))
    ang = torch.rand(n, generator=g, device="cuda") * 6.3
    c, s = ang.cos().to(dtype), ang.sin().to(dtype)
    out = torch.empty_like(x)
    compiled = _mix_kernel[(1,)](x, r, c, s, out, N=n, VARIANT=variant)
    ref = x * c + r * s                                                         # torch: rope_'s arithmetic
    X, R, C, S = (t.double() for t in (x, r, c, s))
    a, e = rounded(X * C, dtype).double(), rounded(R * S, dtype).double()
    hyp = {"torch": ref, "fma(x, c, round(r*s))": rounded(X * C + e, dtype),
           "fma(r, s, round(x*c))": rounded(R * S + a, dtype), "no rounding": rounded(X * C + R * S, dtype)}
    print(f"{dtype} {['before', 'rotary_mix (selects)', 'bits'][variant]}: differ from "
          + ", ".join(f"{name} {(out != h).sum().item()}" for name, h in hyp.items()) + f" (of {n})")
    for i in (out != ref).nonzero()[:2, 0].tolist():
        print(f"  x={x[i].item()} c={c[i].item()} r={r[i].item()} s={s[i].item()}: torch {ref[i].item()} "
              f"triton {out[i].item()}")
    ptx = compiled.asm["ptx"]
    print("  PTX arithmetic:", sorted({ln.split()[0] for ln in ptx.splitlines()
                                       if ln.strip().split(" ")[0].startswith(("fma", "cvt", "mul.", "add.f", "add.b",
                                                                                 "add.rn", "neg", "selp"))}))


def main() -> None:
    for dtype in (torch.bfloat16, torch.float16):
        for variant in (0, 1, 2) if dtype == torch.bfloat16 else (0, 1):
            probe(dtype, variant)


if __name__ == "__main__":
    main()
