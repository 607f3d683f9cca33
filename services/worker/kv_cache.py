"""The KV tensors: one preallocated device pool plus a host pool for swapped-out blocks.

Layout per pool: [num_layers, (num_blocks + 1) * block_size, num_kv_heads, head_dim] for K and for V, so
a token's *slot* (block_id * block_size + offset) indexes its row directly. Block `num_blocks` is a
scratch block the allocator never hands out: padded rows of a CUDA-graph batch write there. Which
blocks belong to which sequence is the BlockManager's business; this class only stores and copies bytes.
"""
from __future__ import annotations

import torch


class PagedKVCache:
    def __init__(self, *, num_layers: int, num_blocks: int, num_host_blocks: int, block_size: int,
                 num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.block_size = block_size
        self.scratch_block = num_blocks
        shape = (num_layers, (num_blocks + 1) * block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        host_shape = (num_layers, num_host_blocks * block_size, num_kv_heads, head_dim)
        pin = device.type == "cuda"
        self.host_k = torch.zeros(host_shape, dtype=dtype, pin_memory=pin)
        self.host_v = torch.zeros(host_shape, dtype=dtype, pin_memory=pin)

    @staticmethod
    def bytes_per_block(*, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer].index_copy_(0, slots, k)
        self.v[layer].index_copy_(0, slots, v)

    def _slot_index(self, block_ids: list[int], device: torch.device) -> torch.Tensor:
        blocks = torch.tensor(block_ids, dtype=torch.long, device=device)
        offsets = torch.arange(self.block_size, device=device)
        return (blocks[:, None] * self.block_size + offsets).reshape(-1)

    def copy_out(self, mapping: list[tuple[int, int]]) -> None:
        """Device blocks -> host blocks, mapping = [(device_id, host_id)]."""
        self._copy(mapping, (self.k, self.v), (self.host_k, self.host_v))

    def copy_in(self, mapping: list[tuple[int, int]]) -> None:
        """Host blocks -> device blocks, mapping = [(host_id, device_id)]."""
        self._copy(mapping, (self.host_k, self.host_v), (self.k, self.v))

    def _copy(self, mapping, src_pair, dst_pair) -> None:
        if not mapping:
            return
        src_ids, dst_ids = zip(*mapping)
        for src, dst in zip(src_pair, dst_pair):
            src_slots = self._slot_index(list(src_ids), src.device)
            dst_slots = self._slot_index(list(dst_ids), dst.device)
            # blocking: a non-blocking copy to the host would be read by the CPU before it had landed
            dst[:, dst_slots] = src[:, src_slots].to(dst.device)
