"""Can the served model's own hidden state re-predict how long a job still runs? (issue 11, TRAIL-style)

The question before building it into the worker: with a small linear head on a middle layer's state at the
job's latest token, how well are jobs ranked by remaining length after 0, 32 and 128 generated tokens,
compared with the prompt-only predictor's view (an embedding of the prompt, the same head, the same data)?

1. Generate greedily with the real model (SmolLM2 on CPU) for prompts of a dataset, as the worker serves them
   (the chat template), up to --max-new-tokens: each prompt's true output length (until EOS; capped at the
   limit, counted as the limit).
2. One forward pass over prompt + output gives the chosen layer's state at the last prompt token (g = 0) and at
   output token g (a causal model's state there is what it had while generating).
3. Ridge regression on log(remaining tokens), k-fold by prompt, for: the hidden state; the prompt embedding (the
   predictor's stock MiniLM); both; and, for g > 0, the prompt embedding plus log(g). Kendall tau and MAE of
   predicted vs true remaining tokens over the jobs still running at g.

    python -m bench.hidden_state_length ../shared/data/alpaca_cleaned_1000.json --num-prompts 300 --out hs.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from bench.serve_metrics import kendall_tau
from services.common.model_paths import default_model_dir
from services.predictor.datasets import load_examples

CHECKPOINTS = (0, 32, 128)


def generate(model_dir: str, tok, prompts: list[str], max_new: int, batch: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, output ids up to and including EOS) per prompt, greedy, by the worker's own engine
    (continuous batching: a batch is not held until its longest output ends)."""
    from services.worker.config import WorkerConfig
    from services.worker.factory import build_engine
    from services.worker.sequence import Sampling

    engine = build_engine(WorkerConfig.from_args(["--device", "cpu", "--model-dir", model_dir,
                                                  "--max-batch", str(batch), "--max-model-len", "4096"]))
    ids = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                              add_generation_prompt=True), add_special_tokens=False)
           for p in prompts]
    out: dict[str, list[int]] = {}
    for i, prompt in enumerate(ids):
        engine.add(str(i), prompt, Sampling(max_tokens=max_new, temperature=0.0))
        out[str(i)] = []
    done = 0
    while engine.has_work:
        step = engine.step()
        for d in step.deltas:
            out[d.job_id] += d.token_ids
        done += len(step.finished)
        if step.finished and done % 20 < len(step.finished):
            print(f"generated {done}/{len(prompts)}", flush=True)
    return [(ids[i], out[str(i)]) for i in range(len(prompts))]


def states(model, pairs, layer: int) -> dict[int, np.ndarray]:
    """Per checkpoint g: [n, hidden] state of `layer` at the job's latest token after g output tokens (NaN rows
    for jobs that ended before g)."""
    import torch

    hidden = model.config.hidden_size
    out = {g: np.full((len(pairs), hidden), np.nan, dtype=np.float32) for g in CHECKPOINTS}
    for i, (prompt, gen) in enumerate(pairs):
        ids = torch.tensor([prompt + gen])
        with torch.no_grad():
            h = model(ids, output_hidden_states=True).hidden_states[layer][0]
        for g in CHECKPOINTS:
            if len(gen) > g:                          # still running after g tokens
                out[g][i] = h[len(prompt) - 1 + g].float().numpy()
    return out


def ridge_cv(x: np.ndarray, y: np.ndarray, folds: int, alpha: float, seed: int = 0) -> np.ndarray:
    """Out-of-fold predictions of a ridge regression (features standardised on each training part)."""
    rng = np.random.default_rng(seed)
    fold = rng.permutation(len(y)) % folds
    pred = np.empty_like(y)
    for k in range(folds):
        tr, te = fold != k, fold == k
        mu, sd = x[tr].mean(0), x[tr].std(0) + 1e-6
        a = np.c_[(x[tr] - mu) / sd, np.ones(tr.sum())]
        w = np.linalg.solve(a.T @ a + alpha * np.eye(a.shape[1]), a.T @ y[tr])
        pred[te] = np.c_[(x[te] - mu) / sd, np.ones(te.sum())] @ w
    return pred


def evaluate(features: dict[str, np.ndarray], remaining: np.ndarray, folds: int, alpha: float) -> dict:
    y = np.log(remaining)
    out = {}
    for name, x in features.items():
        pred = np.exp(ridge_cv(x, y, folds, alpha))
        out[name] = {"kendall_tau": kendall_tau(list(pred), list(remaining)),
                     "mae_tokens": float(np.abs(pred - remaining).mean())}
    return out


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", type=Path)
    p.add_argument("--model-dir", default=str(default_model_dir()))
    p.add_argument("--num-prompts", type=int, default=300)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--layer", type=int, default=0, help="hidden layer (0: the middle one)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--alpha", type=float, default=100.0, help="ridge penalty")
    p.add_argument("--out", type=Path, default=Path("hidden_state_length.json"))
    a = p.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from services.predictor.encoder import Encoder

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(a.model_dir)
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32).eval()
    layer = a.layer or model.config.num_hidden_layers // 2
    prompts = [e.prompt for e in load_examples(a.dataset)][:a.num_prompts]
    started = time.perf_counter()
    pairs = generate(a.model_dir, tok, prompts, a.max_new_tokens, a.batch)
    gen_s = time.perf_counter() - started
    hs = states(model, pairs, layer)
    lengths = np.array([len(g) for _, g in pairs], dtype=float)
    prompt_emb = Encoder().encode(prompts)
    report = {"dataset": str(a.dataset), "prompts": len(prompts), "layer": layer, "max_new_tokens": a.max_new_tokens,
              "capped": int((lengths >= a.max_new_tokens).sum()), "mean_output_tokens": float(lengths.mean()),
              "generation_s": gen_s, "checkpoints": {}}
    for g in CHECKPOINTS:
        alive = lengths > g
        if alive.sum() < 4 * a.folds:               # too few jobs still running to fit and rank
            report["checkpoints"][str(g)] = {"jobs_running": int(alive.sum())}
            continue
        remaining = lengths[alive] - g
        features = {"prompt_embedding": prompt_emb[alive], "hidden_state": hs[g][alive],
                    "hidden_state+prompt": np.c_[hs[g][alive], prompt_emb[alive]]}
        res = evaluate(features, remaining, a.folds, a.alpha)
        report["checkpoints"][str(g)] = {"jobs_running": int(alive.sum()), **res}
        print(f"g={g}: {int(alive.sum())} jobs still running; " + "; ".join(
            f"{k} tau {_f(v['kendall_tau'])} MAE {v['mae_tokens']:.0f}" for k, v in res.items()), flush=True)
    a.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {a.out}; mean output {lengths.mean():.0f} tokens, {report['capped']} capped, generation {gen_s:.0f} s")


if __name__ == "__main__":
    main()
