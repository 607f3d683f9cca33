"""Held-out evaluation of length predictors and the hyper-parameter search that tunes ours.

Ranking is what scheduling needs, so the headline is Kendall's tau between predicted and true length;
also Spearman, MAE (tokens), MAE of log length, accuracy in length buckets and p90 coverage.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from scipy.stats import kendalltau, spearmanr

from services.common.log_normal import Z90
from services.predictor.length_mlp import has_previous_reply
from services.predictor.length_predictor import LengthPredictor

BUCKETS = np.array([32, 128, 512])     # <32, 32-127, 128-511, >=512 tokens


@dataclass
class Split:
    vecs: np.ndarray
    side: np.ndarray           # length_mlp.side_features: prompt size, previous reply, newest message
    lengths: np.ndarray
    keys: list[str]            # prompt identity (index de-duplication)
    groups: list[str]          # split unit: a conversation, or the prompt itself
    message_vecs: np.ndarray   # message_index.message_vectors: the short newest messages alone (zeros elsewhere)

    def take(self, idx) -> "Split":
        return Split(self.vecs[idx], self.side[idx], self.lengths[idx], [self.keys[i] for i in idx],
                     [self.groups[i] for i in idx], self.message_vecs[idx])

    @staticmethod
    def concat(parts: list["Split"]) -> "Split":
        return Split(np.concatenate([p.vecs for p in parts]), np.concatenate([p.side for p in parts]),
                     np.concatenate([p.lengths for p in parts]), [k for p in parts for k in p.keys],
                     [g for p in parts for g in p.groups], np.concatenate([p.message_vecs for p in parts]))


def split_by_prompt(keys: list[str], test_frac: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices of train and test, grouping by `keys` (prompt or conversation) so none is on both sides."""
    groups = sorted(set(keys))
    rng = np.random.default_rng(seed)
    test_groups = set(rng.choice(groups, size=int(len(groups) * test_frac), replace=False))
    test = np.array([i for i, k in enumerate(keys) if k in test_groups])
    train = np.array([i for i, k in enumerate(keys) if k not in test_groups])
    return train, test


def metrics(pred_mu: np.ndarray, pred_p90: np.ndarray | None, true: np.ndarray) -> dict:
    pred = np.exp(pred_mu)
    const = np.ptp(pred_mu) == 0
    return {
        "kendall_tau": 0.0 if const else float(kendalltau(pred_mu, true).statistic),
        "spearman": 0.0 if const else float(spearmanr(pred_mu, true).statistic),
        "mae_tokens": float(np.abs(pred - true).mean()),
        "mae_log": float(np.abs(pred_mu - np.log(true)).mean()),
        "bucket_accuracy": float((np.digitize(pred, BUCKETS) == np.digitize(true, BUCKETS)).mean()),
        "p90_coverage": None if pred_p90 is None else float((true <= pred_p90).mean()),
    }


def tune(pred: LengthPredictor, val: Split, ks=(4, 8, 16, 32), sims=(-1.0, 0.3, 0.4, 0.5, 0.6, 0.7),
         betas=(0.0, 0.25, 0.5, 0.75, 1.0), reply_weights=(0.0, 0.25, 0.5, 0.75, 0.9, 1.0)) -> dict:
    """Choose k, similarity threshold, kNN weight and previous-reply weight by Kendall's tau on `val`, then scale
    sigma so that the p90 covers 90% of `val`. `pred` must already hold the training examples (and the
    previous-reply line fitted on them: without one, or without conversation turns in `val`, its weight stays as
    it is)."""
    all_sims, all_logs = pred.index.search(val.vecs, max(ks))
    mlp_q = pred.mlp_quantiles(val.vecs, val.side)
    votes = pred.messages.votes(val.message_vecs, val.side)
    if pred.params.reply_line() is None or not has_previous_reply(val.side).any():
        # nothing to choose it on: the weight stays as it is (the default), so a predictor trained without chats
        # still uses the line it fits online once chat traffic comes
        reply_weights = (pred.params.reply_weight,)
    def choose(k, thr, beta, reply) -> None:
        p = pred.params
        p.k, p.min_similarity, p.knn_weight, p.reply_weight = k, thr, beta, reply

    best = (-2.0, None)
    for setting in itertools.product(ks, sims, betas, reply_weights):
        choose(*setting)
        mu, _, _, _ = pred.log_distribution(val.vecs, val.side, all_sims, all_logs, mlp_q, votes)
        tau = kendalltau(mu, val.lengths).statistic
        if tau > best[0]:
            best = (tau, setting)
    choose(*best[1])
    pred.params.sigma_scale = 1.0
    mu, sd, _, _ = pred.log_distribution(val.vecs, val.side, all_sims, all_logs, mlp_q, votes)
    z = (np.log(val.lengths) - mu) / sd                         # sigma_scale s: P(z <= 1.2816 s) = 0.9
    pred.params.sigma_scale = float(max(np.quantile(z, 0.9) / Z90, 0.2))
    return {"val_kendall_tau": float(best[0]), "k": best[1][0], "min_similarity": best[1][1],
            "knn_weight": best[1][2], "reply_weight": best[1][3], "sigma_scale": pred.params.sigma_scale}


def evaluate_predictor(pred: LengthPredictor, test: Split) -> tuple[dict, np.ndarray]:
    mu, sd, _, _ = pred.log_distribution(test.vecs, test.side, votes=pred.messages.votes(test.message_vecs, test.side))
    return metrics(mu, np.exp(mu + Z90 * sd), test.lengths), mu


def baseline_mean(train: Split, test: Split) -> dict:
    mu = np.full(len(test.lengths), np.log(train.lengths).mean())
    return metrics(mu, None, test.lengths)


def baseline_prompt_length(train: Split, test: Split) -> dict:
    a, b = np.polyfit(train.side[:, 0], np.log(train.lengths), 1)       # side[:, 0]: log prompt size
    return metrics(a * test.side[:, 0] + b, None, test.lengths)
