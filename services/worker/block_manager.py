"""Paged KV memory bookkeeping: fixed-size blocks in one preallocated pool, a block table per sequence.

Pure Python (no torch): it decides *which* blocks; the model runner moves the bytes.

    device pool:  [b0][b1][b2][b3][b4][b5] ...   free list: ids not in any table
    seq "a":      table [b3, b0]        -> token t lives in block table[t // block_size], slot t % block_size
    host pool:    [h0][h1] ...          swapped-out copies, same block size

Device blocks are reference-counted: `share` lets a sequence start with another's full prefix blocks (a
common system prompt, a forked sequence) without copying; a block returns to the free list when the last
table holding it lets go.

Prefix caching: a *full* block whose tokens are computed is registered under a key of its whole token
prefix: a BLAKE2b digest chained over the blocks (previous block's digest + this block's token ids), so a
crafted prompt cannot collide with another's prefix and read its KV (Python's hash() could). The chain
starts from a per-sequence salt (the engine passes the tenant): tenants never share cached blocks, so one
cannot learn from its time to first token whether another sent a given prompt. A new sequence starts with the cached blocks of its
longest registered prefix (refcount + 1) and computes only the rest. A registered block whose count falls
to 0 keeps its KV and waits, least recently used first, in `_evictable`; it is handed out again (and
forgotten) only when the free list is empty. Multi-turn chats, which resend their history, and shared
system prompts hit it.

The tables live in `rows` (table_rows.py), one numpy row per sequence holding blocks, which the model runner
reads a step's tables from; this class is their only writer.

Invariants (asserted): a device block is unused exactly when its reference count is 0, and its count equals
the number of tables holding it; free + evictable + used == total; host: free + swapped == total.
"""
from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Callable
from hashlib import blake2b

from services.worker.table_rows import TableRows


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
    def __init__(self, num_blocks: int, block_size: int, num_host_blocks: int = 0, prefix_caching: bool = False):
        self.block_size = block_size
        self.device = BlockPool(num_blocks)
        self.host = BlockPool(num_host_blocks)
        self.prefix_caching = prefix_caching
        self._refs = [0] * num_blocks
        self.rows = TableRows()                     # every sequence's block table, one numpy row each
        self._swapped: dict[str, list[int]] = {}
        # prefix cache: key -> block, block -> key, cached blocks nobody holds (LRU order), and per sequence
        # the keys of its leading blocks registered so far
        self._cached: dict[bytes, int] = {}
        self._key_of: dict[int, bytes] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._seq_keys: dict[str, list[bytes]] = {}

    # -- queries ------------------------------------------------------------------------------
    @property
    def num_total(self) -> int:
        return self.device.num_blocks

    @property
    def num_free(self) -> int:
        """Blocks a sequence can take: never used, or cached with nobody holding them."""
        return self.device.num_free + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.device.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    @property
    def num_swapped(self) -> int:
        return self.host.num_blocks - self.host.num_free

    def table(self, seq_id: str) -> list[int]:
        """The sequence's block ids (a copy; empty when it holds none)."""
        return self.rows.table(seq_id)

    def prefix_order(self, seq_ids: list[str]) -> list[int]:
        """An order of these sequences (positions in the list) with those sharing leading blocks together."""
        return self.rows.prefix_order(seq_ids)

    def num_blocks_of(self, seq_id: str) -> int:
        return self.rows.length(seq_id)

    def is_swapped(self, seq_id: str) -> bool:
        return seq_id in self._swapped

    # -- device blocks: check / commit pairs ----------------------------------------------------
    def extra_blocks(self, seq_id: str, num_tokens: int) -> int:
        """Blocks still needed for the sequence to hold `num_tokens` tokens."""
        return max(0, blocks_for(num_tokens, self.block_size) - self.rows.length(seq_id))

    def can_grow(self, seq_id: str, num_tokens: int) -> bool:
        return self.extra_blocks(seq_id, num_tokens) <= self.num_free

    def grow(self, seq_id: str, num_tokens: int) -> list[int]:
        """Extend the sequence's table to cover `num_tokens`; call can_grow first. Returns the blocks added."""
        if seq_id not in self.rows:
            self.rows.assign(seq_id, [])
        extra = self.extra_blocks(seq_id, num_tokens)
        fresh = self._take(extra) if extra else []
        for b in fresh:
            self._refs[b] = 1
        if fresh:
            self.rows.append(seq_id, fresh)
        return fresh

    def _take(self, n: int) -> list[int]:
        """n unused blocks: never-used ones first, then the least recently used cached ones (forgotten)."""
        short = n - self.device.num_free
        evicted = []
        for _ in range(max(0, short)):
            block, _ = self._evictable.popitem(last=False)
            del self._cached[self._key_of.pop(block)]
            evicted.append(block)
        return self.device.take(n - len(evicted)) + evicted

    # -- prefix cache ------------------------------------------------------------------------------
    @staticmethod
    def prefix_key(parent: bytes | None, tokens: list[int]) -> bytes:
        """The key of a block holding `tokens` after the prefix whose last block's key is `parent`."""
        return blake2b((parent or b"") + array("q", tokens).tobytes(), digest_size=16).digest()

    def forget_cached(self) -> None:
        """Drop every prefix-cache entry (their blocks stay with their holders or become free)."""
        for block in self._evictable:
            self.device.give_back([block])
        self._evictable.clear()
        self._cached.clear()
        self._key_of.clear()
        self._seq_keys.clear()

    def match_prefix(self, seq_id: str, token_ids: list[int], salt: bytes = b"") -> int:
        """A sequence about to be prefilled from scratch takes the cached blocks of its longest registered
        prefix; returns how many tokens they hold. At least one token is always left to compute (the step
        needs it for logits), so a fully cached prompt recomputes its last block into a fresh one."""
        assert seq_id not in self.rows, "match_prefix is for a sequence holding no blocks"
        if not self.prefix_caching:
            return 0
        bs, keys, blocks = self.block_size, [], []
        parent = salt
        for i in range((len(token_ids) - 1) // bs):
            key = self.prefix_key(parent, token_ids[i * bs:(i + 1) * bs])
            block = self._cached.get(key)
            if block is None:
                break
            keys.append(key)
            blocks.append(block)
            parent = key
        for b in blocks:
            if self._refs[b] == 0:
                del self._evictable[b]
            self._refs[b] += 1
        self.rows.assign(seq_id, blocks)
        self._seq_keys[seq_id] = keys
        return len(blocks) * bs

    def register_computed(self, seq_id: str, num_computed: int, tokens: Callable[[int, int], list[int]],
                          salt: bytes = b"") -> None:
        """The sequence's first `num_computed` tokens (`tokens(start, stop)` gives them) have their KV in its
        blocks: register its newly full blocks. A prefix registered first by someone else keeps its block;
        ours then stays private. Called every step, so the common case (no new full block) returns at once."""
        if not self.prefix_caching:
            return
        keys = self._seq_keys.setdefault(seq_id, [])
        full = num_computed // self.block_size
        if full <= len(keys):
            return
        bs = self.block_size
        parent = keys[-1] if keys else salt
        for i in range(len(keys), full):
            key, block = self.prefix_key(parent, tokens(i * bs, (i + 1) * bs)), self.rows.block(seq_id, i)
            if key not in self._cached and block not in self._key_of:
                self._cached[key] = block
                self._key_of[block] = key
            keys.append(key)
            parent = key

    def share(self, src_id: str, dst_id: str, num_tokens: int) -> list[int]:
        """Start `dst_id` with the full blocks of `src_id` covering its first `num_tokens` tokens."""
        assert dst_id not in self.rows and dst_id not in self._swapped, "share into a fresh sequence only"
        shared = self.table(src_id)[: num_tokens // self.block_size]
        for b in shared:
            self._refs[b] += 1
        self.rows.assign(dst_id, shared)
        return shared

    def _release(self, device_ids: list[int]) -> None:
        for b in device_ids:
            assert self._refs[b] > 0
            self._refs[b] -= 1
            if self._refs[b] == 0:
                if b in self._key_of:               # keeps its KV for a later hit until it is needed
                    self._evictable[b] = None
                else:
                    self.device.give_back([b])

    def free(self, seq_id: str) -> None:
        """Release everything the sequence holds, on the device and in host swap space."""
        self._release(self.rows.release(seq_id))
        self._seq_keys.pop(seq_id, None)
        self.host.give_back(self._swapped.pop(seq_id, []))

    # -- swapping: return (src, dst) block mappings for the runner to copy ------------------------
    def can_swap_out(self, seq_id: str) -> bool:
        return self.rows.length(seq_id) <= self.host.num_free

    def swap_out(self, seq_id: str) -> list[tuple[int, int]]:
        device_ids = self.rows.release(seq_id)
        self._seq_keys.pop(seq_id, None)       # its blocks come back fresh: registered again as computed
        host_ids = self.host.take(len(device_ids))
        self._swapped[seq_id] = host_ids
        self._release(device_ids)           # shared blocks stay on the device for their other holders
        return list(zip(device_ids, host_ids))

    def can_swap_in(self, seq_id: str) -> bool:
        return len(self._swapped[seq_id]) <= self.num_free

    def swap_in(self, seq_id: str) -> list[tuple[int, int]]:
        host_ids = self._swapped.pop(seq_id)
        device_ids = self._take(len(host_ids))
        for b in device_ids:
            self._refs[b] = 1
        self.rows.assign(seq_id, device_ids)
        self.host.give_back(host_ids)
        return list(zip(host_ids, device_ids))
