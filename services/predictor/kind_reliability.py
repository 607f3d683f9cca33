"""How much a prediction's differences are worth, per kind of request, learned from finished jobs.

The predictor ranks some kinds of request far worse than others: replaying chat3000 as the benchmarks send it, a
conversation's first message (no reply before it, so nothing but its text to go by) at Kendall tau 0.13, a later
turn at 0.44 (docs/BENCHMARKS.md, session 39). A first message predicted at 500 tokens is then about as likely to
be short as one predicted at 150, yet SRPT serves it after every later turn predicted at 300: such jobs made most
of the normalized-latency tail (short answers to long first messages, waiting 10-20 s for their first token).

For each kind, the last `window` finished jobs' (predicted log length, true log length) pairs give the slope of the
true on the predicted: how many log units of true length one log unit of prediction is worth within that kind.
Each new prediction's log median is pulled toward its kind's mean prediction by that slope (clipped to [0, 1])
relative to the best-ranked kind's: mu' = c + b (mu - c). The best-ranked kind keeps its spread (never stretched),
one ranked worse is drawn to its centre, where its jobs wait about as long as an average job and, among
themselves, go more by arrival (the policy's aging). Relative, because pulling every kind alike only weakens the
predictions against aging, whose strength `aging_s` sets: with Alpaca alone (one kind, tau 0.44), an absolute
pull simulated 0.5-2.5% worse in mean and 4-7% worse in p99. The centre is the kind's own mean prediction, not its
mean true length, so the kinds keep their places relative to each other (a fit that also moved each kind to its
true mean, with or without stretching the well-ranked kind, simulated worse than none). Until a kind has
`min_pairs` pairs, or while no kind's slope reaches MIN_BEST_SLOPE, predictions are left as they are.

The prediction of a pair is the one said when the job was admitted (remembered by prompt, before any pull): one
made again when the job finishes comes from a predictor that has learned more since, and overrates it (simulated,
the pull then gained half as much), so a job this process did not predict is left out. The pairs are kept in
memory only: after a restart the pull starts again at `min_pairs`. Only natural stops teach the predictor (the
scheduler's observations), so a kind whose jobs are often cut by max_tokens is fitted on the rest of them.

Simulated on chat3000 (44 / 48 / 60 req/s, replayed predictions): mean normalized latency -2 to -4%, p99 -8 / +2 /
-19% (emulated on two live runs' predictions: -9 to +4%), TTFT p99 -1 to +12% (1.06-1.08x fcfs), the longest tenth
within +1.5%. Live on one H100 (session 40, on against off, same arrivals): mean -4% twice at 44 req/s and -3% at 48,
p99 -7 / -10% at 44 and level at 48; first messages' p99 fell to about a third.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from enum import Enum

import numpy as np

from services.predictor.length_mlp import has_previous_reply


# below this, even the best-ranked kind's slope is mostly noise (its standard error at 50 pairs is ~0.2), and a
# ratio of two such slopes would pull a kind by chance
MIN_BEST_SLOPE = 0.3


class RequestKind(Enum):
    FIRST_MESSAGE = "first_message"    # a prompt alone, or a conversation's first message: its text is all there is
    LATER_TURN = "later_turn"          # a chat turn after an assistant's reply (whose length the predictor reads)


def kinds_of(side: np.ndarray) -> dict[RequestKind, np.ndarray]:
    """Which requests (side features: length_mlp.side_features) are of each kind, as masks."""
    later = has_previous_reply(side)
    return {RequestKind.FIRST_MESSAGE: ~later, RequestKind.LATER_TURN: later}


class KindReliability:
    def __init__(self, window: int = 1000, min_pairs: int = 50, remembered: int = 65_536):
        if window < min_pairs or min_pairs < 2:
            raise ValueError(f"need window >= min_pairs >= 2, got window {window}, min_pairs {min_pairs}")
        self.min_pairs = min_pairs
        self._pairs = {kind: deque(maxlen=window) for kind in RequestKind}
        self._fit: dict[RequestKind, tuple[float, float]] = {}     # kind -> (centre, slope), once min_pairs
        # kind -> (centre, slope relative to the best kind's) for the kinds pulled: what every Predict applies, so
        # worked out once per observation batch, not per request; both swapped whole (a metrics scrape reads them)
        self._pulled: dict[RequestKind, tuple[float, float]] = {}
        # prompt key -> log median served at admission; ~20 minutes of admissions at 50 a second
        self._said: OrderedDict[str, float] = OrderedDict()
        self._remembered = remembered

    def remember(self, keys: list[str], mu: np.ndarray) -> None:
        """What was predicted for these prompts (before any pull), for when their jobs finish. Kept until evicted,
        not dropped once read: jobs with the same text ("hi", a retry) share one entry."""
        for key, m in zip(keys, mu):
            self._said[key] = float(m)
            self._said.move_to_end(key)
        while len(self._said) > self._remembered:
            self._said.popitem(last=False)

    def record(self, keys: list[str], side: np.ndarray, true_lengths) -> None:
        """Finished jobs: what was predicted for them at admission (log median, before any pull) against what they
        generated. A job this process did not predict (admitted before a restart, or by another replica) is left
        out: what the predictor would say of it now, having learned since, overrates it."""
        said = np.array([self._said.get(key, np.nan) for key in keys], dtype=np.float64)
        true = np.asarray(true_lengths, dtype=np.float64)
        usable = np.isfinite(said) & (true > 0)
        fit = dict(self._fit)
        for kind, mask in kinds_of(side).items():
            if not (mask & usable).any():
                continue
            self._pairs[kind].extend(zip(said[mask & usable], np.log(true[mask & usable])))
            if len(self._pairs[kind]) >= self.min_pairs:
                fit[kind] = self._centre_and_slope(kind)
        best = max((slope for _, slope in fit.values()), default=0.0)
        self._fit = fit
        self._pulled = ({} if best < MIN_BEST_SLOPE else     # no kind ranked well: nothing to prefer
                        {kind: (centre, slope / best) for kind, (centre, slope) in fit.items() if slope < best})

    def pairs(self, kind: RequestKind) -> list[tuple[float, float]]:
        """The (predicted, true) log-length pairs the kind's fit stands on, oldest first."""
        return list(self._pairs[kind])

    def _centre_and_slope(self, kind: RequestKind) -> tuple[float, float]:
        x, y = np.asarray(self._pairs[kind]).T
        slope = np.polyfit(x, y, 1)[0] if np.ptp(x) > 0 else 0.0     # all said alike: they tell nothing apart
        return float(x.mean()), float(np.clip(slope, 0.0, 1.0))

    def slope(self, kind: RequestKind) -> float:
        """How much of a prediction's difference from its kind's centre is served: 1 for the best-ranked kind (and
        for any kind while fewer than min_pairs of it have finished), its slope relative to that kind's for the
        others; 0: all of the kind at its centre."""
        return self._pulled.get(kind, (0.0, 1.0))[1]

    def pull(self, mu: np.ndarray, side: np.ndarray) -> np.ndarray:
        """The log medians `mu` of requests with side features `side`, each pulled toward its kind's centre by
        slope(kind)."""
        out = np.array(mu, dtype=np.float64)
        if self._pulled:
            masks = kinds_of(side)
            for kind, (centre, slope) in self._pulled.items():
                out[masks[kind]] = centre + slope * (out[masks[kind]] - centre)
        return out
