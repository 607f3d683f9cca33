"""Multi-turn ShareGPT replay through the engine, prefix caching on and off (issue 9).

Each conversation's turn k is sent once turn k-1 has finished, with the whole history as its prompt (what a
chat client does): human and gpt turns so far, then the new human message; the output length is the
dataset's reply (ignore_eos). The history holds the dataset's replies, not the generated ones (random
weights generate noise), so a turn can reuse the KV of the previous turn's prompt but not of its output:
a conservative hit rate. Reports the prefix-cache hit rate, prefill tokens saved, TTFT and throughput, and
whether greedy outputs are the same with and without the cache.

    # here: conversation token ids from the dataset (SmolLM2 tokenizer; ids fit Llama-3's vocabulary)
    python -m bench.prefix_replay make ../shared/data/sharegpt_sample_1000.json \
        --tokenizer ~/.cache/alise/models/SmolLM2-135M-Instruct --out .bench-data/sharegpt_conversations.json
    # on the GPU
    python -m bench.prefix_replay run --conversations .bench-data/sharegpt_conversations.json --out $OUT/x.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

MAX_CONTEXT = 2048


def make(a) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    conversations = []
    for item in json.loads(a.dataset.read_text()):
        turns, history = [], 0
        pairs = zip(item.get("conversations", []), item.get("conversations", [])[1:])
        for human, gpt in pairs:
            if human["from"] != "human" or gpt["from"] != "gpt":
                continue
            h, g = tok.encode(human["value"]), tok.encode(gpt["value"])
            if not h or not g or history + len(h) + len(g) > MAX_CONTEXT:
                break
            turns.append([h, g])
            history += len(h) + len(g)
        if len(turns) >= 2:                       # only conversations that resend a history
            conversations.append(turns)
        if len(conversations) >= a.limit:
            break
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(conversations))
    n = sum(len(c) for c in conversations)
    print(f"{len(conversations)} conversations, {n} turns -> {a.out}")


def replay(engine, conversations, tag: str, concurrency: int) -> dict:
    """Closed loop: up to `concurrency` conversations at once, each sending its next turn when one ends."""
    from services.worker.sequence import Sampling

    queue = list(range(len(conversations)))
    state: dict[str, tuple[int, int, list[int]]] = {}    # job -> (conversation, turn, history ids)
    sent_at, first_at, outputs = {}, {}, {}
    admitted0, cached0 = engine.sched.admitted_tokens, engine.sched.cached_tokens

    def send(conv: int, turn: int, history: list[int]) -> None:
        human, gpt = conversations[conv][turn]
        job = f"{tag}-{conv}-{turn}"
        prompt = history + human
        state[job] = (conv, turn, prompt + gpt)
        sent_at[job] = time.perf_counter()
        engine.add(job, prompt, Sampling(max_tokens=len(gpt), ignore_eos=True))

    while queue and len(state) < concurrency:
        send(queue.pop(0), 0, [])
    started, produced = time.perf_counter(), 0
    while engine.has_work:
        out = engine.step()
        now = time.perf_counter()
        for d in out.deltas:
            first_at.setdefault(d.job_id, now)
            outputs.setdefault(d.job_id, []).extend(d.token_ids)
            produced += len(d.token_ids)
        for job, _ in out.finished:
            conv, turn, history = state.pop(job)
            if turn + 1 < len(conversations[conv]):
                send(conv, turn + 1, history)
            elif queue:
                send(queue.pop(0), 0, [])
    sec = time.perf_counter() - started
    ttft = sorted(first_at[j] - sent_at[j] for j in sent_at)
    admitted = engine.sched.admitted_tokens - admitted0
    cached = engine.sched.cached_tokens - cached0
    return {"requests": len(sent_at), "output_tokens": produced, "seconds": sec, "output_tokens_per_s": produced / sec,
            "prompt_tokens": admitted, "cached_tokens": cached, "hit_rate": cached / admitted if admitted else 0.0,
            "ttft_mean_s": statistics.mean(ttft), "ttft_p50_s": ttft[len(ttft) // 2],
            "ttft_p99_s": ttft[int(0.99 * (len(ttft) - 1))],
            "outputs": {j.split("-", 1)[1]: toks for j, toks in outputs.items()}}


def run(a) -> None:
    import torch
    from transformers import LlamaConfig

    from bench.engine_bench import LLAMA3_8B, log
    from services.worker.config import WorkerConfig
    from services.worker.factory import build_engine
    from services.worker.model_runner import load_hf_model

    conversations = json.loads(a.conversations.read_text())[: a.conversations_limit]
    hf = load_hf_model(None, torch.bfloat16, torch.device("cuda"), random_weights=True, config=LlamaConfig(**LLAMA3_8B))
    engine = build_engine(WorkerConfig(device="cuda", dtype="bfloat16", num_host_blocks=0, max_model_len=4096),
                          model=hf)
    res = {"device": torch.cuda.get_device_name(), "conversations": len(conversations),
           "turns": sum(len(c) for c in conversations), "max_batch": engine.sched.max_batch}
    engine.blocks.prefix_caching = False
    replay(engine, conversations[: a.concurrency // 2], "prime", a.concurrency)        # priming run
    for mode in ("off", "on"):
        engine.blocks.prefix_caching = mode == "on"
        res[mode] = replay(engine, conversations, mode, a.concurrency)
        log(mode, {k: v for k, v in res[mode].items() if k != "outputs"})
    same = [res["on"]["outputs"][k] == res["off"]["outputs"][k] for k in res["off"]["outputs"]]
    agree = [x == y for k in res["off"]["outputs"] for x, y in zip(res["on"]["outputs"][k], res["off"]["outputs"][k])]
    res["identical_outputs"] = sum(same) / len(same)
    res["token_agreement"] = sum(agree) / len(agree)
    for mode in ("off", "on"):
        res[mode].pop("outputs")
    a.out.write_text(json.dumps(res, indent=2))
    log(f"\nprefix cache: hit rate {100 * res['on']['hit_rate']:.1f}%, prefill tokens saved {res['on']['cached_tokens']} "
        f"of {res['on']['prompt_tokens']}; TTFT mean {res['off']['ttft_mean_s'] * 1e3:.0f} -> {res['on']['ttft_mean_s'] * 1e3:.0f} ms, "
        f"p99 {res['off']['ttft_p99_s'] * 1e3:.0f} -> {res['on']['ttft_p99_s'] * 1e3:.0f} ms; output tok/s "
        f"{res['off']['output_tokens_per_s']:.0f} -> {res['on']['output_tokens_per_s']:.0f}; greedy outputs identical "
        f"{100 * res['identical_outputs']:.1f}% of requests, {100 * res['token_agreement']:.2f}% of tokens")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("dataset", type=Path)
    m.add_argument("--tokenizer", required=True)
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--limit", type=int, default=1000)
    r = sub.add_parser("run")
    r.add_argument("--conversations", type=Path, required=True)
    r.add_argument("--out", type=Path, default=Path("prefix_replay.json"))
    r.add_argument("--conversations-limit", type=int, default=400)
    r.add_argument("--concurrency", type=int, default=128)
    sub.add_parser("check")
    a = p.parse_args()
    {"make": make, "run": run, "check": check}[a.cmd](a)


def check(a) -> None:
    """fp32 check on the GPU: greedy tokens with prefix-cache hits equal those without (4-layer model of
    Llama-3-8B widths, fp32, so rounding cannot hide a wrong KV); then the cost of a cache-hit chunk's
    attention, explicit mask vs SDPA's lower-right causal bias."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention.bias import causal_lower_right
    from transformers import LlamaConfig

    from bench.engine_bench import LLAMA3_8B, log, timed
    from services.worker.config import WorkerConfig
    from services.worker.factory import build_engine
    from services.worker.model_runner import load_hf_model

    hf = load_hf_model(None, torch.float32, torch.device("cuda"), random_weights=True,
                       config=LlamaConfig(**{**LLAMA3_8B, "num_hidden_layers": 4}))
    engine = build_engine(WorkerConfig(device="cuda", dtype="float32", num_blocks=8192, num_host_blocks=0,
                                       max_model_len=4096), model=hf)
    gen = torch.Generator().manual_seed(3)
    convs = [[[torch.randint(0, 128000, (int(n),), generator=gen).tolist(), [0] * 24] for n in (200, 40, 60)]
             for _ in range(24)]
    res = {}
    for mode in ("off", "on"):
        engine.blocks.prefix_caching = mode == "on"
        res[mode] = replay(engine, convs, mode, 8)
    same = [res["on"]["outputs"][k] == res["off"]["outputs"][k] for k in res["off"]["outputs"]]
    log(f"fp32 prefix check: hit rate {100 * res['on']['hit_rate']:.1f}%, identical greedy outputs "
        f"{sum(same)}/{len(same)}")
    q = torch.randn(1, 32, 100, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 8, 1600, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    mask = (torch.arange(1600, device="cuda")[None, :] <= torch.arange(1500, 1600, device="cuda")[:, None])
    kr, vr = k.repeat_interleave(4, 1), v.repeat_interleave(4, 1)
    ref = F.scaled_dot_product_attention(q.double(), kr.double(), vr.double(), attn_mask=mask).float()
    for name, fn in (("mask+repeat", lambda: F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask)),
                     ("lower_right+repeat", lambda: F.scaled_dot_product_attention(q, kr, vr, attn_mask=causal_lower_right(100, 1600))),
                     ("lower_right+gqa", lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(100, 1600), enable_gqa=True))):
        try:
            err = ((fn().float() - ref).norm() / ref.norm()).item()
            log(f"hit-chunk attention {name}: {timed(fn) * 1e6:.0f} us, rel err {err:.1e}")
        except Exception as e:  # noqa: BLE001 - a variant the backend lacks is reported, not fatal
            log(f"hit-chunk attention {name}: {type(e).__name__} {str(e)[:120]}")


if __name__ == "__main__":
    main()
