"""Teach a worker's length probe (services/worker/length_probe.py) before serving, and measure it on held-out prompts.

The worker's own engine generates for a dataset's prompts, sent as chat messages the way the scheduler renders
them, each capped at --max-tokens; the probe learns from every job that stopped by itself, exactly as it does
while serving, and its state is saved where a worker loads it (`--length-probe-path`). Then, frozen, it estimates
the held-out prompts' lengths, and the script prints its Kendall tau against what the model then generated.

    python -m bench.train_length_probe ../shared/data/alpaca_cleaned_1000.json --skip 100 --num-prompts 160 \
        --held-out 40 --max-tokens 256 --out probe.npz
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.serve_metrics import kendall_tau
from bench.workloads import Dataset, Limits, load


def generate(engine, prompts: list[list[int]], max_tokens: int, tag: str) -> tuple[dict, dict]:
    """Runs the prompts to their end; ((stopped by itself, output tokens), estimate) by job id."""
    from services.worker.sequence import Finish, Sampling

    for i, ids in enumerate(prompts):
        engine.add(f"{tag}-{i}", ids, Sampling(max_tokens=max_tokens))
    counts, lengths, estimates = {}, {}, {}
    while engine.has_work:
        out = engine.step()
        estimates.update({e.job_id: e.output_tokens for e in out.estimates})
        for d in out.deltas:
            counts[d.job_id] = counts.get(d.job_id, 0) + len(d.token_ids)
        for job_id, finish in out.finished:
            lengths[job_id] = (finish is Finish.STOP, counts[job_id])
    return lengths, estimates


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", type=Path, help="Alpaca-format JSON")
    p.add_argument("--skip", type=int, default=0, help="leave the dataset's first prompts for the live runs")
    p.add_argument("--num-prompts", type=int, default=160)
    p.add_argument("--held-out", type=int, default=40, help="of them, the last ones: measured, not learned from")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--model-dir", help="default: the local SmolLM2")
    p.add_argument("--out", type=Path, required=True, help="the probe's state, as a worker loads it")
    a = p.parse_args(argv)

    from services.common.model_paths import default_model_dir
    from services.scheduler.tokenizer import PromptTokenizer
    from services.worker.config import WorkerConfig
    from services.worker.factory import build_engine

    model_dir = a.model_dir or str(default_model_dir())
    tok = PromptTokenizer(model_dir)
    items = load(Dataset.ALPACA, a.dataset, a.skip + a.num_prompts, tok.tok, limits=Limits())[a.skip:]
    prompts = [tok.encode(tok.render_chat([{"role": "user", "content": r.prompt}])) for r in items]
    a.out.unlink(missing_ok=True)
    engine = build_engine(WorkerConfig(model_dir=model_dir, length_probe_path=str(a.out)))
    if engine.probe is None:
        raise SystemExit(f"{model_dir}: this architecture runs on the fallback runner, which has no length probe")
    train, held = prompts[:-a.held_out], prompts[-a.held_out:]
    lengths, _ = generate(engine, train, a.max_tokens, "train")
    engine.probe.save(a.out)
    engine.probe.learn = False
    held_lengths, estimates = generate(engine, held, a.max_tokens, "held")
    both = [(estimates[j], n) for j, (_, n) in held_lengths.items() if j in estimates]
    result = {"trained_on": engine.probe.count, "train_jobs": len(train),
              "train_stopped": sum(s for s, _ in lengths.values()), "max_tokens": a.max_tokens,
              "held_out": len(held), "held_out_estimated": len(both),
              "held_out_kendall_tau": kendall_tau([e for e, _ in both], [n for _, n in both]),
              "layer": engine.probe.layer, "dims": engine.probe.dims, "state": str(a.out)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
