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


def spare_sizes(buckets: list[int], rows: int | None = None) -> list[int]:
    """Graphs captured only for the largest bucket to send its steps to when faster: the default buckets up to
    SPARE_ROWS past it, within the static buffers' `rows` when given. (A spare a few rows past every large bucket
    would give each a way out, but each graph keeps its own logits, rows x vocabulary floats: ~1.4 GiB more for the
    Llama-3-8B shape, beyond the activation reserve. Not done.)"""
    largest = max(buckets)
    limit = largest * (1 + SPARE_ROWS) if rows is None else min(rows, largest * (1 + SPARE_ROWS))
    return [b for b in DEFAULT_BUCKETS if largest < b <= limit]


def device_seconds(fn, replays: int) -> list[float]:
    """The device's time of each of `replays` calls of fn (a graph's replay, a step), timed by CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


class DecodeGraphs:
    def __init__(self, runner: ModelRunner, max_batch: int, max_model_len: int, timed_buckets: bool = True):
        self.runner = runner
        self.buckets = [b for b in DEFAULT_BUCKETS if b < max_batch] + [max_batch]
        self.max_batch = max_batch
        self.timed_buckets = timed_buckets
        # the static buffers hold the largest graph's rows, a spare one past the batch included
        self.rows = max(self.buckets + spare_sizes(self.buckets)) if timed_buckets else max_batch
        dev = runner.device
        self.width = -(-max_model_len // runner.block_size)
        scratch = runner.cache.scratch_block
        # every entry a valid block from the start: a step's rows overwrite only their tables' first columns
        self.static = DecodeInputs(
            input_ids=torch.zeros(self.rows, dtype=torch.long, device=dev),
            positions=torch.zeros(self.rows, dtype=torch.long, device=dev),
            slots=torch.full((self.rows,), scratch * runner.block_size, dtype=torch.long, device=dev),
            block_tables=torch.full((self.rows, self.width), scratch, dtype=torch.int32, device=dev),
            context_lens=torch.ones(self.rows, dtype=torch.int32, device=dev))
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.replay_seconds: dict[int, float] = {}     # each graph's time on padding rows (timed_buckets only)
        self.route: dict[int, int] = {}                # bucket -> the size of the graph its steps replay

    def fits(self, batch: int) -> bool:
        return batch <= self.max_batch

    def _view(self, n: int) -> DecodeInputs:
        return DecodeInputs(*(t[:n] for t in vars(self.static).values()))

    def _pad(self, start: int, end: int) -> None:
        """Rows start..end become padding: a context of one token in the scratch block, which they read and write
        (their tables' other columns are never read)."""
        s, scratch = self.static, self.runner.cache.scratch_block
        s.slots[start:end].fill_(scratch * self.runner.block_size)
        s.context_lens[start:end].fill_(1)
        s.block_tables[start:end, 0].fill_(scratch)

    @torch.inference_mode()
    def capture(self) -> None:
        """Captures a graph for every bucket (and, timed, the spares past the largest), and routes the buckets. May
        be called again (after the buckets or the runner's kernels changed): everything is captured and timed anew."""
        started = time.perf_counter()
        pool = None
        self._pad(0, self.rows)                          # whatever the last step left: warm-up and timing on padding
        spares = spare_sizes(self.buckets, self.rows) if self.timed_buckets else []
        self.graphs, self.outputs, self.replay_seconds = {}, {}, {}
        for n in sorted(set(self.buckets + spares), reverse=True):    # largest first: smaller ones reuse its memory
            self.runner.forward_decode(self._view(n))    # warm up (Triton compile, cuBLAS handles)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[n] = self.runner.forward_decode(self._view(n))
            pool = graph.pool()
            self.graphs[n] = graph
        torch.cuda.synchronize()
        log.info("captured %d decode graphs in %.1f s", len(self.graphs), time.perf_counter() - started)
        self.route = self._route_by_time() if self.timed_buckets else {b: b for b in self.buckets}

    def _route_by_time(self) -> dict[int, int]:
        """Times every graph just captured on padding rows and sends each bucket's steps to the fastest graph of its
        size or larger (the others stay: their memory is the shared pool's, but for their logits)."""
        device_seconds(self.graphs[max(self.graphs)].replay, 3 * TIMED_REPLAYS)    # clocks up before any timing
        self.replay_seconds = {n: min(device_seconds(g.replay, TIMED_REPLAYS)) for n, g in self.graphs.items()}
        route = {b: g for b, g in fastest_at_least(self.replay_seconds).items() if b in self.buckets}
        for b, g in route.items():
            if g != b:
                log.info("decode steps of up to %d rows replay the %d-row graph (%.2f ms, its own %.2f ms)",
                         b, g, 1e3 * self.replay_seconds[g], 1e3 * self.replay_seconds[b])
        return route

    def graph_for(self, rows: int) -> int:
        """The size of the graph a step of `rows` rows replays."""
        return self.route[next(b for b in self.buckets if b >= rows)]

    def run(self, batch: DecodeInputs) -> torch.Tensor:
        """`batch` is already on the device: these are device-to-device copies into the static buffers."""
        n = batch.input_ids.shape[0]
        size = self.graph_for(n)
        s = self.static
        s.input_ids[:n].copy_(batch.input_ids)
        s.positions[:n].copy_(batch.positions)
        s.slots[:n].copy_(batch.slots)
        s.context_lens[:n].copy_(batch.context_lens)
        width = min(batch.block_tables.shape[1], self.width)    # columns past a table's end are never read
        s.block_tables[:n, :width].copy_(batch.block_tables[:, :width])
        if n < size:
            self._pad(n, size)
        self.graphs[size].replay()
        return self.outputs[size][:n]
