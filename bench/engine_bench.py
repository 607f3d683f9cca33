"""GPU engine benchmark: correctness against transformers, then decode / prefill / offline throughput.

Run on the lent GPU (see docs/BENCHMARKS.md for the exact command). Builds a Llama-3-8B-shaped model
with random bf16 weights (real sizes; the trace decides output lengths), checks the paged decode kernel
and our runner's logits against references, and prints tables: decode step time next to the memory-
bandwidth floor, prefill throughput next to the measured matmul peak, offline output tokens/s against
plain transformers `generate`, peak memory and KV capacity. Writes everything to --out as JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from services.worker.attention import paged_decode_reference, paged_decode_triton
from services.worker.config import WorkerConfig
from services.worker.factory import build_engine
from services.worker import prefill_attention
from services.worker.model_runner import SeqChunk, load_hf_model
from services.worker.sequence import Sampling

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                 rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)


def log(*a):
    print(*a, flush=True)


def timed(fn, iters: int = 20, warmup: int = 3) -> float:
    """Median seconds of fn() with a device sync around each call (host overhead included)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def device_ceilings() -> dict:
    x = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    copy_s = timed(lambda: y.copy_(x), 10)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    mm_s = timed(lambda: a @ a, 10)
    return {"copy_bw": 2 * (2 << 30) / copy_s, "matmul_flops": 2 * 8192**3 / mm_s}


def check_kernel() -> dict:
    """Triton paged decode vs the torch reference on random data; unused slots and output poisoned."""
    torch.manual_seed(0)
    res = {}
    for bsz, heads, kv, lens in ((4, 32, 8, [1, 17, 512, 2047]), (3, 9, 3, [5, 64, 300])):
        dim, bs, nblocks = (128 if heads == 32 else 64), 16, 1024
        kc = torch.full((nblocks * bs, kv, dim), float("nan"), dtype=torch.bfloat16, device="cuda")
        vc = torch.full_like(kc, float("nan"))
        tables = torch.randperm(nblocks, device="cuda")[: bsz * 128].view(bsz, 128).int()
        for b, n in enumerate(lens):     # fill only the slots the sequences own
            blocks = tables[b, : -(-n // bs)].long()
            slots = (blocks[:, None] * bs + torch.arange(bs, device="cuda")).reshape(-1)[:n]
            kc[slots] = torch.randn(n, kv, dim, dtype=torch.bfloat16, device="cuda")
            vc[slots] = torch.randn(n, kv, dim, dtype=torch.bfloat16, device="cuda")
        q = torch.randn(bsz, heads, dim, dtype=torch.bfloat16, device="cuda")
        lens_t = torch.tensor(lens, dtype=torch.int32, device="cuda")
        ref = paged_decode_reference(q.double(), kc.double(), vc.double(), tables, lens_t, bs, dim**-0.5)
        for splits in (1, None):                     # one pass per sequence, and flash-decoding slices
            out = torch.full_like(q, float("nan"))
            paged_decode_triton(q, kc, vc, tables, lens_t, bs, dim**-0.5, out=out, splits=splits)
            err = ((out.double() - ref).norm() / ref.norm()).item()
            res[f"heads{heads}_kv{kv}_splits{splits or 'auto'}"] = {"rel_err": err, "nan": bool(torch.isnan(out).any())}
    return res


def check_logits(engine, hf, prompts: list[int], steps: int, late: int = 100, join_at: int = 8) -> dict:
    """Our runner vs transformers' forward (its own KV cache), same weights, same tokens fed to both.

    `prompts` prefill together; then `steps` decode steps (CUDA graphs). At step `join_at` another
    sequence joins with a `late`-token prompt in two chunks, so two steps mix decodes with prefill
    chunks (one of them continuing from cached context)."""
    from transformers import DynamicCache

    runner, bm = engine.runner, engine.blocks
    gen = torch.Generator().manual_seed(1)
    ids = {f"c{i}": torch.randint(0, hf.config.vocab_size, (n,), generator=gen).tolist()
           for i, n in enumerate(prompts + [late])}
    late_id = f"c{len(prompts)}"
    caches = {s: DynamicCache() for s in ids}
    errs, agree = [], []

    def hf_logits(s, tokens):
        x = torch.tensor([tokens], device=runner.device)
        return hf(input_ids=x, past_key_values=caches[s], use_cache=True).logits[0, -1].float()

    def run(chunk_list):                 # chunk_list: [(seq, tokens, start, wants_logits)]
        for s, toks, start, _ in chunk_list:
            bm.grow(s, start + len(toks))
        out = runner.forward([SeqChunk(t, st, bm.rows.row(s), w) for s, t, st, w in chunk_list])
        return dict(zip([s for s, _, _, w in chunk_list if w], out))

    with torch.inference_mode():
        ours = run([(s, ids[s], 0, True) for s in ids if s != late_id])
        refs = {s: hf_logits(s, ids[s]) for s in ours}
        for step in range(steps + 1):
            for s in ours:
                errs.append(((ours[s] - refs[s]).norm() / refs[s].norm()).item())
                agree.append(int(ours[s].argmax() == refs[s].argmax()))
            if step == steps:
                break
            work = []
            for s in ours:               # every sequence with logits decodes its argmax next
                token = int(refs[s].argmax())
                ids[s].append(token)
                work.append((s, [token], len(ids[s]) - 1, True))
            cut = late * 3 // 5
            if step == join_at:
                work.append((late_id, ids[late_id][:cut], 0, False))
            if step == join_at + 1:
                work.append((late_id, ids[late_id][cut:], cut, True))
            ours = run(work)
            # the late sequence's reference sees its whole prompt at once, when our second chunk lands
            refs = {s: hf_logits(s, ids[s] if st == cut else toks) if s == late_id else hf_logits(s, toks)
                    for s, toks, st, w in work if w}
    for s in ids:
        bm.free(s)
    return {"max_rel_err": max(errs), "mean_rel_err": statistics.mean(errs), "argmax_agree": statistics.mean(agree),
            "positions": len(errs), "nan": any(e != e for e in errs)}


def hf_drift(ref, other, prompts: list[int], steps: int) -> dict:
    """How far transformers itself drifts between two dtypes on the same tokens: the yardstick for ours."""
    from transformers import DynamicCache

    gen = torch.Generator().manual_seed(1)
    errs, agree = [], []
    with torch.inference_mode():
        for n in prompts:
            ids = torch.randint(0, ref.config.vocab_size, (1, n), generator=gen).cuda()
            caches = DynamicCache(), DynamicCache()
            for _ in range(steps + 1):
                a, b = (m(input_ids=ids, past_key_values=c, use_cache=True).logits[0, -1].float()
                        for m, c in zip((ref, other), caches))
                errs.append(((b - a).norm() / a.norm()).item())
                agree.append(int(a.argmax() == b.argmax()))
                ids = a.argmax().view(1, 1)
    return {"max_rel_err": max(errs), "mean_rel_err": statistics.mean(errs), "argmax_agree": statistics.mean(agree)}


def shallow_checks(layers: int = 4) -> dict:
    """On a shallow model of Llama-3-8B widths: ours in fp32 against transformers in fp32 (rounding cannot
    hide a bug there), and ours in bf16 against fp32 next to transformers' own bf16 against fp32."""
    import copy

    from transformers import LlamaConfig

    cfg = LlamaConfig(**{**LLAMA3_8B, "num_hidden_layers": layers})
    hf32 = load_hf_model(None, torch.float32, torch.device("cuda"), random_weights=True, config=cfg)
    hf16 = copy.deepcopy(hf32).to(torch.bfloat16)
    res = {}
    for name, model, dtype in (("ours_fp32_vs_hf_fp32", hf32, "float32"), ("ours_bf16_vs_hf_fp32", hf16, "bfloat16")):
        engine = build_engine(WorkerConfig(device="cuda", dtype=dtype, max_batch=8, num_blocks=512,
                                           num_host_blocks=0, max_model_len=4096), model=model)
        res[name] = check_logits(engine, hf32, [37, 200, 513], steps=16)
        del engine
    res["hf_bf16_vs_hf_fp32"] = hf_drift(hf32, hf16, [37, 200, 513], steps=16)
    del hf32, hf16
    torch.cuda.empty_cache()
    return res


def decode_step_times(engine, weight_bytes: int, kv_bytes_per_token: int, bw: float, batches, contexts) -> list:
    runner, bm = engine.runner, engine.blocks
    rows = []
    for ctx in contexts:
        for bsz in batches:
            if bsz * (ctx + 16) > bm.num_free * bm.block_size or bsz > engine.sched.max_batch:
                continue
            seqs = [f"d{ctx}_{i}" for i in range(bsz)]
            for s in seqs:
                bm.grow(s, ctx)
            chunks = [SeqChunk([1], ctx - 1, bm.rows.row(s), True) for s in seqs]
            step_s = timed(lambda: runner.forward(chunks), iters=30)
            floor = (weight_bytes + bsz * ctx * kv_bytes_per_token) / bw
            rows.append({"ctx": ctx, "batch": bsz, "step_ms": step_s * 1e3, "floor_ms": floor * 1e3,
                         "ratio": step_s / floor, "tokens_per_s": bsz / step_s})
            for s in seqs:
                bm.free(s)
    return rows


def prefill_throughput(engine, params: int, cfg, peak: float, lengths) -> list:
    runner, bm = engine.runner, engine.blocks
    rows = []
    for n in lengths:
        bm.grow("pf", n)
        chunk = [SeqChunk(list(range(1, n + 1)), 0, bm.rows.row("pf"), True)]
        sec = timed(lambda: runner.forward(chunk), iters=10)
        attn = 2 * 2 * cfg.num_hidden_layers * cfg.hidden_size * n * n / 2     # causal QK^T and PV
        flops = 2 * params * n + attn
        rows.append({"tokens": n, "ms": sec * 1e3, "tokens_per_s": n / sec, "tflops": flops / sec / 1e12,
                     "share_of_peak": flops / sec / peak})
        bm.free("pf")
    return rows


def offline(engine, pairs, vocab: int) -> dict:
    gen = torch.Generator().manual_seed(2)
    for i, (n_in, n_out) in enumerate(pairs):
        engine.add(f"o{i}", torch.randint(0, vocab, (n_in,), generator=gen).tolist(),
                   Sampling(max_tokens=n_out, ignore_eos=True))
    torch.cuda.synchronize()
    t, produced = time.perf_counter(), 0
    while engine.has_work:
        out = engine.step()
        produced += sum(len(d.token_ids) for d in out.deltas)
    sec = time.perf_counter() - t
    return {"requests": len(pairs), "output_tokens": produced, "seconds": sec, "output_tokens_per_s": produced / sec}


def hf_generate_offline(hf, pairs, vocab: int, batch: int) -> dict:
    """Plain transformers generate: batches of `batch` requests, left-padded, until the longest is done."""
    gen = torch.Generator().manual_seed(2)
    produced, t = 0, time.perf_counter()
    for i in range(0, len(pairs), batch):
        group = pairs[i:i + batch]
        width = max(n for n, _ in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, (n_in, _) in enumerate(group):
            ids[r, width - n_in:] = torch.randint(0, vocab, (n_in,), generator=gen)
            mask[r, width - n_in:] = 1
        longest = max(m for _, m in group)
        with torch.inference_mode():
            hf.generate(input_ids=ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=longest,
                        min_new_tokens=longest, do_sample=False, pad_token_id=0)
        produced += sum(m for _, m in group)            # useful tokens only
    torch.cuda.synchronize()
    sec = time.perf_counter() - t
    return {"requests": len(pairs), "output_tokens": produced, "seconds": sec, "output_tokens_per_s": produced / sec}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--lengths", type=Path, required=True, help="JSON [[prompt, output], ...] (bench/make_lengths.py)")
    p.add_argument("--out", type=Path, default=Path("engine_bench.json"))
    p.add_argument("--max-batch", type=int, default=0, help="0: the worker's default (auto from KV room)")
    p.add_argument("--token-budget", type=int, default=0, help="0: the worker's default")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--hf-requests", type=int, default=32)
    p.add_argument("--prefill-reference", action="store_true",
                   help="prompt chunks through the per-chunk SDPA reference instead of the paged prefill kernel")
    p.add_argument("--skip", nargs="*", default=[], help="sections to skip: logits decode prefill offline hf")
    a = p.parse_args()
    prefill_attention.KERNEL_ON = prefill_attention.KERNEL_ON and not a.prefill_reference
    from transformers import LlamaConfig

    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    res["ceilings"] = ceil = device_ceilings()
    log(f"device {res['device']}: copy {ceil['copy_bw'] / 1e12:.2f} TB/s, bf16 matmul {ceil['matmul_flops'] / 1e12:.0f} TFLOP/s")
    res["kernel_check"] = check_kernel()
    log("kernel check", res["kernel_check"])
    if "logits" not in a.skip:
        res["logits_check_4layers"] = shallow_checks()
        for k, v in res["logits_check_4layers"].items():
            log(f"logits check (4 layers) {k}: {v}")

    cfg = LlamaConfig(**LLAMA3_8B)
    t = time.perf_counter()
    hf = load_hf_model(None, torch.bfloat16, torch.device("cuda"), random_weights=True, config=cfg)
    params = sum(x.numel() for x in hf.parameters())
    weight_bytes = sum(x.numel() * x.element_size() for x in hf.parameters())
    wcfg = WorkerConfig(device="cuda", dtype="bfloat16", max_batch=a.max_batch, token_budget=a.token_budget,
                        num_host_blocks=0, max_model_len=4096)
    engine = build_engine(wcfg, model=hf)
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 2
    res["model"] = {"params": params, "weight_bytes": weight_bytes, "kv_blocks": engine.blocks.num_total,
                    "max_batch": engine.sched.max_batch, "token_budget": engine.sched.token_budget,
                    "kv_capacity_tokens": engine.blocks.num_total * engine.blocks.block_size,
                    "build_and_capture_s": time.perf_counter() - t}
    log("model", res["model"])
    if "logits" not in a.skip:
        res["logits_check_bf16"] = check_logits(engine, hf, [37, 200, 513], steps=64)
        log("logits check bf16 (32 layers)", res["logits_check_bf16"])
    if "decode" not in a.skip:
        res["decode"] = decode_step_times(engine, weight_bytes, kv_per_token, ceil["copy_bw"],
                                          (1, 8, 32, 64, 128, 256, 512), (512, 2048))
    if "prefill" not in a.skip:
        res["prefill"] = prefill_throughput(engine, params, cfg, ceil["matmul_flops"], (512, 2048))
    pairs = json.loads(a.lengths.read_text())[: a.requests]
    if "offline" not in a.skip:
        res["offline_alise_subset"] = offline(engine, pairs[: a.hf_requests], cfg.vocab_size)
        res["offline_alise"] = offline(engine, pairs, cfg.vocab_size)
    if "hf" not in a.skip:
        res["offline_hf_generate"] = hf_generate_offline(hf, pairs[: a.hf_requests], cfg.vocab_size, a.hf_requests)
    res["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    a.out.write_text(json.dumps(res, indent=2))
    print_tables(res)


def print_tables(res: dict) -> None:
    log("\n== decode step (Llama-3-8B shape, bf16) ==")
    log(f"{'ctx':>5} {'batch':>5} {'step ms':>8} {'floor ms':>8} {'ratio':>6} {'tok/s':>8}")
    for r in res.get("decode", []):
        log(f"{r['ctx']:>5} {r['batch']:>5} {r['step_ms']:>8.2f} {r['floor_ms']:>8.2f} {r['ratio']:>6.2f} {r['tokens_per_s']:>8.0f}")
    log("\n== prefill ==")
    for r in res.get("prefill", []):
        log(f"{r['tokens']:>5} tokens: {r['ms']:.1f} ms, {r['tokens_per_s']:.0f} tok/s, {r['tflops']:.0f} TFLOP/s "
            f"= {100 * r['share_of_peak']:.0f}% of measured peak")
    for key in ("offline_alise_subset", "offline_hf_generate", "offline_alise"):
        if key in res:
            r = res[key]
            log(f"{key}: {r['requests']} requests, {r['output_tokens']} tokens in {r['seconds']:.1f} s "
                f"= {r['output_tokens_per_s']:.0f} tok/s")
    if "offline_hf_generate" in res and "offline_alise_subset" in res:
        log(f"speedup vs HF generate (same {res['offline_hf_generate']['requests']} requests): "
            f"{res['offline_alise_subset']['output_tokens_per_s'] / res['offline_hf_generate']['output_tokens_per_s']:.1f}x")
    log(f"peak GPU memory {res['peak_memory_gib']:.1f} GiB; KV capacity {res['model']['kv_capacity_tokens']} tokens")


if __name__ == "__main__":
    main()
