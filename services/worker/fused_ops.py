"""Fused elementwise kernels for the decode hot path (Triton on CUDA, plain torch elsewhere).

A Llama layer's elementwise work (residual add + RMSNorm, rotary embedding, SiLU-and-mul) is a dozen
tiny kernels in eager PyTorch; at small batches their launches and extra passes over memory cost as
much as the matmuls. Each function here is one kernel on CUDA and numerically follows transformers:
residual sums are rounded to the model dtype, norms are computed in fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from services.worker.pdl import pdl_on

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def _use_triton(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda


def fused_kernels_on(device: torch.device) -> bool:
    """Whether this module's Triton kernels run on `device` (CUDA with Triton installed)."""
    return triton is not None and device.type == "cuda"


# -- RMSNorm with an optional residual add ------------------------------------------------------------
def rmsnorm_torch(x, weight, eps, residual=None):
    if residual is not None:
        x = x + residual
        residual = x
    var = x.float().pow(2).mean(-1, keepdim=True)
    normed = weight * (x.float() * torch.rsqrt(var + eps)).to(x.dtype)
    return normed, residual


if triton is not None:
    @triton.jit
    def _rmsnorm_kernel(X, R, W, OUT, ROUT, stride, n_cols, eps,
                        HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        ok = cols < n_cols
        x = tl.load(X + row * stride + cols, mask=ok, other=0.0)
        if HAS_RESIDUAL:
            x = (x.to(tl.float32) + tl.load(R + row * stride + cols, mask=ok, other=0.0).to(tl.float32)).to(x.dtype)
            tl.store(ROUT + row * stride + cols, x, mask=ok)
        xf = x.to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / n_cols + eps)
        w = tl.load(W + cols, mask=ok, other=0.0)
        y = (w.to(tl.float32) * (xf * inv).to(x.dtype).to(tl.float32)).to(x.dtype)
        tl.store(OUT + row * stride + cols, y, mask=ok)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """Returns (norm(x + residual), x + residual) -- or (norm(x), None) without a residual."""
    if not _use_triton(x):
        return rmsnorm_torch(x, weight, eps, residual)
    out = torch.empty_like(x)
    rout = torch.empty_like(x) if residual is not None else None
    _rmsnorm_kernel[(x.shape[0],)](x, residual if residual is not None else x, weight, out,
                                   rout if rout is not None else out, x.stride(0), x.shape[1], eps,
                                   HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(x.shape[1]))
    return out, rout


# -- SiLU(gate) * up -----------------------------------------------------------------------------------
if triton is not None:
    @triton.jit
    def _silu_mul_kernel(GU, OUT, n_cols, stride_in, stride_out, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < n_cols
        gate = tl.load(GU + row * stride_in + cols, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(GU + row * stride_in + n_cols + cols, mask=ok, other=0.0)
        act = (gate / (1.0 + tl.exp(-gate))).to(up.dtype)
        tl.store(OUT + row * stride_out + cols, (act.to(tl.float32) * up.to(tl.float32)).to(up.dtype), mask=ok)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] (gate then up) -> silu(gate) * up [T, I]."""
    half = gate_up.shape[1] // 2
    if not _use_triton(gate_up):
        return F.silu(gate_up[:, :half]) * gate_up[:, half:]
    out = torch.empty(gate_up.shape[0], half, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(gate_up.shape[0], triton.cdiv(half, block))](gate_up, out, half, gate_up.stride(0),
                                                                   out.stride(0), BLOCK=block)
    return out


# -- rotary embedding (CPU; on CUDA rope_and_cache_ below does it with the KV write) --------------------
def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] rotated (a new tensor); cos / sin [T, D] in x's dtype. Each product is rounded to the
    model dtype before the sum, as in transformers (and in the kernels' rotary_mix)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


# -- rotary embedding of q and k and the KV cache write, in one kernel ---------------------------------
if triton is not None:
    @triton.jit
    def rotary_mix(x, rot, cos, sin):
        """x * cos + rot * sin, rot being x's partner in the other half (negated in the first half): the rotary
        embedding of x. Each product is rounded to x's dtype before the sum, as rope_ (and transformers) do; every
        kernel that rotates calls this, so that they all round alike.

        The selects are identities (x and rot are NaN only where a and e already are) that keep the compiler from
        fusing the first product into the sum: without them the bf16 / fp16 code was a mul then an fma, which
        skips one rounding, and 23-24% of the outputs were 1 ulp off torch's (docs/BENCHMARKS.md, session 20)."""
        a = (x.to(tl.float32) * cos.to(tl.float32)).to(x.dtype)
        e = (rot.to(tl.float32) * sin.to(tl.float32)).to(x.dtype)
        a = tl.where(x != x, x, a)
        e = tl.where(rot != rot, rot, e)
        return (a.to(tl.float32) + e.to(tl.float32)).to(x.dtype)

    @triton.jit
    def _rope_cache_kernel(QKV, COS, SIN, KC, VC, SLOTS, stride_t, stride_c, stride_slot, stride_head,
                           NUM_HEADS: tl.constexpr, NUM_KV: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
                           USE_PDL: tl.constexpr):
        """Program (t, h): h < NUM_HEADS rotates query head h in place; otherwise kv head h - NUM_HEADS:
        its key is rotated in place and written, with its value, to the token's cache slot."""
        if USE_PDL:                          # pdl.py: wait for the kernel before, let the next one start
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        t = tl.program_id(0)
        h = tl.program_id(1)
        d = tl.arange(0, HALF)
        base = QKV + t * stride_t + h * D
        x1 = tl.load(base + d)
        x2 = tl.load(base + HALF + d)
        c1 = tl.load(COS + t * stride_c + d)
        s1 = tl.load(SIN + t * stride_c + d)
        c2 = tl.load(COS + t * stride_c + HALF + d)
        s2 = tl.load(SIN + t * stride_c + HALF + d)
        y1 = rotary_mix(x1, -x2, c1, s1)
        y2 = rotary_mix(x2, x1, c2, s2)
        tl.store(base + d, y1)
        tl.store(base + HALF + d, y2)
        if h >= NUM_HEADS:
            kv = h - NUM_HEADS
            slot = tl.load(SLOTS + t)
            dst = slot * stride_slot + kv * stride_head
            tl.store(KC + dst + d, y1)
            tl.store(KC + dst + HALF + d, y2)
            full = tl.arange(0, D)
            v = tl.load(QKV + t * stride_t + (NUM_HEADS + NUM_KV) * D + kv * D + full)
            tl.store(VC + dst + full, v)


def rope_and_cache_(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int, cos: torch.Tensor,
                    sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor) -> None:
    """qkv [T, (H + 2 KV) * D], contiguous rows: q and k rotated in place, k and v written to the caches
    ([slots, KV, D]) at `slots`. Four kernels (two rotations, two cache copies) become one; CUDA only."""
    assert k_cache.stride() == v_cache.stride() and qkv.stride(1) == 1 and k_cache.stride(2) == 1
    pdl = pdl_on(qkv.device)
    _rope_cache_kernel[(qkv.shape[0], num_heads + num_kv_heads)](
        qkv, cos, sin, k_cache, v_cache, slots, qkv.stride(0), cos.stride(0), k_cache.stride(0), k_cache.stride(1),
        NUM_HEADS=num_heads, NUM_KV=num_kv_heads, D=head_dim, HALF=head_dim // 2, USE_PDL=pdl, launch_pdl=pdl)
