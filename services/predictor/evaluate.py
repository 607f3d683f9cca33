"""Evaluate the length predictor on real datasets, next to baselines; optionally an online replay.

    python -m services.predictor.evaluate ../shared/data/alpaca_5000.json ../shared/data/sharegpt_sample_1000.json \
        --out docs/results/predictor_eval.json --plot-dir docs/results

Per dataset: a held-out split by prompt (20%), our predictor trained on the rest (its k, similarity threshold
and kNN/MLP blend tuned on a validation part of the training data), and the baselines: global mean,
prompt-length regression, kNN only, MLP only. Output lengths use the served model's tokenizer.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.common.model_paths import default_model_dir
from services.predictor.datasets import count_tokens, load_examples
from services.predictor.encoder import Encoder, load_encoder
from services.predictor.evaluation import (Split, baseline_mean, baseline_prompt_length, evaluate_predictor,
                                           metrics, split_by_prompt, tune)
from services.common.predictor_text import prompt_key
from services.predictor import length_mlp
from services.predictor.length_mlp import has_previous_reply, side_features
from services.predictor.length_predictor import LengthPredictor, PredictorParams
from services.predictor.message_index import is_short, message_vectors

log = logging.getLogger("alise.predictor.evaluate")


def embed_dataset(path: Path, encoder: Encoder, tokenizer, limit: int | None,
                  split_by: str = "conversation") -> tuple[Split, list[str]]:
    """split_by: "conversation" (turns of one conversation stay on one side: new conversations only) or
    "prompt" (later turns of a conversation may be tested after earlier ones were learned, as online)."""
    examples = load_examples(path)[:limit]
    prompts = [e.prompt for e in examples]
    lengths = np.array(count_tokens(tokenizer, [e.response for e in examples]), dtype=np.float32)
    previous = count_tokens(tokenizer, [e.previous_reply for e in examples], empty=0)
    vecs = encoder.encode(prompts)
    newest = [e.newest_message_chars for e in examples]
    side = side_features([len(p) for p in prompts], previous, newest)
    keys = [prompt_key(p) for p in prompts]
    messages = message_vectors(encoder, prompts, newest, side)
    return Split(vecs, side, lengths, keys, [e.group for e in examples] if split_by == "conversation" else keys,
                 messages), prompts


def train_tuned(encoder: Encoder, train: Split, val_frac: float = 0.2) -> tuple[LengthPredictor, dict]:
    """Fit on part of `train`, tune on the rest, then refit the index on all of `train`."""
    fit_idx, val_idx = split_by_prompt(train.groups, val_frac, seed=1)
    fit_part, val = train.take(fit_idx), train.take(val_idx)
    pred = LengthPredictor(encoder)
    pred.fit(fit_part.vecs, fit_part.side, fit_part.lengths, fit_part.keys, val=(val.vecs, val.side, val.lengths),
             message_vecs=fit_part.message_vecs)
    chosen = tune(pred, val)
    pred.index.add(val.vecs, val.lengths, val.keys)           # the final index knows every training prompt
    pred.messages.add(val.message_vecs, val.side, val.lengths)
    return pred, chosen


def variant(pred: LengthPredictor, **overrides) -> LengthPredictor:
    """The same trained parts under other parameters (the kNN-only and MLP-only baselines)."""
    other = LengthPredictor(pred.encoder, PredictorParams(**{**vars(pred.params), **overrides}))
    other.index, other.mlp, other.messages = pred.index, pred.mlp, pred.messages
    return other


def without_previous_reply(split: Split) -> Split:
    return dataclasses.replace(split, side=length_mlp.without_previous_reply(split.side))


@dataclass
class Protocol:
    """How a dataset is held out: the served model's tokenizer, the test fraction, the split unit and which
    random split (`seed`; --repeats evaluates several)."""
    tokenizer: object
    test_frac: float = 0.2
    limit: int | None = None
    split_by: str = "conversation"
    seed: int = 0

    def embed(self, path: Path, encoder) -> tuple[Split, list[str]]:
        return embed_dataset(path, encoder, self.tokenizer, self.limit, self.split_by)

    def split(self, data: Split) -> tuple[np.ndarray, np.ndarray]:
        return split_by_prompt(data.groups, self.test_frac, seed=self.seed)


def finetuned_encoder(path: Path, base: Encoder, proto: Protocol, work_dir: Path) -> tuple[Encoder, dict]:
    """Fine-tune the encoder (MiniLM or static, like `base`) on this dataset's training part only (its own
    validation split inside)."""
    from services.predictor.finetune import RankingData, train_minilm_encoder, train_static_encoder
    from services.predictor.static_encoder import StaticEncoder

    data, prompts = proto.embed(path, base)
    train_idx, _ = proto.split(data)
    train = data.take(train_idx)
    ranking = RankingData([prompts[i] for i in train_idx], train.side, train.lengths)
    out = work_dir / f"encoder-{path.stem}-{proto.seed}"
    if isinstance(base, StaticEncoder):
        info = train_static_encoder(ranking, train.groups, out)
        return StaticEncoder(out), info
    info = train_minilm_encoder(ranking, train.groups, out)
    return Encoder(model_path=str(out), max_tokens=128), info


@dataclass
class Trained:
    """One dataset split and the predictor trained (and tuned) on its training part."""
    data: Split
    train: Split
    test: Split
    pred: LengthPredictor
    chosen: dict

    @property
    def val_tau(self) -> float:
        return self.chosen["val_kendall_tau"]


def train_on_split(path: Path, encoder, proto: Protocol) -> Trained:
    data = proto.embed(path, encoder)[0]
    train_idx, test_idx = proto.split(data)
    train = data.take(train_idx)
    return Trained(data, train, data.take(test_idx), *train_tuned(encoder, train))


def evaluate_dataset(path: Path, encoder: Encoder, proto: Protocol, plot_dir: Path | None = None,
                     finetune_dir: Path | None = None) -> dict:
    started = time.perf_counter()
    t = train_on_split(path, encoder, proto)
    ft_info, encoder_used = None, "stock"
    if finetune_dir is not None:
        tuned_encoder, ft_info = finetuned_encoder(path, encoder, proto, finetune_dir)
        tuned = train_on_split(path, tuned_encoder, proto)
        ft_info["stock_val_kendall_tau"] = t.val_tau
        if tuned.val_tau > t.val_tau:                      # as train.py: only if it validates better
            t, encoder, encoder_used = tuned, tuned_encoder, "finetuned"
    ours, mu = evaluate_predictor(t.pred, t.test)
    # the parts alone: without the previous-reply line and the short messages' votes as well
    knn_only = variant(t.pred, knn_weight=1.0, min_similarity=-1.0, reply_weight=0.0, message_weight=0.0)
    knn_only.mlp = None
    res = {
        "dataset": path.name, "split_by": proto.split_by, "split_seed": proto.seed, "encoder_used": encoder_used, "examples": len(t.data.lengths),
        "train": len(t.train.lengths), "test": len(t.test.lengths),
        "mean_output_tokens": float(t.data.lengths.mean()), "chosen": t.chosen,
        "alise": ours,
        "baseline_global_mean": baseline_mean(t.train, t.test),
        "baseline_prompt_length": baseline_prompt_length(t.train, t.test),
        "baseline_knn_only": evaluate_predictor(knn_only, t.test)[0],
        "baseline_mlp_only": evaluate_predictor(variant(t.pred, knn_weight=0.0, reply_weight=0.0, message_weight=0.0),
                                                t.test)[0],
    }
    if is_short(t.train.side).any():                  # conversations with short messages: what their votes add
        res["ablation_no_short_messages"] = evaluate_predictor(variant(t.pred, message_weight=0.0), t.test)[0]
    if has_previous_reply(t.train.side).any():       # conversations: what the previous-reply feature adds
        res["ablation_no_reply_line"] = evaluate_predictor(variant(t.pred, reply_weight=0.0), t.test)[0]
        res["ablation_no_previous_reply"] = evaluate_predictor(
            train_tuned(encoder, without_previous_reply(t.train))[0], without_previous_reply(t.test))[0]
    res["seconds"] = time.perf_counter() - started
    if ft_info is not None:
        res["finetune"] = ft_info
    if plot_dir is not None and proto.seed == 0:
        res["plot"] = str(scatter(plot_dir, path.stem, np.exp(mu), t.test.lengths, ours["kendall_tau"]))
    return res


def online(path: Path, encoder: Encoder, tokenizer, limit: int | None, chunk: int = 50, window: int = 500) -> dict:
    """Stream the dataset in order: predict each chunk, then learn its true lengths. Tau per window."""
    data, prompts = embed_dataset(path, encoder, tokenizer, limit)
    examples = load_examples(path)[:limit]
    previous = count_tokens(tokenizer, [e.previous_reply for e in examples], empty=0)
    newest = [e.newest_message_chars for e in examples]
    pred = LengthPredictor(encoder, retrain_every=256)
    mus = []
    for i in range(0, len(prompts), chunk):
        batch, prev, new = prompts[i:i + chunk], previous[i:i + chunk], newest[i:i + chunk]
        mus += [np.log(p.p50) for p in pred.predict(batch, prev, new)]
        pred.observe(batch, [int(x) for x in data.lengths[i:i + chunk]], prev, new)
    mus = np.array(mus)
    windows = [metrics(mus[i:i + window], None, data.lengths[i:i + window])["kendall_tau"]
               for i in range(0, len(mus) - window + 1, window)]
    return {"dataset": path.name, "window": window, "kendall_tau_by_window": windows}


def scatter(plot_dir: Path, name: str, pred: np.ndarray, true: np.ndarray, tau: float) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter(true, pred, s=4, alpha=0.4)
    lo, hi = 1, max(true.max(), pred.max())
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set(xscale="log", yscale="log", xlabel="true output tokens", ylabel="predicted p50",
           title=f"{name}: Kendall tau {tau:.3f}")
    fig.tight_layout()
    out = plot_dir / f"predictor_scatter_{name}.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("datasets", nargs="+", type=Path)
    p.add_argument("--tokenizer", default=str(default_model_dir()), help="the served model's tokenizer")
    p.add_argument("--test-frac", type=float, default=0.2)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--online", action="store_true", help="also replay each dataset online")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--plot-dir", type=Path, default=None)
    p.add_argument("--finetune-dir", type=Path, default=None,
                   help="fine-tune the encoder for ranking on each training split, saving it here")
    p.add_argument("--split-by", choices=("conversation", "prompt"), default="conversation",
                   help="held-out unit; conversation: turns of one conversation never on both sides")
    p.add_argument("--encoder", choices=("minilm", "static"), default="minilm",
                   help="static: the fast static encoder, fine-tuned on each training split (used if it validates better)")
    p.add_argument("--repeats", type=int, default=1,
                   help="evaluate on this many different random held-out splits; report tau's mean and spread")
    a = p.parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(a.tokenizer)
    encoder = load_encoder(a.encoder)
    if a.encoder == "static" and a.finetune_dir is None:
        a.finetune_dir = Path(tempfile.mkdtemp(prefix="alise-static-"))
    report: dict = {"offline": [], "repeats": []}
    for d in a.datasets:
        runs = [evaluate_dataset(d, encoder, Protocol(tokenizer, a.test_frac, a.limit, a.split_by, seed), a.plot_dir,
                                 a.finetune_dir) for seed in range(a.repeats)]
        report["offline"].append(runs[0])
        if a.repeats > 1:
            report["repeats"].append(spread(runs))
    if a.online:
        report["online"] = [online(d, encoder, tokenizer, a.limit) for d in a.datasets]
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(report, indent=2))
    print_table(report)


def spread(runs: list[dict]) -> dict:
    """Kendall's tau of each predictor over several held-out splits: mean, standard deviation, values."""
    names = [k for k in runs[0] if isinstance(runs[0][k], dict) and "kendall_tau" in runs[0][k]]
    taus = {n: [r[n]["kendall_tau"] for r in runs] for n in names}
    return {"dataset": runs[0]["dataset"], "splits": len(runs),
            "kendall_tau": {n: {"mean": float(np.mean(v)), "std": float(np.std(v)), "values": v} for n, v in taus.items()}}


def print_table(report: dict) -> None:
    rows = ("alise", "ablation_no_short_messages", "ablation_no_reply_line", "ablation_no_previous_reply",
            "baseline_knn_only", "baseline_mlp_only", "baseline_prompt_length", "baseline_global_mean")
    print(f"\n{'dataset':<34} {'predictor':<28} {'tau':>6} {'spear':>6} {'MAE':>7} {'MAElog':>6} {'bucket':>6} {'p90cov':>6}")
    for r in report["offline"]:
        for name in (n for n in rows if n in r):
            m = r[name]
            cov = "" if m["p90_coverage"] is None else f"{m['p90_coverage']:.2f}"
            print(f"{r['dataset']:<34} {name:<28} {m['kendall_tau']:>6.3f} {m['spearman']:>6.3f} "
                  f"{m['mae_tokens']:>7.1f} {m['mae_log']:>6.2f} {m['bucket_accuracy']:>6.2f} {cov:>6}")
    for r in report.get("repeats", []):
        print(f"{r['dataset']}: tau over {r['splits']} held-out splits: " + ", ".join(
            f"{n} {t['mean']:.3f} +- {t['std']:.3f}" for n, t in r["kendall_tau"].items()))
    for r in report.get("online", []):
        print(f"online {r['dataset']}: tau per {r['window']} " + " ".join(f"{t:.2f}" for t in r["kendall_tau_by_window"]))


if __name__ == "__main__":
    main()
