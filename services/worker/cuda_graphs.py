"""CUDA graphs for decode steps: one graph per batch-size bucket, replayed with static buffers.

A decode step of a large model launches hundreds of small kernels; replaying a captured graph removes
the per-launch CPU cost, which at small batches is most of the step. Inputs are copied into static
buffers; a batch is padded to the next bucket with rows that read and write only the scratch block.
"""
from __future__ import annotations

import logging
import time

import torch

from services.worker.model_runner import DecodeInputs, ModelRunner

log = logging.getLogger("alise.worker.graphs")
# every 8 up to 64, then every 16 to 256, every 32 to 512, every 64 beyond: padding wastes < 1/8 of a step
DEFAULT_BUCKETS = (1, 2, 4, *range(8, 64, 8), *range(64, 256, 16), *range(256, 512, 32), *range(512, 4097, 64))


class DecodeGraphs:
    def __init__(self, runner: ModelRunner, max_batch: int, max_model_len: int):
        self.runner = runner
        self.buckets = [b for b in DEFAULT_BUCKETS if b < max_batch] + [max_batch]
        self.max_batch = max_batch
        dev = runner.device
        self.width = -(-max_model_len // runner.block_size)
        scratch = runner.cache.scratch_block
        self.static = DecodeInputs(
            input_ids=torch.zeros(max_batch, dtype=torch.long, device=dev),
            positions=torch.zeros(max_batch, dtype=torch.long, device=dev),
            slots=torch.full((max_batch,), scratch * runner.block_size, dtype=torch.long, device=dev),
            block_tables=torch.full((max_batch, self.width), scratch, dtype=torch.int32, device=dev),
            context_lens=torch.ones(max_batch, dtype=torch.int32, device=dev))
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def fits(self, batch: int) -> bool:
        return batch <= self.max_batch

    def _view(self, n: int) -> DecodeInputs:
        return DecodeInputs(*(t[:n] for t in vars(self.static).values()))

    @torch.inference_mode()
    def capture(self) -> None:
        started = time.perf_counter()
        pool = None
        for n in sorted(self.buckets, reverse=True):    # largest first: smaller ones reuse its memory
            self.runner.forward_decode(self._view(n))    # warm up (Triton compile, cuBLAS handles)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[n] = self.runner.forward_decode(self._view(n))
            pool = graph.pool()
            self.graphs[n] = graph
        torch.cuda.synchronize()
        log.info("captured %d decode graphs in %.1f s", len(self.graphs), time.perf_counter() - started)

    def run(self, batch: DecodeInputs) -> torch.Tensor:
        """`batch` is already on the device: these are device-to-device copies into the static buffers."""
        n = batch.input_ids.shape[0]
        bucket = next(b for b in self.buckets if b >= n)
        s, scratch = self.static, self.runner.cache.scratch_block
        s.input_ids[:n].copy_(batch.input_ids)
        s.positions[:n].copy_(batch.positions)
        s.slots[:n].copy_(batch.slots)
        s.context_lens[:n].copy_(batch.context_lens)
        width = min(batch.block_tables.shape[1], self.width)    # columns past a table's end are never read
        s.block_tables[:n, :width].copy_(batch.block_tables[:, :width])
        if n < bucket:                                   # padding rows: scratch block only
            s.slots[n:bucket].fill_(scratch * self.runner.block_size)
            s.context_lens[n:bucket].fill_(1)
            s.block_tables[n:bucket, 0].fill_(scratch)
        self.graphs[bucket].replay()
        return self.outputs[bucket][:n]
