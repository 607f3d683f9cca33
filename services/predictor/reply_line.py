"""A conversation's next reply length from its previous reply's and the newest message's:
ln L = a + b ln(1 + previous reply tokens) + c (min(ln(1 + newest message characters), 4) - 4).

In chat traffic a request carries the conversation so far, and the assistant's previous reply there is the best
single clue to how long the next one will be: on the 3,000 chat turns of the GPU benchmark its length alone ranks
the next reply at Kendall tau 0.43, where the live predictor (kNN and MLP blended, learning online; the MLP has
that length as one input beside a 384-wide embedding and learned from a few hundred conversation turns) ranked the
same requests at 0.28
(docs/BENCHMARKS.md, session 34). So the predictor fits this line by least squares on the turns it has seen that
had a previous reply, and blends it into its estimate for requests that have one (`PredictorParams.reply_weight`,
chosen on validation data like the kNN weight).

The third term is for "Thanks!", "hey", "This is wrong." after a long reply: on the GPU benchmark's chat turns
with a previous reply, a newest message under 30 characters is answered with a median of 172 tokens against 274 for
the rest, and by the previous reply alone both were predicted ~300; those short jobs, queued behind longer ones,
made the live p99 of normalized latency (docs/BENCHMARKS.md, sessions 35 and 36). The term is 0 for a message past
the cap (or unknown) and negative below it, so `a` means the same with or without it: a build from before the term
that loads these parameters (it ignores c) predicts ordinary turns as this one does.

Hand-written: a three-column least squares is one `np.linalg.lstsq`; a library would add nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.predictor.length_mlp import has_previous_reply, newest_message_log, previous_reply_log

MIN_TURNS = 20          # fewer conversation turns than this fit no line (its slope would be noise)
TRUSTED_TURNS = 100     # a line from this many turns replaces any other; one from fewer only a line from fewer still
MIN_SD = 0.1            # a floor on the line's spread, as on the other parts' (a perfect fit is luck)
# a longer previous reply never means a shorter next one, nor more than proportionally longer (ShareGPT: 0.51-0.54):
# a slope outside this range is noise from few turns or a narrow range of previous lengths, and would extrapolate
SLOPE_RANGE = (0.0, 1.5)
# a shorter newest message never asks for a longer reply, nor shortens it more than proportionally to its length
# (fitted on ShareGPT: 0.18-0.19); outside this range c is noise, e.g. from one short message among few turns
NEWEST_SLOPE_RANGE = (0.0, 1.0)


@dataclass(frozen=True)
class ReplyLine:
    a: float            # intercept, log tokens
    b: float            # slope on ln(1 + previous reply tokens)
    sd: float           # residual standard deviation of log length
    turns: int          # how many turns with a previous reply it was fitted on
    c: float = 0.0      # slope on the newest message's term, length_mlp.newest_message_log (0: none fitted)

    def log_length(self, side: np.ndarray) -> np.ndarray:
        return self.a + self.b * previous_reply_log(side) + self.c * newest_message_log(side)


def fit_reply_line(side: np.ndarray, log_len: np.ndarray) -> ReplyLine | None:
    """The line through the requests that had a previous reply, or None with too few of them (or all alike)."""
    has = has_previous_reply(side)
    if has.sum() < MIN_TURNS:
        return None
    x, m = previous_reply_log(side)[has], newest_message_log(side)[has]
    y = np.asarray(log_len, dtype=np.float64)[has]
    if np.ptp(x) == 0:
        return None
    # too few turns with a short newest message (most are past the cap, or unknown): its slope would be noise, so the
    # line goes without the term
    with_term = (m < 0).sum() >= MIN_TURNS
    coef = _least_squares([x, m] if with_term else [x], y)
    b = float(np.clip(coef[1], *SLOPE_RANGE))
    # c stays the joint fit's where b was clipped: refitted at the clipped b, it would take up what b could not say
    # (short messages tend to follow short replies) and run to its bound (tried in session 36's re-read)
    c = float(np.clip(coef[2], *NEWEST_SLOPE_RANGE)) if with_term else 0.0
    a = float((y - b * x - c * m).mean())       # least squares for the intercept at those slopes
    fitted = a + b * x + c * m
    return ReplyLine(a, b, max(float(np.std(y - fitted)), MIN_SD), int(has.sum()), c)


def _least_squares(columns: list[np.ndarray], y: np.ndarray) -> np.ndarray:
    """Coefficients of y on an intercept and the columns, intercept first."""
    design = np.column_stack([np.ones(len(y)), *columns])
    return np.linalg.lstsq(design, y, rcond=None)[0]


def replaces(new: ReplyLine | None, turns_now: int) -> bool:
    """Whether a line just fitted should replace one fitted on `turns_now` turns (0: none). After a restart the
    online refresh fits on the turns served since, which may be far fewer than the saved line was fitted on."""
    return new is not None and new.turns >= min(turns_now, TRUSTED_TURNS)
