"""Arrival counters: int32 zeros in device memory for kernels whose programs split a piece of work and whose last
program to arrive finishes it (decode attention's split merge, the skinny GEMM's split-K). Each last arriver resets
its counter, so one buffer serves every launch of a CUDA graph without a memset node."""
from __future__ import annotations

import torch


def arrival_counters(n: int, device: torch.device) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.int32, device=device)


def require_counters(counts: torch.Tensor, needed: int, what: str) -> None:
    """`counts` must hold `needed` int32 counters (one per `what`). Not an assert: a short buffer would be written
    past its end (atomics), and python -O drops asserts."""
    if counts.dtype != torch.int32 or counts.numel() < needed:
        raise ValueError(f"counts: {counts.numel()} {counts.dtype} counters for {needed} {what}; one int32 each is "
                         f"needed")
