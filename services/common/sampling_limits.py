"""Sampling values the engine can run, named once for the scheduler (which refuses a request outside them)
and the worker (which refuses an assignment outside them rather than fail a whole batch in sampling).

A temperature below MIN_TEMPERATURE overflows logits / temperature to inf in fp32 (then NaN in softmax);
above MAX_TEMPERATURE every token is equally likely anyway; a top_k beyond any real vocabulary is refused
rather than guessed at.
"""
from __future__ import annotations

MIN_TEMPERATURE = 1e-3
MAX_TEMPERATURE = 100.0
MAX_TOP_K = 1 << 20


def sampling_problem(temperature: float, top_p: float, top_k: int) -> tuple[str, str] | None:
    """(field, what is wrong) for the first value outside the limits, else None. top_p is already
    normalised (0 = unset = 1.0). `not a <= x <= b` also catches NaN."""
    if temperature != 0 and not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE:
        return "temperature", f"must be 0 (greedy) or in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}]"
    if not 0 < top_p <= 1:
        return "top_p", "must be in (0, 1]"
    if not 0 <= top_k <= MAX_TOP_K:
        return "top_k", f"must be in [0, {MAX_TOP_K}] (0 = off)"
    return None
