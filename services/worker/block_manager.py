"""Paged KV memory bookkeeping: fixed-size blocks in one preallocated pool, a block table per sequence.

Pure Python (no torch): it decides *which* blocks; the model runner moves the bytes.

    device pool:  [b0][b1][b2][b3][b4][b5] ...   free list: ids not in any table
    seq "a":      table [b3, b0]        -> token t lives in block table[t // block_size], slot t % block_size
    host pool:    [h0][h1] ...          swapped-out copies, same block size

Device blocks are reference-counted: `share` lets a sequence start with another's full prefix blocks (a
common system prompt, a forked sequence) without copying; a block returns to the free list when the last
table holding it lets go.

Invariants (asserted): a device block is free exactly when its reference count is 0, and its count equals
the number of tables holding it; free + used == total, for the device and the host pool alike.
"""
from __future__ import annotations


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockPool:
    """A free-list allocator over block ids 0..n-1."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def take(self, n: int) -> list[int]:
        assert n <= len(self._free), "caller must check num_free first"
        return [self._free.pop() for _ in range(n)]

    def give_back(self, ids: list[int]) -> None:
        self._free.extend(reversed(ids))
        assert len(self._free) <= self.num_blocks


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, num_host_blocks: int = 0):
        self.block_size = block_size
        self.device = BlockPool(num_blocks)
        self.host = BlockPool(num_host_blocks)
        self._refs = [0] * num_blocks
        self._tables: dict[str, list[int]] = {}
        self._swapped: dict[str, list[int]] = {}

    # -- queries ------------------------------------------------------------------------------
    @property
    def num_total(self) -> int:
        return self.device.num_blocks

    @property
    def num_free(self) -> int:
        return self.device.num_free

    @property
    def num_used(self) -> int:
        return self.device.num_blocks - self.device.num_free

    @property
    def num_swapped(self) -> int:
        return self.host.num_blocks - self.host.num_free

    def table(self, seq_id: str) -> list[int]:
        return self._tables.get(seq_id, [])

    def is_swapped(self, seq_id: str) -> bool:
        return seq_id in self._swapped

    # -- device blocks: check / commit pairs ----------------------------------------------------
    def extra_blocks(self, seq_id: str, num_tokens: int) -> int:
        """Blocks still needed for the sequence to hold `num_tokens` tokens."""
        return max(0, blocks_for(num_tokens, self.block_size) - len(self.table(seq_id)))

    def can_grow(self, seq_id: str, num_tokens: int) -> bool:
        return self.extra_blocks(seq_id, num_tokens) <= self.device.num_free

    def grow(self, seq_id: str, num_tokens: int) -> list[int]:
        """Extend the sequence's table to cover `num_tokens`; call can_grow first."""
        table = self._tables.setdefault(seq_id, [])
        fresh = self.device.take(self.extra_blocks(seq_id, num_tokens))
        for b in fresh:
            self._refs[b] = 1
        table.extend(fresh)
        return table

    def share(self, src_id: str, dst_id: str, num_tokens: int) -> list[int]:
        """Start `dst_id` with the full blocks of `src_id` covering its first `num_tokens` tokens."""
        assert dst_id not in self._tables and dst_id not in self._swapped, "share into a fresh sequence only"
        shared = self.table(src_id)[: num_tokens // self.block_size]
        for b in shared:
            self._refs[b] += 1
        self._tables[dst_id] = list(shared)
        return self._tables[dst_id]

    def _release(self, device_ids: list[int]) -> None:
        for b in device_ids:
            assert self._refs[b] > 0
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self.device.give_back([b])

    def free(self, seq_id: str) -> None:
        """Release everything the sequence holds, on the device and in host swap space."""
        self._release(self._tables.pop(seq_id, []))
        self.host.give_back(self._swapped.pop(seq_id, []))

    # -- swapping: return (src, dst) block mappings for the runner to copy ------------------------
    def can_swap_out(self, seq_id: str) -> bool:
        return len(self.table(seq_id)) <= self.host.num_free

    def swap_out(self, seq_id: str) -> list[tuple[int, int]]:
        device_ids = self._tables.pop(seq_id)
        host_ids = self.host.take(len(device_ids))
        self._swapped[seq_id] = host_ids
        self._release(device_ids)           # shared blocks stay on the device for their other holders
        return list(zip(device_ids, host_ids))

    def can_swap_in(self, seq_id: str) -> bool:
        return len(self._swapped[seq_id]) <= self.device.num_free

    def swap_in(self, seq_id: str) -> list[tuple[int, int]]:
        host_ids = self._swapped.pop(seq_id)
        device_ids = self.device.take(len(host_ids))
        for b in device_ids:
            self._refs[b] = 1
        self._tables[seq_id] = device_ids
        self.host.give_back(host_ids)
        return list(zip(host_ids, device_ids))
