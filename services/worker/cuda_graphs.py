"""CUDA graphs for decode steps: one graph per batch-size bucket, replayed with static buffers.

A decode step of a large model launches hundreds of small kernels; replaying a captured graph removes
the per-launch CPU cost, which at small batches is most of the step. Inputs are copied into static
buffers; a batch is padded to the next bucket with rows that read and write only the scratch block.

Each bucket's graph is timed once captured, and a bucket whose graph is slower than a larger one's sends its batches
to the larger one: cuBLAS chooses a GEMM algorithm by the number of rows, and at some sizes a worse one (on an H100
with the Llama-3-8B shape, the MLP's gate_up GEMM takes 1.8x as long at 448 rows as at 416 or 480, a decode step
~4 ms more: docs/BENCHMARKS.md, session 33). A spare graph a bucket or two past the largest gives that one a way out.
"""
from __future__ import annotations

import logging
import time

import torch

from services.worker.model_runner import DecodeInputs, ModelRunner

log = logging.getLogger("alise.worker.graphs")
# every 8 up to 64, then every 16 to 256, every 32 to 512, every 64 beyond: padding wastes < 1/8 of a step
DEFAULT_BUCKETS = (1, 2, 4, *range(8, 64, 8), *range(64, 256, 16), *range(256, 512, 32), *range(512, 4097, 64))
SPARE_ROWS = 1 / 8              # spare graphs up to this share past the largest bucket, for it to send its steps to
TIME_MARGIN = 0.03              # a larger graph takes a bucket's steps only when this much faster (not for noise)
TIMED_REPLAYS = 5               # the fastest of these is a graph's time


def fastest_at_least(seconds: dict[int, float], margin: float = TIME_MARGIN) -> dict[int, int]:
    """Which graph serves each bucket: the fastest graph of its size or larger, when faster than its own by `margin`
    (padding rows cost next to nothing: they read one scratch block)."""
    route, best = {}, None
    for size in sorted(seconds, reverse=True):
        if best is not None and seconds[best] < (1 - margin) * seconds[size]:
            route[size] = best
        else:
            route[size] = size
            if best is None or seconds[size] < seconds[best]:
                best = size
    return route


class DecodeGraphs:
    def __init__(self, runner: ModelRunner, max_batch: int, max_model_len: int, timed_buckets: bool = True):
        self.runner = runner
        self.buckets = [b for b in DEFAULT_BUCKETS if b < max_batch] + [max_batch]
        self.max_batch = max_batch
        # graphs captured beyond the batch, only for the largest bucket to send its steps to when faster
        spare_limit = max_batch * (1 + SPARE_ROWS) if timed_buckets else max_batch
        self.spares = [b for b in DEFAULT_BUCKETS if max_batch < b <= spare_limit]
        rows = max(self.buckets + self.spares)
        dev = runner.device
        self.width = -(-max_model_len // runner.block_size)
        scratch = runner.cache.scratch_block
        self.static = DecodeInputs(
            input_ids=torch.zeros(rows, dtype=torch.long, device=dev),
            positions=torch.zeros(rows, dtype=torch.long, device=dev),
            slots=torch.full((rows,), scratch * runner.block_size, dtype=torch.long, device=dev),
            block_tables=torch.full((rows, self.width), scratch, dtype=torch.int32, device=dev),
            context_lens=torch.ones(rows, dtype=torch.int32, device=dev))
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.timed_buckets = timed_buckets
        self.replay_seconds: dict[int, float] = {}     # each graph's time on padding rows (timed_buckets only)
        self.route: dict[int, int] = {}                # bucket -> the size of the graph its steps replay

    def fits(self, batch: int) -> bool:
        return batch <= self.max_batch

    def _view(self, n: int) -> DecodeInputs:
        return DecodeInputs(*(t[:n] for t in vars(self.static).values()))

    @torch.inference_mode()
    def capture(self) -> None:
        started = time.perf_counter()
        pool = None
        self.graphs, self.outputs = {}, {}
        self.route = {b: b for b in self.buckets}
        for n in sorted(self.buckets + self.spares, reverse=True):    # largest first: smaller ones reuse its memory
            self.runner.forward_decode(self._view(n))    # warm up (Triton compile, cuBLAS handles)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[n] = self.runner.forward_decode(self._view(n))
            pool = graph.pool()
            self.graphs[n] = graph
        torch.cuda.synchronize()
        log.info("captured %d decode graphs in %.1f s", len(self.graphs), time.perf_counter() - started)
        if self.timed_buckets:
            self._route_by_time()

    def _route_by_time(self) -> None:
        """Times every graph on padding rows (all the static buffers hold before the first step) and sends each
        bucket's steps to the fastest graph of its size or larger (the others stay: they share one memory pool)."""
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(3 * TIMED_REPLAYS):                 # clocks up before anything is timed
            self.graphs[max(self.graphs)].replay()
        for n, graph in self.graphs.items():
            times = []
            for _ in range(TIMED_REPLAYS):
                start.record()
                graph.replay()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            self.replay_seconds[n] = min(times)
        self.route = {b: g for b, g in fastest_at_least(self.replay_seconds).items() if b in self.buckets}
        for b, g in self.route.items():
            if g != b:
                log.info("decode steps of up to %d rows replay the %d-row graph (%.2f ms, its own %.2f ms)",
                         b, g, 1e3 * self.replay_seconds[g], 1e3 * self.replay_seconds[b])

    def graph_for(self, rows: int) -> int:
        """The size of the graph a step of `rows` rows replays."""
        return self.route[next(b for b in self.buckets if b >= rows)]

    def run(self, batch: DecodeInputs) -> torch.Tensor:
        """`batch` is already on the device: these are device-to-device copies into the static buffers."""
        n = batch.input_ids.shape[0]
        bucket = self.graph_for(n)
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
