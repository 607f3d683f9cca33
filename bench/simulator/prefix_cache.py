"""A simulated worker's prefix cache, as services/worker/block_manager.py keeps it, by block key.

A full block a job computed is registered under its key (the prompt up to that block's end). While some job's
table holds it the block is in use (its KV counted in the worker's used blocks); when the last holder lets go it
stays cached but *evictable*, least recently released first, and is handed out again (forgotten) only when no free
block is left. A job that starts looks its prompt up: its longest cached prefix is taken, not computed again.

Until session 43 the simulator kept every prompt block ever computed: true on an H200's ~885k-token pool, not on
an H100's ~440k, where the simulated alise run computed 71k (6%) fewer prefill tokens than the live one.

Only prompt blocks carry keys the next turn of a chat can hit (a benchmark's outputs are not the next prompt's
history); a job's other full blocks (its generated tokens) are cached live too and take room in the evictable
line, so they join it here as keys nothing looks up.
"""
from __future__ import annotations

from collections import OrderedDict


class PrefixCache:
    def __init__(self) -> None:
        self._holders: dict[int, int] = {}                     # key -> tables holding its block (> 0)
        # cached, held by none, least recently released first; a block no prompt can name (generated tokens) under a
        # key of its own (an object: no prompt's key can equal it)
        self._evictable: OrderedDict[object, None] = OrderedDict()
        self.shared = 0                 # holders beyond the first, summed: blocks each job counts that the pool has once

    @property
    def evictable(self) -> int:
        return len(self._evictable)

    @property
    def held(self) -> int:
        """Cached blocks some table holds."""
        return len(self._holders)

    def hits(self, keys: tuple[int, ...]) -> int:
        """How many of the leading `keys` are cached (held, or evictable)."""
        n = 0
        for key in keys:
            if key not in self._holders and key not in self._evictable:
                break
            n += 1
        return n

    def hold(self, keys: tuple[int, ...], held: int, now: int) -> None:
        """A job's table held the blocks of keys[:held] and now holds keys[:now] (now >= held: a table grows until
        `release`): a block found cached leaves the evictable line; one computed joins the cache as held."""
        for key in keys[held:now]:
            if (n := self._holders.get(key)) is not None:
                self._holders[key] = n + 1
                self.shared += 1
            else:
                self._evictable.pop(key, None)
                self._holders[key] = 1

    def release(self, keys: tuple[int, ...], other_blocks: int) -> None:
        """A job lets go of its prompt blocks `keys` and `other_blocks` full blocks after them: they join the
        evictable line in table order, as the worker's block manager frees a table (head first. Tail first, as
        vLLM frees, was tried in session 43: the same prefill tokens within 0.3% on chat3000, since a turn's
        history is either still cached whole when its next turn comes or gone whole)."""
        for key in keys:
            if (n := self._holders[key]) > 1:
                self._holders[key] = n - 1
                self.shared -= 1
            else:
                del self._holders[key]
                self._evictable[key] = None
        for _ in range(other_blocks):
            self._evictable[object()] = None

    def evict(self, n: int) -> None:
        """Hand out the n least recently released blocks (their keys are forgotten)."""
        for _ in range(min(n, len(self._evictable))):
            self._evictable.popitem(last=False)
