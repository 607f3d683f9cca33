"""The MLP fallback: prompt embedding + request side features -> quantiles 10/50/90 of log output length.

Side features are what a request says besides its words: its size, and in a conversation the length of the
assistant's previous reply (a strong hint: replies in one conversation tend to be alike in length) and of the
user's newest message (the conversation line's third term, reply_line.py; the MLP sees the first SIDE_DIM only).

Quantile (pinball) loss gives a distribution, not just a point; the heads are monotone by construction
(p10 = p50 - softplus, p90 = p50 + softplus).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

QUANTILES = torch.tensor([0.1, 0.5, 0.9])


# The MLP's side inputs: the first three columns. The newest message's column is the conversation line's only: a
# saved MLP keeps loading, and the line is where that length pays (docs/BENCHMARKS.md, session 36).
SIDE_DIM = 3


PROMPT_SCALE, PREVIOUS_REPLY_SCALE = 8.0, 6.0    # log sizes divided by these sit near [0, 1] for the MLP
# ln(1 + characters) of the newest message, capped: "hey" (1.4), "Thanks!" (2.1), "This is wrong." (2.7) ask for
# short replies after a long one, while past ~50 characters (4.0) a message's length says little more
NEWEST_MESSAGE_LOG_CAP = 4.0


def side_features(prompt_chars, previous_reply_tokens=None, newest_message_chars=None) -> np.ndarray:
    """[n, 4]: log prompt size, log previous reply tokens, whether there was a previous reply (0 = none), and the
    newest message's term (newest_message_log). A newest message of 0 characters is unknown (a client or an
    observation from before the field) and counts as an ordinary one, past the cap."""
    chars = np.asarray(prompt_chars, dtype=np.float32)
    prev = np.zeros_like(chars) if previous_reply_tokens is None else np.asarray(previous_reply_tokens, np.float32)
    newest = np.zeros_like(chars) if newest_message_chars is None else np.asarray(newest_message_chars, np.float32)
    below_cap = np.minimum(np.log1p(np.maximum(newest, 0)), NEWEST_MESSAGE_LOG_CAP) - NEWEST_MESSAGE_LOG_CAP
    return np.stack([np.log1p(chars) / PROMPT_SCALE, np.log1p(prev) / PREVIOUS_REPLY_SCALE,
                     (prev > 0).astype(np.float32), np.where(newest > 0, below_cap, 0.0).astype(np.float32)], axis=1)


def has_previous_reply(side: np.ndarray) -> np.ndarray:
    return np.asarray(side)[:, 2] > 0


def previous_reply_log(side: np.ndarray) -> np.ndarray:
    """ln(1 + the previous reply's tokens) of each request (0 where there was none)."""
    return np.asarray(side)[:, 1] * PREVIOUS_REPLY_SCALE


def newest_message_log(side: np.ndarray) -> np.ndarray:
    """min(ln(1 + the newest message's characters), NEWEST_MESSAGE_LOG_CAP) - NEWEST_MESSAGE_LOG_CAP of each request:
    0 for a message past the cap (or unknown), down to -4 for an empty one."""
    return np.asarray(side)[:, 3].astype(np.float64)


def without_previous_reply(side: np.ndarray) -> np.ndarray:
    """The same requests as if none had a previous reply (the ablation in evaluate.py). The newest message's column
    stays: without a previous reply the line has no say, and the short messages' votes still do."""
    return side * np.array([1.0, 0.0, 0.0, 1.0], np.float32)


def mlp_side(side: np.ndarray) -> np.ndarray:
    """The side features the MLP (and the fine-tuning head) reads: the first SIDE_DIM."""
    return np.asarray(side)[:, :SIDE_DIM]


def features(vecs: np.ndarray, side: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.concatenate([vecs, mlp_side(side)], axis=1).astype(np.float32))


class LengthMLP(torch.nn.Module):
    def __init__(self, dim: int = 384 + SIDE_DIM, hidden: int = 256, dropout: float = 0.1):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.GELU(), torch.nn.Dropout(dropout),
                                       torch.nn.Linear(hidden, 3))
        self.net[-1].bias.data[0] = float(np.log(128))     # start near a typical length

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[n, 3] log-length quantiles (p10, p50, p90)."""
        o = self.net(x)
        mid = o[:, 0]
        return torch.stack([mid - F.softplus(o[:, 1]), mid, mid + F.softplus(o[:, 2])], dim=1)


def pinball(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    diff = target[:, None] - pred
    return torch.maximum(QUANTILES * diff, (QUANTILES - 1) * diff).mean()


def fit(model: LengthMLP, x: torch.Tensor, y_log: torch.Tensor, x_val=None, y_val=None,
        epochs: int = 300, lr: float = 3e-3, weight_decay: float = 1e-4, batch: int = 512) -> LengthMLP:
    """Adam on the pinball loss; keeps the epoch with the best validation loss when one is given.
    Seeded (batch order and dropout), so the same data gives the same model."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return _fit(model, x, y_log, x_val, y_val, epochs, lr, weight_decay, batch)


def _fit(model, x, y_log, x_val, y_val, epochs, lr, weight_decay, batch) -> LengthMLP:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    best, best_state = float("inf"), None
    gen = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x), generator=gen).split(batch):
            opt.zero_grad()
            pinball(model(x[idx]), y_log[idx]).backward()
            opt.step()
        if x_val is not None:
            model.eval()
            with torch.no_grad():
                loss = pinball(model(x_val), y_val).item()
            if loss < best:
                best, best_state = loss, {k: v.clone() for k, v in model.state_dict().items()}
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return model
