"""The ALISE execution-time model and the expected remaining work of a job.

Prefill of s prompt tokens costs s*T0; each decode step of a job with context c costs a*c + b, so n
output tokens after a prompt of s cost about n*(a*s + b). Defaults are rough CPU numbers for SmolLM2, and
the scheduler ranks with them on every machine: only the *ordering* of jobs depends on them, and they are
not fitted per worker (the workers' fitted step models, worker_speed.py, set admission, not rank). On an
H200 they weigh a prompt token 10-50x more against a decode step than the machine does; ranking with
constants matched to the H200 changed alise's simulated mean by under 0.5% and its p99 by under 6% on the chat workload
(`bench simulate --exec-model`, docs/BENCHMARKS.md), so the predicted output length is what decides rank.
"""
from __future__ import annotations

from dataclasses import dataclass

# p90 of a length known only as one number (the scheduler's prior, a worker's point estimate): a heavy tail
P90_OVER_GUESS = 3.0


@dataclass(frozen=True)
class ExecTimeModel:
    t0: float = 1.0e-3      # seconds per prefill token
    a: float = 2.0e-6       # decode seconds per token of context, per step
    b: float = 3.0e-2       # decode seconds per step, fixed part

    def total(self, prompt_len: int, output_len: float) -> float:
        return prompt_len * self.t0 + output_len * (self.a * prompt_len + self.b)

    def preemption(self, context_len: int) -> float:
        """What preempting a job costs it: its context computed again on resume (swap costs less; this bounds it)."""
        return context_len * self.t0

    def remaining(self, context_len: int, remaining_tokens: float, needs_prefill: bool) -> float:
        prefill = context_len * self.t0 if needs_prefill else 0.0
        return prefill + remaining_tokens * (self.a * context_len + self.b)


def expected_remaining_tokens(pred_len: float, pred_p90: float, generated: int, max_tokens: int,
                              deciles: tuple[float, ...] = ()) -> float:
    """E[L - g | L > g] for a job that has generated g tokens.

    With the predictor's deciles (quantiles at 0.05 ... 0.95, 10% of the mass each) the expectation is the
    mean excess of the deciles above g. Without them, from the mean and p90. Either way a job that has
    outlived its whole predicted distribution is not "about to finish": it is expected to run about as
    long again (a heavy tail).
    """
    if deciles:
        above = [q - generated for q in deciles if q > generated]
        est = sum(above) / len(above) if above else float(generated)
    elif generated < pred_len:
        est = pred_len - generated
    elif generated < pred_p90:
        est = pred_p90 - generated
    else:
        est = float(generated)
    return max(1.0, min(est, max_tokens - generated))
