"""What the simulated predictor says about a job: the truth (oracle), the truth with log-normal noise (a given
sigma, or the sigma that gives a target Kendall tau on the workload), what the real predictor said for the same
request in a live run (replay: its errors, not a model of them), or nothing (the scheduler's prior).

The noisy and replayed predictors give what the real one gives: the mean of a log-normal as the estimate and its
deciles around the median below it, so the policies' E[L - g | L > g] re-estimate works the same way in
simulation as live.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from enum import Enum

from services.common.log_normal import DECILE_Z, Z90, median_of
from services.scheduler.exec_time import P90_OVER_GUESS


class PredictorKind(str, Enum):
    ORACLE = "oracle"
    NOISY = "noisy"
    REPLAY = "replay"
    NONE = "none"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Prediction:
    mean: float
    p90: float
    deciles: tuple[float, ...]
    predicted: bool

    @property
    def median(self) -> float:
        return median_of(self.deciles, self.mean)


@dataclass
class SimPredictor:
    kind: PredictorKind
    sigma: float = 0.0
    prior: float = 256.0              # the scheduler's prior when nothing is predicted
    seed: int = 0

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def predict(self, true_len: int, recorded: float = 0.0) -> Prediction:
        """`recorded`: the live predictor's estimate for this request (replay; 0 = it predicted nothing)."""
        if self.kind is PredictorKind.NONE or (self.kind is PredictorKind.REPLAY and recorded <= 0):
            return Prediction(self.prior, P90_OVER_GUESS * self.prior, (), False)
        if self.kind is PredictorKind.ORACLE:
            return Prediction(float(true_len), float(true_len), (), True)
        if self.kind is PredictorKind.REPLAY:
            # the live predictor's estimate (what a run records) is the mean of its log-normal, exp(mu + s^2 / 2),
            # and its quantiles sit around the median exp(mu), below it: replaying the estimate as the median put
            # every decile 1.5x too high (s ~ 0.9), so a job that outlived its prediction looked nearly done where
            # the live scheduler saw it as long and preempted it (live had 2-9x the simulated preemptions before,
            # 1.3-2.4x since: session 35)
            mean = float(recorded)
            median = mean * math.exp(-self.sigma ** 2 / 2)
        elif self.sigma == 0:
            return Prediction(float(true_len), float(true_len), (), True)
        else:
            median = true_len * math.exp(self._rng.gauss(0.0, self.sigma))   # noisy around the truth, and
            mean = median * math.exp(self.sigma ** 2 / 2)                    # said as the live one says it
        # the spread (p90, deciles) of log-normal errors of this sigma around the median
        return Prediction(mean, median * math.exp(Z90 * self.sigma),
                          tuple(median * math.exp(z * self.sigma) for z in DECILE_Z), True)


def log_error_sigma(predicted: list[float], true: list[int]) -> float:
    """The root mean square of log(predicted / true) over the requests with both: the spread a replayed
    predictor's deciles are drawn with (around the median below each recorded mean). Its bias is kept in (not the
    standard deviation): a predictor that is off by 2x every time is uncertain by that much about each job."""
    errs = [math.log(p / t) for p, t in zip(predicted, true) if p > 0 and t > 0]
    return math.sqrt(sum(e * e for e in errs) / len(errs)) if errs else 0.0


def kendall_tau(x: list[float], y: list[float]) -> float:
    from scipy.stats import kendalltau

    return float(kendalltau(x, y).statistic)


def sigma_for_tau(lengths: list[int], target: float, seed: int = 0, sample: int = 2000) -> float:
    """The log-normal noise whose predictions rank `lengths` with Kendall tau ~ `target` (bisection)."""
    rng = random.Random(seed)
    xs = rng.sample(lengths, min(sample, len(lengths)))
    noise = [rng.gauss(0.0, 1.0) for _ in xs]

    def tau(sigma: float) -> float:
        return kendall_tau([x * math.exp(sigma * n) for x, n in zip(xs, noise)], xs)

    lo, hi = 0.0, 20.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tau(mid) > target else (lo, mid)
    return (lo + hi) / 2
