"""Each worker's speed, learned from its own step reports, and the throughput knee that admission uses.

    step seconds ~ base + per_seq * sequences + per_prefill_token * prefill tokens + per_context_token * context read
                   + per_mixed_step * (1 if the step ran prefill chunks)

The last term is the fixed price of a mixed step: on a GPU a pure decode step replays a CUDA graph, a step with
prefill chunks launches its kernels one by one, whatever its size (on the CPU worker it fits to ~12 ms; not yet
measured on the H200). Under steady arrivals most steps are mixed; the simulator, which uses the same model, ran
an H200 2-5x faster than it serves without the term (docs/BENCHMARKS.md), which is why it was added.

A load report carries the worker's recent steps one by one (a row may also sum several steps): each is one
linear equation in the five constants. Single steps vary in size as jobs join, leave and prefill, which is what
tells the terms apart (sums over many steps blur it). The last WINDOW rows are solved by least squares (numpy),
with every constant kept >= 0 (a negative one is dropped and the rest solved again); when every step is mixed
(or none is) the mixed term cannot be told from the base and stays inside it. While the reports cannot tell the constants apart (every
step the same size, too few reports), there is no model and admission uses the worker's max batch.

The knee. A batch of B decoding sequences with mean context c takes base + B * k seconds per step, with
k = per_seq + per_context_token * c, so its throughput B / (base + B * k) rises with B and flattens once B * k
outweighs base. The knee is the smallest B whose throughput is within `share` of the max batch's; running more
only slows every running job down for little extra throughput, so further jobs wait at the scheduler, where the
policy orders them. When the engine gets faster per sequence (k falls) the knee moves up on its own.
"""
from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass, replace

WINDOW = 512           # step rows the model is fitted to
SAMPLE = 1024          # step rows kept as a uniform sample of the whole session (GetLoad's step_sample)
MIN_REPORTS = 8
REFIT_EVERY = 64       # new rows before the model is solved again (a solve costs ~0.3 ms; steps come ~100/s)
MAX_CONDITION = 1e6    # of the scaled design matrix: beyond it the reports do not separate the constants
MIN_ADMIT = 4          # never admit fewer than this many sequences (a noisy fit must not starve a worker)


@dataclass(frozen=True)
class StepSums:
    """One engine step (steps = 1), or several summed."""
    steps: int
    seconds: float
    seqs: int
    prefill_tokens: int
    context_tokens: int
    mixed_steps: int = 0          # of `steps`, those that ran prefill chunks
    device_seconds: float = 0.0   # on a GPU, the device's time running them (seconds is the engine's wall time)
    prefill_pairs: int = 0        # query-key pairs their prefill chunks' attention computed (sampled for the
                                  # simulator's step cost; the admission model here does not fit it)


@dataclass(frozen=True)
class StepModel:
    base_s: float
    per_seq_s: float
    per_prefill_token_s: float
    per_context_token_s: float
    per_mixed_step_s: float = 0.0

    def step(self, seqs: float, prefill_tokens: float, context_tokens: float, mixed: float = 0.0) -> float:
        """One step's seconds; `mixed` is 1 for a step with prefill chunks (or the share of such steps)."""
        return (self.base_s + self.per_seq_s * seqs + self.per_prefill_token_s * prefill_tokens
                + self.per_context_token_s * context_tokens + self.per_mixed_step_s * mixed)

    def knee(self, max_batch: int, mean_context: float, share: float, mixed_share: float = 0.0) -> int:
        """The smallest batch whose decode throughput is within `share` of max_batch's. The fixed cost of a step is
        the base plus the mixed-step extra as often as steps are mixed: so the knee does not jump when the fit
        folds that extra into the base (every recent step mixed) or separates it again."""
        k = self.per_seq_s + self.per_context_token_s * mean_context
        fixed = self.base_s + self.per_mixed_step_s * mixed_share
        if fixed <= 0 or k <= 0:
            return max_batch                  # no fixed cost, or no cost per sequence: nothing to learn from
        b = share * max_batch * fixed / (fixed + max_batch * k * (1 - share))
        return max(min(MIN_ADMIT, max_batch), min(max_batch, math.ceil(b - 1e-9)))


class WorkerSpeed:
    def __init__(self, window: int = WINDOW):
        if window < MIN_REPORTS:
            raise ValueError(f"window must be at least {MIN_REPORTS} rows, got {window}")
        self._rows: deque[StepSums] = deque(maxlen=window)
        self._sample = StepReservoir(SAMPLE)
        self._model: StepModel | None = None
        self._new = 0                 # rows since the last solve
        # running totals over the rows, so that the share of mixed steps costs nothing per load report
        self._steps = 0
        self._mixed = 0

    def observe(self, sums: StepSums) -> None:
        # a row with no steps, no time, or a time that is not a number (a worker's clock or a bad report) teaches
        # nothing; an infinite one kept in the window would leave the fit unsolvable until it fell out
        if sums.steps > 0 and 0 < sums.seconds < math.inf:
            if not 0 <= sums.device_seconds < math.inf:     # likewise a device time: kept as unknown (0)
                sums = replace(sums, device_seconds=0.0)
            if len(self._rows) == self._rows.maxlen:
                old = self._rows[0]           # about to fall out of the window
                self._steps -= old.steps
                self._mixed -= old.mixed_steps
            self._rows.append(sums)
            self._sample.offer(sums)
            self._steps += sums.steps
            self._mixed += sums.mixed_steps
            self._new += 1

    def sample(self) -> list[StepSums]:
        """A uniform sample of every row observed since the worker joined (the window holds only the last ones)."""
        return self._sample.rows()

    def mixed_share(self) -> float:
        """The share of the recent steps that were mixed."""
        return self._mixed / self._steps if self._steps else 0.0

    def model(self) -> StepModel | None:
        if self._new >= REFIT_EVERY or (self._model is None and self._new >= MIN_REPORTS):
            self._new = 0
            self._model = fit(list(self._rows))
        return self._model


class StepReservoir:
    """A uniform sample of a stream of rows (reservoir sampling, Vitter's algorithm R): each row seen so far is
    kept with the same probability, in O(1) per row. Seeded, so a run gives the same sample each time."""

    def __init__(self, size: int, seed: int = 0):
        self.size = size
        self.seen = 0
        self._kept: list[StepSums] = []
        self._rng = random.Random(seed)

    def offer(self, row: StepSums) -> None:
        self.seen += 1
        if len(self._kept) < self.size:
            self._kept.append(row)
        elif (i := self._rng.randrange(self.seen)) < self.size:
            self._kept[i] = row

    def rows(self) -> list[StepSums]:
        return list(self._kept)


def fit(rows: list[StepSums]) -> StepModel | None:
    if len(rows) < MIN_REPORTS:
        return None
    import numpy as np     # the scheduler's only numeric dependency; imported where it is used

    a = np.array([[r.steps, r.seqs, r.prefill_tokens, r.context_tokens, r.mixed_steps] for r in rows], dtype=float)
    y = np.array([r.seconds for r in rows])
    active = [i for i in range(4) if a[:, i].any()]
    if a[:, 4].any() and (a[:, 4] != a[:, 0]).any():
        active.append(4)                      # some steps mixed, some not: the mixed term can be told apart
    while active:
        sub = a[:, active]
        scale = np.abs(sub).max(axis=0)
        if np.linalg.cond(sub / scale) > MAX_CONDITION:
            if 4 not in active:
                return None
            active.remove(4)                  # too few pure decode (or mixed) steps to tell it from the base
            continue
        coef = np.linalg.lstsq(sub / scale, y, rcond=None)[0] / scale
        if (coef >= 0).all():
            break
        active.pop(int(np.argmin(coef)))      # a negative constant: drop it, solve for the rest
    else:
        return None
    if 0 not in active:
        return None                           # no fixed part: the knee would be meaningless
    full = dict(zip(active, coef))
    return StepModel(*(float(full.get(i, 0.0)) for i in range(5)))
