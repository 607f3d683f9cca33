"""Block tables as rows of one numpy array, each row with a version that every write to it bumps.

Rebuilding a [batch, width] array from per-sequence Python lists every step cost the engine thread ~15% of
its time at a batch of 512 (tens of thousands of ints through the interpreter). Instead each sequence that
holds blocks keeps a row here for as long as it holds them, and the row changes only when its table does:
a few appended ids per 16 generated tokens. The runner keeps a copy on the device (device_tables.py) and
sends it only the rows whose version moved since it last synced them; it keeps that record itself, so reading
never changes anything here.

This is the only store of block tables: the BlockManager is its only writer and answers every question about
a table from it; the model runner reads whole steps' rows. Rows and columns grow by doubling, so no limit on
sequences or context is fixed here.
"""
from __future__ import annotations

import numpy as np


class TableRows:
    def __init__(self, rows: int = 64, width: int = 16):
        self.blocks = np.zeros((rows, width), np.int64)    # [row, i]: the sequence's i-th block
        self.lens = np.zeros(rows, np.int64)               # [row]: how many of the row's entries are its blocks
        self._row_of: dict[str, int] = {}
        self._free: list[int] = list(range(rows - 1, -1, -1))
        self.version = np.zeros(rows, np.int64)            # [row]: bumped by every write to the row

    def row(self, seq_id: str) -> int:
        return self._row_of[seq_id]

    def __contains__(self, seq_id: str) -> bool:
        return seq_id in self._row_of

    def table(self, seq_id: str) -> list[int]:
        """The sequence's block ids (a copy); empty when it holds no row."""
        r = self._row_of.get(seq_id)
        return [] if r is None else self.blocks[r, :self.lens[r]].tolist()

    def length(self, seq_id: str) -> int:
        """How many blocks the sequence holds (0 when it holds no row)."""
        r = self._row_of.get(seq_id)
        return 0 if r is None else int(self.lens[r])

    def block(self, seq_id: str, i: int) -> int:
        """The sequence's i-th block id."""
        r = self._row_of[seq_id]
        assert i < self.lens[r]
        return int(self.blocks[r, i])

    # -- writes (the BlockManager's) -------------------------------------------------------------
    def assign(self, seq_id: str, table: list[int]) -> None:
        """The sequence starts holding `table` (a fresh row)."""
        assert seq_id not in self._row_of
        if not self._free:
            self._grow_rows()
        r = self._row_of[seq_id] = self._free.pop()
        self.lens[r] = 0
        self.append(seq_id, table)

    def append(self, seq_id: str, block_ids: list[int]) -> None:
        r = self._row_of[seq_id]
        n, end = int(self.lens[r]), int(self.lens[r]) + len(block_ids)
        while end > self.blocks.shape[1]:
            self.blocks = np.concatenate([self.blocks, np.zeros_like(self.blocks)], axis=1)
        self.blocks[r, n:end] = block_ids
        self.lens[r] = end
        self.version[r] += 1

    def release(self, seq_id: str) -> list[int]:
        """The sequence stops holding its row; returns the blocks it held."""
        r = self._row_of.pop(seq_id, None)
        if r is None:
            return []
        held = self.blocks[r, :self.lens[r]].tolist()
        self.lens[r] = 0
        self._free.append(r)
        return held

    def _grow_rows(self) -> None:
        old = len(self.lens)
        self.blocks = np.concatenate([self.blocks, np.zeros_like(self.blocks)])
        self.lens = np.concatenate([self.lens, np.zeros_like(self.lens)])
        self.version = np.concatenate([self.version, np.zeros_like(self.version)])
        self._free.extend(range(2 * old - 1, old - 1, -1))

    def prefix_order(self, seq_ids: list[str], depth: int = 4) -> list[int]:
        """Positions of `seq_ids` (each holding a row) with those that share their `depth`-th block next to each
        other: each such group where its first member is, members in the given order (a table shorter than that is
        a group of its own). Prefix-cache blocks chain, so sharing a block means sharing the prefix up to it; past a
        system prompt's few blocks, that is one conversation. The deep block, not the first: two prompts prefilled
        in one step each hold a copy of a common system block, and a later turn of the second one then holds the
        first's copy and the second's own blocks after it. A system prompt of `depth` blocks or more puts all its
        tables in one group: then nothing moves."""
        if depth > self.blocks.shape[1]:         # no table is that long: each is a group of its own
            return list(range(len(seq_ids)))
        rows = np.fromiter((self._row_of[s] for s in seq_ids), np.int64, len(seq_ids))
        at = np.arange(len(rows))
        deep = np.where(self.lens[rows] >= depth, self.blocks[rows, depth - 1], -1 - at)
        _, first, group = np.unique(deep, return_index=True, return_inverse=True)
        return np.lexsort((at, first[group])).tolist()       # by the group's first position, then its own

    # -- reads (the runner's) ------------------------------------------------------------------
    def width(self, rows: np.ndarray, round_to: int = 1) -> int:
        """Columns that hold every one of these rows' tables (at least 1), rounded up to `round_to`."""
        width = max(1, int(self.lens[rows].max(initial=1)))
        return -(-width // round_to) * round_to
