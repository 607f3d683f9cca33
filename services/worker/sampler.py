"""Next-token choice: greedy in one argmax for the batch; temperature / top-k / top-p per sequence.

A seeded request draws each token from a generator seeded with (seed, token index), so its output does
not depend on batching, preemption or which worker resumes it.
"""
from __future__ import annotations

import torch

from services.worker.sequence import Sampling


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0 and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p   # keep the smallest set reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def _generator(sampling: Sampling, token_index: int, device: torch.device) -> torch.Generator | None:
    if sampling.seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed((sampling.seed * 1_000_003 + token_index) % (2**63))
    return gen


def sample(logits: torch.Tensor, samplings: list[Sampling], token_indices: list[int]) -> list[int]:
    """logits [S, vocab] fp32 -> one token id per row."""
    chosen = logits.argmax(dim=-1).tolist()
    for row, (sp, idx) in enumerate(zip(samplings, token_indices)):
        if sp.greedy:
            continue
        filtered = _filter_top_k_top_p(logits[row] / sp.temperature, sp.top_k, sp.top_p)
        probs = filtered.softmax(-1)
        chosen[row] = int(torch.multinomial(probs, 1, generator=_generator(sp, idx, logits.device)))
    return chosen
