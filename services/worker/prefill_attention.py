"""Paged prefill attention: every prompt chunk of a step, in one kernel launch per layer.

A step's multi-token chunks (fresh prompts, later chunks of a long prompt, recomputes, prompts that continue
from prefix-cached blocks) all read their keys and values from the pool through their block tables: the new
tokens' K/V are written there before attention runs, so a fresh prompt and a cache hit are the same case, a
chunk whose first `ctx_start` tokens are already cached. Each chunk's queries attend causally to those
tokens and to their own.

Why our own kernel: the serving thread launched one SDPA call (plus slicing, a gather and a scatter) per
chunk per layer, 16% of its time when prompts trickle in live (docs/BENCHMARKS.md, thread profile); the
varlen flash kernels in torch change signature between releases and want contiguous K/V or 256-token
pages, our pool has 16-token blocks.

On CUDA a Triton program takes one tile of BLOCK_Q queries of one chunk and one KV head, with the GROUP query
heads that share it stacked into the tile's rows (each K/V byte is read once per group), and runs an online
softmax over the context in BLOCK_K-token pieces up to the tile's last query. Elsewhere the torch reference
runs (one SDPA call per chunk): the CPU worker's path, and what the kernel is checked against.

Shapes: q [T, H, D] (rows of the flat batch, any row stride); k_cache / v_cache [num_slots, KVH, D]; out [T, H, D],
of which only the chunks' rows are written.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch reference serves
    triton = None
else:
    from services.worker.attention import online_softmax_step

BLOCK_Q = 16        # queries per tile; times the padded group size, the tile's rows
KERNEL_ON = triton is not None   # benchmarks turn it off to time the reference on the GPU
BLOCK_K = 64        # keys per step of the online softmax


@dataclass
class PrefillChunks:
    """A step's multi-token chunks, as the kernel reads them (device tensors, int64)."""
    q_start: torch.Tensor       # [G] the chunk's first row in the flat batch
    q_len: torch.Tensor         # [G] its new tokens
    ctx_start: torch.Tensor     # [G] position of its first new token: tokens before it are already cached
    block_tables: torch.Tensor  # [G, W] its blocks, padded with any valid block id
    tile_chunk: torch.Tensor    # [NT] per tile: its chunk
    tile_q: torch.Tensor        # [NT] per tile: its first query, as an offset into the chunk
    context_slots: list[torch.Tensor] | None = None   # the reference's per-chunk pool rows, kept for all layers


def plan_tiles(q_len: np.ndarray, block_q: int = BLOCK_Q) -> tuple[np.ndarray, np.ndarray]:
    """Host side: the tiles covering chunks of these lengths -> (tile's chunk, tile's first query offset)."""
    tiles = -(-q_len // block_q)
    chunk = np.repeat(np.arange(len(q_len)), tiles)
    first_tile = np.cumsum(tiles) - tiles
    return chunk, (np.arange(len(chunk)) - first_tile[chunk]) * block_q


def paged_prefill_reference(q, k_cache, v_cache, chunks: PrefillChunks, block_size: int, scale: float,
                            out: torch.Tensor) -> torch.Tensor:
    """One SDPA call per chunk over its context gathered from the pool, causal aligned to the end."""
    gqa = k_cache.shape[1] != q.shape[1]
    spans = list(zip(chunks.q_start.tolist(), chunks.q_len.tolist(), chunks.ctx_start.tolist()))
    if chunks.context_slots is None:
        chunks.context_slots = [chunks.block_tables[g, pos // block_size] * block_size + pos % block_size
                                for g, (_, n, ctx) in enumerate(spans)
                                for pos in [torch.arange(ctx + n, device=q.device)]]
    for (q0, n, ctx), slots in zip(spans, chunks.context_slots):
        keys, values = k_cache[slots], v_cache[slots]
        mask = causal_lower_right(n, ctx + n) if ctx else None
        o = F.scaled_dot_product_attention(q[q0:q0 + n].transpose(0, 1)[None], keys.transpose(0, 1)[None],
                                           values.transpose(0, 1)[None], attn_mask=mask, is_causal=mask is None,
                                           scale=scale, enable_gqa=gqa)
        out[q0:q0 + n] = o[0].transpose(0, 1)
    return out


if triton is not None:
    @triton.jit
    def _paged_prefill_kernel(Q, K, V, O, QSTART, QLEN, CTX, BT, TILE_CHUNK, TILE_Q, scale,
                              stride_qt, stride_qh, stride_ks, stride_kh, stride_bt, stride_ot, stride_oh,
                              GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr,
                              BLOCK_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
                              PRECISION: tl.constexpr):
        """Program (tile, kv head). Row r of the tile is query token r // GROUP_PAD of the tile, head
        r % GROUP_PAD of the group (rows of padding heads are computed and not stored)."""
        tile = tl.program_id(0)
        kvh = tl.program_id(1)
        g = tl.load(TILE_CHUNK + tile)
        q0 = tl.load(TILE_Q + tile)
        row0 = tl.load(QSTART + g)
        n = tl.load(QLEN + g)
        ctx = tl.load(CTX + g)
        M: tl.constexpr = BLOCK_Q * GROUP_PAD
        r = tl.arange(0, M)
        tok = q0 + r // GROUP_PAD
        sub = r % GROUP_PAD
        row_ok = (tok < n) & (sub < GROUP)
        head = kvh * GROUP + sub
        d = tl.arange(0, D)
        q = tl.load(Q + (row0 + tok)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                    mask=row_ok[:, None], other=0.0)
        qpos = ctx + tok
        hi = ctx + tl.minimum(n, q0 + BLOCK_Q)          # keys up to the tile's last query, inclusive
        m = tl.full([M], float("-inf"), tl.float32)
        l = tl.zeros([M], tl.float32)
        acc = tl.zeros([M, D], tl.float32)
        t = tl.arange(0, BLOCK_K)
        for start in range(0, hi, BLOCK_K):
            kpos = start + t
            k_ok = kpos < hi
            block = tl.load(BT + g * stride_bt + kpos // BLOCK_SIZE, mask=k_ok, other=0)
            slot = block.to(tl.int64) * BLOCK_SIZE + kpos % BLOCK_SIZE      # int64: see attention.py
            k = tl.load(K + slot[:, None] * stride_ks + kvh * stride_kh + d[None, :], mask=k_ok[:, None], other=0.0)
            v = tl.load(V + slot[:, None] * stride_ks + kvh * stride_kh + d[None, :], mask=k_ok[:, None], other=0.0)
            causal = (kpos[None, :] <= qpos[:, None]) & k_ok[None, :]
            m, l, acc = online_softmax_step(q, k, v, causal, m, l, acc, scale, PRECISION)
        l = tl.where(l == 0.0, 1.0, l)                   # rows past the chunk's end saw no key
        tl.store(O + (row0 + tok)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                 (acc / l[:, None]).to(O.dtype.element_ty), mask=row_ok[:, None])


def paged_prefill_triton(q, k_cache, v_cache, chunks: PrefillChunks, block_size: int, scale: float,
                         out: torch.Tensor) -> torch.Tensor:
    num_heads, dim = q.shape[1], q.shape[2]
    num_kv = k_cache.shape[1]
    group = num_heads // num_kv
    precision = "ieee" if q.dtype == torch.float32 else "tf32"   # fp32 models get true fp32 dots
    _paged_prefill_kernel[(chunks.tile_chunk.shape[0], num_kv)](
        q, k_cache, v_cache, out, chunks.q_start, chunks.q_len, chunks.ctx_start, chunks.block_tables,
        chunks.tile_chunk, chunks.tile_q, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), chunks.block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=triton.next_power_of_2(group), D=dim, BLOCK_SIZE=block_size, BLOCK_Q=BLOCK_Q,
        BLOCK_K=BLOCK_K, PRECISION=precision, num_warps=4)
    return out


def paged_prefill(q, k_cache, v_cache, chunks: PrefillChunks, block_size: int, scale: float,
                  out: torch.Tensor) -> torch.Tensor:
    """Write the attention of every chunk's queries into `out`'s rows; returns `out`."""
    if chunks.tile_chunk.shape[0] == 0:
        return out
    if KERNEL_ON and q.is_cuda:
        return paged_prefill_triton(q, k_cache, v_cache, chunks, block_size, scale, out)
    return paged_prefill_reference(q, k_cache, v_cache, chunks, block_size, scale, out)
