"""The paged decode attention used on CPU against the per-sequence reference (the Triton kernel is
checked against the same reference on the GPU by bench/engine_bench.py)."""
import pytest
import torch

from services.worker.attention import (chunk_tokens, num_splits, paged_decode_counts, paged_decode_gather,
                                       paged_decode_reference)
from services.worker.fused_ops import rmsnorm_torch, rope_


@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (9, 3), (4, 4)])
def test_paged_decode_matches_reference(heads, kv_heads):
    torch.manual_seed(0)
    block, dim, blocks = 16, 32, 40
    k_cache = torch.randn(blocks * block, kv_heads, dim)
    v_cache = torch.randn(blocks * block, kv_heads, dim)
    tables = torch.randperm(blocks)[:3 * 8].view(3, 8).int()
    lens = torch.tensor([1, 37, 128], dtype=torch.int32)
    q = torch.randn(3, heads, dim)
    ref = paged_decode_reference(q, k_cache, v_cache, tables, lens, block, dim ** -0.5)
    out = paged_decode_gather(q, k_cache, v_cache, tables, lens, block, dim ** -0.5)
    assert ((out - ref).norm() / ref.norm()) < 1e-5
    # slots past a sequence's length must not matter: poison them and expect the same answer
    for b, n in enumerate(lens.tolist()):
        for pos in range(n, 8 * block):
            k_cache[tables[b, pos // block] * block + pos % block] = float("nan")
    again = paged_decode_gather(q, k_cache, v_cache, tables, lens, block, dim ** -0.5)
    assert not torch.isnan(again).any() and torch.allclose(again, out)


def test_fused_norm_and_rope_follow_transformers():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

    torch.manual_seed(0)
    x, res = torch.randn(5, 64), torch.randn(5, 64)
    norm = LlamaRMSNorm(64, eps=1e-5)
    norm.weight.data.normal_()
    out, summed = rmsnorm_torch(x, norm.weight, 1e-5, res)
    assert torch.equal(summed, x + res) and torch.allclose(out, norm(x + res))
    q = torch.randn(5, 4, 16)
    freqs = torch.randn(5, 8)
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
    ref, _ = apply_rotary_pos_emb(q.transpose(0, 1)[None], q.transpose(0, 1)[None], cos[None], sin[None])
    assert torch.allclose(rope_(q, cos, sin), ref[0].transpose(0, 1), atol=1e-6)


def test_split_contexts_always_have_an_arrival_counter_each():
    """The decode kernel's own split merge counts arrivals per (row, KV head) in paged_decode_counts' buffer: every
    batch whose contexts are split must fit in it (a short buffer would be written past its end)."""
    counters = paged_decode_counts(torch.device("cpu")).numel()
    for kv_heads in (1, 2, 4, 8, 16):
        for batch in range(1, 600):
            splits = num_splits(batch, kv_heads)
            assert 1 <= splits <= 8 and splits & (splits - 1) == 0       # a power of two, as the kernel's arange needs
            if splits > 1:
                assert batch * kv_heads <= counters
    # Llama-3-8B (8 KV heads): the split counts measured fastest on an H200 (bench/decode_attention_bench.py)
    assert [num_splits(b, 8) for b in (1, 8, 16, 32, 64)] == [8, 4, 2, 1, 1]


def test_few_programs_read_longer_chunks():
    """Up to two programs per SM of an H200 a program reads 128 context tokens a step, past that 64 (measured)."""
    assert [chunk_tokens(b * 8 * num_splits(b, 8)) for b in (1, 8, 16, 32, 64)] == [128, 128, 128, 128, 64]
