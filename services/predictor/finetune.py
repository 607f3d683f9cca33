"""Fine-tune the prompt encoder to *rank* prompts by output length (what scheduling needs).

A pre-trained sentence encoder places prompts by topic, not by how long their answers are. Here MiniLM is
trained end to end with a linear head on the served model's true lengths: a pairwise logistic ranking loss
(every pair in a batch whose lengths differ) plus a small regression term on standardised log length.
The fine-tuned encoder then serves both the kNN index and the MLP. Small enough for 2 CPU cores: prompts
truncated to `max_tokens`, a few epochs, early stopping on validation Kendall's tau.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import kendalltau

from services.predictor.encoder import minilm_path

log = logging.getLogger("alise.predictor.finetune")


def ranking_loss(scores: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pairwise logistic loss over all ordered pairs with y_i > y_j, plus 0.1 x MSE."""
    diff_y = y[:, None] - y[None, :]
    pairs = diff_y > 0.05
    pair_loss = F.softplus(-(scores[:, None] - scores[None, :]))[pairs].mean() if pairs.any() else scores.sum() * 0
    return pair_loss + 0.1 * F.mse_loss(scores, y)


def finetune(prompts: list[str], lengths: np.ndarray, val_prompts: list[str], val_lengths: np.ndarray,
             out_dir: Path, epochs: int = 3, batch: int = 32, lr: float = 4e-5, max_tokens: int = 128,
             time_budget_s: float = 900) -> dict:
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(0)
    model = SentenceTransformer(minilm_path(), device="cpu")
    model.max_seq_length = max_tokens
    head = torch.nn.Linear(model.get_sentence_embedding_dimension(), 1)
    logs = np.log(lengths)
    mean, std = logs.mean(), logs.std() + 1e-6
    y = torch.tensor((logs - mean) / std, dtype=torch.float32)
    opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=lr, weight_decay=0.01)
    best_tau, history, started = -1.0, [], time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = np.random.default_rng(epoch).permutation(len(prompts))
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            feats = model.tokenize([prompts[j] for j in idx])
            emb = model(feats)["sentence_embedding"]
            loss = ranking_loss(head(emb).squeeze(-1), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if time.perf_counter() - started > time_budget_s:
                break
        tau = validation_tau(model, head, val_prompts, val_lengths)
        history.append({"epoch": epoch, "val_kendall_tau": tau, "seconds": time.perf_counter() - started})
        log.info("epoch %d: val tau %.3f (%.0f s)", epoch, tau, time.perf_counter() - started)
        if tau > best_tau:
            best_tau = tau
            model.save(str(out_dir))
        if time.perf_counter() - started > time_budget_s:
            break
    return {"best_val_kendall_tau": best_tau, "history": history}


@torch.no_grad()
def validation_tau(model, head, prompts: list[str], lengths: np.ndarray) -> float:
    model.eval()
    emb = model.encode(prompts, batch_size=64, convert_to_tensor=True)
    return float(kendalltau(head(emb).squeeze(-1).numpy(), lengths).statistic)
