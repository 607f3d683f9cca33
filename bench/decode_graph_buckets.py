"""Decode graphs timed by bucket (cuda_graphs.DecodeGraphs, session 33): which bucket replays a larger graph, and
what that saves on steps of real contexts.

The worker times every decode graph once captured (on padding rows) and sends a bucket's steps to a larger graph
when that one is faster (cuBLAS picks its GEMM algorithm by the number of rows; at 448 rows on an H100 the MLP's
gate_up GEMM is 1.8x slower than at 416 or 480). This builds the worker's engine on the Llama-3-8B shape (random
bf16 weights; max batch 416 + 32 early rows, as the chat sweeps run), prints each graph's time and the route, then,
for steps of `--rows` sequences of `--context` tokens each, times the routed graph against the bucket's own and
checks that their logits agree.

    python -m bench.decode_graph_buckets --out decode_graph_buckets.json
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from bench.decode_floor import logits_agreement
from bench.engine_bench import LLAMA3_8B
from services.worker.config import WorkerConfig
from services.worker.cuda_graphs import device_seconds
from services.worker.factory import build_engine
from services.worker.model_runner import SeqChunk, load_hf_model


def replay_ms(graphs, inputs, size: int, iters: int) -> tuple[float, torch.Tensor]:
    """Median device time of a step of `inputs` on the graph of `size` rows (its own bucket's or the routed one),
    and its logits. One step run as the worker runs it first fills the static buffers: the rows, and padding up to
    the routed graph, the larger of the two."""
    graphs.run(inputs)
    ms = 1e3 * statistics.median(device_seconds(graphs.graphs[size].replay, iters))
    return ms, graphs.outputs[size][:len(inputs.input_ids)].clone()


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("decode_graph_buckets.json"))
    p.add_argument("--rows", type=int, nargs="+", default=[384, 392, 400, 416, 417, 432, 448])
    p.add_argument("--context", type=int, default=800, help="tokens per sequence (chat steps average ~790)")
    p.add_argument("--iters", type=int, default=20)
    a = p.parse_args()
    from transformers import LlamaConfig

    hf = load_hf_model(None, torch.bfloat16, torch.device("cuda"), random_weights=True,
                       config=LlamaConfig(**LLAMA3_8B))
    engine = build_engine(WorkerConfig(device="cuda", dtype="bfloat16", num_host_blocks=0, max_model_len=4096,
                                       max_batch=416, early_rows=32), model=hf)
    runner, bm, graphs = engine.runner, engine.blocks, engine.runner.graphs
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "replay_ms": {n: round(1e3 * s, 3) for n, s in sorted(graphs.replay_seconds.items())},
           "route": {b: g for b, g in graphs.route.items() if g != b}, "steps": {}}
    print("graph replay ms (padding rows):", json.dumps(res["replay_ms"]), flush=True)
    print("buckets replaying a larger graph:", res["route"], flush=True)
    for n in a.rows:
        seqs = [f"r{n}_{i}" for i in range(n)]
        for s in seqs:
            bm.grow(s, a.context)
        chunks = [SeqChunk([17 + i % 1000], a.context - 1, bm.rows.row(s), True) for i, s in enumerate(seqs)]
        inputs = runner.prepare_decode(chunks)
        own = next(b for b in graphs.buckets if b >= n)      # the bucket, before any route
        routed = graphs.graph_for(n)
        own_ms, own_logits = replay_ms(graphs, inputs, own, a.iters)
        row = {"own_graph": own, "own_ms": round(own_ms, 3), "graph": routed}
        if routed != own:
            routed_ms, logits = replay_ms(graphs, inputs, routed, a.iters)
            row |= {"routed_ms": round(routed_ms, 3), **logits_agreement(logits, own_logits)}
        res["steps"][n] = row
        print(n, "rows:", json.dumps(row), flush=True)
        for s in seqs:
            bm.free(s)
    a.out.write_text(json.dumps(res, indent=1))
    failed = [n for n, row in res["steps"].items() if row.get("ok") is False]
    if failed:
        raise SystemExit(f"routed graphs' logits differ from their buckets' own at {failed} rows")


if __name__ == "__main__":
    main()
