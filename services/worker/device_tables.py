"""The block tables' copy on the device, kept current by sending only the rows that changed.

A step's attention reads its sequences' block tables on the GPU. Gathering them on the host ([batch, width]
numpy, then ~0.5 MB through the step's host-to-device copy at a batch of 512) was a fifth of the serving
engine thread's samples on an H200 (docs/BENCHMARKS.md, thread profile of 2026-12-03). Here the whole
TableRows array lives on the device, each step sends the rows written since the last one (new sequences,
and a block appended every 16 tokens per decoding sequence), and the step's tables are one gather there.

The runner owns this copy and its record of which row versions it holds (`_synced`); TableRows (the
BlockManager's) stays the only store that is written to, and reading it changes nothing there.
Usage per step: `changes()` -> send the arrays with the step's others -> `apply(sent)` -> `gather(...)`.
All work is queued on the current stream, in order, so a step's gather sees every earlier update.
"""
from __future__ import annotations

import numpy as np
import torch

from services.worker.table_rows import TableRows

COLUMN_MULTIPLE = 16     # the device copy's width is a multiple of this, so a rounded step width always fits


class DeviceTables:
    def __init__(self, tables: TableRows, device: torch.device):
        self.tables = tables
        self.device = device
        self.blocks = torch.zeros(0, 0, dtype=torch.int32, device=device)   # [rows, columns]
        self._synced = np.zeros(0, np.int64)        # [row]: the TableRows version the device copy holds
        self._sending: tuple[np.ndarray, np.ndarray] = (np.zeros(0, np.int64), np.zeros(0, np.int64))

    def changes(self) -> tuple[np.ndarray, np.ndarray]:
        """(changed row ids, their rows [k, columns] as int64), to go to the device with the step's inputs:
        the rows whose version differs from the copy's. When TableRows grew, a new copy of its shape takes every
        row. Rows count as synced only in `apply`, so rows of a step that raised on the way are sent again."""
        host, version = self.tables.blocks, self.tables.version
        rows, cols = host.shape
        if rows > self.blocks.shape[0] or cols > self.blocks.shape[1]:
            width = -(-cols // COLUMN_MULTIPLE) * COLUMN_MULTIPLE
            self.blocks = torch.zeros(rows, width, dtype=torch.int32, device=self.device)
            self._synced = np.full(rows, -1, np.int64)
        changed = np.flatnonzero(version != self._synced)
        self._sending = (changed, version[changed])
        return changed, host[changed]

    def apply(self, changed: torch.Tensor, rows: torch.Tensor) -> None:
        """Write the changed rows (as sent by `changes`, now on the device) into the copy."""
        if changed.numel():
            self.blocks[changed, :rows.shape[1]] = rows.to(torch.int32)
        sent, versions = self._sending
        self._synced[sent] = versions

    def gather(self, rows: torch.Tensor, width: int) -> torch.Tensor:
        """[len(rows), width] int32 tables of these rows (device indices); entries past a table's length are
        stale or 0, never read (attention indexes a table below its sequence's context only)."""
        return self.blocks[rows, :width]
