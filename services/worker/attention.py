"""Paged decode attention: one new query token per sequence against its KV blocks in the pool.

On CUDA a Triton kernel reads K/V straight from the pool through the block table (no gather copy),
with an online softmax over chunks of the context; every query head of a KV-head group is handled by
one program, so each K/V byte is read once per group (GQA). Elsewhere a plain torch version runs, and
it doubles as the reference the kernel is checked against.

Shapes: q [B, H, D]; k_cache / v_cache [num_slots, KVH, D] (one layer; slot = block * block_size + offset);
block_tables [B, max_blocks] int32; context_lens [B] int32 (including the new token, already written).
"""
from __future__ import annotations

import torch

from services.worker.pdl import pdl_on

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path serves
    triton = None


def paged_decode_reference(q, k_cache, v_cache, block_tables, context_lens, block_size: int, scale: float):
    out = torch.empty_like(q)
    group = q.shape[1] // k_cache.shape[1]
    for b in range(q.shape[0]):
        n = int(context_lens[b])
        blocks = block_tables[b, : -(-n // block_size)].long()
        slots = (blocks[:, None] * block_size + torch.arange(block_size, device=q.device)).reshape(-1)[:n]
        k = k_cache[slots].float().repeat_interleave(group, dim=1)     # [n, H, D]
        v = v_cache[slots].float().repeat_interleave(group, dim=1)
        att = torch.einsum("hd,nhd->hn", q[b].float(), k) * scale
        out[b] = torch.einsum("hn,nhd->hd", att.softmax(-1), v).to(q.dtype)
    return out


if triton is not None:
    @triton.jit
    def online_softmax_step(q, k, v, keep, m, l, acc, scale, PRECISION: tl.constexpr):
        """One piece of keys into a running softmax (flash attention's update): q [rows, D], k / v [keys, D],
        `keep` [rows, keys] (or broadcastable) which scores count; m, l [rows] running max and sum, acc [rows, D]
        the weighted values. Returns the new (m, l, acc). A row that has kept no score yet stays at m = -inf,
        l = 0 (the caller guards the division). Shared by the decode and prefill kernels."""
        sc = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        sc = tl.where(keep, sc, float("-inf"))
        m_new = tl.maximum(m, tl.max(sc, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(sc - m_safe[:, None])
        alpha = tl.exp(m - m_safe)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        return m_new, l * alpha + tl.sum(p, 1), acc

    @triton.jit
    def _paged_decode_kernel(Q, K, V, BT, LENS, O, M_OUT, L_OUT, ACC_OUT, scale,
                             stride_qb, stride_qh, stride_ks, stride_kh, stride_btb, stride_ob, stride_oh,
                             GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr,
                             BLOCK_SIZE: tl.constexpr, BLOCKS_PER_ITER: tl.constexpr, SPLITS: tl.constexpr,
                             PRECISION: tl.constexpr, USE_PDL: tl.constexpr):
        """Program (b, kv head, split): the query heads of one KV-head group against one slice of the
        context, online softmax over TOK-token chunks. With SPLITS == 1 the slice is the whole context and
        the output is written directly; otherwise (flash-decoding, for small batches) the partial softmax
        state (max, sum, weighted values) is written and _combine_splits_kernel merges the slices."""
        if USE_PDL:                          # pdl.py: wait for the kernel before, let the next one start
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        TOK: tl.constexpr = BLOCK_SIZE * BLOCKS_PER_ITER
        heads = kvh * GROUP + tl.arange(0, GROUP_PAD)
        head_ok = tl.arange(0, GROUP_PAD) < GROUP
        d = tl.arange(0, D)
        q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=head_ok[:, None], other=0.0)
        n = tl.load(LENS + b)
        per = tl.cdiv(tl.cdiv(n, SPLITS), TOK) * TOK
        lo = split * per
        hi = tl.minimum(n, lo + per)
        m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, D], tl.float32)
        t = tl.arange(0, TOK)
        for start in range(lo, hi, TOK):
            pos = start + t
            ok = pos < hi
            block = tl.load(BT + b * stride_btb + pos // BLOCK_SIZE, mask=ok, other=0)
            slot = block * BLOCK_SIZE + pos % BLOCK_SIZE
            k = tl.load(K + slot[:, None] * stride_ks + kvh * stride_kh + d[None, :], mask=ok[:, None], other=0.0)
            v = tl.load(V + slot[:, None] * stride_ks + kvh * stride_kh + d[None, :], mask=ok[:, None], other=0.0)
            m, l, acc = online_softmax_step(q, k, v, ok[None, :], m, l, acc, scale, PRECISION)
        if SPLITS == 1:
            tl.store(O + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
                     (acc / l[:, None]).to(O.dtype.element_ty), mask=head_ok[:, None])
        else:
            row = (b * (GROUP * tl.num_programs(1)) + heads) * SPLITS + split      # [B, H, SPLITS]
            tl.store(M_OUT + row, m, mask=head_ok)
            tl.store(L_OUT + row, l, mask=head_ok)
            tl.store(ACC_OUT + row[:, None] * D + d[None, :], acc, mask=head_ok[:, None])

    @triton.jit
    def _combine_splits_kernel(M_IN, L_IN, ACC_IN, O, stride_ob, stride_oh, num_heads,
                               SPLITS: tl.constexpr, D: tl.constexpr, USE_PDL: tl.constexpr):
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        b = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.arange(0, SPLITS)
        d = tl.arange(0, D)
        row = (b * num_heads + h) * SPLITS + s
        m = tl.load(M_IN + row)
        l = tl.load(L_IN + row)
        acc = tl.load(ACC_IN + row[:, None] * D + d[None, :])
        top = tl.max(m, 0)
        w = tl.where(m == float("-inf"), 0.0, tl.exp(m - top))          # empty slices weigh nothing
        out = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
        tl.store(O + b * stride_ob + h * stride_oh + d, out.to(O.dtype.element_ty))


def num_splits(batch: int, num_kv_heads: int, num_sms: int = 132) -> int:
    """Context slices per (sequence, KV head): enough programs to fill the GPU at small batch."""
    programs = batch * num_kv_heads
    if programs >= num_sms:
        return 1
    return min(16, triton.next_power_of_2(-(-2 * num_sms // programs)))


def paged_decode_triton(q, k_cache, v_cache, block_tables, context_lens, block_size: int, scale: float,
                        out: torch.Tensor | None = None, blocks_per_iter: int | None = None,
                        splits: int | None = None):
    bsz, num_heads, dim = q.shape
    num_kv = k_cache.shape[1]
    group = num_heads // num_kv
    out = torch.empty_like(q) if out is None else out
    per_iter = blocks_per_iter or max(1, 64 // block_size)
    splits = splits or num_splits(bsz, num_kv)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"   # fp32 models get true fp32 dots
    group_pad = max(16, triton.next_power_of_2(group))
    pdl = pdl_on(q.device)
    if splits > 1:
        m = torch.empty(bsz, num_heads, splits, dtype=torch.float32, device=q.device)
        l = torch.empty_like(m)
        acc = torch.empty(bsz, num_heads, splits, dim, dtype=torch.float32, device=q.device)
    else:                                                       # unused: the kernel writes `out` directly
        m = l = acc = out
    _paged_decode_kernel[(bsz, num_kv, splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, m, l, acc, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=group_pad, D=dim, BLOCK_SIZE=block_size, BLOCKS_PER_ITER=per_iter,
        SPLITS=splits, PRECISION=precision, USE_PDL=pdl, launch_pdl=pdl)
    if splits > 1:
        _combine_splits_kernel[(bsz, num_heads)](m, l, acc, out, out.stride(0), out.stride(1), num_heads,
                                                 SPLITS=splits, D=dim, USE_PDL=pdl, launch_pdl=pdl)
    return out


def paged_decode_gather(q, k_cache, v_cache, block_tables, context_lens, block_size: int, scale: float):
    """Vectorised torch version (CPU): gather every sequence's context, mask past its length."""
    width = block_tables.shape[1] * block_size
    pos = torch.arange(width, device=q.device)
    slots = block_tables.long()[:, pos // block_size] * block_size + pos % block_size      # [B, W]
    valid = pos[None, :] < context_lens[:, None]
    keys, values = k_cache[slots], v_cache[slots]                                           # [B, W, KVH, D]
    # slots past a sequence's length hold stale data; zero them so even NaN garbage cannot leak in
    keys = keys.masked_fill(~valid[:, :, None, None], 0)
    values = values.masked_fill(~valid[:, :, None, None], 0)
    out = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None, :], keys.transpose(1, 2), values.transpose(1, 2), attn_mask=valid[:, None, None, :],
        scale=scale, enable_gqa=q.shape[1] != k_cache.shape[1])
    return out[:, :, 0, :]


def paged_decode(q, k_cache, v_cache, block_tables, context_lens, block_size: int, scale: float):
    if triton is not None and q.is_cuda:
        return paged_decode_triton(q, k_cache, v_cache, block_tables, context_lens, block_size, scale)
    return paged_decode_gather(q, k_cache, v_cache, block_tables, context_lens, block_size, scale)
