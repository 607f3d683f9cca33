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

from services.worker.arrival_counters import arrival_counters, require_counters
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
    from services.worker.fused_ops import rotary_mix

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
    def _rotated(x_ptrs, xp_ptrs, COS_ROW, SIN_ROW, d, mask, HALF: tl.constexpr):
        """Rotary embedding of the vectors at x_ptrs (last axis d); xp_ptrs: the same vectors at the partner
        index (d + HALF) % D. Rounded as fused_ops.rope_ rounds (rotary_mix)."""
        x = tl.load(x_ptrs, mask=mask, other=0.0)
        xp = tl.load(xp_ptrs, mask=mask, other=0.0)
        return rotary_mix(x, tl.where(d < HALF, -xp, xp), tl.load(COS_ROW + d), tl.load(SIN_ROW + d))

    @triton.jit
    def _combine_group(M_IN, L_IN, ACC_IN, O, b, kvh, stride_ob, stride_oh, num_heads,
                       GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, SPLITS: tl.constexpr, D: tl.constexpr):
        """Merge the SPLITS partial softmax states (max, sum, weighted values) of the query heads of KV head kvh,
        sequence b, into their output. Splits are added in order, one at a time: the separate merge kernel and the
        decode kernel's own merge run this same code and give the same bits."""
        heads = kvh * GROUP + tl.arange(0, GROUP_PAD)
        head_ok = tl.arange(0, GROUP_PAD) < GROUP
        d = tl.arange(0, D)
        rows = (b * num_heads + heads) * SPLITS                                 # [GROUP_PAD]
        m_all = tl.load(M_IN + rows[:, None] + tl.arange(0, SPLITS)[None, :], mask=head_ok[:, None],
                        other=float("-inf"))
        top = tl.max(m_all, 1)
        out = tl.zeros([GROUP_PAD, D], tl.float32)
        denom = tl.zeros([GROUP_PAD], tl.float32)
        for sp in tl.static_range(SPLITS):
            m = tl.load(M_IN + rows + sp, mask=head_ok, other=float("-inf"))
            w = tl.where(m == float("-inf"), 0.0, tl.exp(m - top))             # empty slices weigh nothing
            acc = tl.load(ACC_IN + (rows + sp)[:, None] * D + d[None, :], mask=head_ok[:, None], other=0.0)
            out += acc * w[:, None]
            denom += tl.load(L_IN + rows + sp, mask=head_ok, other=0.0) * w
        tl.store(O + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
                 (out / denom[:, None]).to(O.dtype.element_ty), mask=head_ok[:, None])

    @triton.jit
    def _paged_decode_kernel(Q, K, V, BT, LENS, O, M_OUT, L_OUT, ACC_OUT, scale,
                             stride_qb, stride_qh, stride_ks, stride_kh, stride_btb, stride_ob, stride_oh,
                             COS, SIN, SLOTS, stride_c, COUNT,
                             GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr,
                             BLOCK_SIZE: tl.constexpr, BLOCKS_PER_ITER: tl.constexpr, SPLITS: tl.constexpr,
                             PRECISION: tl.constexpr, USE_PDL: tl.constexpr, ROPE: tl.constexpr,
                             SELF_COMBINE: tl.constexpr):
        """Program (b, kv head, split): the query heads of one KV-head group against one slice of the
        context, online softmax over TOK-token chunks. With SPLITS == 1 the slice is the whole context and
        the output is written directly; otherwise (flash-decoding, for small batches) the partial softmax
        state (max, sum, weighted values) is written, and merged by _combine_splits_kernel or, with
        SELF_COMBINE, by the group's last split program to finish (COUNT: one arrival counter per
        (sequence, KV head), left at zero).

        ROPE: Q is the qkv projection's output, unrotated (row b: H query heads, then the KV heads' keys, then
        their values); each program rotates its query heads, and the program whose slice holds the new token
        (the last position) rotates its key and writes key and value to the cache at SLOTS[b] before reading."""
        if USE_PDL:                          # pdl.py: wait for the kernel before, let the next one start
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        num_heads = GROUP * tl.num_programs(1)
        TOK: tl.constexpr = BLOCK_SIZE * BLOCKS_PER_ITER
        heads = kvh * GROUP + tl.arange(0, GROUP_PAD)
        head_ok = tl.arange(0, GROUP_PAD) < GROUP
        d = tl.arange(0, D)
        q_rows = Q + b * stride_qb + heads[:, None] * stride_qh
        n = tl.load(LENS + b)
        per = tl.maximum(tl.cdiv(tl.cdiv(n, SPLITS), TOK), 1) * TOK     # never 0, even for an empty context
        lo = split * per
        hi = tl.minimum(n, lo + per)
        if ROPE:
            partner = (d + D // 2) % D
            q = _rotated(q_rows + d[None, :], q_rows + partner[None, :], COS + b * stride_c, SIN + b * stride_c, d,
                         head_ok[:, None], D // 2)
            if (n > 0) & ((n - 1) // per == split):
                k_row = Q + b * stride_qb + (num_heads + kvh) * D
                k_new = _rotated(k_row + d, k_row + partner, COS + b * stride_c, SIN + b * stride_c, d, d < D, D // 2)
                v_new = tl.load(Q + b * stride_qb + (num_heads + tl.num_programs(1) + kvh) * D + d)
                dst = tl.load(SLOTS + b) * stride_ks + kvh * stride_kh + d
                tl.store(K + dst, k_new)
                tl.store(V + dst, v_new)
            tl.debug_barrier()               # the program's reads below see its threads' cache writes
        else:
            q = tl.load(q_rows + d[None, :], mask=head_ok[:, None], other=0.0)
        m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, D], tl.float32)
        t = tl.arange(0, TOK)
        for start in range(lo, hi, TOK):
            pos = start + t
            ok = pos < hi
            block = tl.load(BT + b * stride_btb + pos // BLOCK_SIZE, mask=ok, other=0)
            # int64: slot * stride_ks passes 2^31 in a layer's pool of more than 2^31 elements (a small model
            # given most of a large GPU), and in int32 it would wrap to a read of somebody else's KV
            slot = block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
            k = tl.load(K + slot[:, None] * stride_ks + kvh * stride_kh + d[None, :], mask=ok[:, None], other=0.0)
            v = tl.load(V + slot[:, None] * stride_ks + kvh * stride_kh + d[None, :], mask=ok[:, None], other=0.0)
            m, l, acc = online_softmax_step(q, k, v, ok[None, :], m, l, acc, scale, PRECISION)
        if SPLITS == 1:
            tl.store(O + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
                     (acc / l[:, None]).to(O.dtype.element_ty), mask=head_ok[:, None])
        else:
            row = (b * num_heads + heads) * SPLITS + split      # [B, H, SPLITS]
            tl.store(M_OUT + row, m, mask=head_ok)
            tl.store(L_OUT + row, l, mask=head_ok)
            tl.store(ACC_OUT + row[:, None] * D + d[None, :], acc, mask=head_ok[:, None])
            if SELF_COMBINE:
                # one thread arrives for the program: the CTA barriers order its other threads' partial-state
                # writes before the release, and their reads of the other splits' after the acquire
                tl.debug_barrier()
                arrived = tl.atomic_add(COUNT + b * tl.num_programs(1) + kvh, 1, sem="acq_rel")
                if arrived == SPLITS - 1:
                    tl.debug_barrier()
                    _combine_group(M_OUT, L_OUT, ACC_OUT, O, b, kvh, stride_ob, stride_oh, num_heads, GROUP, GROUP_PAD,
                                   SPLITS, D)
                    tl.store(COUNT + b * tl.num_programs(1) + kvh, 0)

    @triton.jit
    def _combine_splits_kernel(M_IN, L_IN, ACC_IN, O, stride_ob, stride_oh, num_heads, GROUP: tl.constexpr,
                               GROUP_PAD: tl.constexpr, SPLITS: tl.constexpr, D: tl.constexpr, USE_PDL: tl.constexpr):
        """Program (b, kv head): the split merge of that group's query heads (_combine_group)."""
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        _combine_group(M_IN, L_IN, ACC_IN, O, tl.program_id(0), tl.program_id(1), stride_ob, stride_oh, num_heads,
                       GROUP, GROUP_PAD, SPLITS, D)


# Contexts are split while a decode launch has fewer (sequence, KV head) programs than this, one per SM of an
# H100 / H200 (132 SMs), into at most MAX_SPLITS slices; and a program reads its slice in chunks of 128 tokens while
# the launch has at most LONG_CHUNKS_UP_TO programs (two per SM), of 64 past that. Measured on an H200 for every
# split count, chunk and warp count at batch 1-64 (bench/decode_attention_bench.py, docs/BENCHMARKS.md, session 20):
# fewer, longer slices read in longer chunks were 0-20% faster at batch 1-32 than the 16 / 8 / 4 / 2 slices of 64-token
# chunks used before; at batch 64 (512 programs) 64-token chunks are 11% faster than 128.
SPLIT_BELOW = 132
MAX_SPLITS = 8
LONG_CHUNKS_UP_TO = 264


def num_splits(batch: int, num_kv_heads: int) -> int:
    """Context slices per (sequence, KV head): enough programs to fill the GPU at small batch."""
    programs = batch * num_kv_heads
    if programs >= SPLIT_BELOW:
        return 1
    return min(MAX_SPLITS, 1 << (-(-SPLIT_BELOW // programs) - 1).bit_length())    # the next power of two


def chunk_tokens(programs: int) -> int:
    """Context tokens per online-softmax step of a program, for a launch of `programs` programs."""
    return 128 if programs <= LONG_CHUNKS_UP_TO else 64


def _launch_decode(q_src, stride_qb, stride_qh, num_heads, dim, k_cache, v_cache, block_tables, context_lens,
                   block_size, scale, out, blocks_per_iter, splits, rope=None, counts=None, num_warps=4):
    """The decode kernel over q_src (rope: (cos, sin, slots), q_src the qkv rows), then, without `counts`,
    the split combine kernel."""
    bsz = out.shape[0]
    num_kv = k_cache.shape[1]
    group = num_heads // num_kv
    splits = splits or num_splits(bsz, num_kv)
    per_iter = blocks_per_iter or max(1, chunk_tokens(bsz * num_kv * splits) // block_size)
    precision = "ieee" if out.dtype == torch.float32 else "tf32"   # fp32 models get true fp32 dots
    group_pad = max(16, triton.next_power_of_2(group))
    pdl = pdl_on(out.device)
    if splits > 1:
        m = torch.empty(bsz, num_heads, splits, dtype=torch.float32, device=out.device)
        l = torch.empty_like(m)
        acc = torch.empty(bsz, num_heads, splits, dim, dtype=torch.float32, device=out.device)
    else:                                                       # unused: the kernel writes `out` directly
        m = l = acc = out
    self_combine = splits > 1 and counts is not None
    if self_combine:
        require_counters(counts, bsz * num_kv, "(row, KV head) pairs (paged_decode_counts)")
    cos, sin, slots = rope if rope is not None else (out, out, context_lens)
    _paged_decode_kernel[(bsz, num_kv, splits)](
        q_src, k_cache, v_cache, block_tables, context_lens, out, m, l, acc, scale,
        stride_qb, stride_qh, k_cache.stride(0), k_cache.stride(1), block_tables.stride(0),
        out.stride(0), out.stride(1), cos, sin, slots, cos.stride(0), counts if self_combine else context_lens,
        GROUP=group, GROUP_PAD=group_pad, D=dim, BLOCK_SIZE=block_size, BLOCKS_PER_ITER=per_iter,
        SPLITS=splits, PRECISION=precision, USE_PDL=pdl, ROPE=rope is not None, SELF_COMBINE=self_combine,
        num_warps=num_warps, launch_pdl=pdl)
    if splits > 1 and not self_combine:
        _combine_splits_kernel[(bsz, num_kv)](m, l, acc, out, out.stride(0), out.stride(1), num_heads, GROUP=group,
                                              GROUP_PAD=group_pad, SPLITS=splits, D=dim, USE_PDL=pdl, launch_pdl=pdl)
    return out


def paged_decode_triton(q, k_cache, v_cache, block_tables, context_lens, block_size: int, scale: float,
                        out: torch.Tensor | None = None, blocks_per_iter: int | None = None,
                        splits: int | None = None):
    """q already rotated, the new token's K / V already in the cache; split slices merged by a second kernel."""
    bsz, num_heads, dim = q.shape
    return _launch_decode(q, q.stride(0), q.stride(1), num_heads, dim, k_cache, v_cache, block_tables, context_lens,
                          block_size, scale, torch.empty_like(q) if out is None else out, blocks_per_iter, splits)


def paged_decode_rope(qkv, num_heads: int, cos, sin, slots, k_cache, v_cache, block_tables, context_lens,
                      block_size: int, scale: float, counts: torch.Tensor, splits: int | None = None,
                      blocks_per_iter: int | None = None, num_warps: int = 4):
    """Decode attention straight from the qkv projection's output [B, (H + 2 KV) * D] (contiguous rows,
    unrotated): rotary of q and k, the new token's K / V written to the cache at `slots` [B], attention, and the
    merge of split slices, in one kernel (three kernels a layer were: rotary + KV write, attention, combine).
    counts: int32 zeros, at least B * KV (paged_decode_counts), left at zero. splits, blocks_per_iter (cache blocks
    per chunk of the online softmax) and num_warps: tuning overrides (bench/decode_attention_bench.py). CUDA only.
    Returns [B, H, D]."""
    num_kv, dim = k_cache.shape[1], k_cache.shape[2]
    assert qkv.stride(1) == 1 and qkv.shape[1] == (num_heads + 2 * num_kv) * dim and cos.stride(1) == 1
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(2) == 1      # V is written with K's strides
    out = torch.empty(qkv.shape[0], num_heads, dim, dtype=qkv.dtype, device=qkv.device)
    return _launch_decode(qkv, qkv.stride(0), dim, num_heads, dim, k_cache, v_cache, block_tables, context_lens,
                          block_size, scale, out, blocks_per_iter, splits, rope=(cos, sin, slots), counts=counts,
                          num_warps=num_warps)


def paged_decode_counts(device: torch.device) -> torch.Tensor:
    """paged_decode_rope's arrival counters, one per (sequence, KV head): contexts are split only while there are
    fewer than SPLIT_BELOW of those (num_splits), so that many suffice."""
    return arrival_counters(SPLIT_BELOW, device)


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
