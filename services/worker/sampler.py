"""Next-token choice for a batch: greedy rows by one argmax; sampled rows filtered together on the device.

Temperature, top-k and top-p are applied to all sampled rows at once over one sort of their logits, so a
batch costs a few kernels rather than a Python loop. A row's token is argmax(p / E) with E ~ Exp(1) drawn per
vocabulary entry (the exponential race: index i wins with probability p_i). Unlike torch.multinomial, which
checks its input with `.item()` calls, nothing here waits for the GPU, so sampled rows keep the engine's
steps overlapped. A seeded request draws its noise from a generator seeded with (seed, token index), so its
output does not depend on batching, preemption or which worker resumes it; unseeded rows share one draw.
"""
from __future__ import annotations

import numpy as np
import torch

from services.worker.host_copy import to_device
from services.worker.sequence import Sampling


MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a bijection of 64-bit integers that scatters nearby inputs."""
    x &= MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def _generator(seed: int, token_index: int, device: torch.device) -> torch.Generator:
    """The noise of a seeded row's token: from (seed, token index) through two mixing rounds, so every 64-bit seed
    has a stream of its own (before, `seed * 1_000_003 + index mod 2^63` gave seeds s and s + 2^63 one stream)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(_mix64(_mix64(seed) + token_index))
    return gen


def filtered_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                   top_p: torch.Tensor) -> torch.Tensor:
    """logits [S, V]; per-row temperature (> 0), top_k (0 = off) and top_p -> probabilities [S, V]."""
    scaled = logits / temperature[:, None]
    sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
    rank = torch.arange(scaled.shape[-1], device=scaled.device)[None, :]
    drop = (top_k[:, None] > 0) & (rank >= top_k[:, None])
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
    drop |= probs.cumsum(-1) - probs >= top_p[:, None]          # keep the smallest set reaching top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.zeros_like(scaled).scatter(-1, order, sorted_logits.softmax(-1))


def sample(logits: torch.Tensor, samplings: list[Sampling], token_indices: list[int]) -> torch.Tensor:
    """logits [S, vocab] fp32 -> one token id per row [S] int64, on the logits' device (no host sync)."""
    chosen = logits.argmax(dim=-1)
    rows = [i for i, sp in enumerate(samplings) if not sp.greedy]
    if rows:
        dev = logits.device
        sp = [samplings[i] for i in rows]
        row_index, top_k = to_device(dev, np.array(rows, np.int64), np.array([s.top_k for s in sp], np.int64))
        temperature, top_p = to_device(dev, np.array([s.temperature for s in sp], np.float32),
                                       np.array([s.top_p for s in sp], np.float32))
        probs = filtered_probs(logits[row_index], temperature, top_k, top_p)
        noise = torch.empty_like(probs).exponential_()
        for j, s in enumerate(sp):
            if s.seed is not None:
                noise[j].exponential_(generator=_generator(s.seed, token_indices[rows[j]], dev))
        noise.clamp_(min=torch.finfo(noise.dtype).tiny)     # a draw of exactly 0 would make p / E inf or NaN
        chosen[row_index] = (probs / noise).argmax(dim=-1)
    return chosen
