"""The shape of a length prediction, shared by the predictor that makes it, the scheduler that reads it and the
simulator that imitates it: a log-normal said as its mean, its p90 and its deciles (the quantiles at 0.05, 0.15,
..., 0.95, 10% of the mass each). Pure Python: the scheduler and the client's simulator need no numpy for it."""
from __future__ import annotations

import math

Z90 = 1.2815516                 # standard normal 90th percentile
# standard normal quantiles at 0.05, 0.15, ..., 0.95: where a prediction's deciles sit, in log space
DECILE_Z = (-1.6449, -1.0364, -0.6745, -0.3853, -0.1257, 0.1257, 0.3853, 0.6745, 1.0364, 1.6449)


def median_of(deciles: tuple[float, ...], fallback: float) -> float:
    """A log-normal's median from its deciles: the geometric mean of the middle two (symmetric in log space);
    `fallback` where a prediction has no deciles."""
    if len(deciles) == len(DECILE_Z):
        return math.sqrt(deciles[4] * deciles[5])
    return fallback
