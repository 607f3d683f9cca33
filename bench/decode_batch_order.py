"""Does a decode step's attention cost depend on which rows sit next to each other? On the chat workload a third of
a running batch's context is prefix blocks that two turns of one conversation share (the later turn resends the
earlier one's prompt; the prefix cache gives it the same blocks). Programs launched together read a shared block
about at once, so the second read may come from L2 instead of HBM; rows admitted in arrival order (fcfs) keep a
conversation's turns next to each other, rows admitted by predicted length (alise) scatter them.

Two steps, so the GPU machine needs neither the tokenizer nor the dataset:

    # here: the running batches of live runs, rebuilt from their per-request CSVs (admission order, contexts,
    # shared prefix blocks), at one time every `--every` seconds while at least `--batch` jobs run
    python -m bench.decode_batch_order extract --runs L48/fcfs-r48.csv.xz L48/alise-r48.csv.xz --out batches.json
    # on the GPU: each batch's decode attention in its live (admission) order, shuffled, with sharers next to each
    # other, and without sharing (every block its own): device time per layer
    python -m bench.decode_batch_order time --batches batches.json --out decode_batch_order.json

A job runs from its first token to its end (a parked or preempted stretch is not known from the CSV and counted as
running); its context is its prompt plus a uniform share of its output by then. A later turn shares the earlier
turn's full prompt blocks when both run.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from bench.decode_row_order import BLOCK, run_rows


def conversations(dataset_path: str, tokenizer_dir: str, num: int, skip: int) -> list[int]:
    """The conversation of each request of the sharegpt-chat workload after `skip` (requests of one conversation
    are consecutive; a turn continues the one before when its history ends with that one's prompt)."""
    from transformers import AutoTokenizer

    from bench.workloads import Dataset, load
    reqs = load(Dataset.SHAREGPT_CHAT, Path(dataset_path), skip + num, AutoTokenizer.from_pretrained(tokenizer_dir))
    conv: list[int] = []
    for i, r in enumerate(reqs):
        same = i > 0 and len(r.history) >= 2 and r.history[-2] == ("user", reqs[i - 1].prompt)
        conv.append(conv[-1] if same else (conv[-1] + 1 if conv else 0))
    return conv[skip:]


def running_batch(rows: list[dict], conv: list[int], t: float, batch: int) -> dict | None:
    """The first `batch` jobs in admission order among those running at t: contexts and shared prefix blocks."""
    live = []
    for r in rows:
        start = float(r["start_s"])
        first, end = start + float(r["ttft_s"]), start + float(r["e2e_s"])
        if first <= t < end:
            p, o = int(r["prompt_tokens"]), int(r["output_tokens"])
            ctx = p + max(1, round(o * (t - first) / max(end - first, 1e-9)))
            live.append((start + float(r["queue_s"]), int(r["index"]), p, ctx))
    if len(live) < batch:
        return None
    live = sorted(live)[:batch]
    ctx = [c for _, _, _, c in live]
    shares, last_of = [], {}
    for row, (_, i, p, c) in enumerate(live):
        parent = last_of.get(conv[i])
        shares.append((-1, 0) if parent is None else
                      (parent, min(live[parent][2], p, ctx[parent] - 1, c - 1) // BLOCK))
        last_of[conv[i]] = row
    shares = [(pa, n) if n else (-1, 0) for pa, n in shares]
    return {"t": t, "ctx": ctx, "shares": shares}


def extract(a) -> None:
    conv = conversations(a.dataset_path, a.tokenizer, a.num_prompts, a.skip)
    out = []
    for path in a.runs:
        rows = run_rows(path)
        t, got = a.start, 0
        while got < a.per_run and t < a.end:
            b = running_batch(rows, conv, t, a.batch)
            if b is not None:
                out.append({"run": path, **b})
                got += 1
            t += a.every
    Path(a.out).write_text(json.dumps(out))
    print(f"{len(out)} batches of {a.batch} rows -> {a.out}")


def orders(ctx: list[int], shares: list[tuple[int, int]], seed: int) -> dict[str, list[int]]:
    """Row orders to time: as admitted, shuffled, and each conversation's rows together (rows in admission order
    of each chain's first row; a row follows the row it shares with)."""
    admitted = list(range(len(ctx)))
    shuffled = admitted[:]
    random.Random(seed).shuffle(shuffled)
    root = []
    for row, (parent, _) in enumerate(shares):
        root.append(root[parent] if parent >= 0 else row)
    return {"admitted": admitted, "shuffled": shuffled, "together": sorted(admitted, key=lambda r: (root[r], r))}


def time_batches(a) -> None:
    import torch

    from bench.decode_row_order import Batch, Ordered
    results = []
    for k, item in enumerate(json.loads(Path(a.batches).read_text())):
        ctx, shares = item["ctx"], [tuple(s) for s in item["shares"]]
        timed, ref = {}, None
        b = Batch(ctx, a.seed, shares)
        for name, rows in orders(ctx, shares, a.seed + k).items():
            o = Ordered(b, rows)
            out = o.output_by_row()
            if ref is None:
                ref = out
            else:     # the same rows in another order: the same numbers
                torch.testing.assert_close(out, ref, rtol=0, atol=0)
            timed[name] = o.time_us(a.replays)
        del b
        torch.cuda.empty_cache()
        b = Batch(ctx, a.seed)                        # every row its own blocks: what HBM must deliver
        timed["unshared"] = Ordered(b, list(range(len(ctx)))).time_us(a.replays)
        del b
        torch.cuda.empty_cache()
        shared = sum(n for _, n in shares) * BLOCK
        row = {"run": item["run"], "t": item["t"], "rows": len(ctx), "context": sum(ctx),
               "shared_share": round(shared / sum(ctx), 3), "us_per_layer": timed}
        print(json.dumps(row), flush=True)
        results.append(row)
    Path(a.out).write_text(json.dumps(results, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("extract", help="rebuild running batches from live runs' CSVs (CPU; tokenizer, dataset)")
    e.add_argument("--runs", nargs="+", required=True, help="per-request CSVs (.csv or .csv.xz) of sharegpt-chat runs")
    e.add_argument("--dataset-path", default=".bench-data/sharegpt_heldout_880.json")
    e.add_argument("--tokenizer", default=".bench-data/llama3-8b-shape")
    e.add_argument("--num-prompts", type=int, default=3000)
    e.add_argument("--skip", type=int, default=20, help="the runs' priming requests (the CSV's index starts after)")
    e.add_argument("--batch", type=int, default=416)
    e.add_argument("--start", type=float, default=15.0)
    e.add_argument("--end", type=float, default=60.0)
    e.add_argument("--every", type=float, default=5.0)
    e.add_argument("--per-run", type=int, default=4)
    e.add_argument("--out", default="batches.json")
    t = sub.add_parser("time", help="time each batch's decode attention in several row orders (GPU)")
    t.add_argument("--batches", required=True)
    t.add_argument("--replays", type=int, default=20)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", default="decode_batch_order.json")
    a = p.parse_args()
    extract(a) if a.cmd == "extract" else time_batches(a)


if __name__ == "__main__":
    main()
