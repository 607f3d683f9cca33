"""Decode step against the memory-bandwidth floor at small batches, measured three ways, plus a kernel breakdown.

For each (batch, context): the floor is the bytes a decode step must read (every weight matrix except the
embedding table, of which one row per sequence is read, plus the KV of the context) over the measured copy
bandwidth. Against it:
- synced: `runner.forward` with a device sync around it (host preparation included, as engine_bench.py did);
- gpu: the device time of the decode graph's replay alone (CUDA events);
- served: the steady-state step of the overlapped engine decoding that batch (what a client sees per token).
A/B in the same run: "plain" is the graph of the cuBLAS path (separate norm / SiLU kernels), "no-pdl" the
skinny-GEMM layers (skinny_gemm.py) without programmatic dependent launch (pdl.py), "sep-attn" the skinny layers
without PDL and with rotary + KV write, attention and the split merge as three kernels (before
paged_decode_rope), "no-splitk" the default with no projection splitting K (the tuned split-K tiles of
skinny_gemm_configs.json unused); the other columns run the default: skinny layers up to 32 rows (norm prologues up
to 16) with PDL, one decode-attention kernel. Then a torch.profiler trace of graph replays lists the kernels of
one decode step by total time.

    python -m bench.decode_floor --out decode_floor.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

from bench.engine_bench import LLAMA3_8B, device_ceilings, timed
from services.worker.config import WorkerConfig
from services.worker.cuda_graphs import device_seconds
from services.worker.factory import build_engine
from services.worker.fused_ops import rope_, rope_and_cache_
from services.worker.model_runner import SeqChunk, load_hf_model
from services.worker.sequence import Sampling


def read_bytes_per_step(hf, batch: int, ctx: int, kv_per_token: int) -> int:
    embed = hf.get_input_embeddings().weight
    weights = sum(p.numel() * p.element_size() for p in hf.parameters()) - embed.numel() * embed.element_size()
    return weights + batch * embed.shape[1] * embed.element_size() + batch * ctx * kv_per_token


def gpu_replay_ms(runner, chunks, iters: int = 30) -> float:
    """Device time of the decode graph's replay (inputs prepared and copied once, outside the timing)."""
    inputs = runner.prepare_decode(chunks)
    graphs = runner.graphs
    graphs.run(inputs)
    return 1e3 * statistics.median(device_seconds(graphs.graphs[graphs.graph_for(len(chunks))].replay, iters))


def served_step_ms(engine, batch: int, ctx: int, steps: int = 40) -> float:
    """Wall time per step of the overlapped engine once `batch` sequences of `ctx` tokens are all decoding."""
    gen = torch.Generator().manual_seed(batch * 100_003 + ctx)
    for i in range(batch):      # distinct random prompts: shared (prefix-cached) blocks would be read from L2
        prompt = torch.randint(1, engine.vocab_size, (ctx,), generator=gen).tolist()
        engine.add(f"s{batch}_{ctx}_{i}", prompt, Sampling(max_tokens=steps + 20, ignore_eos=True))
    while len(engine.sched.running) < batch or any(s.num_uncomputed > 1 for s in engine.sched.running):
        engine.step()
    for _ in range(3):
        engine.step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t) / steps * 1e3
    for i in range(batch):
        engine.abort(f"s{batch}_{ctx}_{i}")
    return ms


def kernel_breakdown(runner, chunks, replays: int = 10) -> dict:
    """Kernels of one decode graph replay, by total device time (torch.profiler / CUPTI)."""
    from torch.profiler import ProfilerActivity, profile

    inputs = runner.prepare_decode(chunks)
    runner.graphs.run(inputs)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            runner.graphs.run(inputs)
        torch.cuda.synchronize()
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            by_name[e.name][0] += e.device_time_total / replays / 1e3      # ms per step
            by_name[e.name][1] += 1 / replays
    rows = sorted(([name[:90], ms, round(count, 2)] for name, (ms, count) in by_name.items()), key=lambda r: -r[1])
    return {"total_ms": sum(r[1] for r in rows), "kernels_per_step": round(sum(r[2] for r in rows)),
            "top": rows[:25]}


def check_rope_rounding(runner, rows: int = 64) -> dict:
    """rope_and_cache_ (the mixed steps' fused rotary + KV write) against torch's rope_ and a cache write, on random
    qkv rows at random positions: both round through the same steps (rotary_mix), so q, K and V must be the same bits."""
    gen = torch.Generator(device="cuda").manual_seed(7)
    h, kv, d = runner.num_heads, runner.num_kv_heads, runner.head_dim
    qkv = torch.randn(rows, (h + 2 * kv) * d, generator=gen, device="cuda").to(runner.qkv_w[0].dtype)
    pos = torch.randint(0, 4096, (rows,), generator=gen, device="cuda")
    cos, sin = runner.hf.model.rotary_emb(qkv[None], pos[None])
    cos, sin = cos[0], sin[0]
    q, k, v = qkv.split([h * d, kv * d, kv * d], dim=1)
    ref_q, ref_k = rope_(q.reshape(rows, h, d), cos, sin), rope_(k.reshape(rows, kv, d), cos, sin)
    kc, vc = (torch.full((rows, kv, d), float("nan"), dtype=qkv.dtype, device="cuda") for _ in range(2))
    fused = qkv.clone()
    rope_and_cache_(fused, h, kv, d, cos, sin, kc, vc, torch.arange(rows, device="cuda"))
    res = {"q_equal": bool(torch.equal(fused[:, :h * d].view(rows, h, d), ref_q)),
           "k_equal": bool(torch.equal(kc, ref_k)), "v_equal": bool(torch.equal(vc, v.reshape(rows, kv, d)))}
    res["ok"] = all(res.values())
    return res


class CacheCase:
    """Sequences (name -> (context tokens, new tokens)) whose context's K / V in the cache are random (seeded: the
    same every time the cache is reset) and whose new tokens' slots are poisoned with NaN, so that only a kernel
    that writes them reads them."""

    def __init__(self, runner, bm, shapes: dict[str, tuple[int, int]], seed: int):
        self.runner, self.bm, self.shapes, self.seed = runner, bm, shapes, seed
        for name, (ctx, n) in shapes.items():
            bm.grow(name, ctx + n)
        bs = bm.block_size
        slot = lambda name, pos: bm.table(name)[pos // bs] * bs + pos % bs        # noqa: E731
        self.context = torch.tensor([slot(s, p) for s, (ctx, _) in shapes.items() for p in range(ctx)], device="cuda")
        self.new = torch.tensor([slot(s, p) for s, (ctx, n) in shapes.items() for p in range(ctx, ctx + n)],
                                device="cuda")

    def reset_cache(self):
        cache = self.runner.cache
        gen = torch.Generator(device="cuda").manual_seed(self.seed)
        for pool in (cache.k, cache.v):
            if len(self.context):
                pool[:, self.context] = torch.randn(pool[:, self.context].shape, generator=gen, device="cuda",
                                                    dtype=pool.dtype)
            pool[:, self.new] = float("nan")

    def written(self):
        return self.runner.cache.k[:, self.new].clone(), self.runner.cache.v[:, self.new].clone()

    def free(self):
        for name in self.shapes:
            self.bm.free(name)


def check_fused_rope_cache(runner, bm) -> dict:
    """A mixed step (a fresh prompt, a chunk after 48 tokens of context, two decodes) with the fused rotary + KV-write
    kernel and with torch's rotary and a cache write, over contexts of random K / V (CacheCase): both round alike
    (rotary_mix) and the mixed path has no atomics, so the K and V written in every layer and the logits must be the
    same bits. Where they are not, the first layer that differs says where (layer 0: the rotary itself)."""
    torch.manual_seed(0)
    case = CacheCase(runner, bm, {"p": (0, 37), "c": (48, 16), "d1": (100, 1), "d2": (7, 1)}, seed=11)
    chunks = [SeqChunk(torch.randint(0, 1000, (n,)).tolist(), ctx, bm.rows.row(name), True, name)
              for name, (ctx, n) in case.shapes.items()]
    out = {}
    for fused in (False, True):
        case.reset_cache()
        runner.fuse_rope_cache = fused
        with torch.inference_mode():
            logits = runner.forward_mixed(runner.prepare_mixed(chunks))
        out[fused] = (logits.clone(), *case.written())
    runner.fuse_rope_cache = True
    case.free()
    layers = runner.cache.k.shape[0]
    k_layers = [i for i in range(layers) if not torch.equal(out[True][1][i], out[False][1][i])]
    v_layers = [i for i in range(layers) if not torch.equal(out[True][2][i], out[False][2][i])]
    ref = out[False][0]
    res = {"logits_rel_err": ((out[True][0] - ref).abs().max() / ref.abs().max()).item(),
           "argmax_agree": (out[True][0].argmax(-1) == ref.argmax(-1)).float().mean().item(),
           "k_differs_from_layer": k_layers[0] if k_layers else None,
           "v_differs_from_layer": v_layers[0] if v_layers else None}
    res["ok"] = not k_layers and not v_layers and res["logits_rel_err"] == 0
    return res


GRAPH_CHECK_BATCHES = (1, 8, 24)     # split contexts with prologue norms, and norm kernels with two splits
GRAPH_TOLERANCE = 0.1               # relative logits difference: the skinny layers' sums of squares are added in a
                                    # varying order (last bits); a race or a wrong merge is of order 1 (or NaN)
CHECK_LENGTHS = (300, 1, 64, 128, 17, 255, 200, 65)     # contexts of the attention checks: a whole number of
                                                        # 64-token chunks, one token, several non-empty slices


class DecodeCase(CacheCase):
    """`batch` decoding sequences of varied context lengths (CHECK_LENGTHS), one new token each."""

    def __init__(self, runner, bm, batch: int):
        lens = [CHECK_LENGTHS[i % len(CHECK_LENGTHS)] for i in range(batch)]
        super().__init__(runner, bm, {f"case{batch}_{i}": (n - 1, 1) for i, n in enumerate(lens)}, seed=batch)
        self.chunks = [SeqChunk([17 + i], n - 1, bm.rows.row(s), True) for i, (s, n) in enumerate(zip(self.shapes, lens))]


def check_fused_decode_attention(runner, bm) -> dict:
    """Logits and written KV of one eager decode step with paged_decode_rope (one kernel) against the separate
    rotary + KV write, attention and split-merge kernels, at batch sizes with and without context splits (DecodeCase).
    On the plain (cuBLAS) layers, so the two must agree bit for bit: the skinny ones add sums of squares atomically
    in a varying order, so two runs of them differ in the last bits whatever the attention kernels do."""
    res, skinny_rows = {}, runner.skinny_rows
    runner.skinny_rows = 0
    for batch in (1, 8, 32):
        case = DecodeCase(runner, bm, batch)
        out = {}
        for fused in (False, True):
            runner.fuse_decode_attention = fused
            case.reset_cache()
            with torch.inference_mode():
                logits = runner.forward_decode(runner.prepare_decode(case.chunks)).clone()
            out[fused] = (logits, *case.written())
        case.free()
        res[batch] = {"logits_max_abs_diff": (out[True][0] - out[False][0]).abs().max().item(),
                      "argmax_agree": (out[True][0].argmax(-1) == out[False][0].argmax(-1)).float().mean().item(),
                      "k_equal": bool(torch.equal(out[True][1], out[False][1])),
                      "v_equal": bool(torch.equal(out[True][2], out[False][2])),
                      "counts_zero": not bool(runner.split_counts.any())}
        res[batch]["ok"] = (res[batch]["logits_max_abs_diff"] == 0 and res[batch]["k_equal"] and res[batch]["v_equal"]
                            and res[batch]["counts_zero"])
    runner.fuse_decode_attention, runner.skinny_rows = True, skinny_rows
    return res


def logits_agreement(ours: torch.Tensor, ref: torch.Tensor) -> dict:
    """Largest logit difference relative to the largest reference logit, the share of rows with the same argmax,
    and whether the difference is within GRAPH_TOLERANCE."""
    rel = ((ours - ref).abs().max() / ref.abs().max()).item()
    return {"logits_rel_err": rel, "argmax_agree": (ours.argmax(-1) == ref.argmax(-1)).float().mean().item(),
            "ok": rel < GRAPH_TOLERANCE}


def graph_logits(runner, bm, batch: int, replays: int = 3) -> torch.Tensor:
    """The logits of a DecodeCase through the captured decode graphs, replayed `replays` times from the same cache
    (the last replay's; every replay must leave the arrival counters at zero)."""
    case = DecodeCase(runner, bm, batch)
    for _ in range(replays):
        case.reset_cache()
        logits = runner.graphs.run(runner.prepare_decode(case.chunks)).clone()
        torch.cuda.synchronize()
        assert not runner.split_counts.any(), "arrival counters left non-zero after a graph replay"
    case.free()
    return logits


def check_skinny_path(runner, bm, rows: int, batch: int = 8, ctx: int = 300) -> dict:
    """Logits of one decode step through the skinny-GEMM layers against the plain (cuBLAS) layers, eager."""
    seqs = [f"chk{i}" for i in range(batch)]
    for s in seqs:
        bm.grow(s, ctx)
    chunks = [SeqChunk([17 + i], ctx - 1, bm.rows.row(s), True) for i, s in enumerate(seqs)]
    out = {}
    for skinny in (0, rows):
        runner.skinny_rows = skinny
        with torch.inference_mode():
            out[skinny] = runner.forward_decode(runner.prepare_decode(chunks)).clone()
    for s in seqs:
        bm.free(s)
    plain, fused = out[0], out[rows]
    return {"rows": rows, **logits_agreement(fused, plain)}


@torch.inference_mode()          # the device tables are inference tensors, updated in place
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("decode_floor.json"))
    p.add_argument("--batches", type=int, nargs="*", default=[1, 8, 16, 32, 64])
    p.add_argument("--contexts", type=int, nargs="*", default=[512, 2048])
    p.add_argument("--profile-batches", type=int, nargs="*", default=[1, 64])
    p.add_argument("--checks-only", action="store_true", help="the correctness checks, no timings")
    a = p.parse_args()
    from transformers import LlamaConfig

    ceil = device_ceilings()
    cfg = LlamaConfig(**LLAMA3_8B)
    hf = load_hf_model(None, torch.bfloat16, torch.device("cuda"), random_weights=True, config=cfg)
    engine = build_engine(WorkerConfig(device="cuda", dtype="bfloat16", num_host_blocks=0, max_model_len=4096),
                          model=hf)
    runner, bm = engine.runner, engine.blocks
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 2
    res = {"device": torch.cuda.get_device_name(), "copy_bw": ceil["copy_bw"], "rows": [], "kernels": {},
           "rope_check": {"rows": check_rope_rounding(runner)}, "fused_check": check_fused_rope_cache(runner, bm),
           "ab_gpu_ms": {}}
    print("fused rotary + KV write against torch's rotary:", res["rope_check"], res["fused_check"], flush=True)
    skinny_rows = runner.skinny_rows
    # 8 rows: norms as the projections' prologues; 24: as kernels of their own (skinny_gemm.MAX_ROWS)
    res["skinny_check"] = [check_skinny_path(runner, bm, skinny_rows, batch) for batch in (8, 24)]
    print("skinny-GEMM decode against the plain path:", res["skinny_check"], flush=True)
    res["fused_attention_check"] = check_fused_decode_attention(runner, bm)
    print("one decode-attention kernel against three:", res["fused_attention_check"], flush=True)
    if a.checks_only:
        a.out.write_text(json.dumps(res, indent=2))
        return exit_on_failed_checks(res)
    # A/B: the graphs of the plain (cuBLAS) layers, of the skinny ones without PDL, with attention in three kernels,
    # and with no projection splitting K (the tuned split-K tiles unused), of the batch sizes measured only (seconds,
    # not a minute per variant); then (below) the default, every bucket
    all_buckets = runner.graphs.buckets
    split_k_counts = runner.skinny_counts
    for variant, rows, with_pdl, fused in (("plain", 0, False, True), ("no-pdl", skinny_rows, False, True),
                                           ("sep-attn", skinny_rows, False, False), ("no-splitk", skinny_rows, True, True)):
        runner.skinny_rows, runner.skinny_pdl, runner.fuse_decode_attention = rows, with_pdl, fused
        runner.skinny_counts = None if variant == "no-splitk" else split_k_counts
        runner.graphs.buckets = sorted(set(a.batches))
        runner.graphs.capture()
        if variant == "sep-attn":
            sep_graph_logits = {b: graph_logits(runner, bm, b) for b in GRAPH_CHECK_BATCHES}
        res["ab_gpu_ms"][variant] = {}
        for ctx in a.contexts:
            for bsz in a.batches:
                for s in (seqs := [f"u{ctx}_{i}" for i in range(bsz)]):
                    bm.grow(s, ctx)
                chunks = [SeqChunk([1], ctx - 1, bm.rows.row(s), True) for s in seqs]
                res["ab_gpu_ms"][variant][f"{ctx}x{bsz}"] = gpu_replay_ms(runner, chunks)
                if ctx == a.contexts[0] and bsz in a.profile_batches:
                    res["kernels"][f"{variant} {bsz}"] = kernel_breakdown(runner, chunks)
                for s in seqs:
                    bm.free(s)
    runner.graphs.buckets = all_buckets
    runner.skinny_rows, runner.skinny_pdl, runner.fuse_decode_attention = skinny_rows, True, True
    runner.skinny_counts = split_k_counts
    runner.graphs.capture()
    res["graph_check"] = {}
    for b in GRAPH_CHECK_BATCHES:      # the default graphs (skinny layers, PDL, one kernel) against three kernels
        res["graph_check"][b] = logits_agreement(graph_logits(runner, bm, b), sep_graph_logits[b])
    print("decode graphs, one attention kernel + PDL against three kernels:", res["graph_check"], flush=True)
    print(f"{'ctx':>5} {'batch':>5} {'floor':>7} {'synced':>7} {'gpu':>7} {'served':>7} {'plain':>7} {'no-pdl':>7} "
          f"{'sep-att':>7} {'no-spk':>7}   ratios synced/gpu/served/plain-gpu/no-pdl-gpu/sep-attn-gpu/no-splitk-gpu")
    for ctx in a.contexts:
        for bsz in a.batches:
            seqs = [f"d{ctx}_{i}" for i in range(bsz)]
            for s in seqs:
                bm.grow(s, ctx)
            chunks = [SeqChunk([1], ctx - 1, bm.rows.row(s), True) for s in seqs]
            floor = read_bytes_per_step(hf, bsz, ctx, kv_per_token) / ceil["copy_bw"] * 1e3
            synced = timed(lambda: runner.forward(chunks), iters=30) * 1e3
            gpu = gpu_replay_ms(runner, chunks)
            if ctx == a.contexts[0] and bsz in a.profile_batches:
                res["kernels"][bsz] = kernel_breakdown(runner, chunks)
            for s in seqs:
                bm.free(s)
            served = served_step_ms(engine, bsz, ctx)
            plain, no_pdl, sep, no_splitk = (res["ab_gpu_ms"][v][f"{ctx}x{bsz}"]
                                       for v in ("plain", "no-pdl", "sep-attn", "no-splitk"))
            row = {"ctx": ctx, "batch": bsz, "floor_ms": floor, "synced_ms": synced, "gpu_ms": gpu, "served_ms": served,
                   "plain_gpu_ms": plain, "no_pdl_gpu_ms": no_pdl, "sep_attn_gpu_ms": sep, "no_splitk_gpu_ms": no_splitk}
            res["rows"].append(row)
            print(f"{ctx:>5} {bsz:>5} {floor:7.3f} {synced:7.3f} {gpu:7.3f} {served:7.3f} {plain:7.3f} {no_pdl:7.3f} "
                  f"{sep:7.3f} {no_splitk:7.3f}   {synced / floor:.3f} / {gpu / floor:.3f} / {served / floor:.3f} / "
                  f"{plain / floor:.3f} / "
                  f"{no_pdl / floor:.3f} / {sep / floor:.3f} / {no_splitk / floor:.3f}", flush=True)
    for bsz, k in res["kernels"].items():
        print(f"\nbatch {bsz} (skinny layers unless named), ctx {a.contexts[0]}: {k['kernels_per_step']} kernels, {k['total_ms']:.3f} ms of kernel time")
        for name, ms, count in k["top"][:14]:
            print(f"  {ms:7.3f} ms  x{count:<6} {name}")
    a.out.write_text(json.dumps(res, indent=2))
    exit_on_failed_checks(res)


def exit_on_failed_checks(res: dict) -> None:
    """A non-zero exit (after the JSON is written) if a check of the attention or rotary kernels failed."""
    failed = [f"{name} {batch}" for name in ("fused_attention_check", "graph_check", "rope_check")
              for batch, row in res.get(name, {}).items() if not row["ok"]]
    failed += ["fused_check"] if not res["fused_check"]["ok"] else []
    if failed:
        raise SystemExit(f"failed checks: {', '.join(failed)}")


if __name__ == "__main__":
    main()
