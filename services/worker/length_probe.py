"""How long a job will run, read from the served model's own hidden state (TRAIL-style), learned online.

The prompt-only predictor sees text; the worker sees what the model itself made of it. At the step that
completes a fresh job's prompt, the runner takes layer L's normalised hidden state at the last prompt token (the
state the first output token is sampled from) and multiplies it by a fixed random projection to `dims` numbers
(one small matmul on the device; the features travel to the host with the sampled ids). A ridge regression from
those features to log(output tokens) is fitted from this worker's own finished jobs: only jobs that stopped by
themselves (EOS or a stop string) teach it, since a job cut at max_tokens or run with ignore_eos says nothing
about where the model would have stopped. Until `min_observations` jobs have taught it, it estimates nothing.

bench/hidden_state_length.py measured the idea offline (SmolLM2, Alpaca): Kendall tau 0.585 from transformers'
hidden_states[15] (layer 14's raw output, all 576 dims) against 0.355 from the prompt predictor's embedding, before
the first token. These features differ (layer 15's output normalised, 128 random projections): measured live on
CPU they gave 0.459 against the prompt predictor's 0.304 (docs/BENCHMARKS.md).

Written here rather than taken from scikit-learn: the fit is a running sum of outer products and one small solve
(no training set is kept), and the worker must not depend on scikit-learn.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import torch

DIMS = 128                 # random features kept from the hidden state
RIDGE = 1.0                # L2 penalty, relative to the features' mean square
MIN_OBSERVATIONS = 64      # finished jobs before it estimates anything (ridge keeps a fit on fewer than DIMS sane)
MAX_ESTIMATE = 1 << 20     # tokens: an extrapolated exp() is clipped (no output is longer than a context)
REFIT_EVERY = 16           # observations between solves
SAVE_EVERY = 64            # observations between saves, when it has a path (a multiple of REFIT_EVERY)

log = logging.getLogger("alise.worker")


class LengthProbe:
    def __init__(self, hidden_size: int, layer: int, device: torch.device, dtype: torch.dtype, *,
                 dims: int = DIMS, seed: int = 0, path: Path | None = None,
                 min_observations: int = MIN_OBSERVATIONS, read_only: bool = False, model: str = ""):
        self.layer = layer
        self.model = model         # which model's states it learned from (a saved state of another is refused)
        self.learn = True          # False: frozen, it estimates from what it has learned so far
        self.read_only = read_only # loads `path` but never writes it
        self.dims = dims
        self.path = path
        self.min_observations = min_observations
        gen = torch.Generator().manual_seed(seed)
        # N(0, 1/H) entries keep the projected features at about the scale of the normalised state's entries
        proj = torch.randn(hidden_size, dims, generator=gen) / math.sqrt(hidden_size)
        self.projection = proj.to(device=device, dtype=dtype)
        self._seed, self._hidden = seed, hidden_size
        self._xx = np.zeros((dims, dims))     # sums over observations: x x^T, x, y, y^2, count
        self._x = np.zeros(dims)
        self._xy = np.zeros(dims)
        self._y = 0.0
        self.count = 0
        self._weights: tuple[np.ndarray, float] | None = None
        if path is not None and path.exists():
            self._load(path)

    # -- on the device, inside the runner's forward -------------------------------------------------
    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """[S, hidden] states -> [S, dims] fp32 features."""
        return (hidden @ self.projection).float()

    # -- on the host --------------------------------------------------------------------------------
    def observe(self, features: np.ndarray, output_tokens: int) -> None:
        """A job that stopped by itself after `output_tokens` tokens, with the features taken at its prompt."""
        x, y = np.asarray(features, dtype=np.float64), math.log(max(1, output_tokens))
        if not self.learn or not np.isfinite(x).all():      # a non-finite row would poison the sums for good
            return
        self._xx += np.outer(x, x)
        self._x += x
        self._xy += x * y
        self._y += y
        self.count += 1
        if self.count % REFIT_EVERY == 0 or (self._weights is None and self.count >= self.min_observations):
            self._weights = self._solve()
        if self.path is not None and not self.read_only and self.count % SAVE_EVERY == 0:
            try:
                self.save(self.path)
            except OSError as e:    # a missing, read-only or full volume: learning goes on (this runs inside a step)
                log.warning("length probe not saved to %s: %s", self.path, e)

    def estimate(self, features: np.ndarray) -> float | None:
        """Output tokens of a job whose prompt gave `features`, as exp of the regressed log length (a median, not a
        mean); None while it has learned too little."""
        if self._weights is None:
            return None
        w, intercept = self._weights
        z = float(np.asarray(features, dtype=np.float64) @ w) + intercept
        if not math.isfinite(z):
            return None
        return math.exp(min(max(z, 0.0), math.log(MAX_ESTIMATE)))

    def _solve(self) -> tuple[np.ndarray, float] | None:
        if self.count < self.min_observations:
            return None
        n = self.count
        mx, my = self._x / n, self._y / n
        cov = self._xx / n - np.outer(mx, mx)              # centred: the intercept is not penalised
        cxy = self._xy / n - mx * my
        scale = max(float(np.trace(cov)) / self.dims, 1e-12)
        w = np.linalg.solve(cov + (RIDGE * scale / math.sqrt(n)) * np.eye(self.dims), cxy)
        return w, float(my - mx @ w)

    # -- persistence (a restarted worker keeps what it learned) --------------------------------------
    def save(self, path: Path) -> None:
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.npz")     # workers sharing a path never share it
        try:
            np.savez(tmp, xx=self._xx, x=self._x, xy=self._xy, y=self._y, count=self.count,
                     meta=np.array([self.layer, self.dims, self._seed, self._hidden]), model=np.array(self.model))
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)       # a part written to a full volume must not keep its room
            raise

    def _load(self, path: Path) -> None:
        with np.load(path) as z:
            if tuple(z["meta"]) != (self.layer, self.dims, self._seed, self._hidden):
                raise ValueError(f"{path}: a length probe of another layer, size or seed "
                                 f"(layer, dims, seed, hidden = {tuple(z['meta'])})")
            if (saved := str(z["model"])) != self.model:       # same shape, another model: its states differ
                raise ValueError(f"{path}: a length probe learned on model {saved!r}, not {self.model!r}")
            self._xx, self._x, self._xy = z["xx"], z["x"], z["xy"]
            self._y, self.count = float(z["y"]), int(z["count"])
        self._weights = self._solve()
